"""The modeling code an lrc output carries, so it loads with transformers alone (no lrc installed).

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)   # AutoModel for an encoder

Written into the output folder:
- `lrc_<module>.py`: every module of lrc/forms that defines a registered layer form, and the sibling
  modules they import, copied from lrc's source at write time (only their `from .x import` lines are
  renamed to `.lrc_x`), so the folder's layers are lrc's layers byte for byte. A form module that imports
  anything but torch, transformers, Triton (optional there), the standard library or its siblings is refused: the folder could not
  run without lrc.
- `modeling_lrc.py`: one class per checkpoint, `Lrc<Class>`, deriving from the transformers class lrc
  loaded (`LlamaForCausalLM`, `GPT2LMHeadModel`, `BertModel`, ...). Its `__init__` builds that model, unfuses
  the experts lrc stored unfused (the functions of lrc.model.experts, copied from source), and swaps the
  linears (nn.Linear or GPT-2's Conv1D) named in config.json's layer map for the empty layers of their
  form; the weights then load by name like any other.
- config.json: `auto_map` {"AutoModelForCausalLM" (or "AutoModel"): "modeling_lrc.Lrc<Class>"}.

The layer map stays in `quantization_config` (quant_method "lrc"), which `import lrc` turns into its
transformers quantizer. With remote code the class's `from_pretrained` takes the map out of the config
before transformers sees it, so transformers neither warns about an unknown quantization method (lrc
absent) nor runs lrc's quantizer on top of the swapped layers (lrc imported); the map is put back on the
loaded model's config, so `save_pretrained` writes an lrc checkpoint again. Any tensor missing, unexpected
or misshapen in the files is an error there (transformers would only warn and fill it at random).
Without `trust_remote_code`, transformers keeps its own class, so `lrc.load` is unchanged.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LrcError

MODELING_FILE = "modeling_lrc.py"
FORM_FILE_PREFIX = "lrc_"
REQUIRED_PACKAGES = {"torch", "transformers"}
# imported inside a `try:` only, the module imported where they are present: transformers' check of a
# checkpoint's remote code skips imports in try blocks, so an output loads without them (torch's CPU build has
# no Triton)
OPTIONAL_PACKAGES = {"triton"}
SIBLING_IMPORT = re.compile(r"^(\s*from\s+)\.(\w+)(\s+import)", flags=re.MULTILINE)


def form_module_files(extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """{module name in lrc.forms: source file} of every module a registered layer form (or an `extra` module
    of lrc.forms) needs, in import order (a module after the siblings it imports). Raises LrcError for an
    import the output could not satisfy."""
    from .. import forms

    package = Path(forms.__file__).parent
    ordered: dict[str, Path] = {}

    def visit(name: str, seen: tuple[str, ...]) -> None:
        if name in ordered or name in seen:
            return
        path = package / f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported, guarded in _package_imports(tree):
            _check_package(imported, guarded, path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level == 1 and node.module:
                    visit(node.module, (*seen, name))
                elif node.level == 1:  # from . import sibling
                    for alias in node.names:
                        if not (package / f"{alias.name}.py").is_file():
                            raise LrcError(f"layer form module {path.name} imports {alias.name} from lrc.forms' "
                                           "__init__: the output's modeling code could not run without lrc")
                        visit(alias.name, (*seen, name))
                else:
                    raise LrcError(f"layer form module {path.name} imports {'.' * node.level}{node.module or ''}, "
                                   "outside lrc/forms: the output's modeling code could not run without lrc")
        ordered[name] = path

    for kind in forms.LAYER_FORMS.names():
        module = sys.modules[forms.LAYER_FORMS.get(kind).__module__]
        visit(module.__name__.rpartition(".")[2], ())
    for name in extra:
        visit(name, ())
    return ordered


def _package_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level package, whether the import sits in a try block) of each absolute import of a module."""
    guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try)
               for statement in block.body for node in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(((node.module or "").split(".")[0], id(node) in guarded))
    return found


def _check_package(package: str, guarded: bool, path: Path) -> None:
    if package in OPTIONAL_PACKAGES and not guarded:
        raise LrcError(f"layer form module {path.name} imports {package} outside a try block: the output's modeling "
                       f"code would not load where {package} is not installed")
    if package not in REQUIRED_PACKAGES | OPTIONAL_PACKAGES and package not in sys.stdlib_module_names:
        raise LrcError(f"layer form module {path.name} imports {package}: the output's modeling code may import "
                       "only torch, transformers, triton and the standard library")


def _import_by_name(module: str, path: Path) -> str:
    """The line of modeling_lrc.py that imports a copied module; in a try block where the module needs an
    optional package (it is then imported where that package is present, as lrc imports it)."""
    line = f"from .{FORM_FILE_PREFIX}{module} import __name__ as _{module}  # noqa: F401"
    if not any(package in OPTIONAL_PACKAGES for package, _ in _package_imports(ast.parse(path.read_text(encoding="utf-8")))):
        return line
    return f"try:  # needs an optional package\n    {line}\nexcept ImportError:\n    pass"


def copied_source(path: Path) -> str:
    """A form module's source as written into the output: its sibling imports renamed to the lrc_ copies
    (`from .x import` -> `from .lrc_x import`, `from . import x` -> `from . import lrc_x as x`)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            if node.end_lineno != node.lineno:
                raise LrcError(f"layer form module {path.name}: write `from . import` on one line")
            line = lines[node.lineno - 1]
            indent = line[: len(line) - len(line.lstrip())]
            names = ", ".join(f"{FORM_FILE_PREFIX}{a.name} as {a.asname or a.name}" for a in node.names)
            lines[node.lineno - 1] = f"{indent}from . import {names}\n"
    return SIBLING_IMPORT.sub(rf"\1.{FORM_FILE_PREFIX}\2\3", "".join(lines))


def fused_groups(model: nn.Module) -> list[list[str]]:
    """Full names of the compressed layers that read one input (the adapter's shared_inputs, per block),
    for lrc.forms.fused when this lrc has it; [] otherwise."""
    import importlib.util

    from ..model.adapters import adapter_for

    if importlib.util.find_spec(f"{__package__.rpartition('.')[0]}.forms.fused") is None:
        return []
    from ..forms import LAYER_FORMS

    forms = tuple(LAYER_FORMS.get(kind) for kind in LAYER_FORMS.names())
    adapter = adapter_for(model)
    stack_name, stack = adapter.layer_stack(model)
    groups = []
    for index, block in enumerate(stack):
        for group in adapter.shared_inputs:
            if any(any(c in name for c in "*?[") for name in group):
                continue  # per-expert groups are not fused
            names = [name for name in group if isinstance(_submodule(block, name), forms)]
            if len(names) > 1:
                groups.append([f"{stack_name}.{index}.{name}" for name in names])
    return groups


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def form_classes() -> dict[str, tuple[str, str]]:
    """{form kind: (module name in lrc.forms, class name)} of every registered layer form."""
    from ..forms import LAYER_FORMS

    return {kind: (LAYER_FORMS.get(kind).__module__.rpartition(".")[2], LAYER_FORMS.get(kind).__name__)
            for kind in LAYER_FORMS.names()}


def expert_layout(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """{module name: (gate, up, down) names} of the experts lrc holds unfused in `model`."""
    from ..model.experts import UnfusedExperts

    layout: dict[str, tuple[str, str, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts) and len(module) > 0:
            first: Any = module[0]
            layout[name] = tuple(first.names)
    return layout


def modeling_source(model_class: type, auto_class: str, experts: dict[str, tuple[str, str, str]],
                    fused: list[list[str]] | None = None, build_flags: dict[str, bool] | None = None) -> str:
    """The text of modeling_lrc.py for a model of `model_class` (a transformers class) loaded by `auto_class`,
    built with `build_flags` (the model's __init__ arguments that leave out a part, e.g. BERT's pooler)."""
    from .. import __version__
    from ..model import experts as experts_module

    # every copied module imported by name, so that transformers copies each one next to this file
    imports = "\n".join(_import_by_name(module, path) for module, path in form_module_files(("fused",)).items())
    imports += "\n" + "\n".join(f"from .{FORM_FILE_PREFIX}{module} import {cls}" for module, cls in form_classes().values())
    imports += f"\nfrom .{FORM_FILE_PREFIX}fused import fuse_down_factors, release_freed_heap"
    fuse = ("\n        for group in FUSED_GROUPS:\n            fuse_down_factors([model.get_submodule(name) for name in group])"
            if fused else "")
    fuse += "\n        release_freed_heap()  # what loading freed (converted copies, stacked factors) back to the OS"
    forms = ",\n    ".join(f"{kind!r}: {cls}" for kind, (_, cls) in form_classes().items())
    expert_code = ""
    if experts:
        parts: list[Any] = [experts_module.ExpertMLP, experts_module.UnfusedExperts, experts_module.is_fused_experts,
                 experts_module.unfuse_experts]
        expert_code = ("\n\nclass ModelLoadError(ValueError):\n    \"\"\"The checkpoint does not fit the model.\"\"\"\n\n\n"
                       + "\n\n".join(inspect.getsource(part) for part in parts))
    return _WRAPPER.format(
        version=__version__, auto_class=auto_class, base=model_class.__name__, imports=imports, forms=forms,
        experts=json.dumps({k: list(v) for k, v in experts.items()}, indent=4), expert_code=expert_code,
        fused=json.dumps(fused or [], indent=4), fuse=fuse, build_flags=repr(build_flags or {}),
    )


def write_remote_code(model: nn.Module, folder: Path) -> list[Path]:
    """Write the modeling files into `folder` and add `auto_map` to its config.json; return the files written."""
    import transformers

    from ..model.adapters import adapter_for

    model_class = type(model)
    if getattr(transformers, model_class.__name__, None) is not model_class:
        raise LrcError(f"{model_class.__name__} is not a class of transformers {transformers.__version__}: "
                       "lrc cannot write modeling code that loads this output without lrc")
    adapter = adapter_for(model)
    auto_class = adapter.auto_class
    written = []
    fused = fused_groups(model)
    for name, path in form_module_files(("fused",)).items():
        target = folder / f"{FORM_FILE_PREFIX}{name}.py"
        target.write_text(copied_source(path), encoding="utf-8")
        written.append(target)
    modeling = folder / MODELING_FILE
    modeling.write_text(modeling_source(model_class, auto_class, expert_layout(model), fused,
                                        adapter.left_out_flags(model)), encoding="utf-8")
    written.append(modeling)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {auto_class: f"{MODELING_FILE.removesuffix('.py')}.Lrc{model_class.__name__}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


_WRAPPER = '''"""Loads this lrc checkpoint with transformers alone: {auto_class}.from_pretrained(folder, trust_remote_code=True).

Written by lrc {version}. The layers are lrc's own (the lrc_*.py files next to this one, copied from lrc's
source); this file builds transformers' {base}, stores the experts unfused as lrc wrote them, and swaps the
linears named in config.json's quantization_config (the layer map) for those layers before the weights load.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

{imports}

LAYER_FORMS = {{
    {forms},
}}
# {{experts module name: its (gate, up, down) projection names}}: fused experts lrc stores one matrix each
UNFUSED_EXPERTS: dict[str, list[str]] = {experts}
# layers reading one input whose first factors share one matmul after loading (lrc's forms/fused.py)
FUSED_GROUPS: list[list[str]] = {fused}
# arguments of {base}.__init__ that leave out a part lrc's output has no weights for (e.g. BERT's pooler)
BUILD_FLAGS: dict[str, bool] = {build_flags}{expert_code}


def layer_map(config: Any) -> dict[str, dict[str, Any]]:
    """{{module name: layer spec}} of the compressed layers, from the config's lrc layer map."""
    stored = getattr(config, "lrc_layer_map", None) or getattr(config, "quantization_config", None) or {{}}
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    if stored and stored.get("quant_method") != "lrc":
        raise ValueError(f"config.json's quantization_config is {{stored.get('quant_method')!r}}, not an lrc layer map")
    specs = {{name: {{"kind": "low-rank", "rank": rank}} for name, rank in stored.get("ranks", {{}}).items()}}
    return specs | dict(stored.get("sparse", {{}}))


def build_compressed_layers(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Unfuse the experts, then put an empty layer of its form where each named linear is."""
    for name, names in UNFUSED_EXPERTS.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        fused = getattr(owner, child)
        if is_fused_experts(fused):
            setattr(owner, child, unfuse_experts(fused, tuple(names), name))
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            in_features, out_features = linear.in_features, linear.out_features
        elif isinstance(linear, Conv1D):  # y = x A + b, A stored in x out
            in_features, out_features = linear.weight.shape
        else:
            raise ValueError(f"the layer map names {{name}}, which is not a linear layer of {{type(model).__name__}}")
        if spec.get("kind") not in LAYER_FORMS:
            raise ValueError(f"{{name}} has layer form {{spec.get('kind')!r}}, not one of {{sorted(LAYER_FORMS)}}")
        weight = linear.weight
        layer = LAYER_FORMS[spec["kind"]].skeleton(
            in_features, out_features, spec, linear.bias is not None, weight.device, weight.dtype
        )
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, layer)
        owner._is_hf_initialized = True  # every tensor here comes from the files: no init reaching for .weight


class LrcCompressed:
    """Builds the parent class's model with lrc's compressed layers in place."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **(BUILD_FLAGS | kwargs))
        build_compressed_layers(self, layer_map(config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        if config is None or not isinstance(config, transformers.PretrainedConfig):
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path)
        config = copy.deepcopy(config)
        stored = getattr(config, "quantization_config", None)
        stored = stored if stored is None or isinstance(stored, dict) else stored.to_dict()
        if stored is not None:
            del config.quantization_config  # the layers are built here, not by a quantizer
            config.lrc_layer_map = stored
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(  # type: ignore[misc]
            pretrained_model_name_or_path, *args, config=config, output_loading_info=True, **kwargs
        )
        problems = [f"{{what}}: {{', '.join(sorted(str(k) for k in info.get(key) or []))}}"
                    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                                      ("mismatched_keys", "misshapen")) if info.get(key)]
        if problems:
            raise ValueError(f"{{pretrained_model_name_or_path}} does not match its lrc layer map ({{'; '.join(problems)}})")
        if stored is not None:
            del model.config.lrc_layer_map
            model.config.quantization_config = stored{fuse}
        return (model, info) if wants_info else model


class Lrc{base}(LrcCompressed, transformers.{base}):
    pass
'''

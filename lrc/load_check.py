"""Refusing a checkpoint that would load with weights made up: every tensor the architecture expects must be
in the files with its shape, and every tensor in the files must be used.

transformers fills a missing tensor with random values and only logs it; lrc turns its load report
(`from_pretrained(..., output_loading_info=True)`) into an error naming the tensors. Tied weights (an
lm_head sharing the embedding) are legitimately absent and transformers does not report them. lrc
outputs are also checked, before any weight is read, against the rank map in their config.json (see
`check_factor_tensors`, called by the `lrc` transformers quantizer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

# tensors of lrc's factorized layers (LowRankLinear, SparseDictionaryLinear, LowRankSparseLinear) by module
FACTOR_NAME = re.compile(
    r"^(?P<module>.+)\.(down|up|atoms|mixing|residual)\.(weight|bias|values|col_indices|row_offsets|bitmask)$"
)
SHOWN = 4


def name_some(keys: Iterable[str]) -> str:
    """'a, b, c, d and 5 more' for a collection of tensor names (sorted)."""
    keys = sorted(keys)
    head = ", ".join(keys[:SHOWN])
    return head + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' of an exception from a library, on one line (whitespace collapsed) and at most `limit` chars."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_loading_info(folder: Path, model: Any, info: dict[str, Any]) -> None:
    """Raise ModelLoadError when transformers' load report has missing, unexpected or misshapen tensors."""
    from .model.adapters import adapter_for

    heads = adapter_for(model).unused_heads  # a task head the loaded class does not build: left out, not filled
    missing = set(info.get("missing_keys") or ())
    unexpected = {k for k in info.get("unexpected_keys") or () if not k.startswith(heads)}
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if info.get("error_msgs"):
        raise ModelLoadError(f"transformers cannot load {folder}: {'; '.join(info['error_msgs'])}")
    if not (missing or unexpected or mismatched):
        return
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    factor_modules = {m.group("module") for k in unexpected if (m := FACTOR_NAME.match(k))}
    if (factor_modules or (folder / "lrc_report.yaml").is_file()) and quant is None:
        raise ModelLoadError(
            f"{folder} is an lrc output but its config.json has no quantization_config (the rank map), so its "
            f"factor tensors ({name_some(k for k in unexpected if FACTOR_NAME.match(k))}) cannot be placed: "
            "restore config.json from the original output"
        )
    declared = list(getattr(config, "architectures", None) or [])
    built = type(model).__name__
    if missing and declared and not any(a == built or a.endswith(("ForCausalLM", "LMHeadModel")) for a in declared):
        raise ModelLoadError(
            f"{folder} holds a {declared[0]}, which has no language-model head: loading it as {built} would "
            f"leave {name_some(missing)} random; give the checkpoint with its head"
        )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the {built} architecture needs: {name_some(missing)}")
    if mismatched:
        shown = ", ".join(f"{k} (file {list(a)}, model {list(b)})" for k, a, b in mismatched[:SHOWN])
        more = f" and {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape: {shown}{more}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the {built} architecture does not have: {name_some(unexpected)}")
    raise ModelLoadError(f"{folder} does not match its config.json: {'; '.join(problems)}; "
                         "refusing to fill or drop weights (is config.json from another checkpoint?)")


def checkpoint_shapes(files: Iterable[str | Path]) -> dict[str, list[int]]:
    """{tensor name: shape} from the headers of safetensors files (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise ModelLoadError(f"{path} is not a safetensors file; lrc never loads pickle weights")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = list(handle.get_slice(name).get_shape())
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError
            raise ModelLoadError(f"cannot read {path}: corrupt or truncated safetensors file ({exc})") from None
    return shapes


def check_factor_tensors(model: Any, files: Iterable[str | Path], layers: Iterable[str]) -> None:
    """Before weights load into an lrc skeleton: each factorized layer's tensors are in the files with the
    skeleton's shapes, and no file holds factor tensors of a layer the rank map does not name.

    model: the skeleton (factorized layers already swapped in, on the meta device); layers: the names in
    the rank map (ranks and sparse specs).
    """
    files = list(files)
    shapes = checkpoint_shapes(files)
    where = Path(str(files[0])).parent if files else Path(".")
    layers = set(layers)
    expected = {f"{name}.{k}": list(v.shape) for name in sorted(layers) for k, v in model.get_submodule(name).state_dict().items()}
    missing = sorted(k for k in expected if k not in shapes)
    if missing:
        raise ModelLoadError(f"lrc output {where} lacks factor tensor(s) its rank map needs: {name_some(missing)} "
                             "(the checkpoint is incomplete)")
    wrong = [f"{k} (file {shapes[k]}, rank map {v})" for k, v in expected.items() if shapes[k] != v]
    if wrong:
        raise ModelLoadError(f"lrc output {where}: factor tensor(s) do not match the rank map in config.json: "
                             f"{', '.join(wrong[:SHOWN])}")
    unmapped = sorted({m["module"] for k in shapes if (m := FACTOR_NAME.match(k)) and m["module"] not in layers
                       and _is_plain_linear(model, m["module"])})
    if unmapped:
        raise ModelLoadError(f"lrc output {where} holds factor tensors of {name_some(unmapped)}, which the rank "
                             "map in config.json (quantization_config) does not list: restore config.json")


def check_skeleton_against_files(model: Any, files: Iterable[str | Path]) -> None:
    """Every tensor of the skeleton `model` but tied ones is in the files, and every file tensor is one of its.

    Used for lrc outputs, whose files hold the model's own state_dict names (lrc wrote them).
    """
    files = list(files)
    shapes = checkpoint_shapes(files)
    where = Path(str(files[0])).parent if files else Path(".")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    names = set(model.state_dict())
    missing = sorted(k for k in names - tied - set(shapes) if not any(p.search(k) for p in ignore))
    if missing:
        raise ModelLoadError(f"lrc output {where} lacks {len(missing)} tensor(s) the model needs: {name_some(missing)} "
                             "(the checkpoint is incomplete)")
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    extra = sorted(k for k in set(shapes) - names if not any(p.search(k) for p in ignore))
    if extra:
        raise ModelLoadError(f"lrc output {where} holds {len(extra)} tensor(s) the model does not have: {name_some(extra)}")


def _is_plain_linear(model: Any, name: str) -> bool:
    """Whether `name` is an uncompressed projection (nn.Linear or GPT-2's Conv1D) of `model`."""
    from .model.projection import MATRIX_MODULES

    try:
        return isinstance(model.get_submodule(name), MATRIX_MODULES)
    except AttributeError:
        return False


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files transformers loads with use_safetensors=True: model.safetensors, or the files of
    model.safetensors.index.json. Raises ModelLoadError when neither is there or the index names other files."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
        pickles = [n for n in others if not n.endswith(".safetensors")]
        hint = f" (found {', '.join(others)}; lrc never loads pickle files like {pickles[0]})" if pickles else (
            f" (found {', '.join(others)})" if others else "")
        raise ModelLoadError(f"{folder} holds no model.safetensors or model.safetensors.index.json{hint}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ModelLoadError(f"{index} is not a valid safetensors index (no weight_map)") from None
    for name in names:
        if not str(name).endswith(".safetensors") or "/" in str(name) or "\\" in str(name):
            raise ModelLoadError(f"{index} points at {name}, not a safetensors file in the folder; lrc never "
                                 "loads pickle files")
        if not (folder / name).is_file():
            raise ModelLoadError(f"{index} points at {name}, which is missing")
    return [folder / n for n in names]


def load_with_report(path: str, auto_class: str = "AutoModelForCausalLM", **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """(model, transformers' load report: missing / unexpected / mismatched keys) of `auto_class`.from_pretrained,
    for `check_loading_info`, which says in one line what is wrong: transformers' own printed table of the
    report is silenced meanwhile."""
    import transformers
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        loaded: Any = getattr(transformers, auto_class).from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return loaded[0], loaded[1]

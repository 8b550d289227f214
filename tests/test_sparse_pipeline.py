"""Sparse-plus-low-rank methods through compress -> write -> load: same outputs, bytes that match the file."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lrc
from lrc.forms import count_params
from lrc.forms.sparse_linear import LowRankSparseLinear, SparseDictionaryLinear

from .conftest import file_hashes
from .test_pipeline import config, logits

LAYERS = {"sparse-dictionary": SparseDictionaryLinear, "low-rank-sparse": LowRankSparseLinear}
VALUE_BYTES = {"float32": 4, "bfloat16": 2}


@pytest.mark.parametrize(("method", "dtype"), [("sparse-dictionary", "float32"), ("low-rank-sparse", "bfloat16")])
def test_sparse_round_trip_and_honest_bytes(tiny_model_dir, calib_file, tmp_path, method, dtype):
    out = tmp_path / "out"
    result = lrc.compress(str(tiny_model_dir), config(calib_file, budget=0.3, method=method, dtype=dtype), out)
    sparse = [m for m in result.matrices if m.kind == method]
    assert sparse, "the allocator picked no sparse option on this model"
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = logits(result.model.to(getattr(torch, dtype)), ids)
    # bfloat16: a model cast in memory also casts its rotary buffers, a loaded one keeps them in float32
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    loaded = [lrc.load(str(out)).model, AutoModelForCausalLM.from_pretrained(out)]
    torch.testing.assert_close(logits(loaded[0], ids), logits(loaded[1], ids), rtol=0, atol=0)
    for model in loaded:
        assert model.dtype == getattr(torch, dtype)
        torch.testing.assert_close(logits(model, ids), expected, rtol=tolerance, atol=tolerance)
        for m in sparse:
            layer = model.get_submodule(m.name)
            assert isinstance(layer, LAYERS[method])
            assert layer.sparse_factor().nnz == m.nnz and layer.sparse_factor().layout == m.layout

    # bytes: what the file holds for each sparse layer's weight = what the report charged for it
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    charged = {layer["name"]: layer for layer in report["layers"]}
    vb = VALUE_BYTES[dtype]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) * torch.tensor([], dtype=f.get_slice(k).get_dtype() and
                 getattr(torch, {"F32": "float32", "BF16": "bfloat16", "I16": "int16", "I32": "int32", "U8": "uint8"}[f.get_slice(k).get_dtype()])).element_size()
                 for k in f.keys()}
    for m in sparse:
        on_disk = sum(size for k, size in sizes.items() if k.startswith(m.name + ".") and not k.endswith(".bias"))
        assert charged[m.name]["params"] == math.ceil(on_disk / vb)
        assert charged[m.name]["nnz"] == m.nnz and charged[m.name]["kind"] == method
    removed = 1 - sum(layer["params"] for layer in report["layers"]) / sum(a * b for a, b in (layer["shape"] for layer in report["layers"]))
    assert removed >= 0.3
    assert report["params"]["targeted"]["removed_fraction"] == pytest.approx(removed, abs=1e-6)
    # a loaded model counts the same parameter-equivalents as the report (what `lrc eval` prints)
    assert count_params(loaded[1]) == report["params"]["model"]["compressed"]
    spec = json.loads((out / "config.json").read_text())["quantization_config"]
    assert spec["format_version"] == 2 and set(spec["sparse"]) == {m.name for m in sparse}


def test_sparse_layers_compute_the_dense_product(llama_dir, calib_file):
    result = lrc.compress(str(llama_dir), config(calib_file, budget=0.3, method="sparse-dictionary"))
    for m in result.matrices:
        if m.kind == "sparse-dictionary":
            layer = result.model.get_submodule(m.name)
            x = torch.randn(3, 5, layer.in_features)
            torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)
            break
    else:
        pytest.fail("no sparse-dictionary layer chosen")


def test_sequential_mode_refuses_sparse_options(llama_dir, calib_file):
    with pytest.raises(lrc.LrcError, match="sequential"):
        lrc.compress(str(llama_dir), config(calib_file, budget=0.3, method="sparse-dictionary", sequential=True))


def test_a_pattern_reaches_the_loaded_layers(llama_dir, calib_file, tmp_path):
    """pattern 2:4 through compress -> write -> load: every loaded sparse layer's mixing keeps at most 2 of each
    4 consecutive atoms in every row, its stored entries exactly half of its slots."""
    out = tmp_path / "out"
    cfg = config(calib_file, budget=0.3, method="sparse-dictionary").replace(method_options={"pattern": "2:4"})
    result = lrc.compress(str(llama_dir), cfg, out)
    sparse = [m for m in result.matrices if m.kind == "sparse-dictionary"]
    assert sparse, "the allocator picked no sparse option on this model"
    model = lrc.load(str(out)).model
    for m in sparse:
        layer = model.get_submodule(m.name)
        mixing = layer.sparse_factor().to_dense()
        rows, atoms = mixing.shape
        groups = (mixing != 0).reshape(rows, atoms // 4, 4).sum(2)
        assert (groups <= 2).all() and m.nnz == rows * atoms // 2


@pytest.mark.parametrize("stream", [False, True])
def test_chosen_sparse_layers_are_fitted_once_to_the_same_bytes(llama_dir, calib_file, tmp_path, monkeypatch, stream):
    """The refits of the allocator's choices become the written layers (lrc.engine.build.KeptLayers; streamed:
    kept in files): building fits again only the choices that moved after their last refit, and the file is
    the one written when every chosen layer is fitted again."""
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "cache"))
    from lrc.engine.build import KeptLayers
    from lrc.factorize.sparse_dictionary import SparseDictionary

    fitted = []
    fit = SparseDictionary.sparse_layer
    monkeypatch.setattr(SparseDictionary, "sparse_layer", lambda self, problem, option: fitted.append(option) or fit(self, problem, option))
    cfg = config(calib_file, budget=0.3, method="sparse-dictionary", stream=stream)
    result = lrc.compress(str(llama_dir), cfg, tmp_path / "kept")
    sparse = [m for m in result.matrices if m.kind == "sparse-dictionary"]
    assert sparse and len(fitted) < len(sparse)
    fitted.clear()
    monkeypatch.setattr(KeptLayers, "take", lambda self, name, option, linear: None)
    lrc.compress(str(llama_dir), cfg, tmp_path / "refitted")
    assert len(fitted) == len(sparse)
    assert file_hashes(tmp_path / "kept")["model.safetensors"] == file_hashes(tmp_path / "refitted")["model.safetensors"]

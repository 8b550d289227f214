"""compress -> write -> load back (lrc.load and plain transformers) -> same outputs, fewer parameters."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lrc
from lrc.forms import LowRankLinear

from .conftest import save_tiny_model


def config(calib_file, **kw):
    return lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, batch_size=2, **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_same_outputs(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = lrc.compress(str(tiny_model_dir), config(calib_file, budget=0.4, method="loss-aware"), out)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = logits(result.model, ids)

    again = lrc.load(str(out)).model
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert result.ranks
    for model in (again, plain):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
        for name, rank in result.ranks.items():
            layer = model.get_submodule(name)
            assert isinstance(layer, LowRankLinear) and layer.rank == rank

    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        keys = set(f.keys())
    assert stored == report["params"]["model"]["compressed"] == sum(p.numel() for p in plain.parameters())
    assert report["params"]["targeted"]["removed_fraction"] >= 0.4
    for name in result.ranks:
        assert f"{name}.down.weight" in keys and f"{name}.up.weight" in keys and f"{name}.weight" not in keys
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lrc"
    for layer in report["layers"]:
        assert 0.0 <= layer["rel_error"] < 1.0


def test_factorized_outputs_match_dense_product(llama_dir, calib_file):
    """Each LowRankLinear computes x @ (up @ down)ᵀ, the product the report's error describes."""
    result = lrc.compress(str(llama_dir), config(calib_file, budget=0.3))
    layer = result.model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)


def test_relative_error_in_report_matches_recomputation(llama_dir, calib_file):
    """The reported rel_error of q_proj equals ||(W - W') X|| / ||W X|| recomputed on the same windows."""
    original = lrc.load(str(llama_dir)).model
    cfg = config(calib_file, budget=0.5, method="svd-llm", allocator="uniform")
    result = lrc.compress(str(llama_dir), cfg)
    from lrc.calibration import read_text, token_windows

    tok = lrc.load(str(llama_dir)).tokenizer
    windows = token_windows(tok, read_text(str(calib_file)), cfg.samples, cfg.seq_len, cfg.seed)
    captured = []
    q = original.model.layers[0].self_attn.q_proj
    handle = q.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        original(input_ids=windows)
    handle.remove()
    x = torch.cat(captured).double()
    w = q.weight.double()
    w2 = result.model.model.layers[0].self_attn.q_proj.dense_weight().double()
    direct = float((x @ (w - w2).T).norm() / (x @ w.T).norm())
    reported = next(r for r in result.report["layers"] if r["name"] == "model.layers.0.self_attn.q_proj")
    assert reported["rel_error"] == pytest.approx(direct, rel=1e-3)


def test_tied_embeddings_are_stored_once(tmp_path, calib_file):
    folder = save_tiny_model(tmp_path / "tied", "llama", tie=True)
    out = tmp_path / "out"
    lrc.compress(str(folder), config(calib_file), out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_bytes(llama_dir, calib_file, tmp_path):
    for name in ("a", "b"):
        lrc.compress(str(llama_dir), config(calib_file, seed=3), tmp_path / name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_input_folder_untouched(llama_dir, calib_file, tmp_path):
    before = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    lrc.compress(str(llama_dir), config(calib_file), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in llama_dir.iterdir()} == before


def test_keep_dense_and_bf16_output(llama_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = lrc.compress(str(llama_dir), config(calib_file, keep_dense=[r"\.0\.mlp\."], dtype="bfloat16"), out)
    ranks = {r["name"]: r["rank"] for r in result.report["layers"]}
    assert ranks["model.layers.0.mlp.up_proj"] == "dense"
    assert result.report["params"]["targeted"]["removed_fraction"] >= 0.3
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[1].mlp.up_proj
    assert ranks["model.layers.1.mlp.up_proj"] != "dense" and not isinstance(layer, torch.nn.Linear)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def test_an_already_compressed_model_is_refused(llama_dir, calib_file, tmp_path):
    # a second pass would target the layers left dense alone and write a rank map listing only those
    lrc.compress(str(llama_dir), config(calib_file), tmp_path / "out")
    with pytest.raises(lrc.errors.ConfigError, match="already compressed by lrc"):
        lrc.compress(str(tmp_path / "out"), config(calib_file), tmp_path / "again")
    with pytest.raises(lrc.errors.ConfigError, match="already compressed by lrc"):
        lrc.compress(str(tmp_path / "out"), config(calib_file, stream=True), tmp_path / "streamed")
    loaded = lrc.load(str(llama_dir))
    lrc.compress(loaded, config(calib_file))  # changes the loaded model in place
    with pytest.raises(lrc.errors.ConfigError, match="already compressed by lrc"):
        lrc.compress(loaded, config(calib_file), tmp_path / "twice")
    assert not (tmp_path / "again").exists() and not (tmp_path / "twice").exists()


def test_paths_and_mappings_are_taken_other_objects_refused(llama_dir, calib_file, tmp_path):
    settings = {"calib": str(calib_file), "samples": 4, "seq_len": 32, "batch_size": 2}
    by_path = lrc.compress(llama_dir, settings, tmp_path / "a")  # a pathlib.Path and a recipe's mapping
    by_str = lrc.compress(str(llama_dir), lrc.CompressionConfig(**settings), str(tmp_path / "b"))
    assert by_path.ranks == by_str.ranks
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(lrc.errors.ConfigError, match="save_pretrained"):
        lrc.compress(lrc.load(str(llama_dir)).model, settings)
    with pytest.raises(lrc.errors.ConfigError, match="config must be an lrc.CompressionConfig"):
        lrc.compress(str(llama_dir), ["budget", 0.3])
    with pytest.raises(lrc.errors.ConfigError, match="unknown recipe key 'budgte'"):
        lrc.compress(str(llama_dir), {"budgte": 0.3})

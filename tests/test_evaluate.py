"""Perplexity against transformers' own loss, computed window by window."""

from __future__ import annotations

import math

import pytest
import torch

import lrc


def test_perplexity_matches_transformers_loss(llama_dir, calib_file):
    result = lrc.evaluate(str(llama_dir), str(calib_file), seq_len=64, windows=5, batch_size=2)
    loaded = lrc.load(str(llama_dir))
    ids = loaded.tokenizer(calib_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for w in range(5):
            window = ids[w * 64 : (w + 1) * 64][None]
            losses.append(float(loaded.model(input_ids=window, labels=window).loss))
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert result["windows"] == 5 and result["tokens"] == 320
    assert result["windows_available"] == ids.numel() // 64
    assert result["params"] == sum(p.numel() for p in loaded.model.parameters())
    assert result["bytes"] == (llama_dir / "model.safetensors").stat().st_size
    # a dense float32 model holds its parameters' bytes (tied embeddings once) and its buffers (rotary frequencies)
    buffers = sum(b.numel() * b.element_size() for b in loaded.model.buffers())
    assert result["memory_bytes"] == 4 * sum(p.numel() for p in loaded.model.parameters()) + buffers > 0


def test_too_short_evaluation_text(llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("short")
    with pytest.raises(lrc.errors.ConfigError, match="fewer than one window"):
        lrc.evaluate(str(llama_dir), str(text), seq_len=64)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"seq_len": 0}, "seq_len must be an integer of at least 2"),
    ({"seq_len": 1}, "seq_len must be an integer of at least 2"),
    ({"seq_len": "64"}, "seq_len must be an integer"),
    ({"seq_len": 16.0}, "seq_len must be an integer"),
    ({"windows": 2.5}, "windows must be an integer"),
    ({"batch_size": 0}, "batch_size must be an integer of at least 1"),
    ({"data": None}, "data must be the path of a text file"),
])
def test_bad_arguments_are_refused_by_name(llama_dir, calib_file, arguments, message):
    call = {"data": str(calib_file), "seq_len": 64} | arguments
    with pytest.raises(lrc.errors.ConfigError, match=message):
        lrc.evaluate(str(llama_dir), **call)


def test_paths_are_taken(llama_dir, calib_file):
    by_path = lrc.evaluate(llama_dir, calib_file, seq_len=64, windows=2)
    by_str = lrc.evaluate(str(llama_dir), str(calib_file), seq_len=64, windows=2)
    assert by_path["perplexity"] == by_str["perplexity"] and by_path["data"] == str(calib_file)
    with pytest.raises(lrc.errors.ConfigError, match="save_pretrained"):
        lrc.evaluate(lrc.load(str(llama_dir)).model, calib_file, seq_len=64)


def test_a_finite_loss_past_exps_range_is_an_infinite_perplexity(tmp_path, calib_file):
    # a mean loss above ~709.78 nats overflows math.exp: the perplexity is infinite (null in JSON), not a crash
    from safetensors.torch import load_file, save_file

    from .conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "model", "llama")
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30000.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = lrc.evaluate(folder, calib_file, seq_len=64, windows=2, batch_size=1)
    assert math.isfinite(result["mean_nll"]) and result["mean_nll"] > 709.78
    assert result["perplexity"] == math.inf
    assert result["threads"] == torch.get_num_threads() and result["batch_size"] == 1 and result["device"] == "cpu"

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

"""Layer-by-layer statistics against a direct computation from one ordinary full forward pass."""

from __future__ import annotations

import pytest
import torch

import lrc
from lrc.calibration import calibrate_layerwise, token_windows
from lrc.errors import CalibrationError
from lrc.targets import target_linears


def direct_inputs(model, windows, targets):
    """Inputs of every targeted linear from a plain forward pass of the whole model."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].reshape(-1, a[0].shape[-1])))
        for name, module in targets.items()
    ]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def test_grams_match_direct_computation(tiny_model_dir, calib_file):
    loaded = lrc.load(str(tiny_model_dir))
    windows = token_windows(loaded.tokenizer, calib_file.read_text(), samples=6, seq_len=32, seed=0)
    targets = target_linears(loaded.model)
    direct = direct_inputs(loaded.model, windows, targets)
    collected: dict[str, lrc.factorize.InputStats] = {}
    shared: dict[str, str] = {}

    def keep(index, layer, stats, shares):
        collected.update(stats)
        shared.update(shares)

    calibrate_layerwise(loaded.model, windows, targets, keep, batch_size=4)
    assert set(collected) | set(shared) == set(targets)
    for name, x in direct.items():
        stats = collected[shared.get(name, name)]
        assert stats.tokens == windows.numel()
        assert stats.gram.dtype == torch.float64
        torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.abs_sum, x.abs().sum(0), rtol=1e-4, atol=1e-4)
    # q/k/v read one tensor, gate/up another: their statistics are shared, not recomputed
    assert shared["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert shared["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"


def test_windows_are_seeded_and_non_overlapping(llama_dir, calib_file):
    tok = lrc.load(str(llama_dir)).tokenizer
    text = calib_file.read_text()
    a = token_windows(tok, text, 5, 64, seed=1)
    b = token_windows(tok, text, 5, 64, seed=1)
    c = token_windows(tok, text, 5, 64, seed=2)
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(text, add_special_tokens=False).input_ids
    starts = {tuple(ids[s : s + 64]) for s in range(0, len(ids) - 63, 64)}
    assert all(tuple(w.tolist()) in starts for w in a)


def test_too_little_text_says_how_much(llama_dir):
    tok = lrc.load(str(llama_dir)).tokenizer
    with pytest.raises(CalibrationError, match=r"has 100 tokens; 4 windows x 64 tokens = 256 needed"):
        token_windows(tok, "x" * 100, 4, 64, seed=0)

"""The block-by-block backward sweep gives the statistics of one whole-model backward per batch.

The reference (tests/conftest.py whole_model_reference) is written independently of lrc.stats.gradients:
per batch, the model's own objective through the full model, torch.autograd.grad at every targeted
projection's output, and the same accumulation convention (float32 products per batch, summed in float64).
"""

from __future__ import annotations

import pytest
import torch

import lrc
from lrc.calibration import token_windows
from lrc.model.targets import target_linears
from lrc.stats.gradients import collect_output_stats

from ..conftest import ENCODERS, save_tiny_model, whole_model_reference

SAMPLES, SEQ_LEN = 4, 24  # 24 tokens > gemma2's sliding window of 8: its two layers see different masks
FAMILIES = ["llama", "gemma2", "gpt2", "qwen3_moe", "bert"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory, calib_file):
    family = request.param
    folder = save_tiny_model(tmp_path_factory.mktemp(f"sweep-{family}"), family, tie=family in {"gpt2", "gemma2"})
    loaded = lrc.load(str(folder))
    windows = token_windows(loaded.tokenizer, calib_file.read_text(), SAMPLES, SEQ_LEN, seed=0)
    return family, loaded.model, windows


@pytest.mark.parametrize("batch_size, sweep_batches", [(1, 8), (2, 1)])  # one sweep of 4 windows; two sweeps of 2
def test_backward_sweep_equals_whole_model_backward(family_model, batch_size, sweep_batches):
    family, model, windows = family_model
    targets = target_linears(model)
    swept = collect_output_stats(model, windows, targets, full_max=4096, fisher=True, batch_size=batch_size,
                                 sweep_batches=sweep_batches)
    reference = whole_model_reference(model, windows, targets, batch_size, family in ENCODERS)
    assert set(swept) == set(targets)
    for name, (gram, diag, fisher_rows, tokens) in reference.items():
        s = swept[name]
        assert s.tokens == tokens > 0
        for got, want in ((s.gram, gram), (s.diag, diag), (s.fisher_rows, fisher_rows)):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * want.abs().max().item())
    assert not any(p.requires_grad for p in model.parameters())


def test_backward_sweep_restores_the_blocks(llama_dir, calib_file):
    """After the sweep the model computes what it computed before (every block's forward is its own again)."""
    loaded = lrc.load(str(llama_dir))
    model = loaded.model
    windows = token_windows(loaded.tokenizer, calib_file.read_text(), 2, SEQ_LEN, seed=0)
    before = model(input_ids=windows).logits
    collect_output_stats(model, windows, target_linears(model), batch_size=1)
    torch.testing.assert_close(model(input_ids=windows).logits, before, rtol=0, atol=0)

"""The block-by-block backward sweep gives the statistics of one whole-model backward per batch.

The reference below is written here, independently of lrc.stats.gradients: per batch, the model's own
objective through the full model, torch.autograd.grad at every targeted projection's output, and the
same accumulation convention (products over one batch in float32, summed over batches in float64).
"""

from __future__ import annotations

import pytest
import torch

import lrc
from lrc.calibration import token_windows
from lrc.model.targets import target_linears
from lrc.stats.gradients import PROBE_SEED, collect_output_stats

from ..conftest import ENCODERS, save_tiny_model

SAMPLES, SEQ_LEN = 4, 24  # 24 tokens > gemma2's sliding window of 8: its two layers see different masks
FAMILIES = ["llama", "gemma2", "gpt2", "qwen3_moe", "bert"]


def whole_model_reference(model, windows, targets, batch_size, encoder):
    """{name: (gram, diag, fisher_rows, tokens)} from one whole-model backward per batch."""
    probe = torch.Generator().manual_seed(PROBE_SEED)
    acc = {n: [0.0, 0.0, 0.0, 0] for n in targets}
    outs, ins = {}, {}

    def record(name):
        def hook(module, args, output):
            outs[name], ins[name] = output, args[0]

        return hook

    hooks = [p.module.register_forward_hook(record(n)) for n, p in targets.items()]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    try:
        for batch in windows.split(batch_size):
            outs.clear()
            ins.clear()
            with torch.enable_grad():
                if encoder:  # Σ ε·h with ε ~ N(0, I), drawn in batch order
                    h = model(input_ids=batch).last_hidden_state
                    loss = (h * torch.randn(h.shape, generator=probe)).sum()
                else:  # summed next-token cross-entropy: transformers' mean loss times the predicted tokens
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss * batch[:, 1:].numel()
                names = list(outs)
                grads = torch.autograd.grad(loss, [outs[n] for n in names])
            for name, g in zip(names, grads):
                g = g.float()
                flat = g.reshape(-1, g.shape[-1])
                x = ins[name].float()
                per_window = zip(g, x) if g.dim() == 3 else [(g, x)]  # an expert: one flat list per batch
                a = acc[name]
                a[0] = a[0] + (flat.T @ flat).double()
                a[1] = a[1] + flat.square().sum(0).double()
                a[2] = a[2] + sum((gw.T @ xw).square().sum(1).double() for gw, xw in per_window)
                a[3] += flat.shape[0]
    finally:
        for handle in hooks:
            handle.remove()
    return acc


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

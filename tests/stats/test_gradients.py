"""Output-gradient statistics against gradients taken directly with torch.autograd.grad."""

from __future__ import annotations

import torch

import lrc
from lrc.calibration import token_windows
from lrc.model.targets import target_linears
from lrc.stats.gradients import collect_output_stats


def test_output_gradient_stats_match_autograd(llama_dir, calib_file):
    loaded = lrc.load(str(llama_dir))
    model = loaded.model
    windows = token_windows(loaded.tokenizer, calib_file.read_text(), samples=3, seq_len=24, seed=0)
    targets = target_linears(model)
    stats = collect_output_stats(model, windows, targets, full_max=64, fisher=True, batch_size=1)

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]  # m = 64 (full), m = 96 (diag only)
    expected_gram = {n: 0 for n in names}
    expected_diag = {n: 0 for n in names}
    expected_fisher = {n: 0 for n in names}
    for window in windows:
        outs, ins = {}, {}

        def record(module, args, output, name, outs=outs, ins=ins):
            outs[name], ins[name] = output, args[0]

        hooks = [targets[n].module.register_forward_hook(lambda m, a, o, n=n: record(m, a, o, n)) for n in names]
        embeds = model.get_input_embeddings()(window[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for h in hooks:
            h.remove()
        for n, g in zip(names, grads):
            g = g[0].double()
            expected_gram[n] = expected_gram[n] + g.T @ g
            expected_diag[n] = expected_diag[n] + (g**2).sum(0)
            expected_fisher[n] = expected_fisher[n] + ((g.T @ ins[n][0].detach().double()) ** 2).sum(1)
    q, up = (stats[n] for n in names)
    torch.testing.assert_close(q.gram, expected_gram[names[0]], rtol=1e-3, atol=1e-6)
    assert up.gram is None
    for n in names:
        torch.testing.assert_close(stats[n].diag, expected_diag[n], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(stats[n].fisher_rows, expected_fisher[n], rtol=1e-3, atol=1e-6)
        assert stats[n].tokens == windows.numel()
    assert not any(p.requires_grad for p in model.parameters())


def test_windows_made_under_inference_mode_are_accepted(llama_dir, calib_file):
    """Token ids a caller made under torch.inference_mode (which autograd refuses to save for backward, and the
    loss saves its targets) give the statistics of the same ids made normally."""
    loaded = lrc.load(str(llama_dir))
    windows = token_windows(loaded.tokenizer, calib_file.read_text(), samples=2, seq_len=16, seed=0)
    with torch.inference_mode():
        frozen = windows.clone()
    assert frozen.is_inference()
    targets = target_linears(loaded.model)
    expected = collect_output_stats(loaded.model, windows, targets, full_max=64)
    got = collect_output_stats(loaded.model, frozen, targets, full_max=64)
    assert set(got) == set(expected)
    for name, stats in expected.items():
        assert torch.equal(got[name].diag, stats.diag) and got[name].tokens == stats.tokens == 32

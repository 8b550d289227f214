"""Sequential mode: layer 0 equals one-shot; later layers fit the original outputs from the compressed inputs."""

from __future__ import annotations

import pytest
import torch

import lrc

Q1 = "model.layers.1.self_attn.q_proj"


def run(llama_dir, calib_file, sequential):
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, batch_size=2, budget=0.5, method="loss-aware",
                                   sequential=sequential)
    return lrc.compress(str(llama_dir), config)


def inputs_of(model, name, windows):
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()


def test_sequential_fits_original_outputs_better(llama_dir, calib_file):
    original = lrc.load(str(llama_dir)).model
    one_shot = run(llama_dir, calib_file, False)
    seq = run(llama_dir, calib_file, True)
    assert one_shot.ranks == seq.ranks

    w_shot = one_shot.model.get_submodule("model.layers.0.self_attn.q_proj").dense_weight()
    w_seq = seq.model.get_submodule("model.layers.0.self_attn.q_proj").dense_weight()
    torch.testing.assert_close(w_seq, w_shot, rtol=1e-3, atol=1e-4)  # layer 0 sees identical inputs

    from lrc.calibration import read_text, token_windows

    windows = token_windows(lrc.load(str(llama_dir)).tokenizer, read_text(str(calib_file)), 4, 32, 0)
    x = inputs_of(original, Q1, windows)
    x_hat = inputs_of(seq.model, Q1, windows)
    w = original.get_submodule(Q1).weight.double()
    target = x @ w.T
    err_seq = (target - x_hat @ seq.model.get_submodule(Q1).dense_weight().double().T).norm() / target.norm()
    err_shot = (target - x_hat @ one_shot.model.get_submodule(Q1).dense_weight().double().T).norm() / target.norm()
    assert err_seq < err_shot
    reported = next(r["rel_error"] for r in seq.report["layers"] if r["name"] == Q1)
    assert reported == pytest.approx(float(err_seq), rel=1e-3)

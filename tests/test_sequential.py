"""Sequential mode: layer 0 equals one-shot; later layers fit the original outputs from the compressed inputs.

Run on llama and on a 3-layer gemma2, whose layer 1 (full attention) is called with another mask than
layers 0 and 2 (sliding window): the reported error of layer 2's q_proj matches the compressed model's
own forward only if the refit ran layer 1 with its own arguments."""

from __future__ import annotations

import pytest
import torch

import lrc

from .conftest import save_tiny_model


def run(model_dir, calib_file, sequential):
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, batch_size=2, budget=0.5, method="loss-aware",
                                   sequential=sequential)
    return lrc.compress(str(model_dir), config)


def inputs_of(model, name, windows):
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()


@pytest.mark.parametrize(("family", "layers", "checked"), [
    ("llama", 2, "model.layers.1.self_attn.q_proj"),
    ("gemma2", 3, "model.layers.2.self_attn.q_proj"),  # its input went through layer 1's full attention
])
def test_sequential_fits_original_outputs_better(family, layers, checked, calib_file, tmp_path):
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"][:layers] if family == "gemma2" else None
    model_dir = save_tiny_model(tmp_path / family, family, num_hidden_layers=layers,
                                **({"layer_types": layer_types} if layer_types else {}))
    original = lrc.load(str(model_dir)).model
    one_shot = run(model_dir, calib_file, False)
    seq = run(model_dir, calib_file, True)
    assert one_shot.ranks == seq.ranks

    w_shot = one_shot.model.get_submodule("model.layers.0.self_attn.q_proj").dense_weight()
    w_seq = seq.model.get_submodule("model.layers.0.self_attn.q_proj").dense_weight()
    torch.testing.assert_close(w_seq, w_shot, rtol=1e-3, atol=1e-4)  # layer 0 sees identical inputs

    from lrc.calibration import read_text, token_windows

    windows = token_windows(lrc.load(str(model_dir)).tokenizer, read_text(str(calib_file)), 4, 32, 0)
    x = inputs_of(original, checked, windows)
    x_hat = inputs_of(seq.model, checked, windows)
    w = original.get_submodule(checked).weight.double()
    target = x @ w.T
    err_seq = (target - x_hat @ seq.model.get_submodule(checked).dense_weight().double().T).norm() / target.norm()
    err_shot = (target - x_hat @ one_shot.model.get_submodule(checked).dense_weight().double().T).norm() / target.norm()
    assert err_seq < err_shot
    reported = next(r["rel_error"] for r in seq.report["layers"] if r["name"] == checked)
    assert reported == pytest.approx(float(err_seq), rel=1e-3)

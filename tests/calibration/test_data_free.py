"""Data-free calibration (no --calib: windows sampled from the model) with a method that needs output gradients.

Regression: the sampled windows were made under torch.inference_mode, and the output-gradient pass's loss
saves the token ids for backward (its cross-entropy targets), so every gradient method (the default
sparse-dictionary, loss-aware, ...) stopped with "Inference tensors cannot be saved for backward"."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import lrc
from lrc.calibration import sample_windows, token_windows
from tests.conftest import run_main, save_trained_tiny_model

SAMPLES, SEQ_LEN, BUDGET = 4, 32, 0.3


def test_sampled_windows_are_ordinary_tensors(llama_dir):
    loaded = lrc.load(str(llama_dir))
    windows = sample_windows(loaded.model, loaded.tokenizer, 2, 16, seed=0)
    assert windows.shape == (2, 16) and windows.dtype == torch.long
    assert not windows.is_inference()  # autograd may save them


def test_data_free_statistics_come_from_gradients(llama_dir):
    from lrc.model.targets import target_linears
    from lrc.stats.collect import collect_statistics

    loaded = lrc.load(str(llama_dir))
    config = lrc.CompressionConfig(method="loss-aware", samples=2, seq_len=64)  # calib None: data-free
    stats = collect_statistics(loaded, config)
    assert stats.calib_source == "self-sampled"
    assert set(stats.outputs) == set(target_linears(loaded.model))
    for out in stats.outputs.values():
        assert out.tokens == 2 * 64 and torch.isfinite(out.diag).all() and out.diag.sum() > 0


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, calib_file) -> Path:
    """A tiny llama that predicts the text (see save_trained_tiny_model), so a harmful compression shows."""
    return save_trained_tiny_model(tmp_path_factory.mktemp("trained") / "model", calib_file.read_text())


def logits_and_loss(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits and mean next-token cross-entropy by transformers' own forward (independent of lrc's measures)."""
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.float()
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return logits, float(loss)


def truncated_svd(model: torch.nn.Module, budget: float) -> torch.nn.Module:
    """The reference: every block projection replaced by its best rank-r approximation (plain SVD, no data),
    r such that the two factors hold (1 - budget) of the matrix's parameters."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            m, n = module.weight.shape
            r = int((1 - budget) * m * n / (m + n))
            u, s, vh = torch.linalg.svd(module.weight.data, full_matrices=False)
            module.weight.data = (u[:, :r] * s[:r]) @ vh[:r]
    return model


@pytest.mark.parametrize("method", [None, "loss-aware"])  # None: the default recipe (sparse-dictionary)
def test_data_free_compress_with_gradient_method(tmp_path, capsys, calib_file, trained_model, method):
    """`lrc compress MODEL -o OUT` without --calib, with a method needing output gradients: it completes, its
    statistics came from the gradient pass on self-sampled text, and the written model, loaded by transformers,
    gives finite logits on real text, closer to the dense model's than a plain truncated SVD of the same size."""
    out = tmp_path / "out"
    args = ["compress", trained_model, "-o", out, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--budget", BUDGET]
    code, _, stderr = run_main(capsys, *args, *(["--method", method] if method else []))
    assert code == 0, stderr
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["method"] == (method or lrc.CompressionConfig().method)
    assert report["calibration"]["source"] == "self-sampled" and report["settings"]["calib"] is None
    assert report["timing_s"]["gradients_s"] > 0  # the output-gradient pass ran
    assert report["held_out"]["windows"] > 0 and report["held_out"]["perplexity_ratio"] < 1.01

    windows = token_windows(lrc.load(str(trained_model)).tokenizer, calib_file.read_text(), 8, 64, seed=5)
    dense, dense_loss = logits_and_loss(AutoModelForCausalLM.from_pretrained(trained_model), windows)
    compressed, loss = logits_and_loss(AutoModelForCausalLM.from_pretrained(out), windows)
    reference, _ = logits_and_loss(truncated_svd(AutoModelForCausalLM.from_pretrained(trained_model), BUDGET), windows)
    centred = (dense - dense.mean(-1, keepdim=True)).norm()
    error, reference_error = (compressed - dense).norm() / centred, (reference - dense).norm() / centred
    assert error < reference_error, (error, reference_error)  # measured: 3e-5 against 8e-3
    assert math.exp(loss - dense_loss) < 1.01, (dense_loss, loss)

"""The held-out quality check through the CLI: the report carries the dense and compressed models' loss on
calibration windows the statistics never saw (checked against an independent computation), and a
compressed model past the perplexity-ratio limit stops the run with nothing written."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lrc.calibration import token_windows

from ..conftest import (
    byte_tokenizer,
    file_hashes,
    run_main,
    save_tiny_model,
    save_trained_tiny_model,
    tiny_compress_args,
)


def mean_next_token_loss(model, windows: torch.Tensor) -> float:
    """transformers' own loss (mean cross-entropy of every predicted token) over equal-length windows."""
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def expected_heldout(text: str, samples: int, seq_len: int, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows) computed from the documented rule: one seeded random order of
    the text's non-overlapping windows, calibration the first `samples`, held-out the next `count`."""
    ids = byte_tokenizer()(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    order = torch.randperm(ids.numel() // seq_len, generator=torch.Generator().manual_seed(seed))
    pick = lambda starts: torch.stack([ids[s * seq_len : (s + 1) * seq_len] for s in sorted(starts.tolist())])  # noqa: E731
    return pick(order[:samples]), pick(order[samples : samples + count])


def test_report_holds_dense_and_compressed_heldout_loss(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama")
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, out, "--seed", 3))
    assert code == 0, stderr
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    held = report["held_out"]

    calibration, heldout = expected_heldout(calib_file.read_text(), 4, 32, 3, 4)
    tokenizer = byte_tokenizer()
    assert torch.equal(calibration, token_windows(tokenizer, calib_file.read_text(), 4, 32, 3))
    assert report["calibration"]["windows_sha256"] == hashlib.sha256(calibration.to(torch.int64).numpy().tobytes()).hexdigest()
    assert not {tuple(w.tolist()) for w in heldout} & {tuple(w.tolist()) for w in calibration}
    dense = mean_next_token_loss(AutoModelForCausalLM.from_pretrained(model), heldout)
    compressed = mean_next_token_loss(AutoModelForCausalLM.from_pretrained(out), heldout)
    assert held["windows"] == 4 and held["tokens"] == 128
    assert held["dense_loss"] == pytest.approx(dense, abs=2e-6)
    assert held["compressed_loss"] == pytest.approx(compressed, abs=2e-6)
    assert held["perplexity_ratio"] == pytest.approx(math.exp(compressed - dense), rel=1e-3)
    assert held["max_ratio"] == 100.0


def test_ratio_past_the_limit_stops_the_run(capsys, tmp_path, calib_file):
    model = save_trained_tiny_model(tmp_path / "model", calib_file.read_text())
    args = ["--method", "svd", "--allocator", "uniform", "--budget", "0.8"]
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "first", *args))
    assert code == 0, stderr
    ratio = yaml.safe_load((tmp_path / "first" / "lrc_report.yaml").read_text())["held_out"]["perplexity_ratio"]
    assert ratio > 1.01  # this compression hurts the held-out windows of a model that predicts the text

    recipe = tmp_path / "strict.yaml"
    recipe.write_text("heldout_max_ratio: 1.01\n")
    before = file_hashes(tmp_path)
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out", *args, "--recipe", recipe))
    assert code == 2, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: the compressed model's perplexity on 4 held-out calibration windows is ")
    assert f"{ratio:.3g}x the dense model's" in error and "(limit 1.01x)" in error
    assert ("remove less (--budget), or use a method that weighs the calibration data (method svd does not; e.g. "
            "--method loss-aware); nothing was written") in error  # more data would not change plain SVD
    assert file_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_no_heldout_windows_left_is_reported(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama")
    calib = tmp_path / "short.txt"
    calib.write_text(calib_file.read_text()[: 4 * 32 + 20])  # 4 windows of 32 byte tokens and no fifth
    with pytest.warns(UserWarning, match="held-out quality check skipped: the calibration text has no 32-token window"):
        code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib, tmp_path / "out"))
    assert code == 0, stderr
    held = yaml.safe_load((tmp_path / "out" / "lrc_report.yaml").read_text())["held_out"]
    assert held["windows"] == 0 and "beyond the 4 used for the statistics" in held["skipped"]


def test_heldout_check_can_be_turned_off(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("heldout_windows: 0\n")
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out",
                                                      "--recipe", recipe))
    assert code == 0, stderr
    assert yaml.safe_load((tmp_path / "out" / "lrc_report.yaml").read_text())["held_out"] == {
        "windows": 0, "skipped": "heldout_windows is 0"}


def test_a_dense_model_that_does_not_predict_the_text_is_named(capsys, tmp_path, calib_file):
    # logits overflowing to inf make the dense loss infinite: no ratio can be taken, and the compression is not
    # what is wrong
    from safetensors.torch import load_file, save_file

    model = save_tiny_model(tmp_path / "model", "llama")
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e37
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    args = ["--method", "svd", "--allocator", "uniform"]  # no output gradients, which the head's scale overflows
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out", *args))
    assert code == 2, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: the dense model's own loss on 4 held-out calibration windows is ")
    assert "it does not predict this text" in error and "heldout_windows: 0" in error
    assert not (tmp_path / "out").exists()

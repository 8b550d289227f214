"""Repeatable: same model, data, seed and settings give the same bytes and the same report."""

from __future__ import annotations

import subprocess

import yaml

from .test_nothing_lost import compress_command


def test_same_inputs_same_bytes_and_report(tmp_path, calib_file, llama_dir):
    for name in ("one", "two"):
        result = subprocess.run(compress_command(llama_dir, calib_file, tmp_path / name, "--seed", "5"),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    for file in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes()
    reports = [yaml.safe_load((tmp_path / n / "lrc_report.yaml").read_text()) for n in ("one", "two")]
    for report in reports:
        report.pop("timing_s")
        report.pop("memory")  # measurements of the run, not results
    assert reports[0] == reports[1]
    assert reports[0]["model"]["sha256"] and reports[0]["calibration"]["sha256"]
    assert reports[0]["settings"]["seed"] == 5



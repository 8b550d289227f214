"""`lrc compress --json` and `--quiet`: one JSON object on stdout with the report's fields, or nothing."""

from __future__ import annotations

import json

import yaml

from lrc.cli import main

from ..conftest import tiny_compress_args


def test_json_is_the_report_on_stdout(compressed_run):
    result = compressed_run.result
    data = json.loads(result.stdout)  # the whole of stdout is one JSON object
    report = yaml.safe_load((compressed_run.out / "lrc_report.yaml").read_text())
    assert data.pop("output") == str(compressed_run.out)
    assert data == json.loads(json.dumps(report))  # the same fields and values as the YAML report
    assert data["params"]["targeted"]["removed_fraction"] >= 0.3
    # the summary table went to stderr, after the progress lines
    assert "lrc compression report" in result.stderr and f"wrote {compressed_run.out}" in result.stderr


def test_quiet_prints_nothing(capsys, llama_dir, calib_file, tmp_path):
    capsys.readouterr()
    code = main(tiny_compress_args(llama_dir, calib_file, tmp_path / "out", "--quiet"))
    captured = capsys.readouterr()
    assert code == 0
    assert (captured.out, captured.err) == ("", "")
    assert (tmp_path / "out" / "lrc_report.yaml").is_file()


def test_quiet_json_prints_only_the_json(capsys, llama_dir, calib_file, tmp_path):
    capsys.readouterr()
    code = main(tiny_compress_args(llama_dir, calib_file, tmp_path / "out", "--quiet", "--json"))
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert json.loads(captured.out)["method"] == "loss-aware"

"""The commands end to end on tiny models with the default method: compress, report, eval, a recipe."""

from __future__ import annotations

import yaml

from lrc.cli import main


def run(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def default_compress_args(model, calib, out, *extra):
    """`lrc compress` with the default method and allocator, 4 windows of 32 tokens."""
    return ["compress", model, "-o", out, "--calib", calib, "--samples", 4, "--seq-len", 32, *extra]


def test_compress_report_eval(capsys, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *default_compress_args(tiny_model_dir, calib_file, out, "--budget", 0.3))
    assert code == 0, stderr
    assert "removed 3" in stdout and (out / "lrc_report.yaml").is_file()

    code, stdout, _ = run(capsys, "report", out)
    assert code == 0 and "per matrix" in stdout and "mlp.down_proj" in stdout

    results = tmp_path / "eval.yaml"
    code, stdout, stderr = run(capsys, "eval", out, "--data", calib_file, "--seq-len", 64, "--windows", 3,
                               "--baseline", tiny_model_dir, "-o", results)
    assert code == 0, stderr
    data = yaml.safe_load(results.read_text())["results"]
    assert [r["windows"] for r in data] == [3, 3]
    assert data[0]["params"] < data[1]["params"]
    assert "perplexity ratio" in stdout


def test_recipe_and_flags(capsys, llama_dir, calib_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: svd-llm-v2\nbudget: 0.2\nsamples: 2\n")
    out = tmp_path / "out"
    code, _, stderr = run(capsys, *default_compress_args(llama_dir, calib_file, out, "--recipe", recipe, "--budget", 0.5))
    assert code == 0, stderr
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["method"] == "svd-llm-v2" and report["budget"] == 0.5 and report["calibration"]["samples"] == 4

"""The CLI end to end on a tiny model, and its one-line errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lrc.cli import main


def run(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_compress_args(model, calib, out, *extra):
    return ["compress", model, "-o", out, "--calib", calib, "--samples", 4, "--seq-len", 32, *extra]


def test_compress_report_eval(capsys, tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *tiny_compress_args(tiny_model_dir, calib_file, out, "--budget", 0.3))
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
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out, "--recipe", recipe, "--budget", 0.5))
    assert code == 0, stderr
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["method"] == "svd-llm-v2" and report["budget"] == 0.5 and report["calibration"]["samples"] == 4


BAD = [
    (["--budget", "0"], "budget must be in (0, 1)"),
    (["--budget", "1"], "budget must be in (0, 1)"),
    (["--budget", "-0.2"], "budget must be in (0, 1)"),
    (["--budget", "abc"], "budget must be a number"),
    (["--method", "svdd"], "unknown method 'svdd' (did you mean 'svd'?)"),
    (["--allocator", "unifrom"], "unknown allocator 'unifrom' (did you mean 'uniform'?)"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--samples", "5000"], "tokens;"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_one_line_error_nothing_written(capsys, llama_dir, calib_file, tmp_path, extra, message):
    out = tmp_path / "out"
    if "--device" in extra:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out, *extra))
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_recipe_unknown_key(capsys, llama_dir, calib_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alocator: uniform\n")
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, tmp_path / "o", "--recipe", recipe))
    assert code == 2 and "unknown recipe key 'alocator' (did you mean 'allocator'?)" in stderr


def test_existing_output_needs_overwrite(capsys, llama_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out))
    assert code == 2 and "--overwrite" in stderr and (out / "keep.txt").read_text() == "mine"
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out, "--overwrite"))
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_input_refused(capsys, llama_dir, calib_file):
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, llama_dir / "out"))
    assert code == 2 and "inside the input model's folder" in stderr


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary", None], ids=["empty", "binary", "missing"])
def test_bad_calibration_file(capsys, llama_dir, tmp_path, content):
    calib = tmp_path / "c.txt"
    if content is not None:
        calib.write_bytes(content)
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib, tmp_path / "o"))
    assert code == 2 and "calibration file" in stderr


def test_report_of_non_output(capsys, tmp_path):
    code, _, stderr = run(capsys, "report", tmp_path)
    assert code == 2 and "not an lrc output folder" in stderr


def test_hub_id_offline_names_the_id(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "lrc", "compress", "nobody/no-model", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "'nobody/no-model'" in proc.stderr and "network" in proc.stderr
    assert "Traceback" not in proc.stderr

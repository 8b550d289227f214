"""Bad input through the CLI: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .cli.test_commands import default_compress_args as tiny_compress_args
from .cli.test_commands import run
from .conftest import save_tiny_model

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
    (["--method", "sparse-dictionary", "--allocator", "uniform"], "only the knapsack allocator weighs"),
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
    assert code == 2 and "has no lrc_report.yaml" in stderr and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out))
    assert code == 0, stderr
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, out, "--overwrite", "--budget", "0.5"))
    assert code == 0, stderr
    assert (out / "model.safetensors").is_file() and "budget: 0.5" in (out / "lrc_report.yaml").read_text()


def test_output_inside_input_refused(capsys, llama_dir, calib_file):
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, llama_dir / "out"))
    assert code == 2 and "is inside the input model (" in stderr


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


def test_output_under_a_file(tmp_path, calib_file, llama_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, blocker / "out"))
    assert code == 2 and "is a file" in stderr


def break_model(folder, how):
    """Make a tiny model folder bad in one way; returns the path to give the CLI."""
    if how == "missing":
        return folder / "does-not-exist"
    save_tiny_model(folder)
    weights = folder / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:4096])
    elif how == "config not json":
        (folder / "config.json").write_text("{oops")
    elif how == "gguf not gguf":
        fake = folder / "model.gguf"
        fake.write_bytes(b"PK not a gguf")
        return fake
    elif how == "nan weight":
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
        save_file(tensors, str(weights), metadata={"format": "pt"})
        assert not torch.isfinite(tensors["model.layers.1.self_attn.o_proj.weight"]).all()
    elif how == "quantized":  # a GPTQ checkpoint's config (the package it needs is not installed here)
        import json

        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (folder / "config.json").write_text(json.dumps(config))
    return folder


MODELS = [
    ("missing", "model not found"),
    ("no weights", "holds no .safetensors weights"),
    ("truncated", "corrupt or truncated safetensors file"),
    ("config not json", "config.json is not valid JSON"),
    ("gguf not gguf", "is not a GGUF file"),
    ("nan weight", "model.layers.1.self_attn.o_proj.weight contains NaN or Inf"),
    ("quantized", "a checkpoint quantized with gptq: lrc compresses unquantized weights, give the original checkpoint"),
]


@pytest.mark.parametrize(("how", "message"), MODELS, ids=[h for h, _ in MODELS])
def test_bad_model(capsys, tmp_path, calib_file, how, message):
    model = break_model(tmp_path / "model", how)
    out = tmp_path / "out"
    code, _, stderr = run(capsys, *tiny_compress_args(model, calib_file, out))
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_nothing_to_compress_says_what_was_searched(capsys, llama_dir, calib_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('exclude: [".*"]\n')
    code, _, stderr = run(capsys, *tiny_compress_args(llama_dir, calib_file, tmp_path / "o", "--recipe", recipe))
    assert code == 2 and "no torch.nn.Linear or Conv1D projection inside the 2 layers" in stderr


def test_debug_shows_the_traceback(llama_dir, calib_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrc", "--debug", "compress", str(llama_dir), "-o", str(tmp_path / "o"),
                           "--calib", str(calib_file), "--budget", "2"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "budget must be in (0, 1)" in proc.stderr

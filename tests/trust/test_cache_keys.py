"""Cache keys through the CLI: a change to anything the statistics depend on misses the cache, and the
result then equals a run without the cache byte for byte; an unrelated change (budget) hits it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import lrc.stats.store
from lrc.cli import main

from ..conftest import file_hashes, run_main, save_tiny_model, tiny_compress_args


@pytest.fixture(scope="module")
def base(tmp_path_factory, calib_file):
    """A model, a calibration file, and a cache holding the entry of a base run (made once per module)."""
    root = tmp_path_factory.mktemp("cache-base")
    model = save_tiny_model(root / "model", "llama")
    calib = Path(shutil.copy(calib_file, root / "calib.txt"))
    code = main([str(a) for a in tiny_compress_args(model, calib, root / "base",
                                                    "--cache-dir", root / "cache")])
    assert code == 0
    return root


@pytest.fixture
def setup(tmp_path, base):
    """A private copy of the base model, calibration file and cache."""
    for name in ("model", "calib.txt", "cache"):
        (shutil.copytree if (base / name).is_dir() else shutil.copy)(base / name, tmp_path / name)
    return tmp_path, tmp_path / "model", tmp_path / "calib.txt", tmp_path / "cache"


def compress(capsys, model, calib, out, *extra):
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib, out, *extra))
    assert code == 0, stderr
    return yaml.safe_load((out / "lrc_report.yaml").read_text())


def cache_hit(report) -> bool:
    return report["timing_s"].get("cache_hit") == 1.0


def lowercase_tokenizer(root, model, calib):
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    return []


def other_bos_token(root, model, calib):
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["add_bos_token"] = not config.get("add_bos_token", False)
    config["model_max_length"] = 77
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return []


def other_weights(root, model, calib):
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] *= 2
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return []


def other_calibration_bytes(root, calib_path, calib):
    calib.write_text(calib.read_text().replace("the", "a"))
    return []


CHANGES = {  # change -> (extra flags it needs, whether to compare with a run without the cache)
    "tokenizer.json": (lowercase_tokenizer, True),
    "tokenizer_config.json": (other_bos_token, False),
    "calibration bytes": (other_calibration_bytes, True),
    # per-batch float64 sums: same bytes on this tiny model, not guaranteed in general
    "batch_size": (lambda root, model, calib: ["--recipe", _recipe(root, "batch_size: 3")], False),
    "grad_samples": (lambda root, model, calib: ["--recipe", _recipe(root, "grad_samples: 2")], False),
    "weights": (other_weights, False),
}


def _recipe(root: Path, text: str) -> Path:
    path = root / "recipe.yaml"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_change_misses_the_cache_and_matches_a_fresh_run(capsys, base, setup, change):
    root, model, calib, cache = setup
    make_change, compare = CHANGES[change]
    extra = make_change(root, model, calib)
    before = {k: v for k, v in file_hashes(root).items() if not k.startswith("cache/")}
    cached = compress(capsys, model, calib, root / "cached", "--cache-dir", cache, *extra)
    assert not cache_hit(cached)
    assert len(list(cache.glob("*.safetensors"))) == 2
    if compare:  # the statistics really differ: a stale entry would have given other bytes
        compress(capsys, model, calib, root / "fresh", *extra)
        assert (root / "cached" / "model.safetensors").read_bytes() == (root / "fresh" / "model.safetensors").read_bytes()
        assert (root / "cached" / "model.safetensors").read_bytes() != (base / "base" / "model.safetensors").read_bytes()
    after = file_hashes(root)
    assert {k: v for k, v in after.items() if k in before} == before


def test_versions_and_threads_are_in_the_key(capsys, setup, monkeypatch):
    root, model, calib, cache = setup
    assert cache_hit(compress(capsys, model, calib, root / "same", "--cache-dir", cache, "--budget", "0.5"))
    monkeypatch.setattr(lrc.stats.store, "__version__", "0.0.0-other")
    assert not cache_hit(compress(capsys, model, calib, root / "lrc", "--cache-dir", cache))
    monkeypatch.setattr("transformers.__version__", "0.0.0-other")
    assert not cache_hit(compress(capsys, model, calib, root / "transformers", "--cache-dir", cache))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert not cache_hit(compress(capsys, model, calib, root / "threads", "--cache-dir", cache))
    finally:
        torch.set_num_threads(threads)
    assert len(list(cache.glob("*.safetensors"))) == 4

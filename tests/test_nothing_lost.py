"""Nothing lost: killed runs leave no partial output, the input is untouched, the statistics cache is checked."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lrc

from .conftest import save_tiny_model


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def compress_command(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lrc", "compress", str(model), "-o", str(out), "--calib", str(calib),
            "--samples", "8", "--seq-len", "64", *extra]


@pytest.mark.parametrize("delay", [0.0, 3.0, "writing"])
def test_killed_run_leaves_no_partial_output(tmp_path, calib_file, delay):
    model = save_tiny_model(tmp_path / "model", "llama")
    before = tree_hash(model)
    out = tmp_path / "out"
    proc = subprocess.Popen(compress_command(model, calib_file, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    if delay == "writing":  # wait for the temporary output folder to appear, then kill inside the write
        while not list(tmp_path.glob(".out.lrc-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    else:
        time.sleep(delay + 6.0)  # interpreter start-up and imports take about 6 s here
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tree_hash(model) == before
    if out.exists():  # the run finished before the kill: then the output is complete
        assert (out / "lrc_report.yaml").is_file()
        AutoModelForCausalLM.from_pretrained(out)
    else:  # a later run cleans the dead run's temporary folder and succeeds
        result = subprocess.run(compress_command(model, calib_file, out), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not list(tmp_path.glob(".out.lrc-tmp-*"))


def test_cache_skips_calibration_and_detects_corruption(tmp_path, calib_file, llama_dir):
    cache = tmp_path / "cache"
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, method="loss-aware",
                                   allocator="knapsack", budget=0.3)
    first = lrc.compress(str(llama_dir), config, tmp_path / "a", cache_dir=cache)
    assert "cache_hit" not in first.report["timing_s"]
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 1

    second = lrc.compress(str(llama_dir), config.replace(budget=0.5), tmp_path / "b", cache_dir=cache)
    assert second.report["timing_s"]["cache_hit"] == 1.0
    direct = lrc.compress(str(llama_dir), config.replace(budget=0.5), tmp_path / "c")
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (tmp_path / "c" / "model.safetensors").read_bytes()

    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="discarding corrupt calibration cache entry"):
        third = lrc.compress(str(llama_dir), config, tmp_path / "d", cache_dir=cache)
    assert "cache_hit" not in third.report["timing_s"]
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert direct.ranks == second.ranks




def test_cache_reads_a_loaded_model_in_memory(tmp_path, calib_file, llama_dir):
    # the folder a model was loaded from may no longer hold its weights (changed in memory, or saved over):
    # the entry is keyed by the weights as they are in memory, so neither reuses the other's statistics
    cache = tmp_path / "cache"
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, method="loss-aware", budget=0.3)
    changed = lrc.load(str(llama_dir))
    with torch.no_grad():
        changed.model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    lrc.compress(changed, config, tmp_path / "changed", cache_dir=cache)
    from_folder = lrc.compress(str(llama_dir), config, tmp_path / "folder", cache_dir=cache)
    assert "cache_hit" not in from_folder.report["timing_s"]
    lrc.compress(str(llama_dir), config, tmp_path / "fresh")
    assert (tmp_path / "folder" / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert (tmp_path / "changed" / "model.safetensors").read_bytes() != (tmp_path / "fresh" / "model.safetensors").read_bytes()
    lrc.compress(lrc.load(str(llama_dir)), config, tmp_path / "loaded1", cache_dir=cache)
    again = lrc.compress(lrc.load(str(llama_dir)), config, tmp_path / "loaded", cache_dir=cache)  # the same weights
    assert again.report["timing_s"]["cache_hit"] == 1.0
    assert (tmp_path / "loaded" / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()


def test_a_cache_that_cannot_be_written_leaves_no_file_and_the_run_goes_on(tmp_path, calib_file, llama_dir,
                                                                          monkeypatch):
    """A full disk while storing the statistics: a warning, no partial entry in the cache, the output written."""
    import errno

    from lrc.stats import store

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store, "save_tensors", full_disk)
    cache = tmp_path / "cache"
    config = lrc.CompressionConfig(budget=0.3, calib=str(calib_file), samples=4, seq_len=32, method="loss-aware")
    with pytest.warns(UserWarning, match="statistics were not stored in the cache .*No space left on device"):
        lrc.compress(str(llama_dir), config, tmp_path / "out", cache_dir=cache)
    assert (tmp_path / "out" / "lrc_report.yaml").is_file()
    assert list(cache.iterdir()) == []

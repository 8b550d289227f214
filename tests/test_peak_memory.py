"""`lrc compress` reports the peak resident memory of its process (lrc_report.yaml `memory`, summary table)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lrc.cli import main

STATUS = Path("/proc/self/status")


def kernel_memory_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB$", STATUS.read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@pytest.mark.skipif(not STATUS.is_file(), reason="needs Linux /proc")
def test_compress_reports_peak_resident_memory(capsys, llama_dir, calib_file, tmp_path):
    resident_before = kernel_memory_bytes("VmRSS")
    out = tmp_path / "out"
    code = main(["compress", str(llama_dir), "-o", str(out), "--calib", str(calib_file), "--samples", "4",
                 "--seq-len", "32", "--method", "loss-aware"])
    peak_after = kernel_memory_bytes("VmHWM")
    stdout = capsys.readouterr().out
    assert code == 0
    memory = yaml.safe_load((out / "lrc_report.yaml").read_text())["memory"]
    assert set(memory) == {"peak_rss_bytes"}  # a CPU run: no cuda figure
    # the process's high-water mark: at least what it held when the run began, at most the peak seen just after
    assert resident_before <= memory["peak_rss_bytes"] <= peak_after
    assert re.search(r"peak memory\s*│?\s*\d+\.\d (MiB|GiB) peak rss", stdout)


@pytest.mark.skipif(not STATUS.is_file(), reason="needs Linux /proc")
def test_peak_is_the_process_own_not_its_parents(llama_dir, calib_file, tmp_path):
    """A child inherits its parent's resident set in getrusage's ru_maxrss (fork, then exec); the report
    must give the compressing process's own peak."""
    import subprocess
    import sys

    ballast = torch.ones(512 * 1024 * 1024 // 4)  # 512 MiB resident in this (parent) process at the fork
    parent_resident = kernel_memory_bytes("VmRSS")
    out = tmp_path / "out"
    code = (
        "import resource, sys; from lrc.cli import main; "
        f"rc = main(['compress', {str(llama_dir)!r}, '-o', {str(out)!r}, '--calib', {str(calib_file)!r}, "
        "'--samples', '4', '--seq-len', '32', '--method', 'loss-aware', '--quiet']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    inherited = int(done.stdout.strip().splitlines()[-1])
    reported = yaml.safe_load((out / "lrc_report.yaml").read_text())["memory"]["peak_rss_bytes"]
    assert inherited > 0.95 * parent_resident  # what getrusage would have reported: the parent's memory
    assert reported < parent_resident - 256 * 1024 * 1024

"""Where every benchmark leaves its numbers: the table printed and written as OUT.md, the data as OUT.yaml."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

# the instructions torch's bfloat16 and float32 products choose kernels by: a figure measured with AMX does not
# hold on the same model of CPU without it (a VM may hide it), so every table names them
_MATRIX_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_description() -> str:
    """The CPU a figure was measured on: its model name and matrix instructions, e.g. "Intel(R) Xeon(R)
    Processor, x86_64, avx512_bf16 avx512f (no AMX)"; the machine's architecture where /proc/cpuinfo is absent."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)  # the last CPU's, all alike
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = " ".join(flag for flag in _MATRIX_FLAGS if flag in flags)
    amx = "" if "amx_bf16" in flags else " (no AMX)"  # what lrc's choice of bfloat16 kernel reads too
    return f"{fields.get('model name', 'CPU')}, {platform.machine()}, {present or 'no AVX2'}{amx}{tuning_environment()}"


TUNING_PREFIXES = ("MKL_", "ONEDNN_", "DNNL_", "MALLOC_", "LRC_", "OMP_", "KMP_", "GOMP_")


def tuning_environment() -> str:
    """"; environment: NAME=value ..." for the variables set here that change how the libraries run (MKL's
    memory manager, oneDNN's caches, glibc's malloc, lrc's kernels, OpenMP), "" when none is set."""
    names = sorted(name for name in os.environ if name.startswith(TUNING_PREFIXES))
    return "; environment: " + " ".join(f"{name}={os.environ[name]}" for name in names) if names else ""


def write_results(out: str, lines: list[str], data: dict[str, Any]) -> None:
    """Print the markdown `lines`, write them to OUT.md and {command, **data} to OUT.yaml."""
    table = "\n".join(lines)
    print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(table + "\n")
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"command": " ".join(sys.argv), **data}, sort_keys=False))

"""Memory as lrc counts it: the process's peak (lrc_report.yaml `memory`, the summary table) and the bytes a
model's tensors hold."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn


def peak_memory(device: torch.device) -> dict[str, int]:
    """{"peak_rss_bytes": the process's peak resident set size so far} (the kernel's high-water mark, so it
    covers everything the process did before too), plus on a cuda `device` "cuda_max_allocated_bytes":
    torch's peak allocation there (torch.cuda.max_memory_allocated). Empty where the platform has neither
    /proc nor getrusage (Windows) and the device is not cuda.

    On Linux the peak is VmHWM of /proc/self/status, the high-water mark of this process's own memory.
    getrusage's ru_maxrss is not: a child starts from its parent's resident set at fork and keeps that
    figure through exec, so `lrc compress` launched by a large process (a notebook, a benchmark) would
    report the parent's memory as its own.
    """
    memory: dict[str, int] = {}
    own = process_status_bytes("VmHWM")
    if own is not None:
        memory["peak_rss_bytes"] = own
    else:
        try:
            import resource
        except ImportError:  # Windows
            pass
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            memory["peak_rss_bytes"] = int(peak) * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes, else KiB
    if device.type == "cuda":
        memory["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return memory


def process_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes; None where
    there is no such field (not Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every storage the model's modules hold: parameters, buffers, and tensors kept as attributes
    (or inside tuples / lists / dicts of them), each storage counted once, meta tensors not at all."""
    seen: dict[int, int] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for module in model.modules():
        for name, value in vars(module).items():
            if name != "_modules":
                visit(value)
    return sum(seen.values())

"""The peak memory of this process, as `lrc compress` reports it (lrc_report.yaml `memory`, the summary table)."""

from __future__ import annotations

import sys

import torch


def peak_memory(device: torch.device) -> dict[str, int]:
    """{"peak_rss_bytes": the process's peak resident set size so far} (getrusage ru_maxrss; the kernel's
    high-water mark, so it covers everything the process did before too), plus on a cuda `device`
    "cuda_max_allocated_bytes": torch's peak allocation there (torch.cuda.max_memory_allocated).
    Empty where the platform has no getrusage (Windows) and the device is not cuda.
    """
    memory: dict[str, int] = {}
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

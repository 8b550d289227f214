"""Where the work runs: the one place a device name becomes a torch.device."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """A torch.device for `name`; CUDA without a GPU is an error, never a silent CPU fallback."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA GPU is available to torch {torch.__version__}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device

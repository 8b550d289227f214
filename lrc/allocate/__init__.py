"""Rank allocators, registered by name in ALLOCATORS (one module each)."""

from . import uniform as _uniform  # noqa: F401  (registers "uniform")
from .base import ALLOCATORS, DENSE, Allocator, MatrixCandidates, allowed_params, stored_params

__all__ = ["ALLOCATORS", "DENSE", "Allocator", "MatrixCandidates", "allowed_params", "stored_params"]

"""Factorization methods, registered by name in METHODS (one module per family)."""

from . import methods as _methods  # noqa: F401  (registers the published methods)
from .base import Decomposition, FactorizationMethod, LayerStats, breakeven_rank
from .registry import METHODS

__all__ = ["METHODS", "Decomposition", "FactorizationMethod", "LayerStats", "breakeven_rank"]

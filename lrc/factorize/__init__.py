"""Factorization methods, registered by name in METHODS (one module per family)."""

from . import loss_aware as _loss_aware  # noqa: F401  (registers fwsvd, loss-aware)
from . import methods as _methods  # noqa: F401  (registers the published methods)
from .base import Decomposition, FactorizationMethod, InputStats, OutputStats, breakeven_rank
from .registry import METHODS

__all__ = ["METHODS", "Decomposition", "FactorizationMethod", "InputStats", "OutputStats", "breakeven_rank"]

"""Factorization methods, registered by name in METHODS (one module per family)."""

from . import loss_aware as _loss_aware  # noqa: F401  (registers fwsvd, loss-aware)
from . import low_rank_sparse as _low_rank_sparse  # noqa: F401  (registers low-rank-sparse)
from . import methods as _methods  # noqa: F401  (registers the published methods)
from . import sparse_dictionary as _sparse_dictionary  # noqa: F401  (registers sparse-dictionary)
from .base import Decomposition, FactorizationMethod, InputStats, OutputStats, SparseOption, breakeven_rank
from .registry import METHODS

__all__ = ["METHODS", "Decomposition", "FactorizationMethod", "InputStats", "OutputStats", "SparseOption", "breakeven_rank"]

"""The engine: the per-matrix work of a run as independent jobs, and the executors that run them."""

from .executors import EXECUTORS, Executor, SerialExecutor
from .jobs import Analysis, DecompositionJob, decompose_all, decomposition_jobs

__all__ = ["EXECUTORS", "Analysis", "DecompositionJob", "Executor", "SerialExecutor", "decompose_all", "decomposition_jobs"]

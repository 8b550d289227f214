"""Executors: run independent jobs and gather their results by name, one registry entry per way of running.

An executor's `run(jobs, work)` calls `work(job)` for every job and returns the union of the result
dicts. Results are keyed by matrix name, so the order an executor runs jobs in never changes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from ..registry import Registry

J = TypeVar("J")


class Executor(Protocol):
    def run(self, jobs: Sequence[Any], work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]: ...


EXECUTORS: Registry[Executor] = Registry("executor")


@EXECUTORS.register("serial")
class SerialExecutor:
    """One job after another in this process, in the given order."""

    def run(self, jobs: Sequence[J], work: Callable[[J], dict[str, Any]]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for job in jobs:
            results.update(work(job))
        return results

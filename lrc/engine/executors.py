"""Executors: run independent jobs and gather their results by name, one registry entry per way of running.

An executor's `run(jobs, work)` calls `work(job)` for every job and returns the union of the result
dicts. Results are keyed by matrix name, so the order an executor runs jobs in never changes the output.
Jobs have `name` (unique) and `cost()` (estimated flops), used to order and pack them.

- serial: one job after another in this process, in the given order.
- device: one job after another on one GPU, largest first; every result back on the CPU. cuSOLVER
  batches eigendecompositions only up to 32 x 32 (syevjBatched), so stacking same-shaped jobs would
  still run one large `eigh` at a time: a job is already one large GPU call per matrix.
- distributed: over torch.distributed, the jobs bin-packed by cost across the ranks (longest first, ties
  by name), each rank running its share (on its GPU when the run is on CUDA), the results gathered to every
  rank as CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from ..distributed import merged_over_ranks, pack_jobs, world
from ..registry import Registry


class Job(Protocol):
    @property
    def name(self) -> str: ...

    def cost(self) -> float: ...


J = TypeVar("J", bound=Job)


class Executor(Protocol):
    def run(self, jobs: Sequence[Any], work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]: ...


EXECUTORS: Registry[Executor] = Registry("executor")


def default_executor(device: torch.device) -> str:
    """The executor a run uses: distributed under a process group of several ranks, device on a GPU, else serial."""
    if world()[1] > 1:
        return "distributed"
    return "device" if device.type == "cuda" else "serial"


@EXECUTORS.register("serial")
class SerialExecutor:
    """One job after another in this process, in the given order."""

    def run(self, jobs: Sequence[J], work: Callable[[J], dict[str, Any]]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for job in jobs:
            results.update(work(job))
        return results


def largest_first(jobs: Sequence[J]) -> list[J]:
    """Jobs by decreasing estimated cost, ties by name: the peak memory comes first, not after hours."""
    return sorted(jobs, key=lambda job: (-job.cost(), job.name))


@EXECUTORS.register("device")
class DeviceExecutor:
    """One job after another on the current GPU (the run's device), largest first; results on the CPU.

    The work function places the job's tensors on the device and returns CPU tensors; after the run the
    allocator's cache is released, so the memory held for decompositions goes back to the next stage.
    """

    def run(self, jobs: Sequence[J], work: Callable[[J], dict[str, Any]]) -> dict[str, Any]:
        results = SerialExecutor().run(largest_first(jobs), work)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return results


@EXECUTORS.register("distributed")
class DistributedExecutor:
    """The jobs bin-packed by cost across the ranks of the process group; results gathered to every rank.

    Each rank runs its bin with `local` ("device" when the run is on CUDA, else "serial"). A job that
    fails on one rank fails the run on every rank (lrc.distributed.check_peers), never leaving them waiting.
    """

    def __init__(self, local: str = "serial") -> None:
        self.local = local

    def run(self, jobs: Sequence[J], work: Callable[[J], dict[str, Any]]) -> dict[str, Any]:
        rank, size = world()
        by_name = {job.name: job for job in jobs}
        bins = pack_jobs([(job.name, job.cost()) for job in jobs], size)
        mine = EXECUTORS.create(self.local).run([by_name[name] for name in bins[rank]], work)
        return merged_over_ranks(mine)

"""One compression run over several processes (torch.distributed): who computes what, and how results meet.

Launched by `torchrun --nproc-per-node N -m lrc compress ...` (or `lrc compress --nproc N`), every rank
runs the same pipeline on the same windows and ends with the same statistics and decompositions; rank 0
alone writes. Single-process runs never touch torch.distributed (every helper here is then a no-op).

- Batches (`shard_batches`): the calibration windows are cut into global batches of `batch_size` exactly
  as one process cuts them; rank r runs global batches r, r + N, r + 2N, ... At step s the ranks hold
  global batches s N .. s N + N - 1 (a rank past the last batch holds none).
- Ordered reduction (`ordered_partials`): after each step the per-batch partial sums of every rank are
  broadcast, and every rank adds them to its running sums in global batch order. One process makes
  exactly the same float64 additions in the same order, so the statistics are the same bytes for any
  world size (given the same per-batch results: the same thread count per process).
- Jobs (`pack_jobs`): longest-processing-time-first bin packing by estimated cost, ties by name.
- Errors (`check_peers`, `shared_errors`): every exchange starts with a status exchange, and a rank that
  fails joins the next one with its error; every rank then raises the first failing rank's error (same
  type, same message, so the same exit code), instead of the others waiting forever in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import LrcError

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective waits for a rank that neither answers nor fails (a rank killed outright)."""


def world() -> tuple[int, int]:
    """(this process's rank, number of ranks); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes output and shows progress (rank 0, or the only process)."""
    return world()[0] == 0


def launched() -> bool:
    """Whether torchrun (or `lrc compress --nproc`) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched as one of several), group or no group."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1): the process group for the duration, NCCL when `device` is CUDA (each
    rank on GPU LOCAL_RANK), else gloo; errors on any rank raised on every rank (`shared_errors`).
    Otherwise nothing happens."""
    if not launched() or dist.is_initialized():
        yield
        return
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        with shared_errors():
            yield
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must be for this process group's collectives (the current GPU for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- errors -----------------------------------------------------------------------------------------------


def check_peers(error: BaseException | None = None) -> None:
    """Exchange status with every rank; raise the first failing rank's error (this rank's own if it failed).

    Every collective of lrc is preceded by this exchange, and a failing rank calls it with its error, so
    the others learn of the failure at their next exchange rather than waiting in a collective forever.
    """
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return
    flags = torch.tensor([0 if error is None else 1], device=_comm_device())
    gathered = [torch.zeros_like(flags) for _ in range(size)]
    dist.all_gather(gathered, flags)
    if not any(int(f) for f in gathered):
        return
    errors: list[Any] = [None] * size
    dist.all_gather_object(errors, None if error is None else _portable(error, rank))
    _settle()
    raised = error if error is not None else next(e for e in errors if e is not None)
    raised.shared_by_ranks = True  # type: ignore[union-attr]  # every rank knows: no exchange again
    raise raised


def _portable(error: BaseException, rank: int) -> BaseException:
    """`error` if it survives pickling (the others then raise the same type: same exit code), else an LrcError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return LrcError(f"rank {rank}: {type(error).__name__}: {error}")


@contextlib.contextmanager
def shared_errors() -> Iterator[None]:
    """An error inside reaches every rank (each raises the first failing rank's error); a rank that finishes
    waits at the end until every rank has finished or failed. An interruption (a BaseException: a signal,
    KeyboardInterrupt) is not exchanged: the launcher stops every rank, and a peer still inside another
    collective would meet this rank's exchange as a mismatched collective (gloo aborts the process)."""
    try:
        yield
    except Exception as exc:
        if world()[1] > 1 and not getattr(exc, "shared_by_ranks", False):
            check_peers(exc)
        raise
    check_peers()
    _settle()


def _settle() -> None:
    """A last barrier before the ranks part: a rank that leaves while a peer is still reading the previous
    exchange resets its connection (gloo: "Connection reset by peer"). The outcome is known by now, so a
    peer that is already gone is no error here."""
    with contextlib.suppress(RuntimeError):
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """make() run on rank 0 only and its value handed to every rank (one process: just make()); an error on
    rank 0 is raised on every rank. For what must be the same everywhere but is measured, not computed."""
    rank, size = world()
    if size == 1:
        return make()
    value: list[Any] = [None]
    error = None
    if rank == 0:
        try:
            value[0] = make()
        except Exception as exc:  # every rank raises it (check_peers)
            error = exc
    check_peers(error)
    dist.broadcast_object_list(value, src=0)
    return value[0]


# --- batches and their ordered reduction ------------------------------------------------------------------


def shard_batches(windows: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[int], int]:
    """(this rank's batches, their global batch indices, number of steps every rank takes).

    The global batches are `windows.split(batch_size)`, as one process cuts them; rank r takes r, r + N, ...
    """
    rank, size = world()
    batches = list(windows.split(batch_size)) if windows.shape[0] else []
    indices = list(range(rank, len(batches), size))
    return [batches[i] for i in indices], indices, -(-len(batches) // size)


def ordered_partials(local: dict[str, T] | None, device: torch.device | str) -> list[dict[str, T]]:
    """Every rank's per-batch partial sums of one step, in global batch order (rank order), on `device`.

    local: this rank's partials ({name: dataclass of tensors, ints, None}); None when it ran no batch this
    step. One process gets `[local]`. Tensors travel by broadcast from their rank, one at a time, so a rank
    holds one step's partials of one rank at once beyond its own.
    """
    rank, size = world()
    if size == 1:
        return [] if local is None else [local]
    check_peers()
    manifest = None if local is None else [(name, _describe(value)) for name, value in local.items()]
    manifests: list[Any] = [None] * size
    dist.all_gather_object(manifests, manifest)
    comm = _comm_device()
    out: list[dict[str, T]] = []
    for src, entries in enumerate(manifests):
        if entries is None:
            continue
        received: dict[str, Any] = {}
        for name, (kind, fields) in entries:
            values: dict[str, Any] = {}
            for key, spec in fields.items():
                if spec[0] != "tensor":
                    values[key] = spec[1]
                    continue
                if src == rank:
                    tensor = getattr(local[name], key).to(comm).contiguous()  # type: ignore[index]
                else:
                    tensor = torch.empty(spec[1], dtype=spec[2], device=comm)
                dist.broadcast(tensor, src)
                values[key] = tensor.to(device)
            received[name] = local[name] if src == rank else kind(**values)  # type: ignore[index]
        out.append(received)
    return out


def _describe(value: Any) -> tuple[type, dict[str, tuple[Any, ...]]]:
    """(dataclass type, {field: ("tensor", shape, dtype) or ("value", v)}) of a partial."""
    fields = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        fields[f.name] = ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
    return type(value), fields


def merged_over_ranks(local: dict[str, T]) -> dict[str, T]:
    """The union of every rank's dict, taken in rank order (a key keeps its first rank's value)."""
    rank, size = world()
    if size == 1:
        return local
    check_peers()
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, local)
    merged: dict[str, T] = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


# --- jobs ------------------------------------------------------------------------------------------------


def pack_jobs(costs: Sequence[tuple[str, float]], bins: int) -> list[list[str]]:
    """Names split into `bins` lists of similar total cost: longest processing time first (ties by name),
    each to the least loaded bin (ties: the lowest). Deterministic; at most 4/3 of the best makespan."""
    loads = [0.0] * bins
    packed: list[list[str]] = [[] for _ in range(bins)]
    for name, cost in sorted(costs, key=lambda item: (-item[1], item[0])):
        target = min(range(bins), key=lambda b: (loads[b], b))
        packed[target].append(name)
        loads[target] += cost
    return packed

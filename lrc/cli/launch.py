"""`lrc compress --nproc N`: the same command again as N torch.distributed processes on this machine.

What `torchrun --standalone --nproc-per-node N -m lrc compress ...` does, through torch's elastic launcher
in this process, so that the exit code is the run's own (rank 0's; every rank ends with the same error,
see lrc.distributed) and a failure prints lrc's one-line error rather than the launcher's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Iterator

from ..errors import ConfigError, LrcError


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` with its `--nproc N` / `--nproc=N` removed (the launched ranks must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def threads_per_rank(nproc: int) -> int:
    """OMP_NUM_THREADS for each rank: the caller's setting if any, else the CPU cores shared out (at least 1).

    Per-batch results are the same bytes across world sizes only at the same thread count per process."""
    given = os.environ.get("OMP_NUM_THREADS")
    if given:
        return int(given)
    return max(1, (os.cpu_count() or 1) // nproc)


@contextlib.contextmanager
def _launcher_logs_quiet() -> Iterator[None]:
    """torch's elastic launcher logs nothing while open (each of its modules' loggers has its own level, so
    every one is set): the ranks print lrc's messages."""
    names = ["torch.distributed.elastic", *(name for name in logging.root.manager.loggerDict
                                           if name.startswith("torch.distributed.elastic."))]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class RankKilled(LrcError):
    """A process of an --nproc run was killed by a signal (exit 1: not the user's input)."""

    exit_code = 1


def launch_ranks(nproc: int, argv: list[str]) -> int:
    """Run `python -m lrc ARGV` (minus --nproc) as `nproc` ranks of one job; their exit code (0 when all succeed)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}")
    cores = os.cpu_count() or 1
    if nproc > cores:
        warnings.warn(f"--nproc {nproc} starts more processes than this machine's {cores} CPU cores, each holding the "
                      "whole model: expect it to be slower than fewer, or to run out of memory", stacklevel=2)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lrc-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        with _launcher_logs_quiet(), _environment(OMP_NUM_THREADS=str(threads_per_rank(nproc))):  # the ranks inherit it
            elastic_launch(config, sys.executable)("-m", "lrc", *without_nproc(argv))
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        if first.exitcode < 0:  # killed from outside: the others then stop on a broken connection
            name = first.signal_name()
            why = " (often the system's out-of-memory killer: each process holds the whole model)" if name == "SIGKILL" else ""
            raise RankKilled(f"process {rank} of the {nproc} was killed by {name}{why}, and the run stopped") from None
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        return next((code for code in codes if code > 0), 1)
    except SignalException as exc:  # the launcher was signalled and stopped its ranks, whose first says so
        return 128 + int(exc.sigval)
    return 0


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set, restored after (an in-process `lrc.cli.main` leaves its caller's alone)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

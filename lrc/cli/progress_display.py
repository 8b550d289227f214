"""Drawing the library's progress callbacks (lrc.progress: phase, done, total) for a person or a log.

On a terminal: rich bars on stderr, one per phase. Anywhere else (a CI log, a pipe, a file): plain lines
on stderr, written and flushed as they happen, with the elapsed time and an estimate of the time left:

    [    4.2s] calibrate 3/30 (10%): 3.1s in this phase, about 27.9s left
    [   35.1s] calibrate 30/30 done in 34.0s

The time left is the steps left times the time per step measured since the phase's first report.

Every update of a phase with at most PER_STEP_MAX steps is printed (one line per decoder layer when
calibrating), longer phases (one step per matrix, per window) print every `interval` seconds; the first
and last update of every phase always print. `--quiet` draws nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from ..progress import Progress, no_progress

PER_STEP_MAX = 64
"""Phases with at most this many steps log every step (decoder layers); longer ones log every interval."""
LOG_INTERVAL_S = 10.0


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@dataclass
class _Phase:
    start: float  # when the work before the phase ended
    first_at: float  # when the phase first reported, and how many steps it had done then
    first_done: int
    printed: float = float("-inf")
    finished: bool = False

    def time_left(self, now: float, done: int, total: int) -> float:
        """Steps left x seconds per step, the rate measured since the first report (the first step often
        includes setup, such as loading the model), or since the phase began while there is no other."""
        if done > self.first_done and now > self.first_at:
            return (now - self.first_at) / (done - self.first_done) * (total - done)
        return (now - self.start) / done * (total - done)


class ProgressLog:
    """A Progress callback writing plain lines to `write` (default: sys.stderr, flushed each line)."""

    def __init__(
        self,
        interval: float = LOG_INTERVAL_S,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.write = write or _write_stderr
        self.clock = clock
        self.start = clock()
        self.last_event = self.start
        self.phases: dict[str, _Phase] = {}
        self.pending: list[str] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        for text in self.pending:
            self.write(f"[{duration(now - self.start):>8}] {text}")
        self.pending.clear()
        state = self.phases.get(phase)
        new = state is None or (state.finished and done < total)
        if new:
            # the phase began when the work before it ended: its first step is already done when it reports
            state = self.phases[phase] = _Phase(start=self.last_event, first_at=now, first_done=done)
        assert state is not None
        self.last_event = now
        finished = total > 0 and done >= total
        if state.finished or not (new or finished or total <= PER_STEP_MAX or now - state.printed >= self.interval):
            return
        state.printed = now
        state.finished = finished
        spent = now - state.start
        head = f"[{duration(now - self.start):>8}] {phase} {done}/{total}"
        if finished:
            self.write(f"{head} done in {duration(spent)}")
        elif done > 0:
            left = state.time_left(now, done, total)
            self.write(f"{head} ({done / total:.0%}): {duration(spent)} in this phase, about {duration(left)} left")
        else:
            self.write(f"{head}: started")

    def note(self, text: str) -> None:
        """A line that is not a progress update (what the command does), with the elapsed time. Before the
        first update it waits for it, so that a run failing on bad input prints only its error line."""
        if self.phases:
            self.write(f"[{duration(self.clock() - self.start):>8}] {text}")
        else:
            self.pending.append(text)


def _write_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def rich_bars(console: Console) -> Iterator[Progress]:
    """Rich bars on `console`, one per phase; nothing is drawn before the first update."""
    bars: RichProgress | None = None
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        nonlocal bars
        if bars is None:
            bars = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            bars.start()
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    try:
        yield update
    finally:
        if bars is not None:
            bars.stop()


@contextmanager
def progress_display(quiet: bool = False, interval: float = LOG_INTERVAL_S) -> Iterator[Progress]:
    """The progress callback for a command: none (quiet), rich bars (stderr is a terminal) or log lines."""
    console = Console(stderr=True)
    if quiet:
        yield no_progress
    elif console.is_terminal:
        with rich_bars(console) as bars:
            yield bars
    else:
        yield ProgressLog(interval)


def announce(progress: Progress, text: str) -> None:
    """Log `text` as a line of its own where progress goes to a log (terminals show it in the bars)."""
    if isinstance(progress, ProgressLog):
        progress.note(text)

"""Progress callbacks: the library reports (phase, done, total); the CLI draws bars, the API stays quiet."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, phase: str, done: int, total: int) -> None: ...


def no_progress(phase: str, done: int, total: int) -> None:
    """The default: report nothing."""

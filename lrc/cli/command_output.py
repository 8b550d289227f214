"""Where a command's results go: tables for a person, or one JSON object for a program.

Without --json the tables go to stdout; with --json the JSON object is the only thing on stdout and the
tables go to stderr; --quiet drops the tables (the JSON object and error lines still print).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType

from ..io.atomic_file import atomic_file


class CommandOutput:
    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.human = Console(stderr=json_mode, quiet=quiet)

    def show(self, *renderables: RenderableType) -> None:
        """Human text: stdout, or stderr with --json, or nowhere with --quiet."""
        self.human.print(*renderables)

    def emit(self, data: dict[str, Any]) -> None:
        """With --json: `data` as one JSON object on one line of stdout (a non-finite number becomes null)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(finite_or_null(data), allow_nan=False) + "\n")
            sys.stdout.flush()


def finite_or_null(value: Any) -> Any:
    """`value` with NaN and ±inf replaced by None (JSON has no such numbers), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling: never a half-written file (see lrc.atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

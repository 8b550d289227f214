"""Where a command's results go: tables for a person, or one JSON object for a program.

Without --json the tables go to stdout; with --json the JSON object is the only thing on stdout and the
tables go to stderr; --quiet drops the tables (the JSON object and error lines still print).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType

from ..errors import OutputError


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
    """Write `text` to a temporary sibling of `path`, then rename it over `path`: never a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".lrc-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

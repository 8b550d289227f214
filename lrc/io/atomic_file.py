"""Writing one file atomically: into a temporary sibling, renamed over the target only when complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from .output import apply_umask, unwritable_reason


def check_writable_file(path: str | Path) -> None:
    """Raise OutputError unless a file can be written at `path` (not a folder; its folder exists and is
    writable): called before the work whose result goes there, so a bad path fails at once."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write {path}: {unwritable_reason(path.parent)}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix) to write; on success it replaces `path` with the
    permissions a new file gets under the user's umask, on any error or signal it is deleted."""
    path = Path(path)
    check_writable_file(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".lrc-tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Writing an output folder atomically: build it in a temporary sibling, move it into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


def check_output_path(target: Path, overwrite: bool, inputs: list[Path] | None = None) -> None:
    """Refuse a non-empty existing folder (unless overwrite), a file, a path inside an input, an unwritable parent."""
    target = target.resolve()
    for source in inputs or []:
        source = source.resolve()
        folder = source if source.is_dir() else source.parent
        if target == folder or folder in target.parents:
            raise OutputError(f"output {target} is inside the input model's folder {folder}; choose another place")
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {target} exists and is not empty (pass --overwrite to replace it)")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output folder {target}: {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}: permission denied")


def remove_stale_temporaries(target: Path) -> None:
    """Delete `.NAME.lrc-tmp-PID-*` siblings left by runs that were killed (their PID no longer runs)."""
    for tmp in target.parent.glob(f".{target.name}.lrc-tmp-*"):
        pid_text = tmp.name.removeprefix(f".{target.name}.lrc-tmp-").split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`, on any error it is removed.

    A process killed inside the block leaves only a hidden `.NAME.lrc-tmp-*` sibling, never a partial target.
    """
    target = target.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {target.parent}: {exc.strerror}") from None
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.lrc-tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.lrc-old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Writing an output folder safely: refuse any place whose replacement could lose a user's file, claim the
target with a lock for the whole run, build the folder in a temporary sibling and move it into place when
complete. Everything is created with the user's umask.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import OutputError
from .report import EXPORT_MARKER, REPORT_NAME

if TYPE_CHECKING:
    from ..sources import LoadedModel

FILES_KEY = "files"  # in lrc_report.yaml / lrc_export.yaml: every file lrc wrote into the folder


def written_files(folder: Path, *also: str) -> list[str]:
    """The sorted relative paths (with /) of every file in `folder` and of `also` (files about to be written
    into it): the list an output's record keeps, so `--overwrite` replaces exactly what lrc wrote."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()}
    return sorted(files | set(also))


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, mode: int) -> None:
    """chmod `path` to `mode` less the umask: what open()/mkdir() would have given (mkdtemp gives 0700,
    mkstemp 0600)."""
    os.chmod(path, mode & ~current_umask())


def protected_places(
    inputs: list[Path], calib: str | None = None, cache_dirs: list[Path] | None = None
) -> dict[Path, tuple[str, bool]]:
    """{path: (what it is, whether an output may not lie inside it)}: what replacing an output must never touch.

    inputs: the model folder / .gguf file and the folder actually loaded; calib: the calibration file;
    cache_dirs: lrc's caches. The working directory, the home folder and the Hugging Face cache are added.
    An output may lie inside the working directory or the home folder, never contain them.
    """
    from huggingface_hub import constants

    from ..sources import cache_dir

    places: dict[Path, tuple[str, bool]] = {}

    def add(path: Path, what: str, no_inside: bool) -> None:
        path = path.expanduser().resolve()
        old = places.get(path)
        places[path] = (old[0] if old else what, no_inside or (old[1] if old else False))

    for source in inputs:
        add(source, "the input model", source.is_dir())
    if calib is not None and not calib.startswith("hf://"):
        add(Path(calib), "the calibration file", Path(calib).expanduser().is_dir())
    for folder in [cache_dir(), *(cache_dirs or [])]:
        add(Path(folder), "the lrc cache", True)
    add(Path(constants.HF_HUB_CACHE), "the Hugging Face cache", True)
    add(Path.cwd(), "the working directory", False)
    add(Path.home(), "your home folder", False)
    return places


def run_places(
    model: str | LoadedModel, calib: str | None, cache_dir: str | Path | None
) -> dict[Path, tuple[str, bool]]:
    """protected_places of a compression run: its model (a spec, resolved without loading, or a loaded model),
    calibration file and --cache-dir."""
    from ..sources import resolve_model

    if isinstance(model, str):
        source = resolve_model(model)
        inputs = [] if source.kind == "hub" else [source.path]
    else:
        inputs = [Path(model.folder)] + ([] if model.source.kind == "hub" else [model.source.path])
    return protected_places(inputs, calib, [Path(cache_dir)] if cache_dir else [])


def check_output_path(target: Path, overwrite: bool, places: dict[Path, tuple[str, bool]] | None = None) -> OutputClaim:
    """Refuse an output whose writing could lose a file, and claim it (a lock held until it is written).

    Refused: an output equal to, containing, or (for folders) inside a protected place (see
    `protected_places`); a file; a non-empty folder without `overwrite`; with `overwrite`, a folder that
    is not an earlier lrc output or holds files lrc does not write; an unwritable parent; an output
    another run is writing.
    """
    target = target.expanduser().resolve()
    for place, (what, no_inside) in (places or {}).items():
        if target == place or target in place.parents:
            where = "is" if target == place else "contains"
            raise OutputError(f"output {target} {where} {what} ({place}); choose another output folder")
        if no_inside and place in target.parents:
            raise OutputError(f"output {target} is inside {what} ({place}); choose another output folder")
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if target.is_dir() and os.path.ismount(target):
        raise OutputError(f"output {target} is a mount point, which lrc cannot replace with the folder it builds "
                          f"beside it; write into a folder inside it (-o {target / 'NAME'})")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"output folder {target} exists and is not empty (pass --overwrite to replace it)")
        check_replaceable(target)
    refusal = folder_refusal(target.parent)
    if refusal is not None:
        raise OutputError(f"cannot create output folder {target}: {refusal}")
    return OutputClaim.take(target)


def folder_refusal(folder: Path) -> str | None:
    """Why a folder cannot be made at `folder` (or written in, if it exists), as the machine would refuse it:
    its nearest existing ancestor is a file, or cannot be written to; None when nothing stands in the way."""
    existing = folder.expanduser()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK):
        return f"cannot write to {existing}: {unwritable_reason(existing)}"
    return None


def unwritable_reason(folder: Path) -> str:
    """Why `folder` cannot be written to: "read-only file system" where it lies on one, else "permission denied"."""
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def check_replaceable(folder: Path) -> None:
    """Raise unless `folder` is an earlier lrc output or `lrc export` folder: a readable report (or export
    marker) with lrc_version and the list of files lrc wrote there, and nothing else in it (no other file or
    folder, no symlink)."""
    name = REPORT_NAME if (folder / REPORT_NAME).exists() or not (folder / EXPORT_MARKER).exists() else EXPORT_MARKER
    what = "an lrc output" if name == REPORT_NAME else "an lrc export"
    refuse = f"--overwrite replaces only an empty folder or an earlier lrc output or export; {folder}"
    try:
        data = yaml.safe_load((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{refuse} has no {REPORT_NAME} and no {EXPORT_MARKER}, so it is neither an lrc output "
                          f"nor an lrc export (choose another output folder)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise OutputError(f"{refuse} has an unreadable {name} (choose another output folder)") from None
    if not isinstance(data, dict) or "lrc_version" not in data:
        record = "an lrc report" if name == REPORT_NAME else "lrc's record of an export"
        raise OutputError(f"{refuse}: its {name} is not {record} (choose another output folder)")
    listed = data.get(FILES_KEY)
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise OutputError(f"output folder {folder} is {what}, but its {name} does not list the files lrc wrote "
                          f"(an older lrc wrote it), so --overwrite cannot tell them from yours: delete the folder "
                          f"yourself or choose another output folder")
    files = set(listed)
    parents = {parent.as_posix() for f in files for parent in Path(f).parents if parent != Path(".")}
    unlisted = {  # {relative path: how it is shown}, a folder's contents left out when it is shown itself
        rel: rel + (" (a symlink)" if p.is_symlink() else "/" if p.is_dir() else "")
        for p in folder.rglob("*")
        for rel in [p.relative_to(folder).as_posix()]
        if p.is_symlink() or rel not in (parents if p.is_dir() else files)
    }
    foreign = sorted(shown for rel, shown in unlisted.items()
                     if not any(parent.as_posix() in unlisted for parent in Path(rel).parents))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"output folder {folder} is {what} but also holds files lrc did not write "
                          f"({shown}); --overwrite would delete them: move them or choose another output folder")


class OutputClaim:
    """An exclusive fcntl lock on `.NAME.lrc-lock` beside an output, held while a run builds that output.

    A second run (another process) asking for the same output fails at once naming the holder's PID.
    Taking it again in the same process returns the same claim. It is released (and the lock file removed)
    by `release`, when the claim is garbage-collected, or at exit.
    """

    _held: weakref.WeakValueDictionary[Path, OutputClaim] = weakref.WeakValueDictionary()

    def __init__(self, target: Path, fd: int, lock_path: Path) -> None:
        self.target, self.fd, self.lock_path = target, fd, lock_path

    @classmethod
    def take(cls, target: Path, wait: bool = False, busy: str = "another lrc run (PID {pid}) is writing {target}; "
             "wait for it or choose another output folder") -> OutputClaim:
        """Claim `target` (resolved); `wait` blocks until another holder is done instead of failing with `busy`."""
        if target in cls._held:
            return cls._held[target]
        lock_path = target.parent / f".{target.name}.lrc-lock"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {target.parent}: {exc.strerror}") from None
        for _ in range(100):  # retry while a releasing holder deletes the lock file under us
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot create {lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(busy.format(pid=holder, target=target)) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    claim = cls(target, fd, lock_path)
                    cls._held[target] = claim
                    return claim
            os.close(fd)
        raise OutputError(f"cannot lock {lock_path}: it keeps being replaced")

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()  # while still holding the lock: a waiter then finds a new inode and retries
        os.close(self.fd)
        self.fd = -1
        if self._held.get(self.target) is self:
            del self._held[self.target]

    def __del__(self) -> None:
        self.release()


@atexit.register
def _release_all() -> None:
    for claim in list(OutputClaim._held.values()):
        claim.release()


def remove_stale_temporaries(target: Path) -> None:
    """Delete `.NAME.lrc-tmp-PID-*` and `.NAME.lrc-old-PID-*` siblings left by runs that were killed (their
    PID no longer runs)."""
    for kind in ("tmp", "old"):
        for tmp in target.parent.glob(f".{target.name}.lrc-{kind}-*"):
            pid_text = tmp.name.removeprefix(f".{target.name}.lrc-{kind}-").split("-", 1)[0]
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
def atomic_directory(target: Path, replace: bool = True, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target`, on any error it is removed.

    The target is claimed (see OutputClaim; waiting for another holder when not `replace`) until the block
    ends. What stands at the target when the block ends is checked again, since something may have appeared
    there during the run: a file or symlink is refused, a non-empty folder is refused without `overwrite`
    (the run's --overwrite) and with it must still be replaceable (check_replaceable); a refusal leaves it
    untouched and discards the new folder. With replace=False (a cache entry) an existing target is kept
    and the new folder discarded. A process killed inside the block leaves only a hidden `.NAME.lrc-tmp-*`
    sibling, never a partial target. The folder and its files get the user's umask (mkdtemp alone gives
    0700, safetensors 0600 files).
    """
    target = target.resolve()
    claim = OutputClaim.take(target, wait=not replace)
    try:
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.lrc-tmp-{os.getpid()}-", dir=target.parent))
        try:
            yield tmp
            for path in [tmp, *tmp.rglob("*")]:  # safetensors writes 0600 files, mkdtemp a 0700 folder
                if not path.is_symlink():
                    apply_umask(path, 0o777 if path.is_dir() else 0o666)
            if target.exists() and not replace:
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.lexists(target):
                check_still_replaceable(target, overwrite)
                replace_folder(target, tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        claim.release()


def check_still_replaceable(target: Path, overwrite: bool) -> None:
    """Raise unless the existing `target` may be replaced at the end of a run: an empty folder, or with
    `overwrite` a replaceable one (check_replaceable). A file, a symlink, or files in a folder without
    `overwrite` appeared while the run worked (check_output_path refused them before it)."""
    discarded = "nothing was replaced and the new output was discarded"
    if target.is_symlink() or not target.is_dir():
        kind = "a symlink" if target.is_symlink() else "a file"
        raise OutputError(f"output {target} appeared as {kind} during the run; {discarded}: move it away and run "
                          f"again, or choose another output folder")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"output folder {target} exists and is not empty: it was filled during the run; "
                          f"{discarded} (pass --overwrite to replace an earlier lrc output, or choose another "
                          f"output folder)")
    check_replaceable(target)


def replace_folder(target: Path, new: Path) -> None:
    """Put the folder `new` in place of the existing `target`: target moves into a `.NAME.lrc-old-PID-*`
    sibling, new takes its name, the old one is deleted. If either move fails, target is left as it was
    (moved back) and OutputError says why."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.lrc-old-{os.getpid()}-", dir=target.parent))
    try:
        os.replace(target, old / target.name)
    except OSError as exc:
        shutil.rmtree(old, ignore_errors=True)
        raise OutputError(f"cannot replace {target}: {exc.strerror}") from None
    try:
        os.replace(new, target)
    except OSError as exc:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise OutputError(f"cannot replace {target}: {exc.strerror}") from None
    shutil.rmtree(old, ignore_errors=True)

"""SIGINT and SIGTERM: one line, the temporary output removed, every earlier file unchanged, exit 130 / 143.

Real subprocesses get real signals. To signal at a known moment inside the atomic write, the child runs
the CLI with `atomic_directory` wrapped to announce its temporary folder once the checkpoint is written
in it and wait there, before the rename; everything else is the real code path.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import file_hashes, lrc_command, lrc_env, tiny_compress_args

PAUSE_IN_WRITE = """
import sys, time
from contextlib import contextmanager
import lrc.io.output
real = lrc.io.output.atomic_directory

@contextmanager
def paused(target, **kwargs):
    with real(target, **kwargs) as tmp:
        yield tmp  # the checkpoint and the report are written; then wait before the rename into place
        print(f"TEMPORARY {tmp}", file=sys.stderr, flush=True)
        time.sleep(120)

for name, module in list(sys.modules.items()):  # wherever lrc imported it by name
    if name.startswith("lrc") and getattr(module, "atomic_directory", None) is real:
        module.atomic_directory = paused
from lrc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(args: list[str], cwd: Path, pause_in_write: bool) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", PAUSE_IN_WRITE, *args] if pause_in_write else lrc_command(*args)
    return subprocess.Popen(argv, cwd=cwd, env=lrc_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 180) -> tuple[str, list[str]]:
    """Read stderr until a line containing `prefix`; returns it and the lines read."""
    assert proc.stderr is not None
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if prefix in line:
            return line.rstrip("\n"), lines
    proc.kill()
    raise AssertionError(f"never saw {prefix!r}; stderr: {lines}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, calib_file):
    """A model, a calibration file, an earlier lrc output and a file of the user's, all to stay unchanged
    (every test checks that, so they can share it)."""
    from ..conftest import run_lrc, save_tiny_model

    root = tmp_path_factory.mktemp("signals")
    model = save_tiny_model(root / "model", "llama")
    calib = root / "calib.txt"
    calib.write_bytes(calib_file.read_bytes())
    (root / "notes.txt").write_text("the user's own file")
    earlier = run_lrc(*tiny_compress_args(model, calib, root / "out", "--quiet"), cwd=root)
    assert earlier.returncode == 0, earlier.stderr
    return root, model, calib


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGINT, 130, "error: interrupted by SIGINT"),
    (signal.SIGTERM, 143, "error: terminated by SIGTERM"),
])
def test_signal_inside_the_write_cleans_up(workspace, signum, code, line):
    root, model, calib = workspace
    before = file_hashes(root)
    proc = start(tiny_compress_args(model, calib, root / "out", "--overwrite"), root, pause_in_write=True)
    announced, _ = wait_for_line(proc, "TEMPORARY ")
    temporary = Path(announced.split(" ", 1)[1])
    assert temporary.parent == root and (temporary / "lrc_report.yaml").is_file()  # written, not yet in place
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert stderr.splitlines() == [line]  # one line, no traceback
    assert stdout == ""
    assert not temporary.exists() and not list(root.glob(".out.lrc-*"))
    assert file_hashes(root) == before  # the earlier output, the model, the data and the notes, byte for byte


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGINT, 130, "error: interrupted by SIGINT"),
    (signal.SIGTERM, 143, "error: terminated by SIGTERM"),
])
def test_signal_while_calibrating(workspace, signum, code, line):
    root, model, calib = workspace
    before = file_hashes(root)
    proc = start(tiny_compress_args(model, calib, root / "out2"), root, pause_in_write=False)
    wait_for_line(proc, "] compress ")  # the first log line: imports done, the run has begun
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert stderr.splitlines()[-1] == line and "Traceback" not in stderr
    assert [s for s in stderr.splitlines() if s.startswith("error:")] == [line]
    assert stdout == ""
    assert file_hashes(root) == before and not list(root.glob("*out2*"))


def test_signal_to_a_two_process_run(workspace):
    """--nproc 2 signalled while calibrating: the launcher stops both ranks (neither meets the other's error
    exchange inside another collective), one line, 128 + the signal, nothing left behind (SIGTERM takes the
    same path)."""
    signum, code, line = signal.SIGINT, 130, "error: interrupted by SIGINT"
    root, model, calib = workspace
    before = file_hashes(root)
    proc = start([*tiny_compress_args(model, calib, root / "out3"), "--nproc", 2], root, pause_in_write=False)
    wait_for_line(proc, "] compress ")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert [s for s in stderr.splitlines() if s.startswith("error:")] == [line] and "Traceback" not in stderr
    assert "terminate called" not in stderr and stdout == ""
    assert file_hashes(root) == before and not list(root.glob("*out3*"))

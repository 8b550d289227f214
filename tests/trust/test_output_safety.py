"""Output safety through the CLI: --overwrite never deletes a user's file, concurrent runs cannot both
succeed, everything written follows the umask. Each test hashes every pre-existing file before and after."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import (
    WIKI_VALID,
    file_hashes,
    lrc_command,
    lrc_env,
    run_main,
    save_tiny_model,
    tiny_compress_args,
)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A user's folder: models/llama (the input), models/other (another model), data/calib.txt, notes.txt;
    the working directory is a sibling `work`, the lrc cache is `cache`, HOME is `home`."""
    models = tmp_path / "models"
    save_tiny_model(models / "llama", "llama")
    save_tiny_model(models / "other", "qwen2")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.txt").write_text(WIKI_VALID.read_text(encoding="utf-8")[:40_000])
    (tmp_path / "notes.txt").write_text("my notes")
    for name in ("work", "cache", "home"):
        (tmp_path / name).mkdir()
    (tmp_path / "work" / "todo.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def compress_args(root: Path, out, *extra):
    return tiny_compress_args(root / "models" / "llama", root / "data" / "calib.txt", out, *extra)


def refused(capsys, root: Path, out, message: str, *extra) -> None:
    """The run exits 2 with one `error:` line containing `message`, and no file under root changed."""
    before = file_hashes(root)
    code, _, stderr = run_main(capsys, *compress_args(root, out, *extra))
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert file_hashes(root) == before


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "is the working directory"),
        ("..", "contains the input model"),
        ("../models", "contains the input model"),
        ("../models/llama", "is the input model"),
        ("../models/llama/sub", "is inside the input model"),
        ("../data", "contains the calibration file"),
        ("../cache", "is the lrc cache"),
        ("../cache/out", "is inside the lrc cache"),
        ("../home", "is your home folder"),
        ("/", "contains the input model"),
    ],
)
def test_overwrite_never_replaces_a_protected_place(capsys, sandbox, out, message):
    refused(capsys, sandbox, out, message, "--overwrite")


def test_cache_dir_inside_output_and_output_inside_cache_dir(capsys, sandbox):
    (sandbox / "out").mkdir()
    refused(capsys, sandbox, "../out", "contains the lrc cache", "--overwrite", "--cache-dir", "../out/stats")
    refused(capsys, sandbox, "../stats/out", "is inside the lrc cache", "--cache-dir", "../stats")


def test_symlink_to_the_input_is_the_input(capsys, sandbox):
    (sandbox / "link").symlink_to(sandbox / "models" / "llama")
    refused(capsys, sandbox, "../link", "is the input model", "--overwrite")


def test_overwrite_refuses_a_folder_that_is_not_an_lrc_output(capsys, sandbox):
    (sandbox / "photos").mkdir()
    (sandbox / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    refused(capsys, sandbox, "../photos", "has no lrc_report.yaml, so it is not one", "--overwrite")
    (sandbox / "photos" / "lrc_report.yaml").write_text("budget: [0.3\n")
    refused(capsys, sandbox, "../photos", "has an unreadable lrc_report.yaml", "--overwrite")
    (sandbox / "photos" / "lrc_report.yaml").write_text("budget: 0.3\n")
    refused(capsys, sandbox, "../photos", "is not an lrc report", "--overwrite")


def test_overwrite_replaces_an_earlier_output_only_without_foreign_files(capsys, sandbox):
    out = sandbox / "out"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    (out / "README.md").write_text("my model card")
    (out / "eval").mkdir()
    refused(capsys, sandbox, out, "also holds files lrc did not write (README.md, eval/)", "--overwrite")
    (out / "README.md").unlink()
    (out / "eval").rmdir()
    before = file_hashes(sandbox)
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out, "--overwrite", "--budget", "0.5"))
    assert code == 0, stderr
    after = file_hashes(sandbox)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == {
        k: v for k, v in before.items() if not k.startswith("out/")}
    assert yaml.safe_load((out / "lrc_report.yaml").read_text())["budget"] == 0.5
    assert not [p for p in sandbox.iterdir() if p.name.startswith(".out")]  # no lock or temporary left


def test_overwrite_accepts_an_empty_folder(capsys, sandbox):
    (sandbox / "empty").mkdir()
    code, _, stderr = run_main(capsys, *compress_args(sandbox, sandbox / "empty", "--overwrite"))
    assert code == 0, stderr
    assert (sandbox / "empty" / "lrc_report.yaml").is_file()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_holding_the_output_blocks_another(capsys, sandbox):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(sandbox / ".out.lrc-lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(capsys, sandbox, sandbox / "out", f"another lrc run (PID {holder.pid}) is writing")
    finally:
        holder.kill()
        holder.wait()
    code, _, stderr = run_main(capsys, *compress_args(sandbox, sandbox / "out"))  # the holder is gone: free again
    assert code == 0, stderr


def test_two_concurrent_runs_do_not_both_succeed(sandbox):
    before = file_hashes(sandbox)
    command = lrc_command(*compress_args(sandbox, sandbox / "out"))
    procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=lrc_env())
             for _ in range(2)]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert ("another lrc run" in results[1][1]) or ("exists and is not empty" in results[1][1])
    after = file_hashes(sandbox)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


def test_everything_written_follows_the_umask(capsys, sandbox):
    old = os.umask(0o027)
    try:
        code, _, stderr = run_main(capsys, *compress_args(sandbox, sandbox / "out", "--cache-dir", sandbox / "stats"))
    finally:
        os.umask(old)
    assert code == 0, stderr
    written = [sandbox / "out", *(sandbox / "out").iterdir(), *(sandbox / "stats").iterdir()]
    modes = {str(p.relative_to(sandbox)): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {k: (0o750 if (sandbox / k).is_dir() else 0o640) for k in modes}


def test_a_mount_point_is_refused_before_any_work(capsys, sandbox, monkeypatch):
    """A mount point cannot be renamed away: refused at once (not after the run), with the folder to use instead."""
    (sandbox / "volume").mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).name == "volume" or real(p))
    refused(capsys, sandbox, sandbox / "volume", "is a mount point")


def test_a_failed_replacement_puts_the_earlier_output_back(capsys, sandbox, monkeypatch):
    """When moving the earlier output aside or the new one in fails, the earlier output is left as it was, the
    run exits 2 naming why, and no `.NAME.lrc-old-*` or temporary sibling is left."""
    out = sandbox / "out"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    real_replace = os.replace
    for failing_call in (1, 2):
        calls = []

        def replace(src, dst, calls=calls, failing_call=failing_call):
            if Path(dst).name == "out" or Path(src).name == "out":
                calls.append((src, dst))
                if len(calls) == failing_call:
                    raise OSError(16, "Device or resource busy", str(src), None, str(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        refused(capsys, sandbox, out, "cannot replace", "--overwrite", "--budget", "0.5", "--quiet")
        monkeypatch.setattr(os, "replace", real_replace)
        assert yaml.safe_load((out / "lrc_report.yaml").read_text())["budget"] == 0.3
        assert not [p.name for p in sandbox.iterdir() if p.name.startswith(".out")]


def test_an_unusable_cache_folder_is_refused_before_any_work(capsys, sandbox):
    refused(capsys, sandbox, sandbox / "out", "cannot use", "--cache-dir", "../notes.txt/stats")

"""Output safety through the CLI: --overwrite never deletes a user's file, concurrent runs cannot both
succeed, everything written follows the umask. Each test hashes every pre-existing file before and after."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lrc
from lrc.errors import OutputError
from lrc.io.output import atomic_directory

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
    refused(capsys, sandbox, "../photos", "has no lrc_report.yaml and no lrc_export.yaml, so it is neither an lrc "
            "output nor an lrc export", "--overwrite")
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
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["budget"] == 0.5
    assert report["files"] == sorted(k.removeprefix("out/") for k in after if k.startswith("out/"))
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


# Files a user may add to an earlier output whose names look like what lrc or a tokenizer writes: --overwrite
# replaces only the files the output's record lists, so each of these must make it refuse.
LOOK_ALIKES = ["tokenizer_NOTES.txt", "tokenizer.json.orig", "lrc_my_helper.py", "vocab.txt", "merges.txt",
               "model-00001-of-00002.safetensors", "additional_chat_templates/mine.jinja"]


def test_overwrite_refuses_files_that_only_look_like_lrc_files(capsys, sandbox):
    out = sandbox / "out"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    listed = yaml.safe_load((out / "lrc_report.yaml").read_text())["files"]
    assert listed == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "lrc_report.yaml" in listed and not set(LOOK_ALIKES) & set(listed)
    for name in LOOK_ALIKES:
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(f"the user's {name}")
        shown = name.split("/")[0] + "/" if "/" in name else name  # a folder lrc did not write: named itself
        refused(capsys, sandbox, out, f"also holds files lrc did not write ({shown})", "--overwrite")
        (out / name).unlink()
        if (out / name).parent != out:
            (out / name).parent.rmdir()
    (out / "tokenizer_link.json").symlink_to(sandbox / "notes.txt")  # a symlink, even under a look-alike name
    refused(capsys, sandbox, out, "(tokenizer_link.json (a symlink))", "--overwrite")
    (out / "tokenizer_link.json").unlink()
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out, "--overwrite"))  # clean again: replaced
    assert code == 0, stderr


def test_overwrite_refuses_an_output_whose_record_does_not_list_its_files(capsys, sandbox):
    """An output of an older lrc (a report without `files`) cannot be told apart from the user's additions."""
    out = sandbox / "out"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    del report["files"]
    (out / "lrc_report.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    refused(capsys, sandbox, out, "its lrc_report.yaml does not list the files lrc wrote (an older lrc wrote it), so "
            "--overwrite cannot tell them from yours: delete the folder yourself or choose another", "--overwrite")


def test_overwrite_replaces_a_clean_export_and_refuses_one_with_user_files(capsys, sandbox):
    out, dense = sandbox / "out", sandbox / "dense"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense)
    assert code == 0, stderr
    marker = yaml.safe_load((dense / "lrc_export.yaml").read_text())
    assert marker["files"] == sorted(str(p.relative_to(dense)) for p in dense.rglob("*") if p.is_file())
    first = file_hashes(dense)
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--overwrite")
    assert code == 0, stderr
    assert file_hashes(dense) == first
    for name in ("tokenizer_NOTES.txt", "vocab.txt", "model-00001-of-00002.safetensors"):
        (dense / name).write_text("mine")
        before = file_hashes(sandbox)
        code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--overwrite")
        assert code == 2 and "files lrc did not write" in stderr and file_hashes(sandbox) == before, stderr
        (dense / name).unlink()


def test_a_symlink_to_a_user_folder_without_overwrite_is_the_plain_refusal(capsys, sandbox):
    (sandbox / "photos").mkdir()
    (sandbox / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (sandbox / "link").symlink_to(sandbox / "photos")
    refused(capsys, sandbox, "../link", "exists and is not empty (pass --overwrite to replace it)")
    refused(capsys, sandbox, "../link", "so it is neither an lrc output nor an lrc export", "--overwrite")


def fake_output(folder: Path) -> None:
    """A minimal earlier lrc output: one checkpoint file and a report listing both."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "lrc_report.yaml").write_text(yaml.safe_dump(
        {"lrc_version": lrc.__version__, "files": ["lrc_report.yaml", "model.safetensors"]}))


def users_files(folder: Path) -> dict[str, str]:
    """file_hashes less lrc's own lock and temporary folders."""
    return {k: v for k, v in file_hashes(folder).items() if not k.startswith(".out.lrc-")}


def no_temporaries(target: Path) -> bool:
    return not list(target.parent.glob(f".{target.name}.lrc-*"))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["file", "symlink", "user folder", "lrc output"])
def test_what_appears_at_the_target_during_the_run_is_not_lost(tmp_path, kind, overwrite):
    """The target did not exist when the run began and something appears there while it works: a file, a
    symlink or a user's folder is never replaced (with or without --overwrite); a copy of an earlier lrc
    output is replaced only with --overwrite. A refusal discards the new output and leaves no temporary."""
    target = tmp_path / "out"
    (tmp_path / "elsewhere").write_text("the link's target")
    expected = {
        "file": "appeared as a file during the run; nothing was replaced and the new output was discarded",
        "symlink": "appeared as a symlink during the run; nothing was replaced",
        "user folder": ("so it is neither an lrc output" if overwrite else
                        "exists and is not empty: it was filled during the run; nothing was replaced"),
        "lrc output": None if overwrite else "exists and is not empty: it was filled during the run",
    }[kind]
    refusal = pytest.raises(OutputError) if expected else contextlib.nullcontext()
    with refusal as raised, atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
        if kind == "file":
            target.write_bytes(b"\x00the user's file\xff")
        elif kind == "symlink":
            target.symlink_to(tmp_path / "elsewhere")
        elif kind == "user folder":
            target.mkdir()
            (target / "cat.jpg").write_bytes(b"cat")
        else:
            fake_output(target)
        before = users_files(tmp_path)
    if expected:
        assert expected in str(raised.value) and "\n" not in str(raised.value)
        assert users_files(tmp_path) == before
        assert target.is_symlink() == (kind == "symlink")
    else:
        assert (target / "model.safetensors").read_bytes() == b"new weights"
        assert not (target / "lrc_report.yaml").exists()
    assert no_temporaries(target)


def test_a_cache_entry_that_appears_during_the_run_is_kept(tmp_path):
    """replace=False (a cache entry): another run's entry is kept, the new one discarded, as before."""
    target = tmp_path / "entry"
    with atomic_directory(target, replace=False) as tmp:
        (tmp / "new").write_text("new")
        fake_output(target)
    assert sorted(p.name for p in target.iterdir()) == ["lrc_report.yaml", "model.safetensors"]
    assert no_temporaries(target)


def appear_during(monkeypatch, module, name: str, make) -> None:
    """Wrap `module.name` (a step inside the atomic write) so that `make()` runs just before it."""
    real = getattr(module, name)

    def step(*args, **kwargs):
        make()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, step)


@pytest.mark.parametrize("stream", [False, True])
def test_a_file_created_at_the_output_during_compress_survives(capsys, sandbox, monkeypatch, stream):
    """Through the CLI (in memory and --stream), without --overwrite: the user's file created at -o while the
    run works ends the run with exit 2 and stays byte for byte."""
    import lrc.io.writer
    import lrc.stream.pipeline

    out = sandbox / "out"
    data = b"\x00\x01 the user's file, created while lrc ran \xfe\xff"
    appear_during(monkeypatch, lrc.stream.pipeline if stream else lrc.io.writer, "write_remote_code",
                  lambda: out.exists() or out.write_bytes(data))
    extra = ["--quiet", "--stream"] if stream else ["--quiet"]
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out, *extra))
    assert code == 2 and stderr.count("\n") == 1 and "appeared as a file during the run" in stderr, stderr
    assert out.read_bytes() == data and no_temporaries(out)


def test_an_earlier_output_copied_to_the_output_during_compress(capsys, sandbox, monkeypatch):
    """An earlier lrc output copied to -o while the run works is replaced only with --overwrite."""
    import lrc.io.writer

    earlier = sandbox / "earlier"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, earlier))
    assert code == 0, stderr
    out = sandbox / "out"
    appear_during(monkeypatch, lrc.io.writer, "write_remote_code",
                  lambda: out.exists() or shutil.copytree(earlier, out))
    before_hashes = file_hashes(earlier)
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out, "--budget", "0.5"))
    assert code == 2 and "exists and is not empty: it was filled during the run" in stderr, stderr
    assert file_hashes(out) == before_hashes and no_temporaries(out)
    shutil.rmtree(out)
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out, "--budget", "0.5", "--overwrite"))
    assert code == 0, stderr
    assert yaml.safe_load((out / "lrc_report.yaml").read_text())["budget"] == 0.5 and no_temporaries(out)


def test_a_file_created_at_the_output_during_export_survives(capsys, sandbox, monkeypatch):
    import lrc.export

    out, dense = sandbox / "out", sandbox / "dense"
    code, _, stderr = run_main(capsys, *compress_args(sandbox, out))
    assert code == 0, stderr
    appear_during(monkeypatch, lrc.export, "check_finite_files", lambda: dense.write_text("mine"))
    code, _, stderr = run_main(capsys, "export", out, "--dense", "-o", dense, "--overwrite")
    assert code == 2 and "appeared as a file during the run" in stderr, stderr
    assert dense.read_text() == "mine" and no_temporaries(dense)


def test_a_full_disk_is_the_machines_refusal(capsys, monkeypatch, tmp_path, calib_file):
    # safetensors reports the system's error inside its own exception; lrc raises it as the OSError it was
    from safetensors import SafetensorError

    import lrc.io.checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(lrc.io.checkpoint, "save_file", full)
    model = save_tiny_model(tmp_path / "model", "llama")
    code, stdout, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out"))
    assert code == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: No space left on device: ")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.lrc-*"))

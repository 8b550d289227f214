"""Usage errors caught by typer's parser: one `error:` line on stderr, exit 2, nothing on stdout."""

from __future__ import annotations

import pytest

from lrc.cli import main
from lrc.cli.exit_codes import EXIT_RULES, ExitRule, exit_rule

from ..conftest import run_lrc

CASES = [
    (["compress", "--samples", "abc"],
     "Invalid value for '--samples': Input should be a valid integer, unable to parse string as an integer "
     "(see `lrc compress --help`)"),
    (["compress", "--smaples", "3"], "No such option: --smaples (Possible options: --samples) (see `lrc compress --help`)"),
    (["eval", "out", "--seq-len", "1.5", "--data", "x"],
     "Invalid value for '--seq-len': Input should be a valid integer, unable to parse string as an integer "
     "(see `lrc eval --help`)"),
    (["eval", "out", "--data"], "Option '--data' requires an argument."),
    (["report"], "Missing argument 'folder'. (see `lrc report --help`)"),
    (["compress", "a", "b"], "Got unexpected extra argument(s) (b) (see `lrc compress --help`)"),
    (["compress", "--sequential=yes"], "Option '--sequential' does not take a value."),
    (["bogus"], "No such command 'bogus'. (see `lrc --help`)"),
    (["eval", "out"], "nothing to evaluate: give --data FILE (perplexity) and/or --tasks NAMES (lm-eval)"),
    (["eval", "out", "--tasks", " , "], "--tasks needs task names separated by commas, got ' , '"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_one_error_line_exit_2(capsys, args, message):
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err) == (2, "", f"error: {message}\n")


def test_usage_error_from_a_real_process(tmp_path):
    result = run_lrc("compress", "--budget", "0.3", "--samples", "many", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["error: Invalid value for '--samples': Input should be a valid integer, "
                                          "unable to parse string as an integer (see `lrc compress --help`)"]


def test_no_arguments_shows_help(capsys):
    capsys.readouterr()
    assert main([]) == 0
    assert "compress" in capsys.readouterr().out


def test_every_exception_has_one_rule():
    """The table is ordered from the most specific kind; the last rule catches any other Exception."""
    assert all(isinstance(rule, ExitRule) for rule in EXIT_RULES)
    assert exit_rule(ValueError("x")).code(ValueError("x")) == 1  # type: ignore[union-attr]
    assert exit_rule(SystemExit(0)) is None


@pytest.mark.parametrize(("error", "code", "line"), [
    (OSError(30, "Read-only file system", "/mnt/ro/e.yaml"), 2, "Read-only file system: /mnt/ro/e.yaml"),
    (OSError(28, "No space left on device", "/data/out"), 2, "No space left on device: /data/out"),
    (PermissionError(13, "Permission denied", "/a", None, "/b"), 2, "Permission denied: /a -> /b"),
    (FileNotFoundError(2, "No such file or directory", "/x"), 1, "unexpected FileNotFoundError"),
    (RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer."), 1,
     "lost the connection to another process of this run, which stopped first"),
])
def test_the_machine_refusing_a_file_is_bad_input_not_a_bug(error, code, line):
    """A read-only or full disk, or a permission the user lacks: exit 2 and the reason; other OSErrors stay unexpected."""
    rule = exit_rule(error)
    assert rule is not None and rule.code(error) == code
    assert (rule.message(error) or "").startswith(line)


def test_version_names_lrc_and_its_libraries(capsys):
    from importlib.metadata import version

    import torch

    import lrc

    capsys.readouterr()
    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"lrc {lrc.__version__} (torch {torch.__version__}, transformers ")
    assert version("lrc") == lrc.__version__  # the package's metadata reads the same version

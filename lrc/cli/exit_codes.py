"""How every way a command can end becomes an exit code and one line on stderr: one table, EXIT_RULES.

    0    success (and the quality gate passed, when one was set)
    1    unexpected error (a bug or an environment problem lrc does not recognise; `lrc --debug` shows it)
    2    bad input: an LrcError (model, recipe, calibration data, output folder...), a usage error
         (unknown flag or command, a flag's value of the wrong type, a missing required option), or the
         machine refusing a file (read-only or full disk, no permission: ENVIRONMENT_ERRNOS)
    3    quality gate failed: `lrc eval --max-ratio R` measured a perplexity ratio above R
    130  interrupted by SIGINT (Ctrl-C); 143  terminated by SIGTERM (128 + the signal number, as shells do)

A signal is turned into an exception (`Signalled`, a BaseException like KeyboardInterrupt) so that the
`finally` and `except BaseException` blocks on the way out run: the atomic output's temporary folder is
removed and nothing half-written is left.
"""

from __future__ import annotations

import errno
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import typer

from ..errors import DISK_REFUSALS, LrcError

OK = 0
UNEXPECTED = 1
BAD_INPUT = 2
QUALITY_GATE_FAILED = 3
INTERRUPTED = 128 + signal.SIGINT  # 130
TERMINATED = 128 + signal.SIGTERM  # 143


class QualityGateFailed(Exception):
    """`lrc eval --max-ratio`: the compressed model's perplexity ratio to the baseline is above the limit."""


class Signalled(BaseException):
    """SIGINT or SIGTERM arrived; raised by the handler `handle_signals` installs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class ExitRule:
    """Exceptions of `kinds` (for which `when` holds) exit with `code` after printing `message(exc)` (None:
    print nothing).

    debug_raises: under `lrc --debug` the exception propagates with its traceback instead.
    """

    kinds: tuple[type[BaseException], ...]
    code: Callable[[BaseException], int]
    message: Callable[[BaseException], str | None]
    debug_raises: bool = False
    when: Callable[[BaseException], bool] = lambda exc: True  # a further condition on the exception


def _usage_message(exc: BaseException) -> str:
    """typer's own message ("Invalid value for '--samples': ...", "No such option: --smaples ..."), and
    where the command is known, the help to read."""
    text = exc.format_message() if isinstance(exc, typer.TyperException) else str(exc)
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see `{ctx.command_path} --help`)" if ctx is not None else text


# what the machine refuses (a read-only or full disk, a folder the user may not write), not a bug in lrc
ENVIRONMENT_ERRNOS = DISK_REFUSALS | {errno.ENOTDIR, errno.EISDIR}  # and a path through a file, or a folder where a file goes


PEER_GONE = re.compile(r"Connection (reset|closed) by peer")  # gloo's words for a process that went away


def _environment_refusal(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def _refusal_message(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
    return f"{exc.strerror}: {where}" if where else str(exc.strerror or exc)


def _signal_message(exc: BaseException) -> str:
    signum = exc.signum if isinstance(exc, Signalled) else signal.SIGINT
    verb = "interrupted" if signum == signal.SIGINT else "terminated"
    return f"{verb} by {signal.Signals(signum).name}"


EXIT_RULES: tuple[ExitRule, ...] = (
    # --help and the like: typer.Exit carries the code, the text is already printed
    ExitRule((typer.Exit,), lambda exc: getattr(exc, "exit_code", OK), lambda exc: None),
    ExitRule((Signalled,), lambda exc: 128 + exc.signum if isinstance(exc, Signalled) else INTERRUPTED, _signal_message),
    ExitRule((KeyboardInterrupt, typer.Abort), lambda exc: INTERRUPTED, _signal_message),
    ExitRule((QualityGateFailed,), lambda exc: QUALITY_GATE_FAILED, str),
    ExitRule((LrcError,), lambda exc: getattr(exc, "exit_code", BAD_INPUT), str, debug_raises=True),
    # typer >= 0.29 bundles its own click: every parsing error (UsageError, BadParameter, NoSuchOption,
    # MissingParameter...) is a TyperException
    ExitRule((typer.TyperException,), lambda exc: BAD_INPUT, _usage_message),
    ExitRule((OSError,), lambda exc: BAD_INPUT, _refusal_message, debug_raises=True, when=_environment_refusal),
    # a process of an --nproc / torchrun run whose peer ended first: the peer's message (or the launcher's) says why
    ExitRule((RuntimeError,), lambda exc: UNEXPECTED,
             lambda exc: "lost the connection to another process of this run, which stopped first (see its message)",
             debug_raises=True, when=lambda exc: bool(PEER_GONE.search(str(exc)))),
    ExitRule(
        (Exception,),
        lambda exc: UNEXPECTED,
        lambda exc: f"unexpected {type(exc).__name__}: {exc} (run `lrc --debug ...` for the traceback)",
        debug_raises=True,
    ),
)


def exit_rule(exc: BaseException) -> ExitRule | None:
    """The first rule whose kinds match `exc` (None for anything else, e.g. SystemExit: let it through)."""
    return next((rule for rule in EXIT_RULES if isinstance(exc, rule.kinds) and rule.when(exc)), None)


def one_line(text: str) -> str:
    """Messages are printed on one line: inner line breaks become spaces."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


@contextmanager
def handle_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise Signalled in the main thread (once: a second signal during
    the clean-up is ignored, so the clean-up finishes); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Signalled(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

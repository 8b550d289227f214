"""The `lrc` command line: a thin layer over lrc.compress / lrc.evaluate / lrc.tasks / the report reader.

One module per command (compress, eval, report, methods), shared option types in `options`, and one table
(`exit_codes.EXIT_RULES`) that turns every way a command can end into an exit code and one line on stderr.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from ..distributed import launched_rank
from .compress import compress
from .eval import eval_command
from .exit_codes import OK, exit_rule, handle_signals, one_line
from .export import export
from .methods import methods
from .report import report

app = typer.Typer(
    name="lrc",
    help="Make LLM checkpoints smaller by low-rank factorization.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(compress)
app.command("eval")(eval_command)
app.command()(report)
app.command()(methods)
app.command()(export)
_state: dict[str, Any] = {"debug": False, "argv": []}


def _print_version(value: bool) -> None:
    """--version: lrc's version and those of the libraries that decide its numbers (for a bug report)."""
    if value:
        import torch
        import transformers

        from .. import __version__
        typer.echo(f"lrc {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, "
                   f"Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Show lrc's version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see lrc.cli.exit_codes: 0 ok, 1 unexpected, 2 bad input or usage,
    3 quality gate failed, 130 SIGINT, 143 SIGTERM)."""
    args = sys.argv[1:] if argv is None else list(argv)
    _state["argv"] = args
    command = typer.main.get_command(app)
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    format_warning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        with handle_signals():
            _quiet_libraries()
            result = command.main(args=args or ["--help"], prog_name="lrc", standalone_mode=False)
        return result if isinstance(result, int) else OK
    except BaseException as exc:
        rule = exit_rule(exc)
        if rule is None or (rule.debug_raises and _state["debug"]):
            raise
        message = rule.message(exc)
        if message is not None and launched_rank() == 0:  # over torch.distributed every rank has the error: one prints
            errors.print(Text.assemble(("error:", "bold red"), " ", one_line(message)))
        return rule.code(exc)
    finally:
        _state["debug"] = False
        warnings.formatwarning = format_warning


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as the CLI prints it: `warning: MESSAGE` on one line (not Python's file, line and source)."""
    return f"warning: {one_line(str(message)).removeprefix('lrc: ')}\n"


def _quiet_libraries() -> None:
    """lrc draws its own progress; silence the per-file bars and info logs of transformers and the Hub."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def current_argv() -> list[str]:
    """The arguments `main` was called with (`lrc compress --nproc` launches the same command again)."""
    return list(_state["argv"])


def console_main() -> None:
    sys.exit(main())

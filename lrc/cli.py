"""The `lrc` command line: a thin layer over lrc.compress / lrc.evaluate / the report reader.

Every known error (LrcError, bad flags) becomes one line on stderr and a non-zero exit; an unexpected
exception also gives one line, and `lrc --debug ...` shows its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import CompressionConfig
from .errors import ConfigError, LrcError
from .sources import DEFAULT_MODEL

app = typer.Typer(
    name="lrc",
    help="Make LLM checkpoints smaller by low-rank factorization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
_state = {"debug": False}


@app.callback()
def _global(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False) -> None:
    _state["debug"] = debug


@contextmanager
def _progress_bars() -> Iterator[Any]:
    """A progress callback drawing one rich bar per phase on stderr; nothing is drawn before the first update."""
    bars: Progress | None = None
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        nonlocal bars
        if bars is None:
            bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
            bars.start()
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    try:
        yield update
    finally:
        if bars is not None:
            bars.stop()


def _parse_budget(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"budget must be a number in (0, 1), got {text!r}") from None


ModelArg = Annotated[str, typer.Argument(help="Model folder, .gguf file, Hub id, or alias (smollm2-135m).")]


@app.command()
def compress(
    model: ModelArg = DEFAULT_MODEL,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")] = Path("lrc-out"),
    budget: Annotated[str | None, typer.Option(help="Fraction of targeted parameters to remove, in (0, 1).")] = None,
    method: Annotated[str | None, typer.Option(help="Factorization method (see `lrc methods`).")] = None,
    allocator: Annotated[str | None, typer.Option(help="Rank allocator (see `lrc methods`).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe; flags given here override it.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration .txt/.jsonl file or hf://datasets/...; default: self-sampled.")] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration windows.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per calibration window.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of written weights: float32, bfloat16, float16.")] = None,
    sequential: Annotated[bool | None, typer.Option("--sequential/--one-shot", help="Refit each layer on the compressed layers' outputs.")] = None,
    keep_dense: Annotated[list[str] | None, typer.Option("--keep-dense", help="Regex of linears to keep dense (repeatable).")] = None,
    min_kept: Annotated[float | None, typer.Option("--min-kept", help="Least fraction of parameters every matrix keeps.")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Reuse calibration statistics cached here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Calibrate, allocate ranks, factorize, and write a checkpoint with lrc_report.yaml."""
    from .pipeline import compress as run_compress
    from .report_view import summary_table

    config = CompressionConfig.from_yaml(recipe) if recipe else CompressionConfig()
    config = config.replace(
        budget=_parse_budget(budget), method=method, allocator=allocator, calib=calib, samples=samples,
        seq_len=seq_len, seed=seed, device=device, dtype=dtype, sequential=sequential, keep_dense=keep_dense or None,
        min_kept=min_kept,
    )
    config.validate()
    with _progress_bars() as progress:
        result = run_compress(model, config, output, overwrite=overwrite, progress=progress, cache_dir=cache_dir)
    out.print(summary_table(result.report))
    out.print(f"wrote {output}")


@app.command("eval")
def evaluate_cmd(
    model: ModelArg,
    data: Annotated[str, typer.Option(help="Evaluation text file (e.g. wiki.test.raw).")],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Second model evaluated in the same run.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the results as YAML.")] = None,
) -> None:
    """Perplexity (non-overlapping windows, tail dropped), parameters, size and speed; optionally vs a baseline."""
    from .evaluate import evaluate

    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    results = []
    for spec in [model] + ([baseline] if baseline else []):
        with _progress_bars() as progress:
            results.append(evaluate(spec, data, seq_len, windows, batch_size, device, progress, reference=baseline))
    table = Table(title=f"{data}: seq_len {seq_len}, {results[0]['windows']} windows", title_justify="left")
    table.add_column("")
    for r in results:
        table.add_column(r["model"], justify="right")
    rows = [("perplexity", "{:.3f}", "perplexity"), ("cosine similarity to baseline", "{:.5f}", "cosine_similarity"),
            ("parameters", "{:,}", "params"), ("bytes on disk", "{:,}", "bytes"), ("tokens/s", "{:,.0f}", "tokens_per_s")]
    for label, fmt, key in rows:
        if key in results[0]:  # an encoder has a cosine similarity instead of a perplexity
            table.add_row(label, *[fmt.format(r[key]) for r in results])
    if baseline and "perplexity" in results[0]:
        ratio = results[0]["perplexity"] / results[1]["perplexity"]
        table.caption = f"perplexity ratio (model / baseline): {ratio:.3f}"
    out.print(table)
    if output is not None:
        output.write_text(yaml.safe_dump({"results": results}, sort_keys=False))


@app.command()
def report(folder: Annotated[Path, typer.Argument(help="An lrc output folder or its lrc_report.yaml.")]) -> None:
    """Show a compression report as tables."""
    from .report_view import read_report, render_report

    render_report(read_report(folder), out)


@app.command()
def methods() -> None:
    """List the registered factorization methods and allocators."""
    from .allocate import ALLOCATORS
    from .factorize import METHODS

    for title, registry in (("methods", METHODS), ("allocators", ALLOCATORS)):
        table = Table(title=title, title_justify="left")
        table.add_column("name")
        table.add_column("what it does")
        for name in registry.names():
            doc = (registry.get(name).__doc__ or "").strip().splitlines()[0]
            table.add_row(name, doc)
        out.print(table)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 unexpected error, 130 interrupted)."""
    command = typer.main.get_command(app)
    _quiet_libraries()
    try:
        result = command.main(args=argv, prog_name="lrc", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except LrcError as exc:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        console.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("[bold red]interrupted[/]")
        return 130
    except Exception as exc:
        if _state["debug"]:
            raise
        console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {exc} (run `lrc --debug ...` for the traceback)",
            highlight=False, soft_wrap=True,
        )
        return 1
    finally:
        _state["debug"] = False


def _quiet_libraries() -> None:
    """lrc draws its own progress; silence the per-file bars and info logs of transformers and the Hub."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def console_main() -> None:
    sys.exit(main())

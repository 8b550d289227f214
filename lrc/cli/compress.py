"""`lrc compress`: a recipe and flags -> CompressionConfig -> lrc.compress, then the summary (or JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import CompressionConfig
from ..distributed import launched, launched_rank, process_group, world
from ..errors import ConfigError
from ..sources import DEFAULT_MODEL
from .command_output import CommandOutput
from .launch import launch_ranks
from .options import JsonOpt, ModelArg, QuietOpt
from .progress_display import announce, progress_display


def parse_budget(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"budget must be a number in (0, 1), got {text!r}") from None


def compress(
    model: ModelArg = DEFAULT_MODEL,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")] = Path("lrc-out"),
    budget: Annotated[str | None, typer.Option(help="Fraction to remove, in (0, 1): of the targeted parameters (or of what --objective counts).")] = None,
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
    objective: Annotated[str | None, typer.Option(help="What the budget counts: disk (targeted bytes), memory (targeted resident bytes) or latency (the measured forward time).")] = None,
    latency_tokens: Annotated[int | None, typer.Option("--latency-tokens", help="Tokens per timed forward for --objective latency.")] = None,
    stream: Annotated[bool | None, typer.Option("--stream/--in-memory", help="One decoder block in memory at a time (models larger than memory); same output.")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Reuse calibration statistics cached here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Run as N torch.distributed processes on this machine "
                                              "(torchrun; one GPU each with --device cuda).")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Calibrate, allocate ranks, factorize, and write a checkpoint with lrc_report.yaml."""
    from ..pipeline import compress as run_compress
    from ..report_view import summary_table

    config = CompressionConfig.from_yaml(recipe) if recipe else CompressionConfig()
    config = config.replace(
        budget=parse_budget(budget), method=method, allocator=allocator, calib=calib, samples=samples,
        seq_len=seq_len, seed=seed, device=device, dtype=dtype, sequential=sequential, keep_dense=keep_dense or None,
        min_kept=min_kept, stream=stream,
    )
    config = config.replace(objective=objective, latency_tokens=latency_tokens)
    config.validate()
    if nproc is not None and not launched():
        from .app import current_argv

        raise typer.Exit(launch_ranks(nproc, current_argv()))
    if launched_rank() != 0:  # over torch.distributed rank 0 alone shows progress and results
        json_output, quiet = False, True
    shown = CommandOutput(json_output, quiet)
    with progress_display(quiet) as progress, process_group(config.device):
        announce(progress, f"compress {model} -> {output}: {config.method} + {config.allocator}, budget {config.budget}, "
                           f"{config.samples} x {config.seq_len} calibration tokens{ranks_note()}")
        result = run_compress(model, config, output, overwrite=overwrite, progress=progress, cache_dir=cache_dir)
        announce(progress, f"wrote {output}")
    shown.show(summary_table(result.report))
    shown.show(f"wrote {output}")
    shown.emit({"output": str(output), **result.report})


def ranks_note() -> str:
    size = world()[1]
    return f", {size} processes" if size > 1 else ""

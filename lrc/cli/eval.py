"""`lrc eval`: perplexity, size and speed (lrc.evaluate), zero-shot tasks (lrc.tasks), and the quality gate.

The gate: with --baseline B and --max-ratio R, the command fails with exit code 3 (exit_codes.
QUALITY_GATE_FAILED) when perplexity(model) / perplexity(B) > R, after printing and writing the results.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from ..errors import ConfigError
from ..io.atomic_file import check_writable_file
from .command_output import CommandOutput, write_atomically
from .exit_codes import QualityGateFailed
from .options import DeviceOpt, JsonOpt, ModelArg, QuietOpt, SeqLenOpt
from .progress_display import announce, progress_display


def eval_command(
    model: ModelArg,
    data: Annotated[str | None, typer.Option(help="Evaluation text file for perplexity (e.g. wiki.test.raw).")] = None,
    seq_len: SeqLenOpt = 512,
    windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Second model evaluated in the same run.")] = None,
    max_ratio: Annotated[float | None, typer.Option(
        "--max-ratio", help="Quality gate: exit with code 3 if perplexity(model) / perplexity(baseline) exceeds this.")] = None,
    tasks: Annotated[str | None, typer.Option(help="lm-eval tasks, comma-separated (piqa,arc_easy,...); needs lrc\\[tasks].")] = None,
    tasks_path: Annotated[Path | None, typer.Option("--tasks-path", help="Folder of extra lm-eval task YAML files.")] = None,
    task_limit: Annotated[int | None, typer.Option("--task-limit", help="Score only the first N documents of each task.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    device: DeviceOpt = "cpu",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the results as YAML.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity, size, speed and zero-shot tasks; optionally against a baseline, with a quality gate.

    Perplexity: non-overlapping windows of --seq-len tokens, tail dropped. The gate (--max-ratio R with --baseline) exits with code 3 when perplexity(model) / perplexity(baseline) > R.
    """
    from ..evaluate import check_same_tokens, evaluate, model_size
    from ..sources import load_model
    from ..tasks import parse_tasks, run_tasks, task_manager

    if data is None and tasks is None:
        raise ConfigError("nothing to evaluate: give --data FILE (perplexity) and/or --tasks NAMES (lm-eval)")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if max_ratio is not None:
        if baseline is None or data is None:
            raise ConfigError("--max-ratio compares perplexities: it needs --baseline MODEL and --data FILE")
        if not max_ratio > 0:
            raise ConfigError(f"--max-ratio must be a positive number, got {max_ratio}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if output is not None:
        check_results_path(output)
    if baseline is not None and data is not None:
        check_same_tokens(model, baseline, data)
    task_names = parse_tasks(tasks) if tasks is not None else []
    if task_limit is not None and task_limit < 1:
        raise ConfigError(f"--task-limit must be at least 1, got {task_limit}")
    manager = task_manager(task_names, tasks_path) if task_names else None  # a typo fails before any loading
    shown = CommandOutput(json_output, quiet)
    results = []
    with progress_display(quiet) as progress:
        for role, spec in [("model", model)] + ([("baseline", baseline)] if baseline else []):
            def labelled(phase: str, done: int, total: int, role: str = role) -> None:
                progress(f"{phase} ({role})", done, total)

            announce(progress, f"evaluate {role} {spec}")
            loaded = load_model(spec, progress=labelled)
            row: dict[str, Any] = (evaluate(loaded, data, seq_len, windows, batch_size, device, labelled, reference=baseline)
                                   if data else {"model": loaded.source.spec, **model_size(loaded)})
            if task_names:
                row["tasks"] = run_tasks(loaded, task_names, tasks_path, task_limit, batch_size, device,
                                         progress=labelled, manager=manager)
            results.append(row)
            del loaded
    if windows is not None and results and results[0].get("windows", windows) < windows:
        warnings.warn(f"--windows {windows}: the text holds {results[0]['windows']} windows of {seq_len} tokens, all "
                      "of which were evaluated", stacklevel=1)
    if baseline and data and ("perplexity" in results[0]) != ("perplexity" in results[1]):
        kinds = ["a decoder (perplexity)" if "perplexity" in r else "an encoder" for r in results]
        raise ConfigError(f"{model} is {kinds[0]} and --baseline {baseline} {kinds[1]}: compare a model with the "
                          "dense model it was compressed from")
    ratio = None
    if baseline and data and "perplexity" in results[0]:  # an encoder has a cosine similarity instead
        ratio = results[0]["perplexity"] / results[1]["perplexity"]
    gate = None  # every key is there, null where it does not apply: one shape for a CI job to read
    if max_ratio is not None and ratio is not None:
        gate = {"max_ratio": max_ratio, "ratio": ratio, "passed": bool(ratio <= max_ratio)}
    summary: dict[str, Any] = {"data": data, "seq_len": seq_len if data else None, "results": results,
                               "perplexity_ratio": ratio, "gate": gate}
    shown.show(results_table(summary))
    if output is not None:
        write_atomically(output, yaml.safe_dump(summary, sort_keys=False))
    shown.emit(summary)
    if gate is not None:
        check_gate(results[0]["perplexity"], results[1]["perplexity"], max_ratio, shown)  # type: ignore[arg-type]


def check_results_path(path: Path) -> None:
    """-o may create a file or replace an earlier `lrc eval -o` file (a YAML mapping with `results`), nothing else."""
    check_writable_file(path)
    if not path.exists():
        return
    try:
        earlier = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        earlier = None
    if not (isinstance(earlier, dict) and "results" in earlier):
        raise ConfigError(f"-o {path} exists and is not an earlier `lrc eval -o` file; choose another file "
                          "(lrc replaces only its own results)")


def check_gate(model_ppl: float, baseline_ppl: float, max_ratio: float, shown: CommandOutput) -> None:
    """Raise QualityGateFailed when model_ppl / baseline_ppl > max_ratio (or is not a number)."""
    ratio = model_ppl / baseline_ppl
    figures = f"perplexity ratio {ratio:.4f} (model {model_ppl:.3f} / baseline {baseline_ppl:.3f})"
    if not ratio <= max_ratio:  # NaN fails too
        over = f"by {ratio - max_ratio:.4f} ({ratio / max_ratio - 1:.1%})" if math.isfinite(ratio) else "(not finite)"
        raise QualityGateFailed(f"quality gate failed: {figures} is above --max-ratio {max_ratio:g} {over}")
    shown.show(f"quality gate passed: {figures} is within --max-ratio {max_ratio:g} "
               f"(margin {max_ratio - ratio:.4f})")


def results_table(summary: dict[str, Any]) -> Table:
    results = summary["results"]
    title = (f"{summary['data']}: seq_len {summary['seq_len']}, {results[0]['windows']} windows" if summary["data"]
             else "zero-shot tasks")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for role, r in zip(["model", "baseline"], results):  # a long path folds onto more lines, never cut
        table.add_column(f"{role}: {r['model']}", justify="right", overflow="fold")
    rows = [("parameters", "{:,}", "params"), ("bytes on disk", "{:,}", "bytes"),
            ("bytes in memory (tensors)", "{:,}", "memory_bytes")]
    if summary["data"]:
        threads = results[0].get("threads")
        rows = [("perplexity", "{:.3f}", "perplexity"), ("cosine similarity to baseline", "{:.5f}", "cosine_similarity"),
                *rows, (f"tokens/s ({threads} thread{'' if threads == 1 else 's'}, batch {results[0].get('batch_size')})",
                        "{:,.0f}", "tokens_per_s")]
    for label, fmt, key in rows:
        if key in results[0]:  # an encoder has a cosine similarity instead of a perplexity
            table.add_row(label, *[fmt.format(r[key]) + (" (gguf file)" if key == "bytes" and r.get("bytes_of") == "gguf file"
                                                          else "") for r in results])
    for task, metrics in results[0].get("tasks", {}).items():
        for metric in metrics:
            if metric != "samples" and not metric.endswith("_stderr"):
                cells = []
                for r in results:
                    value = r["tasks"][task].get(metric)
                    err = r["tasks"][task].get(f"{metric}_stderr")
                    cells.append("n/a" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
                table.add_row(f"{task} {metric} ({metrics['samples']} docs)", *cells)
    if summary["perplexity_ratio"] is not None:
        table.caption = f"perplexity ratio (model / baseline): {summary['perplexity_ratio']:.3f}"
    return table

"""Zero-shot tasks (piqa, arc_easy, hellaswag, ...) through lm-evaluation-harness, on a loaded model.

lm-eval is an optional dependency (`pip install 'lrc[tasks]'`), imported only here and only when tasks are
asked for. The model object lrc loaded (compressed layers included) is handed to lm-eval's HFLM wrapper,
so what is scored is exactly what `lrc.load` returns. Task data comes from wherever lm-eval's task
configs say (the Hugging Face Hub for the built-in tasks, so those need the network or a filled
`HF_DATASETS_CACHE`); `include_path` adds a folder of task YAML files, e.g. tasks over local JSON files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .device import resolve_device
from .errors import ConfigError, LrcError
from .hub import network_failure, quiet_retries
from .progress import Progress, no_progress
from .sources import LoadedModel


def parse_tasks(text: str) -> list[str]:
    """'piqa, arc_easy' -> ['piqa', 'arc_easy']; an empty list is an error."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--tasks needs task names separated by commas, got {text!r}")
    return names


def task_manager(tasks: list[str], include_path: str | Path | None = None) -> Any:
    """lm-eval's TaskManager (built-in tasks plus the YAML files under include_path), with every name in
    `tasks` checked to exist: call it before any model is loaded, so a typo fails at once."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LrcError(f"--tasks needs lm-evaluation-harness, which is not installed ({exc.name} missing): "
                       "pip install 'lrc[tasks]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        what = "is a file, not a folder of task YAML files" if Path(include_path).is_file() else "not found"
        raise ConfigError(f"task folder {include_path} {what}")
    with _quiet_lm_eval():
        manager = None
        if include_path is not None:  # the folder alone first: indexing lm-eval's own tasks took 7-15 s here
            manager = TaskManager(include_path=str(include_path), include_defaults=False)
            manager = manager if all(t in manager.all_tasks for t in tasks) else None
        manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)} "
                          "tasks and groups; add a folder of task YAML files with --tasks-path)")
    return manager


def run_tasks(
    loaded: LoadedModel,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    num_fewshot: int | None = None,
    progress: Progress = no_progress,
    manager: Any = None,
) -> dict[str, dict[str, float | int | None]]:
    """{task: {metric: value, metric_stderr: value (None if not computed), samples: n}} for every task.

    limit: score only the first `limit` documents of each task (`samples` says how many were scored);
    manager: a TaskManager from `task_manager` (made here from include_path if not given).
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"task limit must be at least 1, got {limit}")
    manager = manager or task_manager(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    dev = resolve_device(device)
    loaded.model.to(dev)
    progress("tasks", 0, len(tasks))
    with _quiet_lm_eval(), quiet_retries():
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device=str(dev), batch_size=batch_size)
        try:
            output = lm_eval.simple_evaluate(
                model=model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=1000, verbosity="ERROR",
            )
        except FileNotFoundError as exc:  # a task's data file (a local task YAML names it)
            raise LrcError(f"lm-eval could not read the data of {', '.join(tasks)}: {exc}") from None
        except Exception as exc:
            if not network_failure(exc):
                raise
            raise LrcError(f"lm-eval could not fetch the data of {', '.join(tasks)} from the Hub: the network is "
                           "unreachable and it is not in HF_DATASETS_CACHE (fill the cache, or give local task "
                           "files with --tasks-path)") from None
    if output is None:
        raise LrcError("lm-eval returned no results")
    results: dict[str, dict[str, float | int | None]] = {}
    for task, values in output["results"].items():
        row: dict[str, float | int | None] = {}
        for key, value in values.items():
            metric, comma, _filter = key.partition(",")  # lm-eval names a metric "NAME,FILTER"; others: alias...
            if comma and (isinstance(value, (int, float)) or value == "N/A"):
                row[metric] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        row["samples"] = int(output.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0)))
        results[task] = row
    progress("tasks", len(tasks), len(tasks))
    return results


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Only errors from lm-eval's logs and no progress bars from datasets while tasks load and run (lm-eval's
    own tqdm bars still draw: tqdm reads its switch-off setting only when first imported)."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars_were_on = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()

"""`compress`: the run, stage by stage. Data flows one way:

    model (lrc.sources) -> statistics (lrc.stats) -> decompositions (lrc.engine.jobs)
      -> allocation (lrc.allocate) -> layers (lrc.engine.build, lrc.forms) -> files (lrc.io)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .allocate import ALLOCATORS, allocate_ranks, check_budget_reachable, check_patterns_match
from .allocate.curve import allocation_curve
from .allocate.objective import predicted_cost
from .config import CompressionConfig
from .device import resolve_device
from .distributed import is_main
from .engine import Analysis, decompose_all
from .engine.build import KeptLayers, MatrixResult, apply
from .errors import ConfigError
from .factorize import METHODS
from .forms import count_params
from .io.checkpoint import read_tensor_names
from .io.output import check_output_path, run_places
from .io.report import build_report
from .io.writer import write_output
from .model.targets import check_not_compressed, warn_left_out_heads
from .peak_memory import peak_memory
from .progress import Progress, no_progress
from .quality_check import HeldOutCheck
from .sources import LoadedModel, load_model, model_argument
from .stats.collect import cached_statistics
from .stats.store import check_cache_folder
from .stream.pipeline import check_streamable, compress_streamed


@dataclass
class CompressionResult:
    model: nn.Module
    report: dict[str, Any]
    matrices: list[MatrixResult] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        """Rank (or atom count) of every factorized matrix."""
        return {m.name: m.rank for m in self.matrices if m.kind != "dense"}


def compress(
    model: str | os.PathLike[str] | LoadedModel,
    config: CompressionConfig | Mapping[str, Any] | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Progress = no_progress,
    analysis: Analysis | None = None,
    cache_dir: str | Path | None = None,
) -> CompressionResult:
    """Compress `model` (a path / Hub id / alias, or a LoadedModel) as `config` (a CompressionConfig, or a mapping
    of its fields as a recipe gives them) says; write to `output` if given.

    A LoadedModel is modified in place: its chosen linear layers become compressed layer forms. Pass an
    `analysis` from `lrc.engine.decompose_all` (same model, method and calibration) to skip the calibration
    and decomposition, or a `cache_dir` to reuse the calibration statistics of an earlier run with the same
    model and data.
    """
    model = model_argument(model)
    config = config_argument(config)
    start = time.perf_counter()
    resolve_device(config.device)
    check_method_allocator(config)
    out_path = Path(output) if output is not None and is_main() else None  # over torch.distributed rank 0 writes
    if cache_dir is not None:
        check_cache_folder(Path(cache_dir))
    cache = Path(cache_dir) if cache_dir else None
    if config.stream:  # the same stages, one decoder block at a time (lrc.stream.pipeline)
        check_streamable(model, config, out_path, analysis, cache)
        assert isinstance(model, str) and out_path is not None
        net, report, results = compress_streamed(model, config, out_path, overwrite, progress, cache)
        return CompressionResult(net, report, results)
    if out_path is not None and isinstance(model, str):  # _claim: a lock on the output, held until it is written
        _claim = check_output_path(out_path, overwrite, run_places(model, config.calib, cache_dir))
    loaded = load_model(model, progress=progress) if isinstance(model, str) else model
    check_not_compressed(loaded.source.spec, loaded.model.config, loaded.model)
    warn_left_out_heads(loaded.source.spec, loaded.model.config, read_tensor_names(loaded.folder))
    if out_path is not None:
        _claim = check_output_path(out_path, overwrite, run_places(loaded, config.calib, cache_dir))
    timing = {"load_s": time.perf_counter() - start}
    original_params = count_params(loaded.model)
    if analysis is None:
        check_patterns_match(loaded.model, config)
        check_budget_reachable(loaded.model, config)
        stats = cached_statistics(loaded, config, cache, progress,
                                  weights_in_files=isinstance(model, str))
        analysis = decompose_all(loaded, config, stats, progress)
    timing.update(analysis.timing)
    t = time.perf_counter()
    allocator = ALLOCATORS.create(config.allocator, config.allocator_options)
    # sparse options near the choices refined, the choices' fits kept for apply
    kept = KeptLayers()
    allocation = allocate_ranks(analysis, config, loaded.model, allocator=allocator, progress=progress, keep=kept.keep)
    timing["allocation_s"] = time.perf_counter() - t
    timing["refine_s"] = analysis.timing.get("refine_s", 0.0)  # the part of allocation_s spent refining
    t = time.perf_counter()  # the allocator's error-vs-size curve, for `lrc report --plot`
    curve = allocation_curve(ALLOCATORS.create(config.allocator, config.allocator_options), *allocation)
    timing["allocation_curve_s"] = time.perf_counter() - t
    t = time.perf_counter()
    held_out = HeldOutCheck.measure_dense(loaded, config)  # dense loss on held-out windows, before apply
    timing["heldout_s"] = time.perf_counter() - t
    t = time.perf_counter()  # the chosen forms built (sparse options refitted) and swapped in
    results, apply_timing = apply(loaded, analysis, config, progress, allocation, kept)
    timing["apply_s"] = time.perf_counter() - t
    timing.update(apply_timing)
    report = build_report(loaded, config, analysis.stats, results, original_params, resolve_device(config.device))
    report["allocation_curve"] = curve
    predicted = predicted_cost(allocator, *allocation, config.objective)
    if predicted is not None:
        report["predicted_cost"] = predicted
    t = time.perf_counter()
    report["held_out"] = held_out.compare(loaded.model)  # raises QualityError past config.heldout_max_ratio
    timing["heldout_s"] += time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - start
    report["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    report["memory"] = peak_memory(resolve_device(config.device))  # write_output measures it again
    if out_path is not None:
        write_output(loaded, out_path, results, report, config, overwrite=overwrite)
    return CompressionResult(loaded.model, report, results)


def config_argument(config: object) -> CompressionConfig:
    """compress's `config` as a validated CompressionConfig: the default for None, a mapping read as a recipe."""
    if config is None:
        return CompressionConfig()
    if isinstance(config, Mapping):
        return CompressionConfig.from_dict(dict(config))
    if not isinstance(config, CompressionConfig):
        raise ConfigError(f"config must be an lrc.CompressionConfig or a mapping of its fields, not {type(config).__name__}")
    config.validate()
    return config


def check_method_allocator(config: CompressionConfig) -> None:
    """Both names exist, their options are valid, and the pair can work together."""
    METHODS.create(config.method, config.method_options)
    ALLOCATORS.create(config.allocator, config.allocator_options)
    if METHODS.get(config.method).offers_sparse:
        if config.allocator != "knapsack":
            raise ConfigError(f"method {config.method} offers sparse options, which only the knapsack allocator "
                              f"weighs: use --allocator knapsack, or a plain low-rank method with --allocator "
                              f"{config.allocator} (e.g. --method loss-aware)")
        if config.sequential:
            raise ConfigError(f"sequential mode refits plain ranks only, not method {config.method}: "
                              "pair --sequential with a low-rank method (e.g. --method loss-aware)")

"""Collecting statistics: calibration windows -> input statistics (layer by layer) and output gradients."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..calibration import SELF_SAMPLED, read_text, sample_windows, token_windows
from ..calibration.sufficiency import check_token_count
from ..config import CompressionConfig
from ..device import resolve_device
from ..distributed import is_main
from ..errors import DISK_REFUSALS, ConfigError
from ..factorize import METHODS, InputStats, OutputStats
from ..model.targets import decoder_layers, target_linears
from ..progress import Progress, no_progress
from ..sources import LoadedModel
from .gradients import collect_output_stats
from .inputs import collect_input_stats
from .types import CalibrationStats


def calibration_windows(loaded: LoadedModel, config: CompressionConfig) -> tuple[torch.Tensor, str]:
    """(samples x seq_len token ids, description of the source) for the configured calibration data, after
    checking that so many tokens can determine the targeted layers' statistics (check_token_count)."""
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and config.seq_len > context:
        raise ConfigError(f"seq_len {config.seq_len} is longer than the model's context ({context} tokens)")
    widths = {name: p.in_features for name, p in target_linears(loaded.model, config.exclude).items()}
    if METHODS.get(config.method).weighs_data:
        check_token_count(widths, config.samples, config.seq_len)
    if config.calib is None:
        return sample_windows(loaded.model, loaded.tokenizer, config.samples, config.seq_len, config.seed), SELF_SAMPLED
    text = read_text(config.calib)
    return token_windows(loaded.tokenizer, text, config.samples, config.seq_len, config.seed), config.calib


def collect_statistics(
    loaded: LoadedModel,
    config: CompressionConfig,
    progress: Progress = no_progress,
    gradients: bool | None = None,
    fisher: bool | None = None,
    windows: torch.Tensor | None = None,
) -> CalibrationStats:
    """Input statistics (layer by layer) and, if the method needs them (or `gradients`), output gradients.

    windows: calibration token windows (samples x seq_len) to use instead of drawing them from config.calib.
    """
    device = resolve_device(config.device)
    method_cls = METHODS.get(config.method)
    gradients = method_cls.needs_gradients if gradients is None else gradients
    fisher = config.method == "fwsvd" if fisher is None else fisher
    net = loaded.model
    targets = target_linears(net, config.exclude)
    n_layers = len(decoder_layers(net)[1])
    timing: dict[str, float] = {}
    torch.manual_seed(config.seed)

    t = time.perf_counter()
    if windows is None:
        windows, calib_source = calibration_windows(loaded, config)
    else:
        calib_source = config.calib or SELF_SAMPLED
    timing["calibration_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    inputs: dict[str, InputStats] = {}
    shares: dict[str, str] = {}

    def keep(index: int, layer: nn.Module, stats: dict[str, InputStats], shared: dict[str, str]) -> None:
        inputs.update({name: s.to("cpu") for name, s in stats.items()})
        shares.update(shared)
        progress("calibrate", index + 1, n_layers)

    collect_input_stats(net, windows, targets, keep, config.batch_size, device)
    timing["calibration_s"] = time.perf_counter() - t

    outputs: dict[str, OutputStats] = {}
    if gradients:
        t = time.perf_counter()
        grad_windows = windows[: config.grad_samples] if config.grad_samples else windows
        outputs = collect_output_stats(
            net, grad_windows, targets, fisher=fisher, device=device,
            progress=lambda done, total: progress("output gradients", done, total),
        )
        timing["gradients_s"] = time.perf_counter() - t
    return CalibrationStats(windows, calib_source, inputs, shares, outputs, timing)


def cached_statistics(
    loaded: LoadedModel, config: CompressionConfig, cache_dir: Path | None, progress: Progress = no_progress,
    weights_in_files: bool = True,
) -> CalibrationStats:
    """collect_statistics, through the statistics store in `cache_dir` when given (see lrc.stats.store);
    `weights_in_files`: the model was loaded from its folder for this run (else it is fingerprinted in memory)."""
    if cache_dir is None:
        return collect_statistics(loaded, config, progress)
    from .store import cache_key, load_stats, save_stats

    needs = METHODS.get(config.method).needs_gradients
    key = cache_key(loaded, config, gradients=needs, fisher=config.method == "fwsvd", weights_in_files=weights_in_files)
    stats = load_stats(cache_dir, key)
    if stats is not None:
        progress("statistics read from the cache", 1, 1)
    else:
        stats = collect_statistics(loaded, config, progress)
        if is_main():  # over torch.distributed every rank holds the same statistics: rank 0 stores them
            try:
                save_stats(stats, cache_dir, key)
            except OSError as exc:  # the machine refusing the write: the cache saves time, the run does not need it
                if exc.errno not in DISK_REFUSALS:
                    raise
                warnings.warn(f"lrc: the statistics were not stored in the cache {cache_dir} "
                              f"({exc.strerror or exc}); the run goes on without", stacklevel=2)
    return stats

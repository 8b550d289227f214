"""`compress`: calibrate -> decompose every targeted matrix -> allocate ranks -> factorize -> write + report."""

from __future__ import annotations

import dataclasses
import math
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .allocate import ALLOCATORS, DENSE, Choice, MatrixCandidates
from .allocate.curve import allocation_curve
from .calibration import (
    SELF_SAMPLED,
    calibrate_layerwise,
    collect_output_stats,
    read_text,
    sample_windows,
    token_windows,
)
from .checkpoint import DTYPES, check_finite_files, read_tensor_names, tensor_bytes, write_checkpoint
from .config import CompressionConfig
from .errors import ConfigError, LrcError
from .factorize import METHODS, Decomposition, InputStats, OutputStats, SparseOption, breakeven_rank
from .factorize.base import Weighting
from .factorize.output_error import relative_output_errors
from .lowrank import LowRankLinear
from .output import atomic_directory, check_output_path
from .progress import Progress, no_progress
from .report_view import REPORT_NAME
from .sequential import sequential_factorize
from .sources import LoadedModel, load_model
from .sparse_linear import LowRankSparseLinear, SparseDictionaryLinear, sparse_skeleton
from .targets import decoder_layers, matrix_type, replace_module, target_linears


@dataclass
class MatrixResult:
    """What happened to one targeted matrix.

    kind: "dense", "low-rank", or a sparse family ("sparse-dictionary", "low-rank-sparse");
    rank: the rank (or atoms), DENSE (0) when kept dense; params: cost in parameter-equivalents (values,
    plus index bytes / value bytes for sparse layers); nnz, layout: the sparse factor's entries and layout.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    params: int
    rel_error: float  # ||(W - W') X||_F / ||W X||_F on the calibration data
    kind: str = "low-rank"
    nnz: int = 0
    layout: str = ""


@dataclass
class CompressionResult:
    model: nn.Module
    report: dict[str, Any]
    matrices: list[MatrixResult] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        """Rank (or atom count) of every factorized matrix."""
        return {m.name: m.rank for m in self.matrices if m.kind != "dense"}


def resolve_device(name: str) -> torch.device:
    """A torch.device for `name`; CUDA without a GPU is an error, never a silent CPU fallback."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA GPU is available to torch {torch.__version__}")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device


def count_params(model: nn.Module) -> int:
    """Parameters stored once each (a tied embedding / lm_head counts once); a sparse layer's weight counts
    as ⌈its bytes (values, indices or bitmask) / bytes of one value⌉, the parameter-equivalents the report
    and the allocator use."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for layer in model.modules():
        if isinstance(layer, (SparseDictionaryLinear, LowRankSparseLinear)):
            values = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
            vb = layer.sparse_factor().values.element_size()
            total += -(-layer.weight_bytes(vb) // vb) - values
    return total


def calibration_windows(loaded: LoadedModel, config: CompressionConfig) -> tuple[torch.Tensor, str]:
    """(samples x seq_len token ids, description of the source) for the configured calibration data."""
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and config.seq_len > context:
        raise ConfigError(f"seq_len {config.seq_len} is longer than the model's context ({context} tokens)")
    if config.calib is None:
        return sample_windows(loaded.model, loaded.tokenizer, config.samples, config.seq_len, config.seed), SELF_SAMPLED
    text = read_text(config.calib)
    return token_windows(loaded.tokenizer, text, config.samples, config.seq_len, config.seed), config.calib


@dataclass
class CalibrationStats:
    """Everything the calibration passes measured: reusable across methods, allocators and budgets.

    inputs: input statistics per linear that owns them; shares: linear -> owner for linears reading the
    same tensor; outputs: output-gradient statistics per linear (empty unless gradients were collected).
    """

    windows: torch.Tensor
    calib_source: str
    inputs: dict[str, InputStats]
    shares: dict[str, str]
    outputs: dict[str, OutputStats]
    timing: dict[str, float]

    def input_of(self, name: str) -> InputStats:
        return self.inputs[self.shares.get(name, name)]

    def merged(self, other: CalibrationStats) -> CalibrationStats:
        """The statistics of both window sets together (every statistic is a sum over tokens)."""
        inputs = {
            n: InputStats(s.gram + other.inputs[n].gram, s.abs_sum + other.inputs[n].abs_sum, s.tokens + other.inputs[n].tokens)
            for n, s in self.inputs.items()
        }
        outputs = {}
        for n, o in self.outputs.items():
            p = other.outputs[n]
            gram = o.gram + p.gram if o.gram is not None and p.gram is not None else None
            outputs[n] = OutputStats(gram, o.diag + p.diag, o.fisher_rows + p.fisher_rows, o.tokens + p.tokens)
        timing = {k: v + other.timing.get(k, 0.0) for k, v in self.timing.items()}
        return CalibrationStats(
            torch.cat([self.windows, other.windows]), self.calib_source, inputs, self.shares, outputs, timing
        )


@dataclass
class Analysis:
    """The expensive part of a run: every targeted matrix decomposed once, with its error curves.

    decompositions: factors up to the break-even rank; output_errors: relative output error of every rank.
    Allocation and factorization at any budget reuse it (see `apply`).
    """

    stats: CalibrationStats
    decompositions: dict[str, Decomposition]
    output_errors: dict[str, torch.Tensor]
    errors_comparable: bool
    timing: dict[str, float]


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

    calibrate_layerwise(net, windows, targets, keep, config.batch_size, device)
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
    loaded: LoadedModel, config: CompressionConfig, cache_dir: Path | None, progress: Progress = no_progress
) -> CalibrationStats:
    """collect_statistics, through the cache in `cache_dir` when given (see lrc.cache)."""
    if cache_dir is None:
        return collect_statistics(loaded, config, progress)
    from .cache import cache_key, load_stats, save_stats

    needs = METHODS.get(config.method).needs_gradients
    key = cache_key(loaded, config, gradients=needs, fisher=config.method == "fwsvd")
    stats = load_stats(cache_dir, key)
    if stats is None:
        stats = collect_statistics(loaded, config, progress)
        save_stats(stats, cache_dir, key)
    return stats


def decompose_all(
    loaded: LoadedModel, config: CompressionConfig, stats: CalibrationStats, progress: Progress = no_progress
) -> Analysis:
    """Decompose every targeted matrix with the configured method, from already collected statistics."""
    device = resolve_device(config.device)
    method = METHODS.create(config.method, config.method_options)
    if method.needs_gradients and not stats.outputs:
        raise ConfigError(f"method {config.method} needs output-gradient statistics; these statistics have none")
    targets = target_linears(loaded.model, config.exclude)
    t = time.perf_counter()
    decompositions: dict[str, Decomposition] = {}
    output_errors: dict[str, torch.Tensor] = {}
    in_weights: dict[str, Weighting] = {}
    for i, (name, linear) in enumerate(targets.items()):
        owner = stats.shares.get(name, name)
        inp = stats.inputs[owner].to(device)
        if owner not in in_weights:
            in_weights = {owner: method.in_weighting(inp)}  # linears sharing an input are consecutive
        out = stats.outputs[name].to(device) if name in stats.outputs else None
        weight = linear.weight.detach().to(device)
        m, n = weight.shape
        dec = method.decompose(weight, inp, breakeven_rank(m, n), name, in_weights[owner], out, value_bytes(config, linear))
        decompositions[name] = dec
        output_errors[name] = relative_output_errors(weight, inp.gram, dec)
        progress("decompose", i + 1, len(targets))
    timing = dict(stats.timing, decomposition_s=time.perf_counter() - t)
    return Analysis(stats, decompositions, output_errors, method.errors_comparable, timing)


def value_bytes(config: CompressionConfig, linear: nn.Linear) -> int:
    """Bytes per stored value in the output: the --dtype if given, else the layer's own dtype."""
    return DTYPES[config.dtype].itemsize if config.dtype else linear.weight.element_size()


def analyze(loaded: LoadedModel, config: CompressionConfig, progress: Progress = no_progress) -> Analysis:
    """Calibrate and decompose: collect_statistics + decompose_all."""
    return decompose_all(loaded, config, collect_statistics(loaded, config, progress), progress)


def allocate_ranks(
    loaded: LoadedModel, analysis: Analysis, config: CompressionConfig
) -> tuple[list[MatrixCandidates], Mapping[str, Choice]]:
    """The allocator's choice of a rank, DENSE or a sparse option for every targeted matrix under config.budget."""
    allocator = ALLOCATORS.create(config.allocator, config.allocator_options)
    keep_dense = _compile(config.keep_dense, "keep_dense")
    targets = target_linears(loaded.model, config.exclude)
    candidates = []
    for name, linear in targets.items():
        dec = analysis.decompositions[name]
        m, n = linear.out_features, linear.in_features
        min_rank = max(1, math.ceil(config.min_kept * m * n / (m + n)))
        scale = 1.0 if analysis.errors_comparable or float(dec.errors[0]) <= 0 else 1.0 / float(dec.errors[0])
        sparse = [dataclasses.replace(o, error=o.error * scale) for o in dec.sparse_options if o.cost >= config.min_kept * m * n]
        candidates.append(
            MatrixCandidates(
                name=name,
                shape=(m, n),
                errors=dec.errors if analysis.errors_comparable else dec.relative_errors(),
                max_rank=dec.max_rank,
                min_rank=min_rank,
                keep_dense=min_rank > dec.max_rank or any(p.search(name) for p in keep_dense),
                group=matrix_type(name),
                sparse=sparse,
            )
        )
    return candidates, allocator.allocate(candidates, config.budget)


def apply(
    loaded: LoadedModel, analysis: Analysis, config: CompressionConfig, progress: Progress = no_progress
) -> tuple[list[MatrixResult], dict[str, float]]:
    """Allocate ranks and swap the chosen linears for LowRankLinear, in place (one-shot or sequential).

    Returns the per-matrix results and timings (allocation_s, and sequential_s in sequential mode).
    """
    timing = {}
    t = time.perf_counter()
    candidates, choices = allocate_ranks(loaded, analysis, config)
    timing["allocation_s"] = time.perf_counter() - t
    targets = target_linears(loaded.model, config.exclude)
    if config.sequential:
        ranks = {name: choice for name, choice in choices.items() if isinstance(choice, int)}
        if len(ranks) < len(choices):
            raise ConfigError("sequential mode supports plain ranks only, not sparse options")
        t = time.perf_counter()
        errors = sequential_factorize(
            loaded.model, analysis.stats.windows, targets, ranks, METHODS.create(config.method, config.method_options),
            analysis.stats.outputs, config.batch_size, resolve_device(config.device),
            progress=lambda done, total: progress("sequential refit", done, total),
        )
        timing["sequential_s"] = time.perf_counter() - t
        return [_result(c, ranks[c.name], errors.get(c.name, 0.0)) for c in candidates], timing
    results = []
    method = METHODS.create(config.method, config.method_options)
    device = resolve_device(config.device)
    for c in candidates:
        choice = choices[c.name]
        linear = targets[c.name]
        bias = linear.bias.detach() if linear.bias is not None else None
        if isinstance(choice, SparseOption):
            inp = analysis.stats.input_of(c.name).to(device)
            outputs = analysis.stats.outputs.get(c.name)
            problem = method.weighted_problem(
                linear.weight.detach().to(device), inp, c.name, None, outputs.to(device) if outputs else None
            )
            layer = build_sparse_layer(choice, method.sparse_layer(problem, choice), bias, linear.weight.dtype)
            replace_module(loaded.model, c.name, layer)
            error = relative_output_error(linear.weight.detach(), layer.dense_weight().detach(), inp.gram)
            sparse = layer.sparse_factor()  # the layer as built: its real entry count and bytes
            cost = -(-layer.weight_bytes(value_bytes(config, linear)) // value_bytes(config, linear))
            results.append(MatrixResult(c.name, c.shape, layer.rank, cost, error, choice.kind, sparse.nnz, sparse.layout))
        elif choice != DENSE:
            up, down = analysis.decompositions[c.name].factors(choice)
            replace_module(loaded.model, c.name, LowRankLinear.from_factors(up, down, bias, dtype=linear.weight.dtype))
            results.append(_result(c, choice, float(analysis.output_errors[c.name][choice])))
        else:
            results.append(_result(c, DENSE, 0.0))
    return results, timing


def _result(candidate: MatrixCandidates, choice: int, rel_error: float) -> MatrixResult:
    kind = "dense" if choice == DENSE else "low-rank"
    return MatrixResult(candidate.name, candidate.shape, choice, candidate.params(choice), rel_error, kind)


def build_sparse_layer(
    option: SparseOption, factors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype
) -> SparseDictionaryLinear | LowRankSparseLinear:
    """The layer for a chosen sparse option from the method's factors (see the method's sparse_layer)."""
    if option.kind == "sparse-dictionary":
        return SparseDictionaryLinear.from_factors(factors["mixing"].cpu(), factors["atoms"].cpu(), bias, dtype, option.layout)
    return LowRankSparseLinear.from_factors(
        factors["up"].cpu(), factors["down"].cpu(), factors["residual"].cpu(), bias, dtype, option.layout
    )


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||_F / ||W X||_F = sqrt(tr(Δ G Δᵀ) / tr(W G Wᵀ)), G = X Xᵀ, in float64."""
    g = gram.to(device=weight.device, dtype=torch.float64)
    w = weight.to(torch.float64)
    delta = w - approx.to(w)
    total = float(((w @ g) * w).sum())
    return math.sqrt(max(float(((delta @ g) * delta).sum()), 0.0) / total) if total > 0 else 0.0


def compress(
    model: str | LoadedModel,
    config: CompressionConfig | None = None,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Progress = no_progress,
    analysis: Analysis | None = None,
    cache_dir: str | Path | None = None,
) -> CompressionResult:
    """Compress `model` (a path / Hub id / alias, or a LoadedModel) as `config` says; write to `output` if given.

    The model object is modified in place: its chosen nn.Linear layers become LowRankLinear. Pass an
    `analysis` from `analyze` (same model, method and calibration) to skip the calibration pass, or a
    `cache_dir` to reuse the calibration statistics of an earlier run with the same model and data.
    """
    config = config or CompressionConfig()
    config.validate()
    start = time.perf_counter()
    resolve_device(config.device)
    check_method_allocator(config)
    _compile(config.keep_dense, "keep_dense")
    _compile(config.exclude, "exclude")
    out_path = Path(output) if output is not None else None
    if out_path is not None and isinstance(model, str):
        check_output_path(out_path, overwrite)
    loaded = load_model(model, progress=progress) if isinstance(model, str) else model
    if out_path is not None:
        check_output_path(out_path, overwrite, [loaded.source.path] if loaded.source.kind != "hub" else [])
    timing = {"load_s": time.perf_counter() - start}
    original_params = count_params(loaded.model)
    if analysis is None:
        stats = cached_statistics(loaded, config, Path(cache_dir) if cache_dir else None, progress)
        analysis = decompose_all(loaded, config, stats, progress)
    timing.update(analysis.timing)
    # -- the allocator's error-vs-size curve, for `lrc report --plot` (lrc.allocate.curve); before `apply`
    # -- replaces the linears that allocate_ranks reads
    t = time.perf_counter()
    curve = allocation_curve(ALLOCATORS.create(config.allocator, config.allocator_options),
                             *allocate_ranks(loaded, analysis, config))
    timing["allocation_curve_s"] = time.perf_counter() - t
    results, apply_timing = apply(loaded, analysis, config, progress)
    timing.update(apply_timing)
    report = build_report(loaded, config, analysis, results, original_params, resolve_device(config.device))
    report["allocation_curve"] = curve
    timing["total_s"] = time.perf_counter() - start
    report["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    if out_path is not None:
        write_output(loaded, out_path, results, report, config)
    return CompressionResult(loaded.model, report, results)


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


def _compile(patterns: list[str], what: str) -> list[re.Pattern[str]]:
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ConfigError(f"bad regex in {what}: {exc}") from None


def build_report(
    loaded: LoadedModel,
    config: CompressionConfig,
    analysis: Analysis,
    results: list[MatrixResult],
    original_params: int,
    device: torch.device,
) -> dict[str, Any]:
    import transformers

    from .cache import data_fingerprint, model_fingerprint

    windows = analysis.stats.windows
    targeted_original = sum(r.shape[0] * r.shape[1] for r in results)
    targeted_compressed = sum(r.params for r in results)
    # parameter-equivalents: sparse layers' index bytes count as values (as in count_params)
    compressed_params = original_params - targeted_original + targeted_compressed
    return {
        "lrc_version": __version__,
        "model": loaded.source.describe()
        | {"architecture": type(loaded.model).__name__, "sha256": model_fingerprint(Path(loaded.folder))},
        "method": config.method,
        "allocator": config.allocator,
        "budget": config.budget,
        "seed": config.seed,
        "calibration": {
            "source": analysis.stats.calib_source,
            "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "sha256": data_fingerprint(config.calib),
        },
        "params": {
            "targeted": {
                "original": targeted_original,
                "compressed": targeted_compressed,
                "removed_fraction": round(1 - targeted_compressed / targeted_original, 6),
            },
            "model": {
                "original": original_params,
                "compressed": compressed_params,
                "removed_fraction": round(1 - compressed_params / original_params, 6),
            },
        },
        "settings": config.to_dict(),
        "environment": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "transformers": str(transformers.__version__),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "platform": platform.platform(),
        },
        "layers": [
            {
                "name": r.name,
                "shape": list(r.shape),
                "kind": r.kind,
                "rank": "dense" if r.kind == "dense" else r.rank,
                "params": r.params,
                "rel_error": round(r.rel_error, 6),
            }
            | ({"nnz": r.nnz, "layout": r.layout} if r.nnz else {})
            for r in results
        ],
    }


def write_output(
    loaded: LoadedModel, out: Path, results: list[MatrixResult], report: dict[str, Any], config: CompressionConfig
) -> None:
    """Write checkpoint + report into a temporary folder, verify it, then move it to `out`."""
    ranks = {r.name: r.rank for r in results if r.kind == "low-rank"}
    sparse = {r.name: {"kind": r.kind, "rank": r.rank, "nnz": r.nnz, "layout": r.layout} for r in results if r.nnz}
    dtype = DTYPES[config.dtype] if config.dtype else None
    start = time.perf_counter()
    with atomic_directory(out) as tmp:
        write_checkpoint(loaded.model, tmp, loaded.tokenizer, ranks, dtype, sparse)
        names = read_tensor_names(tmp)
        expected = {f"{name}.{part}.weight": shape for name, rank in ranks.items()
                    for part, shape in (("down", [rank, None]), ("up", [None, rank]))}
        for r in results:
            if r.nnz:
                skeleton = sparse_skeleton(r.shape[1], r.shape[0], sparse[r.name], device="meta")
                expected.update({f"{r.name}.{key}": list(t.shape) for key, t in skeleton.state_dict().items()})
        for key, shape in expected.items():
            if key not in names or any(s is not None and s != got for s, got in zip(shape, names[key][1])):
                raise LrcError(f"written checkpoint is missing or misshapes {key}")
        check_finite_files(tmp)
        report["timing_s"]["write_s"] = round(time.perf_counter() - start, 3)
        report["bytes"] = {"safetensors": tensor_bytes(tmp), "dtype": str(dtype or loaded.model.dtype).removeprefix("torch.")}
        _write_report(tmp / REPORT_NAME, report)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(report, sort_keys=False, width=120))

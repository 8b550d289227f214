"""Decompositions as jobs: each group of matrices reading one input (q/k/v, gate/up) is one job.

A job takes the group's weights and statistics in, and gives each matrix's `Decomposition` (factors up to
the break-even rank, weighted error of every rank, sparse options) and its exact relative output error
per rank out. Jobs share nothing, so an executor may run them in any order or place; results are keyed by
matrix name and assembled in the model's order, so the outcome does not depend on the executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..calibration.sufficiency import check_sufficiency
from ..config import CompressionConfig
from ..device import resolve_device
from ..errors import ConfigError
from ..factorize import METHODS, Decomposition, FactorizationMethod, breakeven_rank
from ..factorize.output_error import relative_output_errors
from ..io.checkpoint import DTYPES
from ..model.projection import Projection
from ..model.targets import decoder_layers, target_linears
from ..progress import Progress, no_progress
from ..sources import LoadedModel
from ..stats.types import CalibrationStats
from .executors import EXECUTORS, default_executor


@dataclass
class DecompositionJob:
    """The matrices `names` (in model order) that read the input whose statistics `owner` holds."""

    owner: str
    names: list[str]
    shapes: list[tuple[int, int]]

    @property
    def name(self) -> str:
        return self.owner

    def cost(self) -> float:
        """Estimated flops: an n³ input weighting, then about m n min(m, n) per matrix (its weighted SVD)."""
        n = self.shapes[0][1]
        return float(n**3 + sum(m * k * min(m, k) for m, k in self.shapes))


@dataclass
class MatrixAnalysis:
    """One matrix decomposed: factors and errors, and the relative output error of every rank."""

    decomposition: Decomposition
    output_errors: torch.Tensor


@dataclass
class Analysis:
    """The expensive part of a run: every targeted matrix decomposed once, with its error curves.

    decompositions: factors up to the break-even rank; output_errors: relative output error of every rank.
    Allocation and factorization at any budget reuse it (see `lrc.engine.build.apply`).
    """

    stats: CalibrationStats
    decompositions: dict[str, Decomposition]
    output_errors: dict[str, torch.Tensor]
    errors_comparable: bool
    timing: dict[str, float]


def decomposition_jobs(targets: dict[str, Projection], stats: CalibrationStats) -> list[DecompositionJob]:
    """One job per distinct input, its matrices in model order (linears sharing an input are consecutive)."""
    jobs: dict[str, DecompositionJob] = {}
    for name, linear in targets.items():
        owner = stats.shares.get(name, name)
        job = jobs.setdefault(owner, DecompositionJob(owner, [], []))
        job.names.append(name)
        job.shapes.append((linear.out_features, linear.in_features))
    return list(jobs.values())


def value_bytes(config: CompressionConfig, linear: Projection) -> int:
    """Bytes per stored value in the output: the --dtype if given, else the layer's own dtype."""
    return DTYPES[config.dtype].itemsize if config.dtype else linear.weight.element_size()


def run_job(
    job: DecompositionJob,
    targets: dict[str, Projection],
    stats: CalibrationStats,
    method: FactorizationMethod,
    config: CompressionConfig,
    device: torch.device,
    done: Callable[[str], None],
) -> dict[str, MatrixAnalysis]:
    """Decompose the job's matrices on `device` with one shared input weighting; results on the CPU."""
    inp = stats.inputs[job.owner].to(device)
    in_weights = method.in_weighting(inp)
    results = {}
    for name in job.names:
        linear = targets[name]
        out = stats.outputs[name].to(device) if name in stats.outputs else None
        weight = linear.weight.detach().to(device)
        m, n = weight.shape
        dec = method.decompose(weight, inp, breakeven_rank(m, n), name, in_weights, out, value_bytes(config, linear))
        results[name] = MatrixAnalysis(dec, relative_output_errors(weight, inp.gram, dec))
        done(name)
    return results


def decompose_all(
    loaded: LoadedModel,
    config: CompressionConfig,
    stats: CalibrationStats,
    progress: Progress = no_progress,
    executor: str | None = None,
) -> Analysis:
    """Decompose every targeted matrix with the configured method, from already collected statistics.

    executor: a name in EXECUTORS; None picks one from the run (lrc.engine.executors.default_executor).
    """
    method = METHODS.create(config.method, config.method_options)
    if method.weighs_data:
        stack_name, _ = decoder_layers(loaded.model)
        check_sufficiency(stats.inputs, stats.windows, f"{stack_name}.0.")
    device = resolve_device(config.device)
    if method.needs_gradients and not stats.outputs:
        raise ConfigError(f"method {config.method} needs output-gradient statistics; these statistics have none")
    targets = target_linears(loaded.model, config.exclude)
    t = time.perf_counter()
    finished: list[str] = []

    def done(name: str) -> None:
        finished.append(name)
        progress("decompose", len(finished), len(targets))

    jobs = decomposition_jobs(targets, stats)
    executor = executor or default_executor(device)
    options = {"local": "device" if device.type == "cuda" else "serial"} if executor == "distributed" else None
    results = EXECUTORS.create(executor, options).run(
        jobs, lambda job: run_job(job, targets, stats, method, config, device, done)
    )
    decompositions = {name: results[name].decomposition for name in targets}
    output_errors = {name: results[name].output_errors for name in targets}
    timing = dict(stats.timing, decomposition_s=time.perf_counter() - t)
    return Analysis(stats, decompositions, output_errors, method.errors_comparable, timing)

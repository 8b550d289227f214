"""`compress` with the model streamed: the stages of lrc.pipeline.compress, each walking the blocks one at a time.

    model        lrc.stream.shards        skeleton on the meta device; a block's weights read when walked
    statistics   lrc.stats (unchanged)    the same passes; each layer's statistics go to the layer store as
                                          they are final (inputs in the forward pass, gradients in the sweep)
    decompose    lrc.engine.jobs          per layer: its statistics and weights -> its jobs -> the store; kept
                                          in memory: error curves and sparse options (what allocation reads)
    allocate     lrc.allocate (unchanged) the same candidates, the same choices
    held-out     lrc.quality_check        the dense loss block by block before the build, the compressed loss
                                          by running the held-out hidden states through each layer as it is built
    layers       lrc.engine.build.apply   per layer: its decompositions reloaded, its chosen forms built, its
                                          tensors staged in the output's temporary folder, the block released
    files        lrc.stream.shard_writer  the shards written tensor by tensor with the in-memory writer's bytes,
                                          then verified and moved into place as lrc.io.writer does

Resident at once: the skeleton's embeddings / norm / head, one block (weights, statistics, decompositions),
the hidden states within `stream_activation_gib` (spilled to files beyond it), the error curves.
The output (every tensor, config.json, tokenizer) has the same bytes as the in-memory path's; the report
too, apart from `timing_s` and `memory` (tests/stream/test_streaming.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..allocate import ALLOCATORS, allocate_ranks, check_budget_reachable, check_patterns_match
from ..allocate.curve import allocation_curve
from ..allocate.objective import predicted_cost
from ..allocate.refine import ProblemGroups
from ..calibration.sufficiency import check_sufficiency
from ..config import CompressionConfig
from ..device import resolve_device
from ..distributed import launched, world
from ..engine import Analysis
from ..engine.build import KeptLayers, MatrixResult, apply
from ..engine.executors import EXECUTORS
from ..engine.jobs import decomposition_jobs, run_job
from ..errors import ConfigError, OutputError
from ..factorize import METHODS, Decomposition
from ..forms import LowRankLinear, count_params
from ..io.checkpoint import DTYPES, save_tensors, write_model_files, written_tensor
from ..io.output import atomic_directory, check_output_path, folder_refusal, run_places
from ..io.remote_code import write_remote_code
from ..io.report import build_report
from ..io.writer import finish_output
from ..model.adapters import adapter_for
from ..model.targets import target_linears
from ..peak_memory import peak_memory
from ..progress import Progress, no_progress
from ..quality_check import HeldOutCheck
from ..sources import LoadedModel
from ..sources import cache_dir as default_cache_dir
from ..stats.collect import calibration_windows
from ..stats.gradients import collect_output_stats
from ..stats.inputs import collect_input_stats
from ..stats.types import CalibrationStats
from ..stats.walker import LayerWalk
from .activations import ActivationStore
from .layer_store import LayerStore, decomposition_key
from .shard_writer import ShardedCheckpointWriter, unique_entries
from .shards import StreamedBlocks, load_streamed, streamed_blocks


def check_streamable(model: Any, config: CompressionConfig, output: Path | None, analysis: Any,
                     cache_dir: Path | None = None) -> None:
    """ConfigError for what streaming cannot do (one line each, naming the in-memory path), OutputError where
    its layer files cannot go."""
    if launched() or world()[1] > 1:
        raise ConfigError("streaming runs in one process: drop --nproc (or torchrun) with --stream")
    if not isinstance(model, str):
        raise ConfigError("streaming loads the model itself: give its path, Hub id or alias, not a loaded model")
    if output is None:
        raise ConfigError("streaming writes the model layer by layer: give an output folder")
    if analysis is not None:
        raise ConfigError("streaming keeps its decompositions on disk: an in-memory analysis cannot be reused")
    if config.sequential:
        raise ConfigError("sequential mode refits the whole model in memory: use it without --stream")
    if config.calib is None:
        raise ConfigError("self-sampled calibration generates text with the whole model: give --calib with --stream")
    root = stream_root(cache_dir)
    refusal = folder_refusal(root)
    if refusal is not None:
        raise OutputError(f"--stream keeps each layer's files under {root}, but {refusal}: give --cache-dir DIR (or "
                          "set LRC_CACHE_DIR) to keep them elsewhere")


def stream_root(cache_dir: Path | None) -> Path:
    """The folder of the layer stores: `stream/` in the --cache-dir, else in the lrc cache."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "stream"


def compress_streamed(
    model: str,
    config: CompressionConfig,
    out_path: Path,
    overwrite: bool = False,
    progress: Progress = no_progress,
    cache_dir: Path | None = None,
) -> tuple[Any, dict[str, Any], list[MatrixResult]]:
    """(the skeleton model, the report, per-matrix results) of a streamed run written to `out_path`.

    The layer store lives under `cache_dir`/stream (kept) or the lrc cache's stream/ folder (removed after a
    successful run); a run killed before it finished resumes from the layers whose files it completed.
    """
    start = time.perf_counter()
    _claim = check_output_path(out_path, overwrite, run_places(model, config.calib, cache_dir))
    return_freed_memory()
    loaded = load_streamed(model, progress)
    _claim = check_output_path(out_path, overwrite, run_places(loaded, config.calib, cache_dir))
    check_patterns_match(loaded.model, config)
    check_budget_reachable(loaded.model, config)
    timing = {"load_s": time.perf_counter() - start}
    original_params = count_params(loaded.model)
    store = open_layer_store(loaded, config, cache_dir)
    budget = int(config.stream_activation_gib * 1024**3)
    with ActivationStore(budget, root=store.stats_dir) as activations:
        stats = streamed_statistics(loaded, config, store, activations, progress)
        analysis = decompose_layers(loaded, config, store, stats, progress)
        timing.update(analysis.timing)
        t = time.perf_counter()
        allocator = ALLOCATORS.create(config.allocator, config.allocator_options)
        kept = KeptLayers(store)  # the choices' refits, in files, for the blocks' builds
        allocation = allocate_ranks(analysis, config, problems=streamed_problems(loaded, config, store, stats),
                                    allocator=allocator, progress=progress, keep=kept.keep)
        timing["allocation_s"] = time.perf_counter() - t
        timing["refine_s"] = analysis.timing.get("refine_s", 0.0)  # the part of allocation_s spent refining
        t = time.perf_counter()
        curve = allocation_curve(ALLOCATORS.create(config.allocator, config.allocator_options), *allocation)
        timing["allocation_curve_s"] = time.perf_counter() - t
        held_out = HeldOutCheck.measure_dense(
            loaded, config, lambda net, windows, batch, device: streamed_mean_loss(net, windows, batch, device, activations)
        )
        with atomic_directory(out_path, overwrite=overwrite) as tmp:
            t = time.perf_counter()
            results, held_out_entry = build_and_write(loaded, analysis, config, store, allocation, held_out, tmp,
                                                      activations, kept, progress)
            timing["apply_s"] = time.perf_counter() - t
            device = resolve_device(config.device)
            report = build_report(loaded, config, analysis.stats, results, original_params, device)
            report["allocation_curve"] = curve
            predicted = predicted_cost(allocator, *allocation, config.objective)
            if predicted is not None:
                report["predicted_cost"] = predicted
            report["held_out"] = held_out_entry
            timing["total_s"] = time.perf_counter() - start
            report["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
            report["stream"] = {"block_loads": streamed_blocks(loaded.model).loads,  # type: ignore[union-attr]
                                "spilled_activation_bytes": activations.spilled}
            report["memory"] = peak_memory(device)
            write_remote_code(loaded.model, tmp)  # modeling code: the output loads without lrc
            finish_output(tmp, results, report, config, loaded.model.dtype, t)
    if cache_dir is None:
        store.remove()
    return loaded.model, report, results


def return_freed_memory() -> None:
    """glibc only: a fixed mmap threshold (128 KiB) for the rest of the process, so every freed block's memory
    goes back to the system. By default glibc raises the threshold to the largest block freed (up to 32 MiB),
    after which a block's tensors come from the heap, which fragments and does not shrink: the peak then grew
    with depth (1.41x for 2x the layers in bench/memory.py; 1.00x with the threshold fixed)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(name).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def open_layer_store(loaded: LoadedModel, config: CompressionConfig, cache_dir: Path | None) -> LayerStore:
    from ..stats.store import cache_key

    needs = METHODS.get(config.method).needs_gradients
    stats_key = cache_key(loaded, config, gradients=needs, fisher=config.method == "fwsvd")
    return LayerStore(stream_root(cache_dir), stats_key, decomposition_key(stats_key, config.method, config.method_options, config.dtype))


def _blocks(loaded: LoadedModel) -> StreamedBlocks:
    blocks = streamed_blocks(loaded.model)
    assert blocks is not None
    return blocks


def streamed_statistics(
    loaded: LoadedModel, config: CompressionConfig, store: LayerStore, activations: ActivationStore,
    progress: Progress = no_progress,
) -> CalibrationStats:
    """The statistics passes of lrc.stats.collect, each layer's result saved to the store (a completed pass is
    not run again); the returned CalibrationStats holds the windows only."""
    device = resolve_device(config.device)
    method_cls = METHODS.get(config.method)
    targets = target_linears(loaded.model, config.exclude)
    n_layers = len(_blocks(loaded).layers)
    torch.manual_seed(config.seed)
    found = store.load_windows()
    if found is None:
        t = time.perf_counter()
        windows, calib_source = calibration_windows(loaded, config)
        timing = {"calibration_data_s": time.perf_counter() - t}
        store.save_windows(windows, calib_source, timing)
    else:
        windows, calib_source, timing = found
    if not store.has_inputs(n_layers):
        t = time.perf_counter()

        def keep(index: int, layer: Any, stats: dict[str, Any], shared: dict[str, str]) -> None:
            store.save_inputs(index, {name: s.to("cpu") for name, s in stats.items()}, shared)
            progress("calibrate", index + 1, n_layers)

        collect_input_stats(loaded.model, windows, targets, keep, config.batch_size, device, activations)
        timing["calibration_s"] = time.perf_counter() - t
    if method_cls.needs_gradients and not store.has_outputs(n_layers):
        t = time.perf_counter()
        grad_windows = windows[: config.grad_samples] if config.grad_samples else windows
        collect_output_stats(
            loaded.model, grad_windows, targets, fisher=config.method == "fwsvd", device=device,
            progress=lambda done, total: progress("output gradients", done, total),
            sweep_batches=None, activations=activations, layer_done=store.save_outputs,
        )
        timing["gradients_s"] = time.perf_counter() - t
    return CalibrationStats(windows, calib_source, {}, {}, {}, timing)


def _layer_stats(store: LayerStore, index: int, stats: CalibrationStats) -> CalibrationStats:
    found = store.load_inputs(index)
    assert found is not None, f"the layer store lost layer {index}'s statistics"
    inputs, shares = found
    return CalibrationStats(stats.windows, stats.calib_source, inputs, shares, store.load_outputs(index) or {}, {})


def decompose_layers(
    loaded: LoadedModel, config: CompressionConfig, store: LayerStore, stats: CalibrationStats,
    progress: Progress = no_progress,
) -> Analysis:
    """decompose_all, one layer at a time: each layer's jobs from its stored statistics and its weights, the
    result saved to the store (a stored layer is not decomposed again); in memory only what allocation reads."""
    device = resolve_device(config.device)
    method = METHODS.create(config.method, config.method_options)
    targets = target_linears(loaded.model, config.exclude)
    blocks = _blocks(loaded)
    stack_name = adapter_for(loaded.model).layer_stack(loaded.model)[0]
    decompositions: dict[str, Decomposition] = {}
    output_errors: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    finished: list[str] = []

    def done(name: str) -> None:
        finished.append(name)
        progress("decompose", len(finished), len(targets))

    for index in range(len(blocks.layers)):
        layer_targets = {n: p for n, p in targets.items() if n.startswith(f"{stack_name}.{index}.")}
        found = store.load_decompositions(index)
        if found is None and layer_targets:
            layer_stats = _layer_stats(store, index, stats)
            if method.weighs_data:
                check_sufficiency(layer_stats.inputs, stats.windows, f"{stack_name}.0.")
            if method.needs_gradients and not layer_stats.outputs:
                raise ConfigError(f"method {config.method} needs output-gradient statistics; these statistics have none")
            blocks.load(index)
            try:
                results = EXECUTORS.create("serial").run(
                    decomposition_jobs(layer_targets, layer_stats),
                    lambda job: run_job(job, layer_targets, layer_stats, method, config, device, done),  # noqa: B023
                )
            finally:
                blocks.release(index)
            found = ({n: results[n].decomposition for n in layer_targets}, {n: results[n].output_errors for n in layer_targets})
            store.save_decompositions(index, *found)
        elif found is not None:
            finished.extend(found[0])
            progress("decompose", len(finished), len(targets))
        if found is not None:
            for name, dec in found[0].items():
                decompositions[name] = _curves_only(dec)
                output_errors[name] = found[1][name]
    timing = dict(stats.timing, decomposition_s=time.perf_counter() - t)
    return Analysis(stats, decompositions, output_errors, method.errors_comparable, timing)


def streamed_problems(
    loaded: LoadedModel, config: CompressionConfig, store: LayerStore, stats: CalibrationStats
) -> ProblemGroups:
    """The weights and stored statistics of the named matrices, one decoder block at a time (read, then released)."""
    blocks = _blocks(loaded)
    targets = target_linears(loaded.model, config.exclude)

    def groups(names: list[str]) -> Iterator[tuple[dict[str, Any], CalibrationStats]]:
        by_layer: dict[int, list[str]] = {}
        for name in names:
            by_layer.setdefault(int(name[len(blocks.stack_name) + 1:].split(".")[0]), []).append(name)
        for index in sorted(by_layer):
            blocks.load(index)
            try:
                yield {n: targets[n] for n in by_layer[index]}, _layer_stats(store, index, stats)
            finally:
                blocks.release(index)

    return groups


def _curves_only(dec: Decomposition) -> Decomposition:
    """The decomposition without its factors (their shapes kept, on the meta device): what allocation reads."""
    return Decomposition(torch.empty(dec.up_full.shape, device="meta"), torch.empty(dec.down_full.shape, device="meta"),
                         dec.errors, dec.sparse_options)


class LayerwiseLoss:
    """The mean next-token loss of `windows` (k x seq_len), the blocks run one at a time: `step(i)` runs block i
    (its weights in place) on the current hidden states, `loss()` takes the model's own head and loss on the
    last ones. The same sum as lrc.quality_check.mean_loss, batch by batch."""

    def __init__(self, model: Any, windows: torch.Tensor, batch_size: int, device: torch.device,
                 activations: ActivationStore) -> None:
        self.model = model
        self.batches = windows.split(batch_size)
        self.walk = LayerWalk(model, windows, batch_size, device, activations)
        self.hidden = self.walk.inputs

    def step(self, index: int) -> None:
        out = self.walk.activations.boundary()
        with torch.no_grad():
            for b, h in enumerate(self.hidden):
                out.append(self.walk.run(index, b, h))
        self.hidden = out

    def loss(self) -> float:
        adapter = adapter_for(self.model)
        home = self.model.get_input_embeddings().weight.device
        total, count = 0.0, 0
        for b, batch in enumerate(self.batches):
            with self.walk.blocks_bypassed(self.hidden[b].to(home)), torch.no_grad():
                total += float(adapter.loss(self.model, batch.to(home), torch.Generator()))
            count += batch[:, 1:].numel()
        return total / count


def streamed_mean_loss(model: Any, windows: torch.Tensor, batch_size: int, device: torch.device,
                       activations: ActivationStore) -> float:
    """lrc.quality_check.mean_loss of a streamed model: each block read, run and released in turn."""
    run = LayerwiseLoss(model, windows, batch_size, device, activations)
    for index in range(len(run.walk)):
        with run.walk.placed(index):
            run.step(index)
    return run.loss()


def build_and_write(
    loaded: LoadedModel, analysis: Analysis, config: CompressionConfig, store: LayerStore, allocation: Any,
    held_out: HeldOutCheck, folder: Path, activations: ActivationStore, kept: KeptLayers | None = None,
    progress: Progress = no_progress,
) -> tuple[list[MatrixResult], dict[str, Any]]:
    """Per layer: reload its decompositions and statistics, build its chosen forms (lrc.engine.build.apply, the
    sparse ones from `kept` where the refits made them), run
    the held-out hidden states through it, stage its tensors; then the checkpoint's shards from the staged
    tensors and the resident ones. Returns the per-matrix results and the held-out report entry."""
    model = loaded.model
    candidates, choices = allocation
    blocks = _blocks(loaded)
    dtype = DTYPES[config.dtype] if config.dtype else None
    held = None
    if held_out.dense_loss is not None:
        held = LayerwiseLoss(model, held_out.windows, held_out.batch_size, held_out.device, activations)
    staging = folder / ".layers"
    staging.mkdir()
    results: list[MatrixResult] = []
    n_layers = len(blocks.layers)
    for index in range(n_layers):
        prefix = f"{blocks.stack_name}.{index}."
        layer_candidates = [c for c in candidates if c.name.startswith(prefix)]
        layer = blocks.load(index)
        try:
            if layer_candidates:
                found = store.load_decompositions(index)
                assert found is not None, f"the layer store lost layer {index}'s decompositions"
                for name, dec in found[0].items():  # the options' errors as refined after the allocation
                    dec.sparse_options = analysis.decompositions[name].sparse_options
                layer_analysis = Analysis(_layer_stats(store, index, analysis.stats), found[0], found[1],
                                          analysis.errors_comparable, {})
                results += apply(loaded, layer_analysis, config, no_progress, (layer_candidates, choices), kept)[0]
            if held is not None:
                held.step(index)
            save_tensors({prefix + k: written_tensor(prefix + k, v, dtype) for k, v in unique_entries(layer).items()},
                         str(staging / f"{index}.safetensors"))
        finally:
            blocks.release(index)
        progress("build layers", index + 1, n_layers)
    entry = {"windows": 0, "skipped": held_out.skipped} if held is None else held_out.entry(held.loss())
    _write_shards(model, folder, staging, blocks, dtype)
    ranks = {r.name: r.rank for r in results if r.kind == LowRankLinear.kind}
    sparse = {r.name: r.spec() for r in results if r.kind not in ("dense", LowRankLinear.kind)}
    write_model_files(model, folder, loaded.tokenizer, ranks, dtype, sparse)
    return results, entry


def _write_shards(model: Any, folder: Path, staging: Path, blocks: StreamedBlocks, dtype: torch.dtype | None) -> None:
    """The checkpoint's shards: the skeleton (now with the built forms, on the meta device) gives the names in
    order and their shapes; block tensors come from the staged files, the others from the resident model."""
    entries = unique_entries(model)
    layout = {name: (dtype if dtype is not None and t.is_floating_point() else t.dtype, list(t.shape))
              for name, t in entries.items()}
    writer = ShardedCheckpointWriter(folder, layout)
    try:
        for name, tensor in entries.items():
            if not name.startswith(f"{blocks.stack_name}."):
                writer.write(name, written_tensor(name, tensor, dtype))
        for path in sorted(staging.glob("*.safetensors"), key=lambda p: int(p.stem)):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    writer.write(name, handle.get_tensor(name))
            path.unlink()
    finally:
        writer.close()
    staging.rmdir()

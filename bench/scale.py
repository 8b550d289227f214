"""Cost at the scale users compress: one decoder layer at Llama-3-8B and Llama-3-70B shapes, projected to the model.

For each shape, one LlamaForCausalLM layer is built from its config (random weights; a 1024-token
vocabulary, which only sizes the embeddings and head, outside the layer) and lrc's own stages run on it:

- statistics: the input-statistics pass and the output-gradient sweep of `lrc.stats.collect` on random
  token windows (synthetic activations), on half of `--samples` x `--seq-len` tokens and on all: the
  difference gives the time per token, scaled to the default calibration (128 x 512 tokens).
- decomposition: every job of the layer (q/k/v, o, gate/up, down) through `lrc.engine.jobs.run_job` with
  the default method, on Grams from those tokens plus a ridge of 1% of their mean diagonal (few tokens
  leave them singular; real calibration does not). Jobs run cheapest first until `--job-budget-s` is
  spent; the others are projected from the measured ones by the flop model `DecompositionJob.cost()`
  (seconds per unit fitted on the measured jobs of this device), and marked so.
- allocation: the knapsack over the layer's measured matrices, scaled per matrix to the whole model, and
  the refits of the sparse options next to its choices (the default recipe; lrc.allocate.refine), scaled
  to the layer's seven matrices by Σ m · n · min(m, n) and to the model by its layers, split over the GPUs.
- write: safetensors save of the layer's weights at bfloat16, as bytes per second, scaled to the model's
  compressed bytes (1 - budget of the targeted weights, plus the rest).

Projection: L layers (32 for 8B, 80 for 70B); statistics split over G GPUs by batches; decompositions
bin-packed over G (lrc.distributed.pack_jobs over every layer's jobs); refits split over G; allocation and
write on one rank.
Memory: the device peak per phase (CUDA: torch.cuda.max_memory_allocated; CPU: sampled resident set
size), which does not grow with depth, and the host memory the current pipeline holds for the whole
model (weights at bfloat16, every layer's float64 statistics, decompositions at float32 up to the
break-even rank). Numbers measured on a CPU give a "CPU projection": a GPU run (bench/gpu_check.sh)
replaces it.

    OMP_NUM_THREADS=2 python bench/scale.py --device cpu --samples 2 --seq-len 128 --job-budget-s 300
    python bench/scale.py --device cuda                    # 8 x 512 tokens, every job measured
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_files import cpu_description, write_results  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lrc.config import CompressionConfig  # noqa: E402
from lrc.distributed import pack_jobs  # noqa: E402
from lrc.engine.jobs import Analysis, decomposition_jobs, run_job  # noqa: E402
from lrc.factorize import METHODS  # noqa: E402
from lrc.model.targets import target_linears  # noqa: E402
from lrc.sources import LoadedModel, ModelSource  # noqa: E402
from lrc.stats.collect import collect_statistics  # noqa: E402

SHAPES = {  # name: (hidden, MLP, attention heads, KV heads, layers)
    "llama3-8b": (4096, 14336, 32, 8, 32),
    "llama3-70b": (8192, 28672, 64, 8, 80),
    "smollm2-135m": (576, 1536, 9, 3, 30),
    "test-tiny": (256, 512, 4, 2, 2),  # for a dry run of this script
}
DEFAULT_TOKENS = 128 * 512
GIB = 1024**3


class Clock:
    """Seconds of a phase. On CUDA the wall clock (after a synchronize). On the CPU the process's CPU time
    divided by torch's thread count: the wall time on an idle machine with that many cores, which a shared
    machine's wall clock (other jobs running) overstates."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time() / torch.get_num_threads()


class PeakMemory:
    """The peak of device memory over a `with` block: CUDA's allocator peak, or the sampled resident set on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()


@dataclass
class JobCost:
    name: str
    matrices: str
    cost: float
    seconds: float
    measured: bool
    peak_bytes: int


def build_layer(hidden: int, mlp: int, heads: int, kv: int, seq_len: int, dtype: torch.dtype) -> LoadedModel:
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq_len, 128),
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)  # transformers' own init: normal(0, 0.02) weights
    model.eval()
    return LoadedModel(model, None, ModelSource("config-built", "folder", Path(".")), Path("."))  # type: ignore[arg-type]


def ridged(stats: Any) -> Any:
    """Statistics made definite: Grams from few tokens plus 1% of their mean diagonal (see the module docstring)."""
    for s in stats.inputs.values():
        s.gram.diagonal().add_(0.01 * float(s.gram.diagonal().mean()) + 1e-12)
    for o in stats.outputs.values():
        o.diag.add_(0.01 * float(o.diag.mean()) + 1e-20)
        if o.gram is not None:
            o.gram.diagonal().add_(0.01 * float(o.gram.diagonal().mean()) + 1e-20)
    return stats


def measure_shape(label: str, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], list[JobCost]]:
    hidden, mlp, heads, kv, layers = SHAPES[label]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = build_layer(hidden, mlp, heads, kv, args.seq_len, dtype)
    config = CompressionConfig(method=args.method, samples=args.samples, seq_len=args.seq_len,
                               batch_size=args.batch_size, device=str(device), heldout_windows=0)
    windows = torch.randint(0, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = windows.numel()
    result: dict[str, Any] = {"shape": label, "hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv,
                              "layers": layers, "tokens_measured": tokens}

    # twice, on half the windows and on all of them: time = fixed + per_token x tokens (the fixed part, the
    # walker's set-up and the Gram allocations, would dominate a per-token rate from few tokens)
    clock = Clock(device)
    half = windows[: max(1, args.samples // 2)]
    # an untimed pass first: the device's first use (kernel loading, library handles, allocator growth) cost more
    # than the half pass it would have been charged to (on an H100 the half pass ran longer than the full one)
    collect_statistics(loaded, config.replace(samples=1), windows=windows[:1])
    t = clock.now()
    collect_statistics(loaded, config.replace(samples=half.shape[0]), windows=half)
    half_s = clock.now() - t
    t = clock.now()
    with PeakMemory(device) as peak:
        stats = collect_statistics(loaded, config, windows=windows)
    stats_s = clock.now() - t
    per_token = (stats_s - half_s) / (tokens - half.numel()) if tokens > half.numel() else stats_s / tokens
    floor = stats_s / tokens / 10  # noise or a fixed cost must not make the rate vanish; a rate at the floor is marked
    rate = max(per_token, floor)
    result["statistics"] = {"seconds": round(stats_s, 3), "seconds_half": round(half_s, 3),
                            "per_token_s": rate, "per_token_at_floor": per_token <= floor,
                            "fixed_s": max(0.0, stats_s - rate * tokens), "peak_bytes": peak.peak,
                            **{k: round(v, 3) for k, v in stats.timing.items()}}
    ridged(stats)

    targets = target_linears(loaded.model, config.exclude)
    method = METHODS.create(config.method, config.method_options)
    jobs = sorted(decomposition_jobs(targets, stats), key=lambda j: (j.cost(), j.name))
    costs: list[JobCost] = []
    decompositions, output_errors = {}, {}
    spent = 0.0
    for job in jobs:
        short = ",".join(n.rsplit(".", 1)[-1] for n in job.names)
        if spent >= args.job_budget_s or short in args.skip_jobs:
            costs.append(JobCost(job.name, short, job.cost(), float("nan"), False, 0))
            continue
        t = clock.now()
        with PeakMemory(device) as peak:
            out = run_job(job, targets, stats, method, config, device, lambda name: None)
        seconds = clock.now() - t
        spent += seconds
        costs.append(JobCost(job.name, short, job.cost(), seconds, True, peak.peak))
        for name, analysis in out.items():
            decompositions[name] = analysis.decomposition
            output_errors[name] = analysis.output_errors
        print(f"{label}: job {short} {seconds:.1f} s", file=sys.stderr, flush=True)
    measured = [c for c in costs if c.measured]
    rate = sum(c.seconds for c in measured) / sum(c.cost for c in measured)  # seconds per flop-model unit
    for c in costs:
        if not c.measured:
            c.seconds = rate * c.cost
    result["jobs"] = [{"matrices": c.matrices, "cost": c.cost, "seconds": round(c.seconds, 3), "measured": c.measured,
                       "peak_bytes": c.peak_bytes} for c in costs]
    result["seconds_per_cost_unit"] = rate

    from lrc.allocate import allocate_ranks

    t, wall = clock.now(), time.perf_counter()
    analysis = Analysis(stats, decompositions, output_errors, method.errors_comparable, {})
    allocate_ranks(analysis, config, loaded.model)  # with the model: sparse options near the choices refitted
    seconds, wall = clock.now() - t, time.perf_counter() - wall
    refine = seconds * analysis.timing.get("refine_s", 0.0) / wall if wall > 0 else 0.0  # its share, on the clock
    result["allocation"] = {"seconds": round(seconds - refine, 4), "matrices": len(decompositions),  # measured ones
                            "refine_seconds": round(refine, 4), "refine_work": matrix_work(tuple(targets[n].weight.shape) for n in decompositions)}

    from safetensors.torch import save_file

    layer_state = {k: v.detach().to(torch.bfloat16).contiguous()
                   for k, v in loaded.model.model.layers[0].state_dict().items()}
    path = Path(args.scratch) / f"scale-{label}.safetensors"
    t = time.perf_counter()  # writing waits on the disk: wall clock
    save_file(layer_state, str(path))
    write_s = time.perf_counter() - t
    nbytes = path.stat().st_size
    path.unlink()
    result["write"] = {"seconds": round(write_s, 3), "bytes": nbytes, "bytes_per_s": nbytes / write_s}
    result["projection"] = project(result, costs, args)
    return result, costs


def matrix_work(dims: Iterable[tuple[int, int]]) -> float:
    """Σ m · n · min(m, n) over (m, n) matrices: the factorization term of the flop model, and the scale of
    refitting a matrix's sparse options (products m x n by n x k, atoms k growing with min(m, n)), by which
    a layer's refits are projected from those of its measured matrices."""
    return float(sum(m * n * min(m, n) for m, n in dims))


def layer_matrices(hidden: int, mlp: int, kv_width: int) -> dict[str, tuple[int, int]]:
    """(out, in) of a Llama decoder layer's seven projections."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv_width, hidden), "v_proj": (kv_width, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}


def projected_shape(label: str, reference: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A shape not measured here, from `reference`'s rates: statistics time per token scaled by the layer's
    work per token (weights for the forward and backward, input widths squared for the float64 Grams), every
    job by the flop model at the reference's seconds per unit, allocation and write at its rates."""
    hidden, mlp, heads, kv, layers = SHAPES[label]
    kv_width = hidden // heads * kv

    def work(h: int, m: int, kvw: int) -> float:
        return 3 * (2 * h * h + 2 * h * kvw + 3 * h * m) + 2 * (3 * h * h + m * m)

    ref_work = work(reference["hidden"], reference["mlp"], reference["hidden"] // reference["heads"] * reference["kv_heads"])
    per_token = reference["statistics"]["per_token_s"] * work(hidden, mlp, kv_width) / ref_work
    rate = reference["seconds_per_cost_unit"]
    matrices = layer_matrices(hidden, mlp, kv_width)
    costs = []
    for names in ("q_proj,k_proj,v_proj", "o_proj", "gate_proj,up_proj", "down_proj"):  # one job per shared input
        dims = [matrices[name] for name in names.split(",")]
        cost = dims[0][1] ** 3 + matrix_work(dims)
        costs.append(JobCost(names, names, cost, rate * cost, False, 0))
    result: dict[str, Any] = {
        "shape": label, "hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv, "layers": layers,
        "tokens_measured": 0, "projected_from": reference["shape"],
        "statistics": {"seconds": float("nan"), "per_token_s": per_token, "peak_bytes": 0},
        "jobs": [{"matrices": c.matrices, "cost": c.cost, "seconds": c.seconds, "measured": False, "peak_bytes": 0}
                 for c in costs],
        "seconds_per_cost_unit": rate, "allocation": reference["allocation"], "write": reference["write"],
    }
    result["projection"] = project(result, costs, args)
    return result


def project(result: dict[str, Any], costs: list[JobCost], args: argparse.Namespace) -> dict[str, Any]:
    """Whole-model time and memory on 1 and 8 GPUs from the per-layer numbers (see the module docstring)."""
    layers, hidden, mlp = result["layers"], result["hidden"], result["mlp"]
    kv_width = hidden // result["heads"] * result["kv_heads"]
    matrices = layer_matrices(hidden, mlp, kv_width)
    layer_params = sum(m * n for m, n in matrices.values())
    stats_layer = result["statistics"]["per_token_s"] * DEFAULT_TOKENS + result["statistics"].get("fixed_s", 0.0)
    allocation = result["allocation"]
    alloc = allocation["seconds"] / max(allocation["matrices"], 1) * len(matrices) * layers
    # refits: the measured matrices' seconds per unit of matrix_work, for the layer's seven, in every layer;
    # one refit per matrix, bin-packed over the GPUs (lrc.allocate.refine), here split evenly
    refine_layer = (allocation["refine_seconds"] / allocation["refine_work"] * matrix_work(matrices.values())
                    if allocation["refine_work"] else 0.0)
    model_bytes = 2 * layers * layer_params * (1 - args.budget) + 2 * 2 * 128256 * hidden  # bf16, embeddings + head
    write = model_bytes / result["write"]["bytes_per_s"]
    stat_bytes = 8 * (3 * hidden**2 + mlp**2)  # input Grams: q/k/v, o, gate/up, down
    stat_bytes += sum(8 * m * m for m in (hidden, kv_width, kv_width, hidden, mlp, mlp, hidden) if m <= 2048)  # output Grams
    stat_bytes += 16 * (3 * hidden + 2 * kv_width + 2 * mlp)  # output diagonals and Fisher rows
    host = {"weights_bf16": 2 * layers * layer_params + 4 * 128256 * hidden, "statistics_f64": layers * stat_bytes,
            "decompositions_f32": 4 * layers * layer_params}
    device_peak = max([result["statistics"]["peak_bytes"], *(c.peak_bytes for c in costs)])
    out: dict[str, Any] = {"host_bytes": host, "device_peak_bytes": device_peak}
    for gpus in (1, 8):
        all_jobs = [(f"{layer}/{c.name}", c.seconds) for layer in range(layers) for c in costs]
        bins = pack_jobs(all_jobs, gpus)
        seconds = dict(all_jobs)
        decompose = max(sum(seconds[n] for n in b) for b in bins)
        statistics = stats_layer * layers / gpus
        refine = refine_layer * layers / gpus
        out[f"gpus_{gpus}"] = {"statistics_s": statistics, "decomposition_s": decompose, "allocation_s": alloc,
                               "refine_s": refine, "write_s": write,
                               "total_s": statistics + decompose + alloc + refine + write}
    return out


def table(results: list[dict[str, Any]], device_name: str, label: str) -> list[str]:
    clock = ("wall clock" if "CPU" not in device_name else
             "CPU time / threads, the wall time of an idle machine with that many cores")
    lines = [f"# Cost at scale: one decoder layer measured on {device_name}, whole model projected ({label})", "",
             f"Seconds are {clock}.", ""]
    lines += ["Per layer (measured unless marked *projected by the flop model*):", "",
              "| shape | statistics, tokens | statistics s/token | peak (stats) | job | flop-model cost | s | peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        st = r["statistics"]
        for i, j in enumerate(r["jobs"]):
            if i:
                head = "| | | | |"
            elif "projected_from" in r:
                head = f"| {r['shape']} | *from {r['projected_from']}* | *{st['per_token_s']:.2e}* | - |"
            else:
                rate = f"≥ {st['per_token_s']:.2e}" if st.get("per_token_at_floor") else f"{st['per_token_s']:.2e}"
                head = (f"| {r['shape']} | {st['seconds']:.1f} s, {r['tokens_measured']} | {rate} | "
                        f"{st['peak_bytes'] / GIB:.2f} GiB |")
            seconds = f"{j['seconds']:.1f}" if j["measured"] else f"*{j['seconds']:.1f}*"
            peak = f"{j['peak_bytes'] / GIB:.2f} GiB" if j["measured"] else "-"
            lines.append(f"{head} {j['matrices']} | {j['cost']:.3g} | {seconds} | {peak} |")
    lines += ["", f"Whole model ({label}): default calibration {DEFAULT_TOKENS} tokens, statistics split over the "
              "GPUs, jobs bin-packed (LPT):", "",
              "| model | GPUs | statistics | decomposition | allocation | refits near the choices | write | total | "
              "device peak | host: weights + statistics + decompositions |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        p = r["projection"]
        host = p["host_bytes"]
        peak = "-" if "projected_from" in r else f"{p['device_peak_bytes'] / GIB:.1f} GiB"
        for gpus in (1, 8):
            q = p[f"gpus_{gpus}"]
            lines.append(
                f"| {r['shape']} ({r['layers']} layers) | {gpus} | {q['statistics_s'] / 60:.1f} min | "
                f"{q['decomposition_s'] / 60:.1f} min | {q['allocation_s']:.1f} s | {q['refine_s'] / 60:.1f} min | "
                f"{q['write_s']:.0f} s | "
                f"**{q['total_s'] / 60:.1f} min** | {peak} | "
                f"{host['weights_bf16'] / GIB:.0f} + {host['statistics_f64'] / GIB:.0f} + "
                f"{host['decompositions_f32'] / GIB:.0f} GiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3-70b"], choices=list(SHAPES))
    parser.add_argument("--method", default=CompressionConfig().method)
    parser.add_argument("--budget", type=float, default=CompressionConfig().budget)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--job-budget-s", type=float, default=600.0,
                        help="stop measuring jobs of a shape after this many seconds; project the rest")
    parser.add_argument("--skip-jobs", nargs="*", default=[], help="jobs to project rather than run, e.g. down_proj")
    parser.add_argument("--project-shapes", nargs="*", default=[], choices=list(SHAPES),
                        help="shapes not measured: projected from the first measured shape's rates")
    parser.add_argument("--scratch", default="/tmp")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale"))
    args = parser.parse_args()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({cpu_description()}, {torch.get_num_threads()} threads)")
    label = "GPU projection" if device.type == "cuda" else "CPU projection"
    results = [measure_shape(shape, args, device)[0] for shape in args.shapes]
    results += [projected_shape(shape, results[0], args) for shape in args.project_shapes]
    write_results(args.out, table(results, device_name, label),
                  {"device": device_name, "label": label, "torch": str(torch.__version__), "results": results})


if __name__ == "__main__":
    main()

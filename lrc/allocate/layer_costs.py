"""Measured costs of the layer forms on this device: forward time and resident bytes per (form, shape, size).

`LayerCostTable.seconds(entry)` is the time of one forward pass of `tokens` tokens through one layer: a
dense nn.Linear (m x n), a LowRankLinear of rank r, or a sparse layer with k atoms / rank r and nnz stored
entries, built with random values (a sparse factor's entries at random places). Each is timed after one
warm-up call as the least of 7 rounds, each round long enough to last at least 10 ms (the least is the
time with the least interference from other processes). A dense layer's time is the least over every
measurement of its shape. Every other form is timed right after the dense layer of its shape, in each of
2 passes over the entries, and priced at the mean ratio of the two times, times the dense layer's time:
on a machine whose speed drifts (a shared virtual machine, up to 30% from minute to minute) a ratio
measured back to back holds where times taken a minute apart do not (measured: gate/up's dense entry
timed in a slow minute made every low-rank option of that shape look about 1.4x cheaper against dense
than it timed back to back). `resident_bytes(entry)` is what the layer holds after that forward: every
tensor reachable from the module (parameters, buffers, and caches such as a sparse layer's kernel copy),
each storage counted once.

A low-rank layer's time is priced by the least-squares line t(r) = a + b r (b >= 0) through its shape's
measured ranks: its work is two products of r (m + n) tokens multiply-adds plus a fixed cost per call,
and on a shared machine single measurements are noisy enough (±50% seen) that a knapsack pricing each
rank by its own measurement picks the ranks that measured fast by chance. So only RANK_SAMPLES ranks per
shape are measured, spread over its candidate ranks (`sample_ranks`): a Llama-3-8B gate projection has
about 400 candidate ranks at the knapsack's step of 8.

`time_outside` times one forward of a whole model and splits it into the targeted layers' time (by hooks)
and the rest (attention, norms, embeddings, the head): the latency objective's budget counts both.

Measured once per device and cached as JSON under the lrc cache dir (`latency/<key hash>.json`), keyed
by the device (CPU model and whether it has AMX, or GPU name), torch version, thread count, dtype, token count and the layer forms'
source (a change to a kernel measures again); later runs
measure only the entries they lack. A sparse entry's nnz is rounded to 1/64 of its factor's slots
(up, never to 0), so the options of many matrices share measurements.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic_file import atomic_file
from ..progress import Progress, no_progress

DENSE_KIND = "dense"
NNZ_STEPS = 64
ROUNDS = 7
PASSES = 2
MIN_ROUND_S = 0.01
RANK_SAMPLES = 16  # low ranks measured per shape; the rest are priced by the line through them


@dataclass(frozen=True)
class LayerShape:
    """One layer to measure: its form, out x in shape, rank (atoms) and sparse entries (0 if none)."""

    kind: str
    out_features: int
    in_features: int
    rank: int = 0
    nnz: int = 0
    layout: str = ""

    def key(self) -> str:
        return f"{self.kind}:{self.out_features}x{self.in_features}:r{self.rank}:nnz{self.nnz}:{self.layout}"


def forms_source_digest() -> str:
    """A digest of the layer forms' source files (lrc/forms/*.py): what a layer runs when it is timed."""
    from .. import forms

    digest = hashlib.sha256()
    for path in sorted(Path(forms.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The CPU model (from /proc/cpuinfo, else the platform) and whether it has AMX, or the GPU's name. AMX
    decides which bfloat16 products run (cpu_kernels), and a VM may hide it on the same model of CPU."""
    from ..forms import cpu_kernels

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    amx = "AMX" if cpu_kernels.HAS_AMX else "no AMX"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({amx})"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({amx})"


def sparse_slots(shape: LayerShape) -> int:
    """Slots of the sparse factor: out x k for a sparse dictionary, out x in for a sparse residual."""
    return shape.out_features * (shape.rank if shape.kind == "sparse-dictionary" else shape.in_features)


def rounded(shape: LayerShape) -> LayerShape:
    """The entry that stands for `shape` in the table: nnz rounded up to a multiple of slots / NNZ_STEPS."""
    if not shape.nnz:
        return shape
    slots = sparse_slots(shape)
    step = max(1, slots // NNZ_STEPS)
    nnz = min(slots, math.ceil(shape.nnz / step) * step)
    return LayerShape(shape.kind, shape.out_features, shape.in_features, shape.rank, nnz, shape.layout)


def random_sparse(rows: int, cols: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with exactly nnz non-zero N(0, 1) entries at random places, on the generator's device."""
    device = generator.device
    flat = torch.zeros(rows * cols, device=device)
    where = torch.randperm(rows * cols, generator=generator, device=device)[:nnz]
    flat[where] = torch.randn(nnz, generator=generator, device=device).abs() + 0.1
    return flat.view(rows, cols)


def build_layer(shape: LayerShape, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A layer of `shape`'s form with random values (see module doc), drawn on `device`: at a big model's widths
    drawing them on the host took longer than timing the layer on a GPU."""
    from ..forms import LowRankLinear, LowRankSparseLinear, SparseDictionaryLinear

    g = torch.Generator(device=device).manual_seed(0)
    m, n, r = shape.out_features, shape.in_features, shape.rank

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device)

    layer: nn.Module
    if shape.kind == DENSE_KIND:
        layer = nn.Linear(n, m, bias=False, dtype=dtype, device=device)
    elif shape.kind == LowRankLinear.kind:
        layer = LowRankLinear.from_factors(randn(m, r), randn(r, n), dtype=dtype)
    elif shape.kind == SparseDictionaryLinear.kind:
        layer = SparseDictionaryLinear.from_factors(random_sparse(m, r, shape.nnz, g), randn(r, n), dtype=dtype,
                                                    layout=shape.layout)
    elif shape.kind == LowRankSparseLinear.kind:
        layer = LowRankSparseLinear.from_factors(randn(m, r), randn(r, n), random_sparse(m, n, shape.nnz, g),
                                                 dtype=dtype, layout=shape.layout)
    else:
        raise ValueError(f"no latency measurement for layer form {shape.kind!r}")
    return layer.to(device).requires_grad_(False)


def held_bytes(module: nn.Module) -> int:
    """Bytes of every tensor reachable from the module's attributes (parameters, buffers, caches), each
    storage once."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any, depth: int = 0) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            tensors = [value]
            if value.layout == torch.sparse_csr:
                tensors = [value.values(), value.crow_indices(), value.col_indices()]
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        elif isinstance(value, (tuple, list)) and depth < 4:
            for item in value:
                visit(item, depth + 1)
        elif isinstance(value, dict) and depth < 4:
            for item in value.values():
                visit(item, depth + 1)

    for sub in module.modules():
        for name, value in vars(sub).items():
            if name in ("_parameters", "_buffers"):
                visit(list(value.values()))
            elif not name.startswith("_modules"):
                visit(value)
    return total


def measure(layer: nn.Module, tokens: int, in_features: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of one forward of `tokens` tokens: the least of ROUNDS rounds after a warm-up call."""
    x = torch.randn(1, tokens, in_features, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        layer(x)
        sync()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < MIN_ROUND_S or calls < 1:
            layer(x)
            calls += 1
        sync()
        best = math.inf
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            sync()
            best = min(best, (time.perf_counter() - start) / calls)
    return best


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line a + b x through (x, y) with b >= 0 (a flat line at the mean if the best
    slope is negative)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    slope = max(0.0, sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx) if sxx > 0 else 0.0
    return my - slope * mx, slope


def sample_ranks(ranks: list[int], samples: int = RANK_SAMPLES) -> list[int]:
    """At most `samples` of `ranks` (sorted), evenly spread over them, the least and the greatest included."""
    ranks = sorted(set(ranks))
    if len(ranks) <= samples:
        return ranks
    return sorted({ranks[round(i * (len(ranks) - 1) / (samples - 1))] for i in range(samples)})


MEASURE_PHASE = "measure layer costs"


class LayerCostTable:
    """Forward seconds and resident bytes of layer forms at given shapes, measured once and cached on disk."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, tokens: int = 512,
                 cache_dir: Path | None = None) -> None:
        from ..sources import cache_dir as default_cache_dir

        self.device, self.dtype, self.tokens = torch.device(device), dtype, tokens
        self.identity = {
            "device": device_name(self.device), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
            "timing": "ratio to dense, back to back",  # tables timed otherwise are measured again
            "forms": forms_source_digest(),
        }
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (cache_dir or default_cache_dir()) / "latency" / f"{digest}.json"
        self.entries: dict[str, dict[str, float]] = {}
        self.measured = 0  # entries measured by this object (the rest came from the cache)
        self._fits: dict[tuple[int, int], tuple[float, float, float]] = {}  # low-rank series: (a, b, floor)
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except (OSError, ValueError):
                stored = {}
            if stored.get("identity") == self.identity:
                self.entries = dict(stored.get("entries", {}))

    def seconds(self, shape: LayerShape) -> float:
        """The measured time; for a low-rank layer, its shape's line fitted over the ranks measured (the shape
        itself is measured only when none of its ranks is)."""
        from ..forms import LowRankLinear

        if shape.kind != LowRankLinear.kind:
            return self._time(rounded(shape).key(), self._entry(shape))
        series = (shape.out_features, shape.in_features)
        if series not in self._fits:
            prefix = f"{shape.kind}:{shape.out_features}x{shape.in_features}:r"
            if not any(key.startswith(prefix) for key in self.entries):
                self.fill([shape])
            measured = [(float(key[len(prefix):].split(":")[0]), self._time(key, value))
                        for key, value in self.entries.items() if key.startswith(prefix)]
            a, b = linear_fit([rank for rank, _ in measured], [t for _, t in measured])
            self._fits[series] = (a, b, min(t for _, t in measured))  # the line may cross zero below the ranks measured
        a, b, floor = self._fits[series]
        return max(a + b * shape.rank, floor)

    def resident_bytes(self, shape: LayerShape) -> float:
        """Measured; for a low-rank layer not measured, r (m + n) values at the table's dtype (what a measured
        one holds)."""
        from ..forms import LowRankLinear

        key = rounded(shape).key()
        if shape.kind == LowRankLinear.kind and key not in self.entries:
            return float(shape.rank * (shape.out_features + shape.in_features) * self.dtype.itemsize)
        return self._entry(shape)["resident_bytes"]

    def fill(self, shapes: list[LayerShape], progress: Progress = no_progress) -> None:
        """Measure every shape not in the table yet (each non-dense form back to back with the dense layer of
        its shape), then save the table (once). progress: ("measure layer costs", measurements made, to make)."""
        missing = {rounded(s).key(): rounded(s) for s in shapes if rounded(s).key() not in self.entries}
        order = sorted(missing.items(), key=lambda item: (item[1].out_features, item[1].in_features))
        done, total = 0, PASSES * len(order)
        if total:
            progress(MEASURE_PHASE, done, total)
        dense_seconds: dict[str, float] = {}
        ratios: dict[str, list[float]] = {}
        held: dict[str, float] = {}
        for _ in range(PASSES):  # passes apart in time: a burst of load elsewhere spoils one, not all
            dense_layer: nn.Module | None = None
            dense_key = ""
            for key, shape in order:  # grouped by shape: one dense layer built (and held) at a time
                dense = LayerShape(DENSE_KIND, shape.out_features, shape.in_features)
                if dense.key() != dense_key:
                    dense_layer, dense_key = build_layer(dense, self.dtype, self.device), dense.key()
                    held[dense_key] = float(held_bytes(dense_layer))
                assert dense_layer is not None
                t_dense = measure(dense_layer, self.tokens, shape.in_features, self.dtype, self.device)
                dense_seconds[dense_key] = min(t_dense, dense_seconds.get(dense_key, math.inf))
                if shape.kind != DENSE_KIND:
                    layer = build_layer(shape, self.dtype, self.device)
                    t = measure(layer, self.tokens, shape.in_features, self.dtype, self.device)
                    held[key] = float(held_bytes(layer))
                    ratios.setdefault(key, []).append(t / t_dense)
                done += 1
                progress(MEASURE_PHASE, done, total)
            del dense_layer
        for key, t in dense_seconds.items():  # the least of every measurement of the shape, earlier ones too
            previous = self.entries.get(key, {}).get("seconds", math.inf)
            self.entries[key] = {"seconds": min(t, previous), "resident_bytes": held[key]}
        for key, measured in ratios.items():
            ratio = sum(measured) / len(measured)
            self.entries[key] = {"dense_ratio": ratio, "resident_bytes": held[key]}
            self.entries[key]["seconds"] = self._time(key, self.entries[key])
        self.measured += len(missing)
        if missing:
            self._fits.clear()
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"identity": self.identity, "entries": self.entries}, indent=1, sort_keys=True))

    def _time(self, key: str, entry: dict[str, float]) -> float:
        """An entry's seconds: its ratio to the dense layer of its shape times that layer's time, where measured
        so (key: LayerShape.key())."""
        if "dense_ratio" not in entry:
            return entry["seconds"]
        out_features, in_features = (int(v) for v in key.split(":")[1].split("x"))
        return entry["dense_ratio"] * self.entries[LayerShape(DENSE_KIND, out_features, in_features).key()]["seconds"]

    def _entry(self, shape: LayerShape) -> dict[str, float]:
        key = rounded(shape).key()
        if key not in self.entries:
            self.fill([shape])
        return self.entries[key]


def time_outside(model: nn.Module, names: list[str], forward: Callable[[], Any], rounds: int = 7) -> tuple[float, float]:
    """(seconds inside the modules `names`, seconds outside them) of one call of `forward` through `model`,
    timed in the model: the modules by forward hooks, the rest as the call's time minus theirs; of the call
    whose outside / inside ratio is the median of `rounds` calls after a warm-up one (the split of a single
    call moves when the machine's speed changes within it; on CUDA, synchronized around every hooked call)."""
    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inside = [0.0]
    started: dict[int, float] = {}

    def before(module: nn.Module, args: Any) -> None:
        sync()
        started[id(module)] = time.perf_counter()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        sync()
        inside[0] += time.perf_counter() - started.pop(id(module))

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    splits: list[tuple[float, float]] = []
    try:
        with torch.no_grad():
            forward()
            for _ in range(rounds):
                inside[0] = 0.0
                sync()
                start = time.perf_counter()
                forward()
                sync()
                total = time.perf_counter() - start
                splits.append((inside[0], total - inside[0]))
    finally:
        for handle in handles:
            handle.remove()
    splits.sort(key=lambda split: split[1] / max(split[0], 1e-12))
    return splits[len(splits) // 2]

"""Where a sparse-dictionary projection's time goes on a GPU, and which tile sizes lrc's bitmask kernels want.

For mixings of Llama-3-8B widths (bench/layer_speed.py's sizes: half of the entries stored, bfloat16, random):
- the bitmask matmul kernel (lrc/forms/triton_kernels.py) at tile sizes BLOCK_R x BLOCK_K, TILES chunks per
  split, num_warps, for 1, 4 and 16 tokens, against torch's dense product of the same (rows x atoms) matrix
  and against reading the stored bytes at the device's bandwidth (--peak-gbs); the densify kernel at three
  tile sizes and torch's `to_dense`: GPU time from triton.testing.do_bench (L2 flushed between calls);
- what each piece of a sparse layer's call costs: wall time per call of 200 back-to-back calls (where the
  GPU keeps up, the CPU's cost of issuing them) next to its GPU time, the layer and a dense one replayed
  from a CUDA graph (no Python or launch cost), and torch.profiler's table of one layer's calls.

    python bench/gpu_kernel_sweep.py --out bench/results/gpu_check   # on a CUDA machine (kernel_sweep.md)
    TRITON_INTERPRET=1 python bench/gpu_kernel_sweep.py --device cpu --quick --out /tmp/sweep   # a dry run
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lrc.forms import gpu_kernels  # noqa: E402
from lrc.forms.sparse_linear import SparseDictionaryLinear  # noqa: E402
from lrc.forms.sparse_matrix import SparseMatrix, bitmask_row_starts  # noqa: E402

SHAPES = {"gate": (14336, 3380, 4096), "q": (4096, 1832, 4096), "down": (4096, 5848, 14336)}  # rows x atoms x in
TOKENS = (1, 4, 16)


def gpu_ms(fn: Callable[[], object]) -> float:
    """Median GPU milliseconds of fn (triton.testing.do_bench; the CPU dry run calls fn once and says 0)."""
    import triton.testing

    if not torch.cuda.is_available():
        fn()
        return 0.0
    return float(triton.testing.do_bench(fn, warmup=10, rep=40))


def split_starts(matrix: SparseMatrix, split: int) -> torch.Tensor:
    """gpu_kernels.split_starts for splits of `split` columns."""
    row_starts = bitmask_row_starts(matrix.bitmask, matrix.cols, matrix.nnz)
    return gpu_kernels.split_starts(row_starts, matrix.bitmask, matrix.cols, split)


def matmul_ms(matrix: SparseMatrix, x: torch.Tensor, block_r: int, block_k: int, tiles: int, warps: int) -> float:
    """The matmul kernel alone at these tile sizes, after checking its product against float64."""
    from lrc.forms import triton_kernels

    starts = split_starts(matrix, block_k * tiles)
    rows, splits = starts.shape
    tokens = x.shape[0]
    out = torch.empty(splits, tokens, rows, dtype=torch.float32, device=x.device)

    def run() -> None:
        triton_kernels.matmul_kernel[(-(-rows // block_r), splits)](
            matrix.values, matrix.bitmask, starts, x, out, rows, matrix.cols, matrix.bitmask.shape[1], splits, tokens,
            x.stride(0), rows, tokens * rows, BLOCK_R=block_r, BLOCK_K=block_k, TILES=tiles,
            BLOCK_T=1 if tokens == 1 else gpu_kernels.MAX_TOKENS, PRECISION="tf32", num_warps=warps)

    run()
    reference = x.double() @ matrix.to_dense().double().T
    error = float((out.sum(0).double() - reference).norm() / reference.norm())
    assert error < 2e-2, (block_r, block_k, tiles, warps, error)
    return gpu_ms(run)


def densify_ms(matrix: SparseMatrix, block_r: int, block_k: int, tiles: int) -> float:
    """The densify kernel alone at these tile sizes, after checking it gives the matrix exactly."""
    from lrc.forms import triton_kernels

    starts = split_starts(matrix, block_k * tiles)
    rows, splits = starts.shape
    out = torch.empty(rows, matrix.cols, dtype=matrix.values.dtype, device=matrix.values.device)

    def run() -> None:
        triton_kernels.dense_kernel[(-(-rows // block_r), splits)](
            matrix.values, matrix.bitmask, starts, out, rows, matrix.cols, matrix.bitmask.shape[1], splits,
            BLOCK_R=block_r, BLOCK_K=block_k, TILES=tiles)

    run()
    assert torch.equal(out, matrix.to_dense())
    return gpu_ms(run)


def wall_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Wall µs per call of `calls` back-to-back calls."""
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def kernel_rows(matrix: SparseMatrix, grid: list[tuple[int, ...]], peak_us: float, gen: torch.Generator) -> list[str]:
    """Table rows: per token count the dense product, the four fastest tile sizes and the shipped one; then
    the densify kernel and torch's to_dense."""
    device, shipped = matrix.values.device, (gpu_kernels.BLOCK_R, gpu_kernels.BLOCK_K, gpu_kernels.TILES, 4)
    dense = matrix.to_dense()
    lines = []
    for tokens in TOKENS:
        x = torch.randn(tokens, matrix.cols, generator=gen).to(device=device, dtype=matrix.values.dtype)
        ms = gpu_ms(functools.partial(torch.nn.functional.linear, x, dense))
        lines.append(f"| {tokens} | dense matmul of the mixing (torch) | {ms * 1e3:.1f} | {ms * 1e3 / peak_us:.1f} |")
        ranked = sorted((matmul_ms(matrix, x, *config), config) for config in grid)
        for ms, config in ranked[:4] + [r for r in ranked[4:] if r[1] == shipped]:
            mark = " (shipped)" if config == shipped else ""
            lines.append(f"| {tokens} | kernel R{config[0]} K{config[1]} tiles{config[2]}{mark} | {ms * 1e3:.1f} | "
                         f"{ms * 1e3 / peak_us:.1f} |")
    for config in [(16, 128, 1), (32, 128, 4), (32, 256, 1)]:
        ms = densify_ms(matrix, *config)
        lines.append(f"| - | densify kernel R{config[0]} K{config[1]} tiles{config[2]} | {ms * 1e3:.1f} | "
                     f"{ms * 1e3 / peak_us:.1f} |")
    ms = gpu_ms(matrix.to_dense)
    lines.append(f"| - | densify with torch (to_dense) | {ms * 1e3:.1f} | {ms * 1e3 / peak_us:.1f} |")
    return lines


@torch.inference_mode()
def call_rows(layer: SparseDictionaryLinear, tokens: int, gen: torch.Generator) -> list[str]:
    """Table rows: wall and GPU µs per call of a sparse layer's pieces and of a dense layer of its shape."""
    matrix, device, dtype = layer.mixing, layer.atoms.weight.device, layer.atoms.weight.dtype
    x = torch.randn(tokens, layer.in_features, generator=gen).to(device=device, dtype=dtype)
    x_mixing = torch.randn(tokens, matrix.cols, generator=gen).to(device=device, dtype=dtype)
    starts = split_starts(matrix, gpu_kernels.SPLIT_K)
    partial = torch.zeros(starts.shape[1], tokens, matrix.rows, device=device)
    dense_layer = torch.nn.Linear(layer.in_features, matrix.rows, bias=False).to(device=device, dtype=dtype)
    calls: dict[str, Callable[[], object]] = {
        "torch.empty": functools.partial(torch.empty, tokens, matrix.rows, device=device),
        "partial sums: sum(0).to(bf16)": lambda: partial.sum(0).to(dtype),
        "gpu_kernels.bitmask_matmul": functools.partial(gpu_kernels.bitmask_matmul, matrix.values, matrix.bitmask,
                                                        starts, matrix.cols, x_mixing),
        "SparseMatrix.forward (mixing)": functools.partial(matrix, x_mixing),
        "SparseDictionaryLinear.forward": functools.partial(layer, x),
        "nn.Linear, dense layer": functools.partial(dense_layer, x),
    }
    rows = [f"| {tokens} | {name} | {wall_us(fn):.1f} | {gpu_ms(fn) * 1e3:.1f} |" for name, fn in calls.items()]
    for name, module in (("SparseDictionaryLinear, CUDA graph replay", layer), ("nn.Linear, CUDA graph replay", dense_layer)):
        rows.append(f"| {tokens} | {name} | {graph_replay_us(module, x)} | - |")
    return rows


def graph_replay_us(module: torch.nn.Module, x: torch.Tensor) -> str:
    """Wall µs per replay of `module(x)` captured in a CUDA graph (200 back-to-back replays): the call
    without Python or launch costs, as a serving stack that captures decode steps runs it."""
    if not torch.cuda.is_available():
        return "- (no CUDA)"
    try:
        module(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
    except Exception as exc:  # reported in the table: capture is what is being checked
        return f"capture failed: {type(exc).__name__}: {str(exc)[:60]}"
    return f"{wall_us(graph.replay):.1f}"


@torch.inference_mode()
def profile_table(layer: SparseDictionaryLinear, gen: torch.Generator) -> str:
    """torch.profiler's table of 20 one-token calls of the layer (CPU and CUDA time per op)."""
    device, dtype = layer.atoms.weight.device, layer.atoms.weight.dtype
    x = torch.randn(1, layer.in_features, generator=gen).to(device=device, dtype=dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(20):
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check"))
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="device memory bandwidth (H100 SXM: 3350)")
    parser.add_argument("--quick", action="store_true", help="two tile sizes only")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (tiny, slow)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = SHAPES if device.type == "cuda" else {"tiny": (64, 300, 256)}
    grid = [(16, 128, 1, 4), (32, 128, 4, 4)] if args.quick else list(
        itertools.product([16, 32], [64, 128, 256], [1, 2], [4]))
    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run: times are 0)"
    lines = [f"# Bitmask kernel sweep, bfloat16, {name}", "",
             f"torch {torch.__version__}; GPU µs: triton.testing.do_bench (median, L2 flushed); x stored bytes at "
             f"peak: against reading the values and bits once at {args.peak_gbs:.0f} GB/s", ""]
    for shape, (rows, atoms, inputs) in shapes.items():
        mixing = torch.randn(rows, atoms, generator=gen) * (torch.rand(rows, atoms, generator=gen) < 0.5)
        layer = SparseDictionaryLinear.from_factors(
            mixing, torch.randn(atoms, inputs, generator=gen) / inputs**0.5, layout="bitmask",
        ).to(device=device, dtype=torch.bfloat16).eval()
        matrix = layer.mixing
        stored = matrix.values.numel() * matrix.values.element_size() + matrix.bitmask.numel()
        peak_us = stored / args.peak_gbs / 1e3
        lines += [f"## {shape} mixing: {rows} x {atoms} (atoms {atoms} x {inputs}), {matrix.nnz} stored, "
                  f"{stored / 2**20:.1f} MiB stored (dense {rows * atoms * 2 / 2**20:.1f} MiB; at peak {peak_us:.1f} µs)",
                  "", "| tokens | what | GPU µs | x stored bytes at peak |", "| --- | --- | --- | --- |",
                  *kernel_rows(matrix, grid, peak_us, gen), "",
                  "What a call costs (wall µs per call of 200 back-to-back calls, next to its GPU µs):", "",
                  "| tokens | call | wall µs per call | GPU µs |", "| --- | --- | --- | --- |",
                  *call_rows(layer, 1, gen), *call_rows(layer, 16, gen), "",
                  "```", profile_table(layer, gen), "```", ""]
        print("\n".join(lines), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

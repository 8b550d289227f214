"""lrc's CPU decode kernels with and without software prefetch, on matrices streamed from memory.

A decoded token reads every weight once: the matrices do not stay in cache between tokens. This bench times
lrc's C kernels (lrc/forms/cpu_kernels.py) the way decoding runs them: over `--matrices` distinct matrices
in turn (200 by default: 272 MB in float32, beyond the 300 MiB last-level cache this VM reports only with the
other cases' matrices in between), for 1 and 3 tokens, compiled twice in one process,
with the default prefetch distance (LRC_PREFETCH bytes ahead) and with -DLRC_PREFETCH=0 (each prefetch
aimed at the line being read, which the hardware prefetcher alone would fetch). The two builds alternate
within each round; the speedup is the median of the per-round ratios.

Shapes are SmolLM2-135M's MLP at budget 0.3: a sparse-dictionary mixing 1536 x 416 half full (bitmask
layout) in float32 and bfloat16, and a dense bfloat16 factor 1536 x 576 (lrc's own one-token bfloat16
product; float32 dense factors go through torch).

    python bench/cpu_prefetch.py     # bench/results/cpu_prefetch.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_files import cpu_description  # noqa: E402

from lrc.forms import cpu_kernels  # noqa: E402
from lrc.forms.sparse_matrix import SparseMatrix  # noqa: E402

ROWS, ATOMS, COLS = 1536, 416, 576


def cases(count: int, gen: torch.Generator) -> dict[str, tuple[list[Any], Callable[[Any, Any], None]]]:
    """name: (the matrices, call(lib, matrix)) for each kernel and token count."""
    out: dict[str, tuple[list[Any], Callable[[Any, Any], None]]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        mats = []
        for _ in range(count):
            dense = (torch.randn(ROWS, ATOMS, generator=gen) * (torch.rand(ROWS, ATOMS, generator=gen) < 0.5)).to(dtype)
            matrix = SparseMatrix.from_dense(dense, dense != 0, "bitmask")
            mats.append((matrix, matrix.kernel_row_starts()))
        for tokens in (1, 3):
            z = torch.randn(tokens, ATOMS, generator=gen).to(dtype)
            y = torch.empty(tokens, ROWS, dtype=dtype)

            def sparse(lib: Any, item: Any, z: torch.Tensor = z, y: torch.Tensor = y, tokens: int = tokens) -> None:
                matrix, starts = item
                lib.lrc_bitmask_mm(matrix.values.dtype == torch.bfloat16, matrix.bitmask.data_ptr(), matrix.values.data_ptr(),
                                   starts.data_ptr(), ROWS, ATOMS, matrix.bitmask.shape[1], z.data_ptr(), tokens, y.data_ptr(),
                                   torch.get_num_threads())

            out[f"sparse mixing {ROWS} x {ATOMS}, half full, {str(dtype).removeprefix('torch.')}, {tokens} token(s)"] = (mats, sparse)
    weights = [torch.randn(ROWS, COLS, generator=gen).to(torch.bfloat16) for _ in range(count)]
    for tokens in (1, 3):
        x = torch.randn(tokens, COLS, generator=gen).to(torch.bfloat16)
        y = torch.empty(tokens, ROWS, dtype=torch.bfloat16)

        def dense(lib: Any, w: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y, tokens: int = tokens) -> None:
            lib.lrc_dense_mm(1, w.data_ptr(), None, ROWS, COLS, x.data_ptr(), tokens, y.data_ptr(), torch.get_num_threads())

        out[f"dense factor {ROWS} x {COLS}, bfloat16, {tokens} token(s)"] = (weights, dense)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrices", type=int, default=200, help="distinct matrices cycled through (beyond the caches)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=4, help="passes over the matrices per timing")
    parser.add_argument("--out", default="bench/results/cpu_prefetch")
    args = parser.parse_args()
    libs = {"prefetch": cpu_kernels.library(), "no prefetch": cpu_kernels.compile_library(("-DLRC_PREFETCH=0",))}
    if any(lib is None for lib in libs.values()):
        sys.exit("lrc's CPU kernels could not be compiled here")

    def timed(lib: Any, call: Callable[[Any, Any], None], items: list[Any]) -> float:
        start = time.perf_counter()
        for _ in range(args.reps):
            for item in items:
                call(lib, item)
        return (time.perf_counter() - start) / (args.reps * len(items))

    lines = [f"# lrc's CPU decode kernels, with and without software prefetch ({cpu_description()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__})", "",
             f"{args.matrices} distinct matrices per case cycled through, {args.reps} passes per timing, {args.rounds} rounds "
             "(the two builds alternating); time per matrix, median over rounds; speedup: median of per-round ratios.", "",
             "| kernel | no prefetch µs | prefetch µs | speedup (range) |", "| --- | --- | --- | --- |"]
    for name, (items, call) in cases(args.matrices, torch.Generator().manual_seed(0)).items():
        for item in items[:2]:  # warm: pages touched, code loaded
            for lib in libs.values():
                call(lib, item)
        times: dict[str, list[float]] = {key: [] for key in libs}
        for round_ in range(args.rounds):
            for key in (list(libs) if round_ % 2 == 0 else list(reversed(libs))):
                times[key].append(timed(libs[key], call, items))
        ratios = [a / b for a, b in zip(times["no prefetch"], times["prefetch"])]
        lines.append(f"| {name} | {statistics.median(times['no prefetch']) * 1e6:.1f} | "
                     f"{statistics.median(times['prefetch']) * 1e6:.1f} | {statistics.median(ratios):.2f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")
        print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()

"""Memory a process keeps for the distinct matrix shapes it multiplies, and what turning MKL's pool off costs.

A compressed model multiplies many more distinct shapes than the dense one (SmolLM2-135M at budget 0.3:
~95 factor shapes, the dense model 7), and a BLAS may keep memory per shape. This runs, in a fresh process
per row, a 512-token product chain x -> x Dᵀ -> (x Dᵀ) Uᵀ through lrc's `linear` (float32: torch's MKL
product; bfloat16 on an x86 CPU without AMX: converted to float32 for the call) for 100 factor pairs,
either 100 distinct shapes (in 576 or 1536, rank 16-399, seeded) or one shape 100 times, and records the
growth of glibc's allocated bytes (mallinfo2: in use + mmapped) and of the resident set over the 200
products, after one warm-up product, and the resident growth again after glibc's malloc_trim(0) (what is left
is held, not merely kept free by the allocator). Each row runs with MKL's memory manager on (its default) and off
(`MKL_DISABLE_FAST_MM=1`: every buffer freed after its call), timing the 200 products (median of 5
passes over the same pairs, after the measured one).

    python bench/gemm_shape_memory.py          # writes bench/results/gemm_shape_memory.md and .yaml
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from results_files import cpu_description, write_results
from runtime import MIB, ROOT, proc_status


def allocated_bytes() -> int:
    """glibc's bytes in use: small blocks plus mmapped ones (mallinfo2)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def child(args: argparse.Namespace) -> None:
    import torch

    from lrc.forms.cpu_kernels import linear
    from lrc.forms.fused import release_freed_heap

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    shapes = ([(rng.choice([576, 1536]), rng.randrange(16, 400)) for _ in range(100)] if args.shapes == "distinct"
              else [(576, 200)] * 100)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(rank, n, generator=g).to(dtype), torch.randn(576 if n == 1536 else 1536, rank, generator=g).to(dtype))
             for n, rank in shapes]
    xs = {n: torch.randn(args.tokens, n, generator=g).to(dtype) for n in (576, 1536)}

    def chain() -> None:
        for (n, _), (down, up) in zip(shapes, pairs, strict=True):
            linear(linear(xs[n], down), up)

    with torch.inference_mode():
        linear(xs[shapes[0][0]], pairs[0][0])
        allocated, resident = allocated_bytes(), proc_status("VmRSS")
        chain()
        grown = allocated_bytes() - allocated, proc_status("VmRSS") - resident
        release_freed_heap()
        trimmed = proc_status("VmRSS") - resident
        times = []
        for _ in range(5):
            start = time.perf_counter()
            chain()
            times.append(time.perf_counter() - start)
    print(json.dumps({"allocated": grown[0], "resident": grown[1], "trimmed": trimmed, "seconds": statistics.median(times)}))


def run_child(shapes: str, dtype: str, pool: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    env.pop("MKL_DISABLE_FAST_MM", None)
    if not pool:
        env["MKL_DISABLE_FAST_MM"] = "1"
    cmd = [sys.executable, __file__, "--child", "--shapes", shapes, "--dtype", dtype, "--threads", str(args.threads),
           "--tokens", str(args.tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) | {"shapes": shapes, "dtype": dtype, "mkl_pool": pool}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", choices=["distinct", "one"], default="distinct", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gemm_shape_memory"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = [run_child(shapes, dtype, pool, args) for dtype in args.dtypes for shapes in ("one", "distinct")
            for pool in (True, False)]
    lines = [f"{cpu_description()}, {args.threads} threads; 100 factor pairs x 2 products of {args.tokens} tokens "
             "through lrc's `linear`, one fresh process per row; growth over the 200 products after one warm-up "
             "product; time: median of 5 more passes.", "",
             "| dtype | shapes | MKL memory manager | allocated MiB (glibc, in use + mmapped) | resident MiB | "
             "resident after malloc_trim(0) MiB | 200 products ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['dtype']} | {'100 distinct' if row['shapes'] == 'distinct' else 'one, 100 times'} | "
                     f"{'on (default)' if row['mkl_pool'] else 'off (MKL_DISABLE_FAST_MM=1)'} | "
                     f"{row['allocated'] / MIB:+.1f} | {row['resident'] / MIB:+.1f} | {row['trimmed'] / MIB:+.1f} | "
                     f"{row['seconds'] * 1e3:.0f} |")
    write_results(args.out, lines, {"measured_on": cpu_description(), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()

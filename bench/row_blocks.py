"""Peak memory and prefill time against the block size of lrc's prefill products (cpu_kernels.BLOCK_BYTES and
CONVERTED_BLOCK_BYTES, both set to each size).

A prefill product that needs a weight made for it (a bfloat16 factor converted to float32 on a CPU without
AMX, a sparse mixing densified) makes it, and computes the product, a block of rows at a time
(`cpu_kernels.product_by_row_blocks`). Smaller blocks are less transient memory per product and more,
smaller products. For each block size in --block-mib:
- memory: each model in its own process, loaded with plain transformers after `import lrc`, a 16-token
  warm-up, then the peak resident set (VmHWM, reset after the warm-up) of a 512-token prefill and 32
  decode steps, as bench/runtime.py measures it; --rounds rounds interleave models and block sizes;
- speed: one process per lrc model, the block size switched before every prefill (the order rotated),
  --alternations rounds: each size's median prefill time and the median per-round ratio to the first size.

    python bench/row_blocks.py --models dense=DENSE "default recipe, 0.3=OUT" --dtypes bfloat16 \\
        --out bench/results/row_blocks
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from results_files import cpu_description, write_results
from runtime import (
    FLOAT_DTYPES,
    MIB,
    ROOT,
    WIKI_TEST,
    child_json,
    file_bytes,
    load,
    proc_status,
    prompt,
    reset_peak_rss,
    timed_run,
)


def set_block(mib: float) -> None:
    """Both block sizes (float32 products, bfloat16 products made in float32) to `mib`."""
    from lrc.forms import cpu_kernels

    cpu_kernels.BLOCK_BYTES = cpu_kernels.CONVERTED_BLOCK_BYTES = int(mib * MIB)


def memory_child(args: argparse.Namespace) -> None:
    """One model at one block size: the peak RSS of a prefill and the decode steps after a warm-up."""
    import torch

    import lrc  # noqa: F401  (registers the lrc loader with transformers)

    torch.set_num_threads(args.threads)
    set_block(args.block)
    folder = Path(args.child)
    model = load(folder, args)
    ids = prompt(folder, args)
    with torch.inference_mode():
        model(ids[:, :16], use_cache=True)
    gc.collect()
    reset_peak_rss()
    timed_run(model, ids, args)
    print(json.dumps({"peak_rss": proc_status("VmHWM")}))


def speed_child(args: argparse.Namespace) -> None:
    """One model, every block size in turn before each prefill: {size: [seconds per round]}."""
    import torch

    import lrc  # noqa: F401

    torch.set_num_threads(args.threads)
    folder = Path(args.child)
    model = load(folder, args)
    ids = prompt(folder, args)
    sizes = list(args.block_mib)
    seconds: dict[str, list[float]] = {str(size): [] for size in sizes}
    with torch.inference_mode():
        model(ids[:, :16], use_cache=True)
        model(ids, use_cache=True, logits_to_keep=1)
        for rnd in range(args.alternations):
            for size in sizes[rnd % len(sizes):] + sizes[: rnd % len(sizes)]:
                set_block(size)
                start = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                seconds[str(size)].append(time.perf_counter() - start)
    print(json.dumps(seconds))


def run_child(mode: str, folder: str, dtype: str, args: argparse.Namespace, block: float = 0.0) -> Any:
    arguments = ["--child-mode", mode, "--child", folder, "--dtypes", dtype, "--block", str(block), "--threads",
                 str(args.threads), "--alternations", str(args.alternations), "--text", str(args.text),
                 "--block-mib", *map(str, args.block_mib)]
    return child_json(__file__, arguments, args.threads, f"{folder} ({mode}, {dtype})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], help="NAME=FOLDER ...; the first is the dense baseline")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--block-mib", type=float, nargs="+", default=[8.0, 4.0, 2.0, 1.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alternations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", type=Path, default=WIKI_TEST)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "row_blocks"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seq_len, args.decode, args.device, args.compile, args.all_logits = 512, 32, "cpu", False, False
    if args.child:
        args.dtype = args.dtypes[0]
        return memory_child(args) if args.child_mode == "memory" else speed_child(args)
    if len(args.models) < 2:
        raise SystemExit("--models dense=FOLDER NAME=OUT ...: the dense baseline and at least one lrc output")
    models = dict(item.split("=", 1) for item in args.models)
    dense = next(iter(models))
    peaks: dict[tuple[str, str, float], list[int]] = {}
    speeds: dict[tuple[str, str], dict[str, list[float]]] = {}
    for dtype in args.dtypes:
        for rnd in range(args.rounds):
            for size in args.block_mib:
                for name, folder in models.items():
                    peak = run_child("memory", folder, dtype, args, size)["peak_rss"]
                    peaks.setdefault((name, dtype, size), []).append(peak)
                    print(f"round {rnd + 1}, {size} MiB, {name}, {dtype}: peak {peak / MIB:.0f} MiB", file=sys.stderr)
        for name, folder in models.items():
            if name != dense:
                speeds[(name, dtype)] = run_child("speed", folder, dtype, args)
    first = args.block_mib[0]
    lines = [
        f"Block size of lrc's prefill products (cpu_kernels.BLOCK_BYTES and CONVERTED_BLOCK_BYTES); {cpu_description()}, {args.threads} threads, "
        f"torch {__import__('torch').__version__}. Peak: VmHWM of a 512-token prefill of wiki.test.raw (logits of the "
        f"last position) and 32 decode steps after a 16-token warm-up, one process per model, block size and round, "
        f"{args.rounds} rounds (ranges shown); saving: dense's peak less the model's, as a share of the file-size "
        f"saving, per round. Prefill: one process per model, the block size switched before each prefill, "
        f"{args.alternations} rounds; median time and median per-round ratio to {first:g} MiB.",
        "",
        "| model | dtype | block MiB | peak RSS MiB | dense - peak, share of file saving | prefill ms | x "
        f"{first:g} MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for dtype in args.dtypes:
        width = FLOAT_DTYPES["F32" if dtype == "float32" else "BF16"]
        files = {name: file_bytes(Path(folder), width)[1] for name, folder in models.items()}
        for name in models:
            for size in args.block_mib:
                peak = peaks[(name, dtype, size)]
                share, prefill, ratio = "-", "-", "-"
                if name != dense:
                    dense_peak = peaks[(dense, dtype, size)]
                    saved = [(d - p) / (files[dense] - files[name]) for d, p in zip(dense_peak, peak)]
                    share = f"{min(saved):.0%}-{max(saved):.0%}"
                    runs = speeds[(name, dtype)]
                    prefill = f"{statistics.median(runs[str(size)]) * 1e3:.0f}"
                    ratio = f"{statistics.median(a / b for a, b in zip(runs[str(size)], runs[str(first)])):.3f}"
                lines.append(f"| {name} | {dtype} | {size:g} | {min(peak) / MIB:.0f}-{max(peak) / MIB:.0f} | {share} "
                             f"| {prefill} | {ratio} |")
                rows.append({"model": name, "dtype": dtype, "block_mib": size, "peak_rss": peak,
                             "prefill_s": speeds.get((name, dtype), {}).get(str(size))})
    write_results(args.out, lines, {"measured_on": cpu_description(), "threads": args.threads,
                                    "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()

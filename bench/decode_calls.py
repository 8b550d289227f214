"""A factorized layer's decode step: its two products in one kernel call against two calls.

When decoding, a low-rank layer multiplies by `down` then `up`, a sparse dictionary by its atoms then its
mixing; at SmolLM2-135M's sizes each call's Python, dispatch and thread wake-up cost about as much as its
product. lrc makes both products in one C call where that was faster (bfloat16 low rank, a sparse
dictionary in the bitmask layout; see lrc/forms/cpu_kernels.py). This measures:

1. per shape, a low-rank layer's two products (torch's in float32, lrc's `linear` in bfloat16) against the
   one-call kernel, alone and through `cpu_kernels.lowrank_linear` (its checks and output included; timed in
   float32 too, where lrc does not use it), one token, 60 factor pairs of the shape cycled, median of 7 rounds;
2. per model, decode steps after a 512-token prefill with the one-call paths on and off, alternating every
   step (two KV caches advance side by side), so the two see the same machine within milliseconds: the
   median of the per-step-pair time ratios (two calls / one call; > 1: one call is faster) and its quartiles.

    python bench/decode_calls.py --models "default recipe, 0.3=OUT1" "loss-aware, 0.3=OUT2"
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from results_files import cpu_description, write_results
from runtime import ROOT, WIKI_TEST, prompt

SHAPES = [(576, 24, 576), (576, 64, 576), (576, 136, 576), (576, 248, 1536), (1536, 272, 576), (576, 24, 192)]


def shape_table(dtypes: list[str], threads: int) -> list[str]:
    import torch

    from lrc.forms import cpu_kernels

    torch.set_num_threads(threads)
    lines = ["| in -> rank -> out | dtype | two calls µs | one call (the C call alone) µs | two / one "
             "| one call through `lowrank_linear` µs | two / that |", "| --- | --- | --- | --- | --- | --- | --- |"]
    chosen = cpu_kernels.LOW_RANK_ONE_CALL_DTYPES
    cpu_kernels.LOW_RANK_ONE_CALL_DTYPES = (torch.float32, torch.bfloat16)  # timed in both, whatever lrc chooses
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        two = torch.nn.functional.linear if dtype == torch.float32 else cpu_kernels.linear
        for n, r, m in SHAPES:
            g = torch.Generator().manual_seed(r)
            pairs = [(torch.randn(r, n, generator=g).to(dtype), torch.randn(m, r, generator=g).to(dtype)) for _ in range(60)]
            x = torch.randn(1, 1, n, generator=g).to(dtype)
            times: dict[str, list[float]] = {"two": [], "one": [], "python": []}
            with torch.inference_mode():
                for _ in range(7):
                    start = time.perf_counter()
                    for down, up in pairs:
                        two(two(x, down), up)
                    times["two"].append((time.perf_counter() - start) / len(pairs))
                    start = time.perf_counter()
                    for down, up in pairs:
                        # the kernel itself, whatever lrc chooses for this dtype (its output alive through the call)
                        y = torch.empty(1, m, dtype=dtype)
                        cpu_kernels.library().lrc_lowrank_mm(  # type: ignore[union-attr]
                            dtype == torch.bfloat16, down.data_ptr(), up.data_ptr(), None, r, n, m, x.data_ptr(), 1,
                            y.data_ptr(), torch.get_num_threads())
                    times["one"].append((time.perf_counter() - start) / len(pairs))
                    start = time.perf_counter()
                    for down, up in pairs:
                        cpu_kernels.lowrank_linear(x, down, up)
                    times["python"].append((time.perf_counter() - start) / len(pairs))
            a, b, c = (statistics.median(times[key]) for key in ("two", "one", "python"))
            lines.append(f"| {n} -> {r} -> {m} | {dtype_name} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.2f} | "
                         f"{c * 1e6:.1f} | {a / c:.2f} |")
    cpu_kernels.LOW_RANK_ONE_CALL_DTYPES = chosen
    return lines


def model_row(name: str, folder: Path, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    import lrc  # noqa: F401  (registers the lrc loader with transformers)
    from lrc.forms import cpu_kernels, lowrank

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name)).eval()
    args.seq_len, args.device = 512, "cpu"
    ids = prompt(folder, args)
    one_call = (lowrank.lowrank_linear, cpu_kernels.BoundMatmul.after_dense)
    declined = (lambda *a, **k: None, lambda *a, **k: None)  # the layers then make two products

    def use(paths: tuple[Any, Any]) -> None:
        lowrank.lowrank_linear, cpu_kernels.BoundMatmul.after_dense = paths

    times: dict[str, list[float]] = {"two": [], "one": []}
    try:
        with torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1)
            state = {key: [copy.deepcopy(out.past_key_values), out.logits[:, -1:].argmax(-1)] for key in times}
            for step in range(args.steps):
                for key in ("two", "one") if step % 2 else ("one", "two"):
                    use(one_call if key == "one" else declined)
                    cache, token = state[key]
                    start = time.perf_counter()
                    result = model(token, past_key_values=cache, use_cache=True)
                    times[key].append(time.perf_counter() - start)
                    state[key] = [result.past_key_values, result.logits[:, -1:].argmax(-1)]
    finally:
        use(one_call)
    ratios = sorted(a / b for a, b in zip(times["two"][5:], times["one"][5:], strict=True))
    return {"model": name, "dtype": dtype_name, "two_ms": statistics.median(times["two"]) * 1e3,
            "one_ms": statistics.median(times["one"]) * 1e3, "ratio": statistics.median(ratios),
            "quartiles": [ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], help="NAME=FOLDER ... (lrc outputs)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="decode steps per setting")
    parser.add_argument("--text", type=Path, default=WIKI_TEST)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_calls"))
    args = parser.parse_args()
    lines = [f"{cpu_description()}, {args.threads} threads.", "", "Per shape (one token; 60 factor pairs cycled; "
             "two calls: torch's products in float32, lrc's `linear` in bfloat16):", "", *shape_table(args.dtypes, args.threads)]
    rows = []
    if args.models:
        lines += ["", f"Per model (decode after a 512-token prefill of wiki.test.raw, {args.steps} steps per setting, "
                      "alternating every step; ratio = median per step pair of two-call time / one-call time):", "",
                  "| model | dtype | step, two calls ms | step, one call ms | two / one (quartiles) |",
                  "| --- | --- | --- | --- | --- |"]
        for item in args.models:
            name, folder = item.split("=", 1)
            for dtype_name in args.dtypes:
                row = model_row(name, Path(folder), dtype_name, args)
                rows.append(row)
                lines.append(f"| {name} | {dtype_name} | {row['two_ms']:.1f} | {row['one_ms']:.1f} | "
                             f"**{row['ratio']:.3f}** ({row['quartiles'][0]:.3f}-{row['quartiles'][1]:.3f}) |")
    write_results(args.out, lines, {"measured_on": cpu_description(), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()

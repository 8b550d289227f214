"""Resident memory as prompt lengths vary: what a model holds after prefills of many different lengths.

A server sees prompts of every length. torch's bfloat16 product on a CPU without AMX (oneDNN) keeps
state for each distinct (weight shape, token count) it has run, for the life of the process; a low-rank
model has many more weight shapes than the dense one (every factor's rank is its own). This loads each
model (plain transformers after `import lrc`), runs a 16-token warm-up, then one prefill per length in
--lengths (KV cache on, logits of the last position), and records the process's RSS after each, and
once more after handing freed heap back to the OS (glibc's malloc_trim(0): what is left is held). Each
model runs twice, each time in its own process: with lrc's products (the default) and with torch's
everywhere (LRC_CPU_KERNELS=0), so the two are compared in the same run.

    python bench/prompt_lengths.py --models dense=DENSE "loss-aware, 0.3=OUT" --out bench/results/prompt_lengths
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from results_files import cpu_description, write_results
from runtime import MIB, ROOT, WIKI_TEST, child_json, proc_status, prompt

LENGTHS = [512, 448, 384, 320, 256, 192, 128, 64]
PRODUCTS = {"lrc's": "1", "torch's": "0"}  # LRC_CPU_KERNELS


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers

    import lrc  # noqa: F401  (registers the lrc loader with transformers)
    from lrc.forms.fused import release_freed_heap

    torch.set_num_threads(args.threads)
    folder = Path(args.child)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    args.seq_len, args.device = max(args.lengths), "cpu"
    ids = prompt(folder, args)
    with torch.inference_mode():
        model(ids[:, :16], use_cache=True, logits_to_keep=1)
        release_freed_heap()
        start = proc_status("VmRSS")
        after = []
        for length in args.lengths:
            model(ids[:, :length], use_cache=True, logits_to_keep=1)
            after.append(proc_status("VmRSS"))
        release_freed_heap()
        trimmed = proc_status("VmRSS")
    print(json.dumps({"start": start, "after": after, "trimmed": trimmed}))


def run_child(folder: Path, products: str, args: argparse.Namespace) -> dict[str, Any]:
    arguments = ["--child", str(folder), "--dtype", args.dtype, "--threads", str(args.threads), "--text", str(args.text),
                 "--lengths", *map(str, args.lengths)]
    return child_json(__file__, arguments, args.threads, f"{folder} ({products} products)",
                      {"LRC_CPU_KERNELS": PRODUCTS[products]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[], help="NAME=FOLDER ...; required")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--text", type=Path, default=WIKI_TEST)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prompt_lengths"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    models = dict(item.split("=", 1) for item in args.models)
    rows = []
    for name, folder in models.items():
        for products in PRODUCTS:
            got = run_child(Path(folder), products, args)
            rows.append({"model": name, "products": products, **got})
            print(f"{name}, {products}: {(got['after'][-1] - got['start']) / MIB:+.0f} MiB", file=sys.stderr)
    lines = [
        f"{args.dtype}, {cpu_description()}, {args.threads} threads; after a 16-token warm-up, one prefill per "
        f"length ({', '.join(map(str, args.lengths))} tokens of wiki.test.raw, KV cache on, last position's logits); "
        "RSS of the process (one per row). torch's products: LRC_CPU_KERNELS=0.",
        "",
        "| model | products | RSS after warm-up MiB | after each prefill: growth MiB | growth over all lengths MiB "
        "| growth after malloc_trim(0) MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        steps = " ".join(f"{(value - row['start']) / MIB:+.0f}" for value in row["after"])
        lines.append(f"| {row['model']} | {row['products']} | {row['start'] / MIB:.0f} | {steps} | "
                     f"**{(row['after'][-1] - row['start']) / MIB:+.0f}** | {(row['trimmed'] - row['start']) / MIB:+.0f} |")
    write_results(args.out, lines, {"measured_on": cpu_description(), "dtype": args.dtype, "threads": args.threads,
                                    "lengths": args.lengths, "rows": rows})


if __name__ == "__main__":
    main()

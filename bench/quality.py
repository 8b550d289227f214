"""Quality benchmark: perplexity of SmolLM2-135M compressed by each method x allocator at several budgets.

Calibrates once (input Grams layer by layer, plus output gradients and Fisher rows), decomposes once per
method, then allocates and evaluates every (method, allocator, budget) row on a fresh copy of the model.
The dense model is evaluated in the same run. Prints a markdown table and writes it (and a YAML with every
number) under bench/results/.

    python bench/quality.py --data ../shared/data/wikitext-2            # the README table
    python bench/quality.py --rows svd-llm:uniform --budgets 0.2 0.3 0.4  # the foundation table
    python bench/quality.py --rows loss-aware:knapsack sparse-dictionary:knapsack low-rank-sparse:knapsack \
        --stats-cache /tmp/lrc-stats --out bench/results/sparse             # the sparse-plus-low-rank table

Next to OUT.md and OUT.yaml it draws OUT.png: perplexity against the removed fraction, one line per recipe
(bench/quality_plot.py, needs matplotlib: `pip install 'lrc[plot]'`); `python bench/quality_plot.py OUT.yaml`
redraws it from the YAML alone.

"removed" counts parameter-equivalents: sparse layers' indices / bitmasks are charged as values of the
written dtype (bytes / value bytes), so removed fractions compare at equal real bytes; the safetensors
column is the size of the written file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import yaml
from quality_plot import plot_quality
from results_files import cpu_description, write_results

import lrc
from lrc.engine import Analysis, decompose_all
from lrc.engine.build import apply
from lrc.evaluate import perplexity
from lrc.forms import count_params
from lrc.io.checkpoint import tensor_bytes, write_checkpoint
from lrc.sources import LoadedModel, load_model
from lrc.stats.collect import cached_statistics, collect_statistics

DEFAULT_ROWS = [
    "svd:uniform", "asvd:uniform", "fwsvd:uniform", "svd-llm:uniform", "svd-llm-v2:svd-llm-v2",
    "svd-llm:energy", "svd-llm:knapsack", "loss-aware:uniform", "loss-aware:knapsack",
]


def parse_row(row: str) -> tuple[str, str, str, dict]:
    """'method:allocator[:mode][:key=value,...]' -> (method, allocator, mode, method options)."""
    method, allocator, mode, options = (row.split(":") + ["", ""])[:4]
    parsed = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in options.split(",") if item)}
    return method, allocator, mode, parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/wikitext-2", help="folder with wiki.valid.tokens and wiki.test.raw")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help="method:allocator pairs; append :sequential for the sequential refit, and "
                             ":key=value,... for method options (e.g. sparse-dictionary:knapsack::reselect=0)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/quality")
    parser.add_argument("--stats-cache", default=None,
                        help="reuse / store the calibration statistics in this lrc cache folder (not with fwsvd rows)")
    args = parser.parse_args()

    data = Path(args.data)
    calib, test = data / "wiki.valid.tokens", data / "wiki.test.raw"
    base = lrc.CompressionConfig(calib=str(calib), samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    loaded = load_model(args.model)
    pristine = copy.deepcopy(loaded.model)
    test_ids = loaded.tokenizer(test.read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]

    def ppl(model: torch.nn.Module) -> dict:
        return perplexity(model, test_ids, args.eval_seq_len, args.eval_windows)

    dense = ppl(loaded.model)
    original_params = count_params(pristine)
    print(f"dense: ppl {dense['perplexity']:.3f} ({dense['windows']} windows x {args.eval_seq_len})", flush=True)
    rows = [parse_row(r) for r in args.rows]
    need_grads = any(lrc.factorize.METHODS.get(m).needs_gradients for m, *_ in rows)
    t = time.perf_counter()
    fisher = any(m == "fwsvd" for m, *_ in rows)
    if args.stats_cache and not fisher:
        stats = cached_statistics(loaded, dataclasses.replace(base, method="loss-aware"), Path(args.stats_cache))
    else:
        stats = collect_statistics(loaded, dataclasses.replace(base, method="svd-llm"), gradients=need_grads, fisher=fisher)
    stats_s = time.perf_counter() - t
    if "cache_hit" in stats.timing:
        print("statistics: from the cache", args.stats_cache, flush=True)
    print(f"statistics: {stats_s:.0f}s {stats.timing}", flush=True)

    results = []
    analyses: dict[str, Analysis] = {}
    for method, allocator, mode, options in rows:
        config = dataclasses.replace(base, method=method, method_options=options, allocator=allocator,
                                     sequential=mode == "sequential")
        label = method + "".join(f" {k}={v}" for k, v in options.items())
        if label not in analyses:
            analyses[label] = decompose_all(loaded, config, stats)
        analysis = analyses[label]
        for budget in args.budgets:
            run_config = dataclasses.replace(config, budget=budget)
            model = copy.deepcopy(pristine)
            work = LoadedModel(model, loaded.tokenizer, loaded.source, loaded.folder)
            t = time.perf_counter()
            matrices, apply_timing = apply(work, analysis, run_config)
            apply_s = time.perf_counter() - t
            targeted = sum(r.shape[0] * r.shape[1] for r in matrices)
            compressed = sum(r.params for r in matrices)
            removed = 1 - compressed / targeted
            with tempfile.TemporaryDirectory() as tmp:
                ranks = {r.name: r.rank for r in matrices if r.kind == "low-rank"}
                sparse = {r.name: {"kind": r.kind, "rank": r.rank, "nnz": r.nnz, "layout": r.layout}
                          for r in matrices if r.nnz}
                write_checkpoint(model, Path(tmp), None, ranks, sparse=sparse)
                size = tensor_bytes(Path(tmp))
            kinds = {kind: sum(r.kind == kind for r in matrices) for kind in sorted({r.kind for r in matrices})}
            result = ppl(model)
            row = {
                "method": label, "allocator": allocator, "mode": mode or "one-shot", "budget": budget,
                "removed_targeted": round(removed, 4),
                "removed_model": round((targeted - compressed) / original_params, 4),
                "layers": kinds,
                "perplexity": round(result["perplexity"], 3),
                "ratio_to_dense": round(result["perplexity"] / dense["perplexity"], 3),
                "safetensors_bytes": size,
                "compress_s": round(stats_s + analysis.timing["decomposition_s"] + apply_s, 1),
            }
            results.append(row)
            print(row, flush=True)
            del model, work

    header = (f"Model {args.model}, calibration {calib.name} ({args.samples} x {args.seq_len} tokens, seed {args.seed}), "
              f"evaluation {test.name} (seq_len {args.eval_seq_len}, first {dense['windows']} windows), "
              f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    lines = [header, "", f"Dense perplexity: **{dense['perplexity']:.2f}** (same run).", "",
             "| method | allocator | mode | budget | removed (targeted) | removed (model) | perplexity | x dense | safetensors | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['allocator']} | {r['mode']} | {r['budget']} | {r['removed_targeted']:.1%} | "
                     f"{r['removed_model']:.1%} | {r['perplexity']:.2f} | {r['ratio_to_dense']:.2f} | "
                     f"{r['safetensors_bytes'] / 2**20:.0f} MiB | {r['compress_s']:.0f} s |")
    lines.append("")
    if any(set(r["layers"]) - {"dense", "low-rank"} for r in results):
        lines += ["Layer kinds chosen by the allocator:", ""]
        lines += [f"- {r['method']} {r['budget']}: " + ", ".join(f"{n} {k}" for k, n in r["layers"].items()) for r in results]
        lines.append("")
    if "cache_hit" in stats.timing:
        lines.append("time = this method's decomposition + allocation; the calibration statistics were read from the "
                     "lrc statistics cache (collected by an earlier run), so their cost is not in the column.")
    else:
        lines.append("time = shared calibration statistics + this method's decomposition + allocation; the statistics "
                     f"({stats_s:.0f} s) are collected once for all rows.")
    write_results(args.out, lines, {"dense": dense, "statistics_s": stats_s, "rows": results})
    print(f"wrote {plot_quality({'dense': dense, 'rows': results}, Path(args.out).with_suffix('.png'))}")


if __name__ == "__main__":
    main()

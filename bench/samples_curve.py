"""Perplexity of a recipe (--method, with the knapsack) against the amount of calibration data (--samples).

    python bench/samples_curve.py --samples 16 32 64 --budgets 0.2 0.3

The window sets are nested: with one seed, the windows of a smaller count are a subset of a larger
count's (the first k of one random permutation). So the statistics are collected once per increment and
summed (every statistic is a sum over tokens): the whole curve costs one calibration pass over the
largest count. The dense model is evaluated in the same run. With --save-stats DIR, the statistics of
each count are also written to an lrc statistics cache in DIR (reusable by bench/quality.py --stats-cache).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
from results_files import write_results

import lrc
from lrc.calibration import read_text, token_windows
from lrc.engine import decompose_all
from lrc.engine.build import apply
from lrc.evaluate import perplexity
from lrc.sources import LoadedModel, load_model
from lrc.stats.collect import collect_statistics
from lrc.stats.store import cache_key, save_stats
from lrc.stats.types import CalibrationStats


def new_windows(windows: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """Rows of `windows` not already in `seen` (the increment from a smaller nested window set)."""
    if seen is None:
        return windows
    old = {tuple(row.tolist()) for row in seen}
    return torch.stack([row for row in windows if tuple(row.tolist()) not in old])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/wikitext-2")
    parser.add_argument("--samples", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.3])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--method", default="loss-aware", help="factorization method (the README curve: loss-aware)")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--out", default="bench/results/samples_curve")
    parser.add_argument("--save-stats", default=None, help="write each count's statistics to this cache folder")
    args = parser.parse_args()
    data = Path(args.data)
    loaded = load_model(args.model)
    pristine = copy.deepcopy(loaded.model)
    ids = loaded.tokenizer((data / "wiki.test.raw").read_text(encoding="utf-8"), return_tensors="pt",
                           add_special_tokens=False).input_ids[0]
    dense = perplexity(loaded.model, ids, args.seq_len, args.eval_windows)
    print(f"dense ppl {dense['perplexity']:.3f}", flush=True)
    rows = []
    calib = str(data / "wiki.valid.tokens")
    text = read_text(calib)
    stats: CalibrationStats | None = None
    collected_s = 0.0
    for samples in sorted(args.samples):
        config = lrc.CompressionConfig(calib=calib, samples=samples, seq_len=args.seq_len, method=args.method)
        windows = token_windows(loaded.tokenizer, text, samples, args.seq_len, config.seed)
        increment = new_windows(windows, stats.windows if stats is not None else None)
        work = LoadedModel(copy.deepcopy(pristine), loaded.tokenizer, loaded.source, loaded.folder)
        t = time.perf_counter()
        part = collect_statistics(work, config, windows=increment)
        stats = part if stats is None else stats.merged(part)
        collected_s += time.perf_counter() - t
        if args.save_stats:
            save_stats(stats, Path(args.save_stats), cache_key(work, config, gradients=True, fisher=False))
        t = time.perf_counter()
        analysis = decompose_all(work, config, stats)
        analysis_s = collected_s + time.perf_counter() - t
        print(f"{samples} samples: statistics {collected_s:.0f} s so far", flush=True)
        for budget in args.budgets:
            model = LoadedModel(copy.deepcopy(pristine), loaded.tokenizer, loaded.source, loaded.folder)
            matrices, _ = apply(model, analysis, dataclasses.replace(config, budget=budget))
            removed = 1 - sum(m.params for m in matrices) / sum(m.shape[0] * m.shape[1] for m in matrices)
            result = perplexity(model.model, ids, args.seq_len, args.eval_windows)
            row = {"samples": samples, "budget": budget, "removed": round(removed, 4),
                   "perplexity": round(result["perplexity"], 3),
                   "ratio_to_dense": round(result["perplexity"] / dense["perplexity"], 3),
                   "calibration_s": round(analysis_s, 1)}
            rows.append(row)
            print(row, flush=True)
    lines = [f"{args.method} + knapsack on {args.model}; "
             f"calibration wiki.valid.tokens at seq_len {args.seq_len}; evaluation wiki.test.raw, seq_len {args.seq_len}, "
             f"first {dense['windows']} windows; {torch.get_num_threads()} threads. Dense perplexity {dense['perplexity']:.2f}. "
             "Time = statistics of all windows up to this count (collected incrementally) + this count's decomposition.",
             "", "| samples | budget | removed | perplexity | x dense | calibration + decomposition |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['samples']} | {r['budget']} | {r['removed']:.1%} | {r['perplexity']:.2f} | {r['ratio_to_dense']:.2f} | "
              f"{r['calibration_s']:.0f} s |" for r in rows]
    write_results(args.out, lines, {"dense": dense, "rows": rows})


if __name__ == "__main__":
    main()

"""Decomposition time against fit quality for sparse-dictionary settings, on a few layers, from cached statistics.

For each setting (method options as KEY=VALUE, e.g. `reselect=4 sparsity_levels=[2.0]`), decomposes every
targeted matrix of the chosen layers of SmolLM2-135M with the statistics of an `lrc` cache entry
(`--cache-dir` of `lrc compress`), timing each in CPU seconds of this process (robust to other load on
the machine), then allocates with the knapsack over those matrices at each budget (refining the options
near the choices, as a run does; the first budget's refinement is part of the time) and reports the summed
loss-scale error of the allocation, relative to the first setting. One decomposition per matrix is shared
by the budgets.

    python bench/speed_quality.py --stats CACHE/KEY.safetensors --layers 3 10 \\
        --settings "reselect_options=all" "" "reselect=4" --out bench/results/speed_quality
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from typing import Any

import torch
import yaml
from results_files import cpu_description, write_results
from safetensors import safe_open

from lrc.allocate import allocate_ranks
from lrc.config import CompressionConfig
from lrc.engine import Analysis
from lrc.engine.jobs import decomposition_jobs
from lrc.factorize import METHODS, InputStats, OutputStats, SparseOption, breakeven_rank
from lrc.model.targets import target_linears
from lrc.sources import load_model
from lrc.stats.types import CalibrationStats


def parse_setting(text: str) -> dict[str, Any]:
    """'reselect=4 sparsity_levels=[2.0]' -> {"reselect": 4, "sparsity_levels": [2.0]} (values read as YAML)."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in text.split())}


def layer_stats(path: str, names: list[str]) -> CalibrationStats:
    """The cached statistics of `names` only (the whole entry is GBs)."""
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
        shares = {n: o for n, o in json.loads(meta["shares"]).items() if n in names}
        in_tokens, out_tokens = json.loads(meta["input_tokens"]), json.loads(meta["output_tokens"])
        inputs = {
            o: InputStats(handle.get_tensor(f"in.{o}.gram"), handle.get_tensor(f"in.{o}.abs_sum"), in_tokens[o])
            for o in {shares.get(n, n) for n in names}
        }
        outputs = {
            n: OutputStats(
                handle.get_tensor(f"out.{n}.gram") if f"out.{n}.gram" in keys else None,
                handle.get_tensor(f"out.{n}.diag"), handle.get_tensor(f"out.{n}.fisher_rows"), out_tokens[n],
            )
            for n in names
        }
        windows = handle.get_tensor("windows")
    return CalibrationStats(windows, meta["calib_source"], inputs, shares, outputs, {})


def code_version() -> str:
    """The lrc checkout this ran (`git describe` of the folder lrc was imported from), for the table."""
    import subprocess

    import lrc

    folder = os.path.dirname(os.path.dirname(lrc.__file__))
    done = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{folder} @ {done.stdout.strip() or 'unknown'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", required=True, help="a cache entry KEY.safetensors (default recipe's statistics)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--settings", nargs="+", default=["reselect_options=all", "", "reselect=4"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.2, 0.4])
    parser.add_argument("--out", default="bench/results/speed_quality")
    args = parser.parse_args()

    loaded = load_model(args.model)
    targets = {n: p for n, p in target_linears(loaded.model, [r"(^|\.)lm_head$"]).items() if int(n.split(".")[2]) in args.layers}
    stats = layer_stats(args.stats, list(targets))
    rows: list[dict[str, Any]] = []
    for text in args.settings:
        options = parse_setting(text)
        method = METHODS.create("sparse-dictionary", options)
        decompositions, seconds, wall = {}, 0.0, time.perf_counter()
        for job in decomposition_jobs(targets, stats):
            start = time.process_time()
            inputs = stats.inputs[job.owner]
            in_weights = method.in_weighting(inputs)
            for name in job.names:
                weight = targets[name].weight.detach()
                decompositions[name] = method.decompose(
                    weight, inputs, breakeven_rank(*weight.shape), name, in_weights, stats.outputs[name], 4
                )
            seconds += time.process_time() - start
        analysis = Analysis(stats, decompositions, {}, True, {})
        errors = {}
        for index, budget in enumerate(args.budgets):  # the first budget's refinement counts in the time
            config = CompressionConfig(budget=budget, method_options=options)
            start = time.process_time()
            # with the model, options near the choices are refined; an lrc without refinement takes no model
            refining = "model" in inspect.signature(allocate_ranks).parameters
            candidates, choices = allocate_ranks(analysis, config, *([loaded.model] if refining else []))
            if index == 0:
                seconds += time.process_time() - start
            errors[budget] = sum(
                choice.error if isinstance(choice, SparseOption) else float(c.errors[choice]) if choice else 0.0
                for c in candidates for choice in [choices[c.name]]
            )
            if index == 0:
                wall = time.perf_counter() - wall
        rows.append({"setting": text or "default", "cpu_s": seconds, "wall_s": wall,
                     "errors": {b: float(e) for b, e in errors.items()}})
        print(rows[-1], flush=True)

    base = rows[0]
    lines = [
        f"Sparse-dictionary settings on {args.model} layers {' '.join(map(str, args.layers))} ({len(targets)} matrices), "
        f"statistics {os.path.basename(args.stats)[:12]} ({int(stats.windows.shape[0])} windows x "
        f"{int(stats.windows.shape[1])} tokens), cpu, {torch.get_num_threads()} threads, {cpu_description()}, "
        f"lrc {code_version()}.",
        "Time: CPU seconds of the decomposition and the refinement at the first budget (this process). Error: summed loss-scale error of the knapsack's "
        "allocation over these matrices at each budget, relative to the first row.",
        "",
        "| setting | CPU s | x first | " + " | ".join(f"error at {b}" for b in args.budgets) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in args.budgets) + " |",
    ]
    for row in rows:
        rel = " | ".join(f"{row['errors'][b] / base['errors'][b]:.4f}" for b in args.budgets)
        lines.append(f"| {row['setting']} | {row['cpu_s']:.1f} | {row['cpu_s'] / base['cpu_s']:.2f} | {rel} |")
    write_results(args.out, lines, {"code": code_version(), "model": args.model, "layers": args.layers, "stats": args.stats,
                                    "windows": int(stats.windows.shape[0]), "seq_len": int(stats.windows.shape[1]),
                                    "device": "cpu", "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()

"""Forward speed of one layer in each storage form against the dense nn.Linear, in the same run.

For SmolLM2-135M's matrix shapes, at a given removed fraction (0.3 by default, charged in real bytes):
dense nn.Linear, LowRankLinear, SparseDictionaryLinear (atoms / entries per row = 2) and LowRankSparseLinear
(15% of the bytes in the residual). Times a prefill (batch 1 x 512 tokens) and a decode step (1 token)
with torch.utils.benchmark (median of repeated runs). Weights are random: speed does not depend on values.

    python bench/speed.py                      # writes bench/results/speed.md
"""

from __future__ import annotations

import argparse
import platform

import torch
from results_files import write_results
from torch import nn
from torch.utils.benchmark import Timer

from lrc.factorize.low_rank_sparse import entries_within
from lrc.factorize.sparse_dictionary import atoms_within
from lrc.forms import LowRankLinear
from lrc.forms.sparse_linear import LowRankSparseLinear, SparseDictionaryLinear
from lrc.forms.sparse_matrix import best_layout

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down of SmolLM2-135M


def random_mask_rows(rows: int, cols: int, per_row: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(rows, cols, generator=gen).topk(per_row, dim=1).indices
    return torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, keep, True)


def layers_for(m: int, n: int, removed: float, gen: torch.Generator) -> dict[str, nn.Module]:
    vb = 4
    budget = int((1 - removed) * m * n * vb)
    rank = budget // (vb * (m + n))
    k, s = atoms_within(m, n, 2.0, budget, vb)
    nnz = entries_within(m, n, int(0.15 * budget), vb)
    r_sparse = (budget - best_layout(m, n, nnz, vb)[1]) // (vb * (m + n))
    mixing = torch.randn(m, k, generator=gen) * random_mask_rows(m, k, s, gen)
    residual = torch.randn(m, n, generator=gen) * (torch.rand(m, n, generator=gen).flatten().argsort().argsort() < nnz).view(m, n)
    return {
        "dense": nn.Linear(n, m, bias=False),
        f"low-rank (r={rank})": LowRankLinear.from_factors(torch.randn(m, rank, generator=gen), torch.randn(rank, n, generator=gen)),
        f"sparse-dictionary (k={k}, s={s})": SparseDictionaryLinear.from_factors(mixing, torch.randn(k, n, generator=gen)),
        f"low-rank-sparse (r={r_sparse}, nnz={nnz})": LowRankSparseLinear.from_factors(
            torch.randn(m, r_sparse, generator=gen), torch.randn(r_sparse, n, generator=gen), residual
        ),
    }


def median_ms(layer: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        timer = Timer("layer(x)", globals={"layer": layer, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--removed", type=float, default=0.3)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", default="bench/results/speed")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, n in SHAPES:
        layers = layers_for(m, n, args.removed, gen)
        for name, layer in layers.items():
            layer.requires_grad_(False)
            prefill = median_ms(layer, torch.randn(1, args.tokens, n))
            decode = median_ms(layer, torch.randn(1, 1, n))
            rows.append({"shape": f"{m}x{n}", "form": name, "prefill_ms": round(prefill, 3), "decode_ms": round(decode, 4)})
            print(rows[-1], flush=True)
    for row in rows:  # ratio to the dense layer of the same shape, measured in this run
        dense = next(r for r in rows if r["shape"] == row["shape"] and r["form"] == "dense")
        row["prefill_x_dense"] = round(row["prefill_ms"] / dense["prefill_ms"], 2)
        row["decode_x_dense"] = round(row["decode_ms"] / dense["decode_ms"], 2)
    lines = [f"One layer's forward, float32, {args.removed:.0%} of the dense bytes removed; prefill = 1 x {args.tokens} "
             f"tokens, decode = 1 token; median of repeated runs; {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}.", "",
             "| shape | form | prefill ms | x dense | decode ms | x dense |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['shape']} | {r['form']} | {r['prefill_ms']:.2f} | {r['prefill_x_dense']:.2f} | "
              f"{r['decode_ms']:.3f} | {r['decode_x_dense']:.2f} |" for r in rows]
    write_results(args.out, lines, {"rows": rows})


if __name__ == "__main__":
    main()

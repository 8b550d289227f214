"""The quality curve of a bench/quality.py run: perplexity against the removed fraction, one line per recipe.

    python bench/quality_plot.py bench/results/quality_128.yaml     # writes bench/results/quality_128.png

Reads only the results YAML (no model, no torch); needs matplotlib (`pip install 'lrc[plot]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml


def plot_quality(data: dict[str, Any], path: Path) -> Path:
    """Perplexity (log scale) against the removed fraction of the targeted parameters, one line per recipe
    (method, allocator, mode), the dense model as a dashed line; written to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, MultipleLocator

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    recipes: dict[str, list[dict[str, Any]]] = {}
    for row in data["rows"]:
        label = f"{row['method']} + {row['allocator']}" + (f" ({row['mode']})" if row["mode"] != "one-shot" else "")
        recipes.setdefault(label, []).append(row)
    for label, rows in recipes.items():
        rows = sorted(rows, key=lambda r: r["removed_targeted"])
        ax.plot([r["removed_targeted"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=label)
    dense = data["dense"]
    ax.axhline(dense["perplexity"], color="black", linestyle="--", linewidth=1, label=f"dense ({dense['perplexity']:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:,.0f}" if y < 1e5 else f"{y:.0e}")
    ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1.5, 0.5)))  # minor labels on short ranges only
    ax.xaxis.set_major_locator(MultipleLocator(0.05))
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:.0%}")
    ax.set_xlabel("removed fraction of the targeted parameters (sparse indices counted)")
    ax.set_ylabel(f"perplexity (seq_len {dense['seq_len']}, {dense['windows']} windows)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results YAML written by bench/quality.py")
    args = parser.parse_args()
    print(f"wrote {plot_quality(yaml.safe_load(args.results.read_text()), args.results.with_suffix('.png'))}")


if __name__ == "__main__":
    main()

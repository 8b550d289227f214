"""A compression report as a picture: where the parameters went, and the curve the allocator traded on.

Top: the kept fraction (params / m n, sparse indices counted) of every targeted matrix as a heat map,
decoder layer x matrix type; D marks a matrix kept dense, S a sparse-plus-low-rank one. Bottom: the
report's `allocation_curve` (see lrc.allocate.curve), the allocator's least summed error at each kept
fraction of the targeted weights, with this run's allocation marked. matplotlib (`pip install 'lrc[plot]'`)
is imported only here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LrcError, OutputError
from .io.atomic_file import atomic_file, check_writable_file
from .model.targets import matrix_type


def kept_grid(report: dict[str, Any]) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """(layer indices, matrix types, kept fractions (layers x types, NaN where absent), kinds as strings)."""
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    types: list[str] = []
    for layer in report["layers"]:
        index = re.search(r"\.(\d+)\.", layer["name"])
        if index is None:
            continue
        kind = matrix_type(layer["name"])
        if kind not in types:
            types.append(kind)
        cells[(int(index.group(1)), kind)] = layer
    layers = sorted({i for i, _ in cells})
    kept = np.full((len(layers), len(types)), np.nan)
    kinds = np.full((len(layers), len(types)), "", dtype=object)
    for (i, t), layer in cells.items():
        m, n = layer["shape"]
        row, col = layers.index(i), types.index(t)
        kept[row, col] = layer["params"] / (m * n)
        kinds[row, col] = "dense" if layer["rank"] == "dense" else layer.get("kind", "low-rank")
    return layers, types, kept, kinds


PLOT_TITLE = "lrc report"  # the title in every picture's metadata: what marks a file --plot may replace


def check_plot_path(path: str | Path) -> None:
    """OutputError unless the picture can go to `path`: a known image type, a writable place, and no file there
    but one lrc report drew (its metadata title): a user's file of that name is never replaced."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OutputError(f"cannot draw to {path}: unknown image type {path.suffix!r} (use .png, .svg or .pdf)")
    check_writable_file(path)
    if path.exists() and PLOT_TITLE.encode() not in path.read_bytes():
        raise OutputError(f"--plot {path} exists and is not a picture lrc report drew; choose another file (lrc "
                          "replaces only its own pictures)")


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Draw the report to `path` (format from its suffix; see check_plot_path), written atomically; returns
    the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LrcError("--plot needs matplotlib, which is not installed: pip install 'lrc[plot]'") from None
    path = Path(path)
    check_plot_path(path)
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the canvas that draws the figure
    suffix = path.suffix.lower().lstrip(".")
    heat, curve = fig.subplots(2, 1, height_ratios=[1.1, 1])
    _draw_heat_map(fig, heat, report)
    _draw_curve(curve, report)
    model = report.get("model", {}).get("spec", "?")
    removed = report["params"]["targeted"]["removed_fraction"]
    fig.suptitle(f"{model}: {report.get('method')} + {report.get('allocator')}, "
                 f"{removed:.1%} of the targeted parameters removed")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format=suffix, metadata={"Title": PLOT_TITLE})
    return path


def _draw_heat_map(fig: Any, ax: Any, report: dict[str, Any]) -> None:
    layers, types, kept, kinds = kept_grid(report)
    image = ax.imshow(kept.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7 if len(layers) > 20 else 9)
    ax.set_yticks(range(len(types)), types, fontsize=9)
    ax.set_xlabel("decoder layer")
    small = len(layers) * len(types) > 150
    for row in range(len(layers)):
        for col in range(len(types)):
            mark = {"dense": "D", "low-rank": ""}.get(kinds[row, col], "S")
            if mark:
                ax.text(row, col, mark, ha="center", va="center", fontsize=6 if small else 8,
                        color="black" if kept[row, col] > 0.6 else "white")
    ax.set_title("kept fraction of every matrix (D: kept dense, S: sparse + low-rank, else low rank)", fontsize=10)
    fig.colorbar(image, ax=ax, label="kept fraction", shrink=0.9)


def _draw_curve(ax: Any, report: dict[str, Any]) -> None:
    curve = report.get("allocation_curve")
    if not curve:
        ax.text(0.5, 0.5, "this report has no allocation_curve (written by an older lrc)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    points = [(k, e) for k, e in zip(curve["kept_fraction"], curve["error"]) if e is not None]
    positive = all(e > 0 for _, e in points if e != 0) and any(e > 0 for _, e in points)
    if positive:
        points = [(k, e) for k, e in points if e > 0]  # all dense (error 0) has no place on a log axis
        ax.set_yscale("log")
    ax.plot([k for k, _ in points], [e for _, e in points], marker="o", markersize=3,
            label=f"{report.get('allocator')}: least summed error within each size")
    chosen = curve.get("chosen")
    if chosen:
        ax.plot([chosen["kept_fraction"]], [chosen["error"]], marker="*", markersize=14, color="tab:red",
                linestyle="none", label=f"this run (budget {report.get('budget')})")
    ax.set_xlabel("targeted weights kept (fraction of their dense size, sparse indices counted)")
    ax.set_ylabel(f"summed error ({report.get('method')}'s scale)")
    ax.set_xlim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title("error against size, as the allocator saw it", fontsize=10)

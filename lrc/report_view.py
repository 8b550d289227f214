"""Drawing an lrc_report.yaml as rich tables: a summary, then one row per matrix."""

from __future__ import annotations

import re
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .io.checkpoint import human_bytes
from .io.report import REPORT_NAME, read_report
from .model.targets import matrix_type

__all__ = ["REPORT_NAME", "read_report", "render_report", "summary_table"]

def _bar(fraction: float, width: int = 4) -> Text:
    """A bar of `width` cells, filled to `fraction`; shows the parameters a matrix keeps."""
    filled = max(0, min(width, round(fraction * width)))
    return Text("█" * filled, style="green") + Text("░" * (width - filled), style="grey50")


BUDGET_UNITS = {"disk": "targeted parameters", "memory": "targeted resident bytes",
                "latency": "the measured forward time"}


def predicted_rows(predicted: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The allocation's cost by the measured prices it was chosen with (memory, latency objectives)."""
    if not predicted:
        return []
    text = f"{predicted['fraction_of_dense']:.1%} of dense ({predicted['counts']}; measured per layer shape)"
    if "outside_share" in predicted:
        text += (f"; targeted layers {predicted['targeted_layers_fraction']:.1%} of theirs, the rest of the model "
                 f"{predicted['outside_share']:.2f}x their dense time")
    return [("predicted cost", text)]


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="lrc compression report", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    params = report["params"]
    tgt, whole = params["targeted"], params["model"]
    calib = report.get("calibration", {})
    model = report.get("model", {})
    rows = [
        ("model", f"{model.get('spec')} ({model.get('architecture', '?')})"),
        ("method / allocator", f"{report.get('method')} / {report.get('allocator')}"),
        ("budget", f"{report.get('budget')} of {BUDGET_UNITS.get(report.get('objective', 'disk'), 'cost')}"),
        ("targeted params", f"{tgt['original']:,} -> {tgt['compressed']:,}  (removed {tgt['removed_fraction']:.1%})"),
        ("model params", f"{whole['original']:,} -> {whole['compressed']:,}  (removed {whole['removed_fraction']:.1%})"),
        *predicted_rows(report.get("predicted_cost")),
        ("calibration", f"{calib.get('source')}: {calib.get('samples')} x {calib.get('seq_len')} tokens"),
        ("seed", str(report.get("seed"))),
    ]
    if "bytes" in report:
        rows.append(("weights on disk", f"{human_bytes(report['bytes']['safetensors'])} ({report['bytes']['dtype']})"))
    timing = report.get("timing_s", {})
    if timing:  # cache_hit is a flag among the times (1.0: the statistics came from the cache)
        times = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timing.items() if k != "cache_hit")
        rows.append(("time", times + (" (statistics read from the cache)" if timing.get("cache_hit") else "")))
    rows += [("peak memory", ", ".join(f"{human_bytes(v)} {k.removesuffix('_bytes').replace('_', ' ')}"
                                      for k, v in report["memory"].items()))] if report.get("memory") else []
    env = report.get("environment", {})
    rows.append(("environment", f"lrc {report.get('lrc_version')}, torch {env.get('torch')}, {env.get('device')}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def layers_table(report: dict[str, Any]) -> Table:
    table = Table(title="per matrix (kept: parameters kept, sparse indices counted; error: ||(W - W')X|| / ||WX|| "
                        "on calibration data)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    rows = []
    for layer in report["layers"]:
        m, n = layer["shape"]
        kept = layer["params"] / (m * n)
        error = layer["rel_error"]
        style = "red" if error > 0.5 else "yellow" if error > 0.2 else ""
        index = re.search(r"\.(\d+)\.", layer["name"])
        rows.append((
            index.group(1) if index else "",
            matrix_type(layer["name"]),
            f"{m}x{n}",
            _form(layer),
            _bar(kept) + Text(f" {kept:.0%}"),
            f"{layer['params']:,}",
            Text(f"{error:.3f}", style=style),
        ))
    columns = [("#", "right"), ("matrix", "left"), ("shape", "right"), ("rank", "right"), ("kept", "left"),
               ("params", "right"), ("error", "right")]
    for i, (name, justify) in enumerate(columns):
        # on a narrow terminal the matrix names are shortened, never a number
        widest = max([len(name), *(len(str(row[i])) for row in rows)])
        flexible = name == "matrix"  # one word: shortened with "…" where the table would not fit
        table.add_column(name, justify=justify, no_wrap=not flexible, overflow="ellipsis",  # type: ignore[arg-type]
                         min_width=None if flexible else widest)
    for row in rows:
        table.add_row(*row)
    return table


def _form(layer: dict[str, Any]) -> str:
    """"dense", the rank, or for a sparse layer its rank and sparse entries ("192+41k dict")."""
    if layer["rank"] == "dense":
        return "dense"
    if "nnz" not in layer:
        return str(layer["rank"])
    short = {"sparse-dictionary": "dict", "low-rank-sparse": "residual"}.get(layer.get("kind", ""), layer.get("kind", ""))
    nnz = layer["nnz"]
    return f"{layer['rank']}+{nnz if nnz < 1000 else f'{nnz / 1000:.0f}k'} {short}"


def render_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(Group(summary_table(report), layers_table(report)))

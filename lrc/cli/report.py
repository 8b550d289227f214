"""`lrc report`: an lrc_report.yaml as tables, as JSON, or as a picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .command_output import CommandOutput
from .options import JsonOpt, ReportArg


def report(
    folder: ReportArg,
    plot: Annotated[Path | None, typer.Option(
        help="Also draw the kept fraction of every matrix and the allocator's error-vs-size curve to this "
             "image (.png, .svg, .pdf); needs lrc\\[plot].")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a compression report as tables."""
    from ..report_view import read_report, render_report

    data = read_report(folder)
    if plot is not None:  # before drawing anything (matplotlib is imported only to draw)
        from ..report_plot import check_plot_path

        check_plot_path(plot)
    shown = CommandOutput(json_output)
    if plot is not None:
        from ..report_plot import plot_report

        plot_report(data, plot)
    render_report(data, shown.human)
    if plot is not None:
        shown.show(f"wrote {plot}")
    shown.emit(data)

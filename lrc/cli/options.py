"""Options shared by several commands, as Annotated types (one definition, one help text each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(help="Model folder, .gguf file, Hub id, or alias (smollm2-135m).")]
ReportArg = Annotated[Path, typer.Argument(help="An lrc output folder or its lrc_report.yaml.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the results as one JSON object on stdout; human text goes to stderr.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress and no tables (errors still print).")]

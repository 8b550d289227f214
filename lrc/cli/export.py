"""`lrc export OUT --dense -o DIR`: an lrc output as the dense checkpoint it computes (lrc.export_dense)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .command_output import CommandOutput
from .options import JsonOpt, ModelArg, QuietOpt
from .progress_display import announce, progress_display


def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")],
    dense: Annotated[bool, typer.Option("--dense", help="Write every compressed layer as its dense weight.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write an lrc output in another form; --dense: the dense checkpoint it computes, loadable without lrc."""
    from ..export import export_dense
    from ..io.checkpoint import human_bytes, tensor_bytes

    if not dense:
        raise ConfigError("lrc export writes the dense equivalent of an output: pass --dense")
    shown = CommandOutput(json_output, quiet)
    with progress_display(quiet) as progress:
        announce(progress, f"export {model} -> {output}: dense weights")
        export_dense(model, output, overwrite=overwrite, progress=progress)
    size = tensor_bytes(output)
    shown.show(f"wrote {output} (dense, {human_bytes(size)} of weights)")
    shown.emit({"output": str(output), "dense": True, "safetensors_bytes": size})

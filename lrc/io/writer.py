"""Writing a compressed model: checkpoint + report into a temporary sibling, verified, then moved into place."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..device import resolve_device
from ..errors import LrcError
from ..forms import LowRankLinear, skeleton
from ..peak_memory import peak_memory
from .checkpoint import DTYPES, check_finite_files, read_tensor_names, tensor_bytes, write_checkpoint
from .output import FILES_KEY, atomic_directory, written_files
from .remote_code import write_remote_code
from .report import REPORT_NAME, write_report

if TYPE_CHECKING:
    from ..config import CompressionConfig
    from ..engine.build import MatrixResult
    from ..sources import LoadedModel


def expected_tensors(results: list[MatrixResult]) -> dict[str, list[int]]:
    """{tensor name: shape} every compressed matrix must have in the checkpoint, from its form's skeleton."""
    expected: dict[str, list[int]] = {}
    for r in results:
        if r.kind == "dense":
            continue
        layer = skeleton(r.shape[1], r.shape[0], r.spec(), device="meta")
        expected.update({f"{r.name}.{key}": list(t.shape) for key, t in layer.state_dict().items()})
    return expected


def write_output(
    loaded: LoadedModel, out: Path, results: list[MatrixResult], report: dict[str, Any], config: CompressionConfig,
    overwrite: bool = False,
) -> None:
    """Write checkpoint + report into a temporary folder, verify it, then move it to `out` (`overwrite`: the
    run's --overwrite, which lets it replace an earlier lrc output; see atomic_directory)."""
    ranks = {r.name: r.rank for r in results if r.kind == LowRankLinear.kind}
    sparse = {r.name: r.spec() for r in results if r.kind not in ("dense", LowRankLinear.kind)}
    dtype = DTYPES[config.dtype] if config.dtype else None
    start = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(loaded.model, tmp, loaded.tokenizer, ranks, dtype, sparse)
        write_remote_code(loaded.model, tmp)  # modeling code: the output loads without lrc
        finish_output(tmp, results, report, config, loaded.model.dtype, start)


def finish_output(
    tmp: Path, results: list[MatrixResult], report: dict[str, Any], config: CompressionConfig,
    model_dtype: Any, start: float,
) -> None:
    """Verify the checkpoint written in `tmp` against the forms' tensor names and shapes and for NaN/Inf, then
    complete the report (write time since `start`, peak memory, bytes, and the list of every file in the
    folder, the report included, which `--overwrite` later replaces and nothing else) and write it, last."""
    dtype = DTYPES[config.dtype] if config.dtype else None
    names = read_tensor_names(tmp)
    for key, shape in expected_tensors(results).items():
        if key not in names or names[key][1] != shape:
            raise LrcError(f"written checkpoint is missing or misshapes {key}")
    check_finite_files(tmp)
    report["timing_s"]["write_s"] = round(time.perf_counter() - start, 3)
    report["memory"] = peak_memory(resolve_device(config.device))  # again: the peak now includes the writing
    report["bytes"] = {"safetensors": tensor_bytes(tmp), "dtype": str(dtype or model_dtype).removeprefix("torch.")}
    report[FILES_KEY] = written_files(tmp, REPORT_NAME)
    write_report(tmp / REPORT_NAME, report)

"""The compression report, lrc_report.yaml: what it records (build_report), writing and reading it."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from .. import __version__
from ..config import CompressionConfig
from ..errors import ModelLoadError

if TYPE_CHECKING:
    from ..engine.build import MatrixResult
    from ..sources import LoadedModel
    from ..stats.types import CalibrationStats

REPORT_NAME = "lrc_report.yaml"
EXPORT_MARKER = "lrc_export.yaml"  # {lrc_version, exported_from, files}: marks a folder `lrc export` wrote


def model_sha256(loaded: LoadedModel) -> str:
    """The GGUF file's sha256 for a GGUF input (what `sha256sum FILE` prints), else the folder's fingerprint
    (stats.store.model_fingerprint: config.json and the safetensors files)."""
    from ..sources import file_sha256
    from ..stats.store import model_fingerprint

    if loaded.source.kind in ("gguf", "alias"):
        return file_sha256(loaded.source.path)
    return model_fingerprint(Path(loaded.folder))


def build_report(
    loaded: LoadedModel,
    config: CompressionConfig,
    stats: CalibrationStats,
    results: list[MatrixResult],
    original_params: int,
    device: torch.device,
) -> dict[str, Any]:
    """The report of a run: model, settings, calibration, parameter counts, environment and every matrix."""
    import transformers

    from ..stats.store import data_fingerprint

    windows = stats.windows
    targeted_original = sum(r.shape[0] * r.shape[1] for r in results)
    targeted_compressed = sum(r.params for r in results)
    # parameter-equivalents: sparse layers' index bytes count as values (as in lrc.forms.count_params)
    compressed_params = original_params - targeted_original + targeted_compressed
    return {
        "lrc_version": __version__,
        "model": loaded.source.describe() | {"architecture": type(loaded.model).__name__, "sha256": model_sha256(loaded)},
        "method": config.method,
        "allocator": config.allocator,
        "budget": config.budget,
        "objective": config.objective,  # what the budget counts (lrc.allocate.objective)
        "seed": config.seed,
        "calibration": {
            "source": stats.calib_source,
            "samples": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
            "tokens": int(windows.numel()),
            "sha256": data_fingerprint(config.calib),
            # the token windows themselves (int64, row-major): what self-sampled calibration drew, too
            "windows_sha256": hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest(),
        },
        "params": {
            "targeted": {
                "original": targeted_original,
                "compressed": targeted_compressed,
                "removed_fraction": round(1 - targeted_compressed / targeted_original, 6),
            },
            "model": {
                "original": original_params,
                "compressed": compressed_params,
                "removed_fraction": round(1 - compressed_params / original_params, 6),
            },
        },
        "settings": config.to_dict(),
        "environment": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "transformers": str(transformers.__version__),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "platform": platform.platform(),
        },
        "layers": [
            {
                "name": r.name,
                "shape": list(r.shape),
                "kind": r.kind,
                "rank": "dense" if r.kind == "dense" else r.rank,
                "params": r.params,
                "rel_error": round(r.rel_error, 6),
            }
            | ({"nnz": r.nnz, "layout": r.layout} if r.nnz else {})
            for r in results
        ],
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(report, sort_keys=False, width=120))


def read_report(path: str | Path) -> dict[str, Any]:
    """The report of an output folder (or the YAML file itself)."""
    path = Path(path)
    file = path / REPORT_NAME if path.is_dir() else path
    if not path.exists():
        raise ModelLoadError(f"not found: {path}")
    if not file.is_file() and (path / EXPORT_MARKER).is_file():
        raise ModelLoadError(f"{path} is an lrc export (a dense checkpoint, see its {EXPORT_MARKER}), which has no "
                             "compression report: run lrc report on the output it was exported from")
    if not file.is_file():
        raise ModelLoadError(f"no {REPORT_NAME} in {path}: not an lrc output folder")
    try:
        report = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ModelLoadError(f"{file} is not valid YAML") from None
    if not isinstance(report, dict) or "layers" not in report or "params" not in report:
        raise ModelLoadError(f"{file} is not an lrc report (no params/layers)")
    check_complete(report, file)
    return report


def check_complete(report: dict[str, Any], file: Path) -> None:
    """ModelLoadError unless every layer entry has a name, kind, shape [m, n] and params, the layers' original
    parameters add up to the targeted total, and the keys written last (timing_s, bytes) are there: a report
    cut short or edited is not shown as if it were whole."""
    layers = report["layers"]
    if not isinstance(layers, list):
        raise ModelLoadError(f"{file} is not a valid lrc report: its layers are not a list")
    for index, layer in enumerate(layers):
        shape = layer.get("shape") if isinstance(layer, dict) else None
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("kind"), str)
                and isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)
                and isinstance(layer.get("params"), int)):
            raise ModelLoadError(f"{file} is not a valid lrc report: layers[{index}] lacks a name, kind, shape [m, n] "
                                 "or params")
    targeted = report["params"].get("targeted") if isinstance(report["params"], dict) else None
    total = targeted.get("original") if isinstance(targeted, dict) else None
    listed = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    if total != listed:
        raise ModelLoadError(f"{file} is incomplete or edited: its {len(layers)} layers hold {listed:,} parameters, "
                             f"not the {total} its targeted total says")
    missing = [key for key in ("timing_s", "bytes") if key not in report]
    if missing:
        raise ModelLoadError(f"{file} is incomplete or edited: it has no {' or '.join(missing)}")

"""A cache of calibration statistics, so a second run on the same model and data skips the calibration passes.

Entry key: SHA-256 over everything that changes the statistics (see `cache_key`): the model's weight
files and config.json (for a model the caller loaded, its weights and config as they are in memory, which
may no longer be what its folder holds), its tokenizer and generation files (they make the token windows), the dtype and
attention implementation of the loaded model, the calibration data (the text's bytes, or
"self-sampled"), samples, seq_len, seed, batch_size (float sums are taken per batch), grad_samples,
exclude patterns, which statistics were collected, the device and torch's CPU thread count (both change
float rounding), and the lrc, torch and transformers versions. An entry is one safetensors file
(windows, Grams, gradient statistics) plus a `.sha256` sidecar of its bytes, both written atomically with
the user's umask. An entry whose bytes, key or layout do not check out is reported, deleted and
recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from .. import __version__
from ..errors import OutputError
from ..factorize import InputStats, OutputStats
from ..io.checkpoint import save_tensors, weight_files
from ..io.output import apply_umask, folder_refusal
from ..sources import file_sha256
from .types import CalibrationStats

if TYPE_CHECKING:
    from ..config import CompressionConfig
    from ..sources import LoadedModel


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over config.json and every safetensors file of a model folder (names and bytes)."""
    digest = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


# files beside the weights that change the calibration windows: the tokenizer's, and generation settings
# (self-sampled calibration generates text)
TOKENIZER_FILES = re.compile(
    r"(tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|[\w.-]*\.model"
    r"|chat_template\.(jinja|json)|generation_config\.json|preprocessor_config\.json)"
)


def tensors_fingerprint(model: Any) -> str:
    """SHA-256 over a model's config (its path aside) and every state-dict tensor's name, dtype, shape and bytes,
    as they are in memory."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def tokenizer_fingerprint(folder: Path) -> str:
    """SHA-256 over the tokenizer and generation files of a model folder (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and TOKENIZER_FILES.fullmatch(p.name)):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def data_fingerprint(calib: str | None) -> str:
    """SHA-256 of the calibration text as lrc reads it (UTF-8, "\n" line ends: for a UTF-8 file with "\n" line
    ends, the file's bytes); "self-sampled" without one; `calib` itself if it is not a file or hf:// source."""
    if calib is None:
        return "self-sampled"
    if not calib.startswith("hf://") and not Path(calib).expanduser().is_file():
        return calib
    from ..calibration import read_text

    return hashlib.sha256(read_text(calib).encode()).hexdigest()


def cache_key(loaded: LoadedModel, config: CompressionConfig, gradients: bool, fisher: bool,
              weights_in_files: bool = True) -> str:
    """SHA-256 over every input of `collect_statistics` (see the module docstring); `weights_in_files`: the model
    was loaded from its folder for this run (else its weights are read in memory)."""
    import transformers

    model = loaded.model
    fields = {
        "model": model_fingerprint(Path(loaded.folder)) if weights_in_files else tensors_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(Path(loaded.folder)),
        "model_dtype": str(getattr(model, "dtype", "")),
        "attention": str(getattr(model.config, "_attn_implementation", "")),
        "data": data_fingerprint(config.calib),
        "samples": config.samples,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_samples": config.grad_samples,
        "exclude": config.exclude,
        "gradients": gradients,
        "fisher": fisher,
        "device": str(torch.device(config.device)),
        "threads": torch.get_num_threads(),
        "lrc": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_cache_folder(folder: Path) -> None:
    """Raise OutputError unless `folder` (a statistics cache, created on first use) can be written: checked
    before the run, not when its statistics are ready."""
    refusal = folder_refusal(folder)
    if refusal is not None:
        raise OutputError(f"cannot use {folder} as the statistics cache: {refusal}")


def save_stats(stats: CalibrationStats, folder: Path, key: str) -> Path:
    """Write one entry atomically: KEY.safetensors and KEY.sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"windows": stats.windows.contiguous()}
    for name, s in stats.inputs.items():
        tensors[f"in.{name}.gram"] = s.gram.contiguous()
        tensors[f"in.{name}.abs_sum"] = s.abs_sum.contiguous()
    for name, o in stats.outputs.items():
        if o.gram is not None:
            tensors[f"out.{name}.gram"] = o.gram.contiguous()
        tensors[f"out.{name}.diag"] = o.diag.contiguous()
        tensors[f"out.{name}.fisher_rows"] = o.fisher_rows.contiguous()
    meta = {
        "key": key,
        "calib_source": stats.calib_source,
        "shares": json.dumps(stats.shares),
        "input_tokens": json.dumps({n: s.tokens for n, s in stats.inputs.items()}),
        "output_tokens": json.dumps({n: o.tokens for n, o in stats.outputs.items()}),
        "timing": json.dumps(stats.timing),
    }
    target = folder / f"{key}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=folder)
    os.close(fd)
    check = folder / f"{key}.sha256.tmp"
    try:
        save_tensors(tensors, tmp, metadata=meta)
        apply_umask(Path(tmp), 0o666)  # mkstemp and safetensors make 0600
        digest = file_sha256(Path(tmp))
        os.replace(tmp, target)
        check.write_text(digest)
        os.replace(check, folder / f"{key}.sha256")
    except BaseException:  # a full disk, an interruption: no partial file left in the cache
        for path in (Path(tmp), check):
            path.unlink(missing_ok=True)
        raise
    return target


def load_stats(folder: Path, key: str) -> CalibrationStats | None:
    """The cached entry for `key`, or None if absent; a corrupt or stale entry is deleted (with a warning)."""
    path, check = folder / f"{key}.safetensors", folder / f"{key}.sha256"
    if not path.is_file():
        return None
    try:
        if not check.is_file() or check.read_text().strip() != file_sha256(path):
            raise ValueError("checksum mismatch")
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        if meta.get("key") != key:
            raise ValueError("key mismatch")
        in_tokens = json.loads(meta["input_tokens"])
        out_tokens = json.loads(meta["output_tokens"])
        inputs = {n: InputStats(tensors[f"in.{n}.gram"], tensors[f"in.{n}.abs_sum"], t) for n, t in in_tokens.items()}
        outputs = {
            n: OutputStats(tensors.get(f"out.{n}.gram"), tensors[f"out.{n}.diag"], tensors[f"out.{n}.fisher_rows"], t)
            for n, t in out_tokens.items()
        }
        return CalibrationStats(
            tensors["windows"], meta["calib_source"], inputs, json.loads(meta["shares"]), outputs,
            {"cache_hit": 1.0, **{k: 0.0 for k in json.loads(meta["timing"])}},
        )
    except Exception as exc:  # any failure to read means the entry cannot be trusted
        warnings.warn(f"lrc: discarding corrupt calibration cache entry {path.name} ({exc})", stacklevel=2)
        path.unlink(missing_ok=True)
        check.unlink(missing_ok=True)
        return None

"""Writing and reading lrc checkpoints: config.json + tokenizer + safetensors weights (+ lrc_report.yaml).

Each factorized linear `NAME` is stored as `NAME.down.weight` (r x n) and `NAME.up.weight` (m x r);
config.json's quantization_config holds the rank map (see hf_integration).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import ModelLoadError, NumericalError
from .hf_integration import LrcConfig

SHARD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tie_sources_first(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` in the model's order, but the names transformers ties to another weight (lm_head -> embed_tokens:
    its `all_tied_weights_keys`) last, so a tied tensor is first met under the name it is loaded by."""
    tie_targets = set(getattr(model, "all_tied_weights_keys", None) or ())
    return {name: state[name] for name in sorted(state, key=lambda n: n in tie_targets)}  # a stable sort


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each stored once: a tied weight keeps the name transformers loads it by, its tie's
    source (embed_tokens, not lm_head; XLM-R's state dict lists the head first), else its first name."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in tie_sources_first(model, model.state_dict(keep_vars=False)).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor
    return tensors


def write_checkpoint(
    model: Any,
    folder: Path,
    tokenizer: Any | None = None,
    ranks: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
    sparse: dict[str, dict[str, Any]] | None = None,
) -> list[Path]:
    """Write config.json, safetensors shards (+ index) and tokenizer files into `folder`; return the weight files.

    ranks / sparse: the factorized layers (see hf_integration), recorded in config.json.

    Floating tensors are cast to `dtype` when given. Tensors with NaN/Inf are refused (NumericalError).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: written_tensor(name, tensor, dtype) for name, tensor in unique_state_dict(model).items()}
    files = _write_shards(tensors, folder)
    write_model_files(model, folder, tokenizer, ranks, dtype, sparse)
    return files


def written_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` as the checkpoint stores it: on the CPU, floating values cast to `dtype`, contiguous; NaN/Inf refused."""
    t = tensor.detach().to("cpu")
    if t.is_floating_point() and dtype is not None:
        t = t.to(dtype)
    t = t.contiguous()
    if t.is_floating_point() and not all_finite(t):
        raise NumericalError(f"tensor {name} is not finite; refusing to write it")
    return t


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """torch.isfinite(t).all() of a contiguous `t`, `chunk` values at a time (isfinite makes full-size temporaries)."""
    flat = t.view(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def write_model_files(
    model: Any,
    folder: Path,
    tokenizer: Any | None,
    ranks: dict[str, int] | None,
    dtype: torch.dtype | None,
    sparse: dict[str, dict[str, Any]] | None,
) -> None:
    """config.json (with the lrc quantization_config), generation_config.json and the tokenizer files."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # the class written (BertModel for a BERT classifier's encoder)
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    if ranks or sparse:
        config["quantization_config"] = LrcConfig(ranks, sparse=sparse).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def plan_shards(sizes: dict[str, int]) -> list[list[str]]:
    """Tensor names per shard, in order: a new shard starts where the next tensor would pass SHARD_BYTES."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """model.safetensors for one shard, else transformers' model-0000I-of-0000N.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard_index(folder: Path, shards: list[list[str]], sizes: dict[str, int]) -> None:
    """model.safetensors.index.json (only for more than one shard)."""
    if len(shards) == 1:
        return
    files = shard_file_names(len(shards))
    weight_map = {n: file for file, names in zip(files, shards) for n in names}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors reports the system's error in its message


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file; a write the system refused (a full or read-only disk) raised as that OSError
    with the path (safetensors wraps it in SafetensorError), so it reads as the machine's refusal, not a bug."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = OS_ERROR.search(str(exc))
        if found is None:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path) -> list[Path]:
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes)
    files = [folder / name for name in shard_file_names(len(shards))]
    for path, names in zip(files, shards):
        save_tensors({n: tensors[n] for n in names}, path, metadata={"format": "pt"})
    write_shard_index(folder, shards, sizes)
    return files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded or not), sorted."""
    return sorted(folder.glob("*.safetensors"))


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def renaming_on_load(model: Any, convert: bool = True) -> Callable[[str], tuple[str, str | None]]:
    """name -> (the model's name for a checkpoint tensor `name`, as transformers' conversion mapping for the
    model's class gives it on load; the pattern of the converter that merges or splits it, or None). With
    convert=False renamings only: a tensor to be converted keeps its name. Each call makes its own mapping
    (matching arms the renamings' state)."""
    import copy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = copy.deepcopy(get_model_conversion_mapping(model))
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)] if convert else []
    return lambda name: rename_source_key(name, renamings, converters)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file, read from
    its header alone: nothing is memory-mapped (a mapping of the whole file would count against a process's
    RLIMIT_DATA). A header that does not parse or points past the end of the file raises ValueError."""
    with path.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if 8 + size + end > path.stat().st_size:
        raise ValueError("the file ends before its last tensor")
    return 8 + size, header


def read_tensor(handle: Any, start: int, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor of an open safetensors file (`start`, `entry` from read_header), by one positioned read."""
    t = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    handle.seek(start + int(entry["data_offsets"][0]))
    buffer: Any = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes
    if t.numel() and handle.readinto(buffer) != t.numel() * t.element_size():
        raise ValueError("the file ends early")
    return t


def read_tensor_names(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from the safetensors headers; a corrupt file is a ModelLoadError."""
    found: dict[str, tuple[str, list[int]]] = {}
    for path in weight_files(folder):
        try:
            header = read_header(path)[1]
            found.update({name: (str(e["dtype"]), [int(d) for d in e["shape"]]) for name, e in header.items()})
        except Exception as exc:  # struct, JSON, missing keys, OSError
            raise ModelLoadError(f"cannot read {path}: corrupt or truncated safetensors file ({exc})") from None
    return found


def check_finite_files(folder: Path) -> None:
    """Raise NumericalError naming the first tensor with NaN or Inf in the folder's safetensors files."""
    for path in weight_files(folder):
        start, header = read_header(path)
        with path.open("rb") as handle:
            for name in sorted(header):
                floating = header[name]["dtype"] in ("F64", "F32", "F16", "BF16")
                if floating and not all_finite(read_tensor(handle, start, header[name])):
                    raise NumericalError(f"tensor {name} in {path.name} contains NaN or Inf")


def tensor_bytes(folder: Path) -> int:
    """Bytes of the safetensors files alone (tensor data + headers)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"

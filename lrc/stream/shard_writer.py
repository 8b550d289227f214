"""Safetensors shards written one tensor at a time, with the bytes `safetensors.torch.save_file` would write.

The in-memory writer gives `save_file` each shard's tensors at once. Streaming has one tensor at a time, so
`ShardedCheckpointWriter` lays each shard out first: safetensors' own tensor order (taken from `save` on
one-element stand-ins with the same names and dtypes: its order depends on names and dtypes only), byte
offsets from the shapes, the same compact JSON header padded with spaces to 8 bytes. Then each tensor's
bytes go to their offset. The shard plan (`plan_shards`) and file names are the in-memory writer's, from
the same name order and sizes, so the checkpoint's bytes are the same (tested against the in-memory path).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save

from ..errors import LrcError
from ..io.checkpoint import plan_shards, shard_file_names, tie_sources_first, write_shard_index

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def unique_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The in-memory writer's order with each tensor once (`unique_state_dict`: a tied weight under its tie's
    source), for meta tensors too: ties are the same Parameter object (meta tensors have no storage to compare)."""
    seen: set[int] = set()
    entries: dict[str, torch.Tensor] = {}
    for name, tensor in tie_sources_first(model, model.state_dict(keep_vars=True)).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries[name] = tensor
    return entries


class ShardedCheckpointWriter:
    """Shards of `layout` ({name: (dtype, shape)} in checkpoint order) in `folder`; `write` each tensor once, then `close`."""

    def __init__(self, folder: Path, layout: dict[str, tuple[torch.dtype, list[int]]]) -> None:
        self.folder = folder
        self.layout = layout
        self.sizes = {n: _numel(shape) * _itemsize(dtype) for n, (dtype, shape) in layout.items()}
        self.shards = plan_shards(self.sizes)
        self.files = [folder / name for name in shard_file_names(len(self.shards))]
        self._where: dict[str, tuple[BinaryIO, int]] = {}
        self._written: set[str] = set()
        for path, names in zip(self.files, self.shards):
            handle = path.open("wb")
            header, offsets, data_bytes = self._header(names)
            handle.write(struct.pack("<Q", len(header)) + header)
            handle.truncate(8 + len(header) + data_bytes)
            for name in names:
                self._where[name] = (handle, 8 + len(header) + offsets[name])

    def _header(self, names: list[str]) -> tuple[bytes, dict[str, int], int]:
        """(the padded JSON header, each tensor's data offset, total data bytes) as safetensors lays them out."""
        stand_ins = {n: torch.zeros(1, dtype=self.layout[n][0]) for n in names}
        raw = save(stand_ins, metadata={"format": "pt"})
        order = [k for k in json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]]) if k != "__metadata__"]
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offsets, at = {}, 0
        for name in order:
            dtype, shape = self.layout[name]
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + self.sizes[name]]}
            offsets[name] = at
            at += self.sizes[name]
        text = json.dumps(header, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8), offsets, at

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or list(tensor.shape) != list(shape) or name in self._written:
            raise LrcError(f"tensor {name} does not match the checkpoint's layout ({tensor.dtype} {list(tensor.shape)}"
                           f" vs {dtype} {list(shape)}) or was written twice")
        handle, offset = self._where[name]
        handle.seek(offset)
        handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # the bytes, not a copy
        self._written.add(name)

    def close(self) -> list[Path]:
        """Close the files (every tensor must have been written) and write the shard index; the weight files."""
        for handle in {id(h): h for h, _ in self._where.values()}.values():
            handle.close()
        missing = [n for n in self.layout if n not in self._written]
        if missing:
            raise LrcError(f"the streamed checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}")
        write_shard_index(self.folder, self.shards, self.sizes)
        return self.files


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()

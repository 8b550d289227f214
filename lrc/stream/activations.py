"""Hidden states between blocks (per batch: batch x seq_len x hidden), in memory under a byte budget, on disk beyond.

The block passes (statistics, backward sweep) hold one or more block boundaries, each a list of per-batch
tensors. `ActivationStore.boundary()` gives such a list: with no budget a plain list; with a budget a
`SpilledBoundary`, which keeps a tensor in memory while the store's resident total stays within the
budget and otherwise writes it to a safetensors file in the store's folder, read back on access. Files are
deleted when their boundary is cleared or dropped, and the folder when the store is closed. The values
read back are the values written (bit for bit), so spilling never changes a result.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, MutableSequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..io.checkpoint import save_tensors


class ActivationStore:
    """Boundaries sharing one in-memory budget (bytes; None: unlimited), spilling into a temporary folder under `root`."""

    def __init__(self, budget_bytes: int | None = None, root: Path | None = None) -> None:
        self.budget = budget_bytes
        self.root = root
        self.resident = 0  # bytes of activations held in memory now
        self.spilled = 0  # bytes written to disk so far
        self._folder: Path | None = None
        self._files = 0

    def boundary(self) -> MutableSequence[torch.Tensor]:
        """An empty list of per-batch hidden states for one block boundary."""
        return [] if self.budget is None else SpilledBoundary(self)

    def _new_file(self) -> Path:
        if self._folder is None:
            if self.root is not None:
                self.root.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="activations-", dir=self.root))
        self._files += 1
        return self._folder / f"{self._files}.safetensors"

    def close(self) -> None:
        """Delete the spill folder (and every file still in it)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SpilledBoundary(MutableSequence[torch.Tensor]):
    """Per-batch tensors of one boundary: each held in memory or in a file of its store (see the module)."""

    def __init__(self, store: ActivationStore) -> None:
        self._store = store
        self._items: list[torch.Tensor | Path] = []

    def _place(self, tensor: torch.Tensor) -> torch.Tensor | Path:
        size = tensor.numel() * tensor.element_size()
        budget = self._store.budget
        if budget is None or self._store.resident + size <= budget:
            self._store.resident += size
            return tensor
        path = self._store._new_file()
        save_tensors({"h": tensor.detach().contiguous()}, path)
        self._store.spilled += size
        return path

    def _drop(self, item: torch.Tensor | Path) -> None:
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
        else:
            self._store.resident -= item.numel() * item.element_size()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        return load_file(str(item))["h"] if isinstance(item, Path) else item

    def __setitem__(self, index: Any, value: Any) -> None:
        old = self._items[index]
        self._items[index] = self._place(value)
        self._drop(old)

    def __delitem__(self, index: Any) -> None:
        items = self._items[index] if isinstance(index, slice) else [self._items[index]]
        del self._items[index]
        for item in items:
            self._drop(item)

    def __len__(self) -> int:
        return len(self._items)

    def insert(self, index: int, value: torch.Tensor) -> None:
        self._items.insert(index, self._place(value))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def __del__(self) -> None:
        for item in self._items:
            self._drop(item)
        self._items = []

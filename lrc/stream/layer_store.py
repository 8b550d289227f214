"""Each layer's statistics and decompositions on disk, so that nothing of a finished layer stays in memory and a
killed run resumes from the layers it completed.

Layout under `root` (the --cache-dir's `stream/` folder, else the lrc cache's):
  STATS_KEY/windows.safetensors       the calibration windows (+ source, shares, timings in its metadata)
  STATS_KEY/inputs-I.safetensors      layer I's input statistics (Grams, abs sums; tokens and shares in metadata)
  STATS_KEY/outputs-I.safetensors     layer I's output-gradient statistics
  STATS_KEY/DECOMP_KEY/layer-I.safetensors   layer I's decompositions and output-error curves
  STATS_KEY/DECOMP_KEY/kept/NAME.safetensors   matrix NAME's sparse layer as refitted for the allocator's choice
                                             (its option and layer spec in the metadata; lrc.engine.build.KeptLayers)
STATS_KEY is the statistics cache's key (lrc.stats.store.cache_key: model and tokenizer bytes, data, samples,
seq_len, seed, batch size, device, threads, versions, ...); DECOMP_KEY adds the method, its options and the
written dtype (sparse options' byte costs depend on it). Every file is written to a temporary name and renamed,
so a file that exists is complete; a file that cannot be read is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..factorize import Decomposition, InputStats, OutputStats, SparseOption
from ..io.checkpoint import save_tensors
from ..io.output import OutputClaim


def decomposition_key(stats_key: str, method: str, options: dict[str, Any], dtype: str | None) -> str:
    fields = {"stats": stats_key, "method": method, "options": options, "dtype": dtype}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class LayerStore:
    """The per-layer files of one run (see the module docstring)."""

    def __init__(self, root: Path, stats_key: str, decomp_key: str) -> None:
        self.stats_dir = root / stats_key[:32]
        self.decomp_dir = self.stats_dir / decomp_key[:32]
        # one run at a time uses these files (a finished run deletes them): a second is refused, not broken
        self.claim = OutputClaim.take(self.stats_dir.resolve(), busy=(
            "another lrc run (PID {pid}) is streaming this model with the same data and settings, and uses its "
            "files in {target}; wait for it, or give this run its own --cache-dir"))
        self.decomp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.stats_dir.glob("activations-*"):  # hidden states spilled by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)

    # --- files ------------------------------------------------------------------------------------

    def _save(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp,
                     metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)

    def _load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
            return tensors, meta
        except Exception as exc:  # an unreadable entry is recomputed, never trusted
            warnings.warn(f"lrc: discarding unreadable layer store file {path} ({exc})", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    # --- windows ------------------------------------------------------------------------------------

    def save_windows(self, windows: torch.Tensor, calib_source: str, timing: dict[str, float]) -> None:
        self._save(self.stats_dir / "windows.safetensors", {"windows": windows},
                   {"calib_source": calib_source, "timing": timing})

    def load_windows(self) -> tuple[torch.Tensor, str, dict[str, float]] | None:
        found = self._load(self.stats_dir / "windows.safetensors")
        return None if found is None else (found[0]["windows"], found[1]["calib_source"], found[1]["timing"])

    # --- statistics ---------------------------------------------------------------------------------

    def save_inputs(self, index: int, stats: dict[str, InputStats], shares: dict[str, str]) -> None:
        tensors = {}
        for name, s in stats.items():
            tensors[f"{name}.gram"], tensors[f"{name}.abs_sum"] = s.gram, s.abs_sum
        self._save(self.stats_dir / f"inputs-{index}.safetensors", tensors,
                   {"tokens": {n: s.tokens for n, s in stats.items()}, "shares": shares})

    def load_inputs(self, index: int) -> tuple[dict[str, InputStats], dict[str, str]] | None:
        found = self._load(self.stats_dir / f"inputs-{index}.safetensors")
        if found is None:
            return None
        tensors, meta = found
        stats = {n: InputStats(tensors[f"{n}.gram"], tensors[f"{n}.abs_sum"], t) for n, t in meta["tokens"].items()}
        return stats, meta["shares"]

    def has_inputs(self, layers: int) -> bool:
        return all((self.stats_dir / f"inputs-{i}.safetensors").is_file() for i in range(layers))

    def save_outputs(self, index: int, stats: dict[str, OutputStats]) -> None:
        tensors = {}
        for name, o in stats.items():
            if o.gram is not None:
                tensors[f"{name}.gram"] = o.gram
            tensors[f"{name}.diag"], tensors[f"{name}.fisher_rows"] = o.diag, o.fisher_rows
        self._save(self.stats_dir / f"outputs-{index}.safetensors", tensors,
                   {"tokens": {n: o.tokens for n, o in stats.items()}})

    def load_outputs(self, index: int) -> dict[str, OutputStats] | None:
        found = self._load(self.stats_dir / f"outputs-{index}.safetensors")
        if found is None:
            return None
        tensors, meta = found
        return {n: OutputStats(tensors.get(f"{n}.gram"), tensors[f"{n}.diag"], tensors[f"{n}.fisher_rows"], t)
                for n, t in meta["tokens"].items()}

    def has_outputs(self, layers: int) -> bool:
        return all((self.stats_dir / f"outputs-{i}.safetensors").is_file() for i in range(layers))

    # --- decompositions -----------------------------------------------------------------------------

    def save_decompositions(self, index: int, decompositions: dict[str, Decomposition],
                            output_errors: dict[str, torch.Tensor]) -> None:
        tensors, options = {}, {}
        for name, dec in decompositions.items():
            tensors[f"{name}.up_full"], tensors[f"{name}.down_full"] = dec.up_full, dec.down_full
            tensors[f"{name}.errors"], tensors[f"{name}.output_errors"] = dec.errors, output_errors[name]
            options[name] = [o.__dict__ for o in dec.sparse_options]
        self._save(self.decomp_dir / f"layer-{index}.safetensors", tensors, {"sparse_options": options})

    def load_decompositions(self, index: int) -> tuple[dict[str, Decomposition], dict[str, torch.Tensor]] | None:
        found = self._load(self.decomp_dir / f"layer-{index}.safetensors")
        if found is None:
            return None
        tensors, meta = found
        decompositions, output_errors = {}, {}
        for name, options in meta["sparse_options"].items():
            decompositions[name] = Decomposition(tensors[f"{name}.up_full"], tensors[f"{name}.down_full"],
                                                 tensors[f"{name}.errors"], [SparseOption(**o) for o in options])
            output_errors[name] = tensors[f"{name}.output_errors"]
        return decompositions, output_errors

    def save_kept(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        (self.decomp_dir / "kept").mkdir(exist_ok=True)
        self._save(self.decomp_dir / "kept" / f"{name}.safetensors", tensors, meta)

    def load_kept(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        return self._load(self.decomp_dir / "kept" / f"{name}.safetensors")

    def remove(self) -> None:
        """Delete this run's files (after a successful run that was not asked to keep them)."""
        shutil.rmtree(self.stats_dir, ignore_errors=True)
        self.claim.release()

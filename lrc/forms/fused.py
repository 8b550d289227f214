"""One matmul for the first factors of layers that read the same input (q/k/v, gate/up).

Layers reading one tensor x each start with a dense product x D_iᵀ (LowRankLinear: down, r_i x n;
SparseDictionaryLinear: atoms, k_i x n). `fuse_down_factors` stacks those factors into one matrix
D = [D_1; D_2; ...] (Σ r_i x n) and makes each layer's factor a view of its rows, so memory holds each
value once and the state dict is unchanged (views are saved as their own tensors). The first layer called
with x computes x Dᵀ once; each layer of the group then takes its columns, and the product is dropped
when every layer has taken its share (or when a call comes with another input); each thread has its own
input and product. Where gradients flow each layer makes its own product (of its own parameter, the view,
so a fine-tuned factor gets its gradient). When decoding on CPU,
layers that make both their products in one kernel call (bfloat16 low rank, a sparse dictionary in the
bitmask layout) take no share, so in a group with such a layer every layer makes its own first product
then (the stacked one would compute their rows for nothing). A layer whose factor no
longer is that view (the model was moved or cast, or a factor replaced) leaves the group and computes its
own product again; the stacked weight is freed when the last layer has left.
This module imports torch, the standard library and its sibling forms only (it travels with the model's
own modeling code).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cpu_kernels import DENSE_KERNEL_MAX_TOKENS, LOW_RANK_ONE_CALL_DTYPES, linear
from .lowrank import LowRankLinear
from .sparse_linear import SparseDictionaryLinear

FUSABLE = (LowRankLinear, SparseDictionaryLinear)


def makes_one_call_when_decoding(layer: nn.Module) -> bool:
    """Whether the layer makes both its products in one kernel call for a decode-sized input on CPU (see
    cpu_kernels.lowrank_linear and SparseMatrix.after_dense), taking no share of its group's product."""
    if isinstance(layer, LowRankLinear):
        return layer.down.weight.dtype in LOW_RANK_ONE_CALL_DTYPES
    return isinstance(layer, SparseDictionaryLinear) and layer.mixing.layout == "bitmask"


def down_factor(layer: nn.Module) -> nn.Linear:
    """The layer's first (dense) factor: LowRankLinear.down or SparseDictionaryLinear.atoms."""
    if isinstance(layer, LowRankLinear):
        return layer.down
    assert isinstance(layer, SparseDictionaryLinear)
    return layer.atoms


class SharedInputProduct:
    """x Dᵀ for the stacked first factors D (Σ r_i x n) of a group of layers, computed once per input x."""

    def __init__(self, weight: torch.Tensor, layers: list[nn.Module]) -> None:
        self.weight = weight
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for layer in layers:
            rows = down_factor(layer).weight.shape[0]
            self.bounds.append((start, start + rows))
            start += rows
        # each member's view: (address, shape); the stacked weight is held here, so no other tensor can take
        # the address while this object lives, and a factor moved, cast or replaced is a new tensor elsewhere
        self._views = [(weight.data_ptr() + start * weight.stride(0) * weight.element_size(),
                        torch.Size((end - start, weight.shape[1]))) for start, end in self.bounds]
        # decode-sized inputs share the product too, unless a layer of the group makes its own in one call
        self.shared_when_decoding = weight.device.type != "cpu" or not any(map(makes_one_call_when_decoding, layers))
        self._per_thread = threading.local()  # each thread its own input and product: a server's threads share a model

    def __getstate__(self) -> dict[str, Any]:  # copied or pickled without the threads' products
        return {k: v for k, v in self.__dict__.items() if k != "_per_thread"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._per_thread = threading.local()

    def is_view_of_weight(self, factor: torch.Tensor, index: int) -> bool:
        """Whether `factor` still is rows bounds[index] of the stacked weight (not moved, cast or replaced)."""
        address, shape = self._views[index]
        w = self.weight
        return factor.data_ptr() == address and factor.shape == shape and factor.dtype == w.dtype and factor.device == w.device

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the group's layers take their first product from the shared one for this input."""
        return self.shared_when_decoding or x.numel() > DENSE_KERNEL_MAX_TOKENS * x.shape[-1]

    def share(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x D_indexᵀ: a slice of x Dᵀ, computed when this input comes first (or again)."""
        version = x._version if not x.is_inference() else 0  # inference tensors cannot change in place
        state = self._per_thread
        pending = getattr(state, "pending", None)
        if pending is None or state.input is not x or state.version != version or index not in pending:
            state.input, state.version = x, version
            state.product = linear(x, self.weight)
            state.pending = pending = set(range(len(self.bounds)))
        product = state.product
        pending.discard(index)
        if not pending:  # every layer took its share: hold nothing between calls
            state.input = state.product = state.pending = None
        start, end = self.bounds[index]
        return product[..., start:end]


def _clone_views(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the fused factor is saved as its own tensor, not as a view sharing the stacked storage."""
    factor = down_factor(module)
    name = prefix + ("down.weight" if isinstance(module, LowRankLinear) else "atoms.weight")
    if name in state_dict and state_dict[name].untyped_storage().nbytes() != factor.weight.numel() * factor.weight.element_size():
        state_dict[name] = state_dict[name].clone()


MADV_DONTNEED = 4  # Linux


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings backed by a file (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            spans.append((start, end))
    return spans


def release_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop from this process's resident set the whole pages of `tensor` (no longer used) when they lie in a
    file mapping (a memory-mapped checkpoint): they would otherwise stay resident next to their copy in the
    stacked factor. The file is unchanged; the pages would be read again if touched. Anything else: no-op."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    page = os.sysconf("SC_PAGE_SIZE")
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if last > first and any(start <= first and last <= end for start, end in mappings):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def release_freed_heap() -> None:
    """Hand the heap pages that loading freed back to the OS (glibc's malloc_trim(0); elsewhere nothing).
    Loading leaves freed memory between live blocks of the heap: the factors copied into stacked matrices
    (`fuse_down_factors`) and, at another dtype than the files', the converted copies of every tensor.
    glibc keeps such pages resident until the process trims them. On SmolLM2-135M at budget 0.3 loaded in
    bfloat16 from float32 files, trimming once after loading lowered the peak RSS of a 512-token prefill and
    32 decode steps from 799-803 to 766-779 MiB for the default recipe (dense: 799-809), and by 15-20 MiB for
    pure low rank (bench/results/runtime_memory_884ad23.md against runtime_memory_load_trim.md); in float32
    the change was within the runs' spread."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def fuse_down_factors(layers: list[nn.Module]) -> SharedInputProduct | None:
    """Stack the first factors of `layers` (which must read one input) into one matrix; None (nothing done)
    for fewer than two fusable layers or mixed dtypes / devices."""
    layers = [layer for layer in layers if isinstance(layer, FUSABLE)]
    if len(layers) < 2:
        return None
    factors = [down_factor(layer).weight for layer in layers]
    if len({(f.dtype, f.device, f.shape[1]) for f in factors}) != 1:
        return None
    weight = torch.cat([f.detach() for f in factors])
    shared = SharedInputProduct(weight, layers)
    mappings = file_mappings()
    for index, layer in enumerate(layers):
        start, end = shared.bounds[index]
        # the view keeps the factor's requires_grad: a model loaded to be fine-tuned trains it (its own product then)
        down_factor(layer).weight = nn.Parameter(weight[start:end], requires_grad=factors[index].requires_grad)
        release_file_pages(factors[index], mappings)
        setattr(layer, "shared_input", (shared, index))  # noqa: B010  (the form's attribute, any FUSABLE)
        if not getattr(layer, "_clones_fused_views", False):
            layer._register_state_dict_hook(_clone_views)
            setattr(layer, "_clones_fused_views", True)  # noqa: B010
    return shared


def unfuse(model: nn.Module) -> None:
    """Every layer computes its own first product again (the factors stay views: memory is unchanged)."""
    for module in model.modules():
        if isinstance(module, FUSABLE):
            module.shared_input = None

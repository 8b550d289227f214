"""`SparseMatrix`: a sparse rows x cols matrix stored compactly, and what that storage costs in bytes.

Two layouts, whichever stores fewer bytes for the given non-zero count:
- "csr":     values (nnz,), col_indices (nnz,) int16 (int32 when cols > 32767), row_offsets (rows + 1,) int32;
             bytes = nnz · (value_bytes + index_bytes) + 4 (rows + 1).
- "bitmask": values (nnz,) in row-major order of the set bits, bitmask (rows, ⌈cols / 8⌉) uint8, bit j % 8
             of byte j // 8 set where column j is non-zero; bytes = nnz · value_bytes + rows ⌈cols / 8⌉.
An index costs as much as a bfloat16 value, so the bitmask wins once more than 1/16 of the slots are
non-zero. Every tensor is in the state dict, so the checkpoint holds exactly what `layout_bytes` counts
(plus the safetensors header).
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_kernels, gpu_kernels

LAYOUTS = ("csr", "bitmask")
# Up to this many tokens per call (decoding) the kernels multiply from the stored layout; above (prefill)
# the matrix is densified for the call (on CPU a block of rows at a time) and dense matmuls run (measured
# on SmolLM2-135M's mixing shapes, 2 CPU threads: see bench/runtime.py and notes in docs/design.md). The GPU
# kernel takes as many at once.
KERNEL_MAX_TOKENS = gpu_kernels.MAX_TOKENS
DENSIFIED_ON_DEVICE = (
    "sparse layers on {device} without lrc's kernels (there: the bitmask layout with Triton) are densified with torch "
    "for every call (measured on an NVIDIA H100, bfloat16: 10-30x a dense layer's time); to run on a GPU, use the "
    "dense equivalent (`lrc export OUT --dense -o DIR`) or an output of `lrc compress --objective latency --device "
    "cuda`, which prices forms by their time there"
)
_warned_devices: set[str] = set()


class _KernelPlan(NamedTuple):
    """What a matrix's kernels read, made for one state of its stored tensors."""

    state: tuple[tuple[weakref.ref[torch.Tensor], int, int], ...]  # per stored tensor: itself, address, version
    starts: torch.Tensor | None  # None: no kernel runs (see SparseMatrix.kernel_row_starts)
    cpu_matmul: cpu_kernels.BoundMatmul | None  # the CPU kernel's product, its addresses bound

    def made_for(self, stored: tuple[torch.Tensor, ...]) -> bool:
        """Whether `stored` are the tensors this was made for, at the same addresses, unchanged in place."""
        for t, (ref, address, version) in zip(stored, self.state, strict=True):
            if ref() is not t or t.data_ptr() != address or (not t.is_inference() and t._version != version):
                return False
        return True


def index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def layout_bytes(layout: str, rows: int, cols: int, nnz: int, value_bytes: int) -> int:
    """Bytes a `layout` stores for `nnz` non-zeros of a rows x cols matrix, values at `value_bytes` each."""
    if layout == "csr":
        return nnz * (value_bytes + index_dtype(cols).itemsize) + 4 * (rows + 1)
    if layout == "bitmask":
        return nnz * value_bytes + rows * math.ceil(cols / 8)
    raise ValueError(f"unknown sparse layout {layout!r} (use one of {LAYOUTS})")


def best_layout(rows: int, cols: int, nnz: int, value_bytes: int) -> tuple[str, int]:
    """(layout, bytes) of the cheaper layout for this many non-zeros."""
    return min(((layout, layout_bytes(layout, rows, cols, nnz, value_bytes)) for layout in LAYOUTS), key=lambda x: x[1])


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ⌈cols / 8⌉), bit j % 8 of byte j // 8 = mask[:, j]."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_bits: uint8 (rows, ⌈cols / 8⌉) -> bool (rows, cols)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def bitmask_row_starts(bitmask: torch.Tensor, cols: int, nnz: int) -> torch.Tensor:
    """(rows + 1,) int64: where each row's values start, for a bitmask (rows, ⌈cols / 8⌉). Checks what the
    kernels (CPU and GPU) rely on: no bit set past column `cols` and exactly `nnz` bits set in all (else ValueError)."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)
    if bool(bits[:, cols:].any()):
        raise ValueError(f"sparse bitmask sets bits past its {cols} columns")
    starts = torch.zeros(bitmask.shape[0] + 1, dtype=torch.int64, device=bitmask.device)
    starts[1:] = bits.sum(1, dtype=torch.int64).cumsum(0)
    if int(starts[-1]) != nnz:
        raise ValueError(f"sparse bitmask sets {int(starts[-1])} bits for {nnz} stored values")
    return starts


def csr_row_ids(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) int64: the row of each stored value, from the csr row offsets (rows + 1,)."""
    counts = (row_offsets[1:] - row_offsets[:-1]).long()
    rows = torch.arange(counts.numel(), device=counts.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)  # sized: no device-to-host sync


def stored_to_dense(layout: str, rows: int, cols: int, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The rows x cols matrix from its stored tensors ((values, bitmask) or (values, col_indices, row_offsets)),
    zeros included, built with torch ops whose output sizes are known up front (no boolean-mask indexing), so
    that on a GPU nothing waits for the device: entry k of the bitmask's row-major set bits is values[k],
    found as (number of set bits up to and including it) - 1."""
    values = stored[0]
    if layout == "csr":
        dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        dense[csr_row_ids(stored[2], values.numel()), stored[1].long()] = values
        return dense
    if values.numel() == 0:
        return torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    mask = unpack_bits(stored[1], cols).reshape(-1)
    positions = mask.cumsum(0, dtype=torch.int32).sub_(1).clamp_(min=0)
    return torch.where(mask, values[positions], 0).reshape(rows, cols)


def kernel_dense(layout: str, cols: int, stored: tuple[torch.Tensor, ...], starts: torch.Tensor, start: int = 0,
                 end: int | None = None) -> torch.Tensor:
    """Rows start:end (default: all) of stored_to_dense through a kernel (one pass over the stored layout);
    `starts` from the kernel plan. On CPU the offsets into the stored values are absolute, so a block of rows
    reads them where the whole matrix's would; the GPU kernel makes every row."""
    if stored[0].device.type != "cpu":
        assert start == 0 and end is None, "the GPU kernel densifies the whole matrix"
        return gpu_kernels.bitmask_dense(stored[0], stored[1], starts, cols)
    if layout == "bitmask":
        return cpu_kernels.bitmask_dense(stored[0], stored[1][start:end], starts[start:], cols)
    return cpu_kernels.csr_dense(stored[0], stored[1], stored[2][start : None if end is None else end + 1], cols)


def torch_dense_rows(layout: str, rows: int, cols: int,
                     stored: tuple[torch.Tensor, ...]) -> Callable[[int, int], torch.Tensor]:
    """(start, end) -> rows start:end of stored_to_dense, by torch ops: all rows in one piece as before, a
    block from the row offsets, computed for the first block that needs them (on CPU)."""
    offsets: list[torch.Tensor] = []

    def dense_rows(start: int, end: int) -> torch.Tensor:
        if start == 0 and end == rows:
            return stored_to_dense(layout, rows, cols, stored)
        if not offsets:
            offsets.append(stored[2] if layout == "csr" else bitmask_row_starts(stored[1], cols, stored[0].numel()))
        return stored_to_dense(layout, end - start, cols, stored_rows(layout, stored, offsets[0], start, end))

    return dense_rows


def stored_rows(layout: str, stored: tuple[torch.Tensor, ...], offsets: torch.Tensor, start: int,
                end: int) -> tuple[torch.Tensor, ...]:
    """The stored tensors of rows start:end alone, as stored_to_dense takes them (offsets (rows + 1,): where
    each row's values start; on CPU)."""
    first, last = int(offsets[start]), int(offsets[end])
    if layout == "bitmask":
        return stored[0][first:last], stored[1][start:end]
    return stored[0][first:last], stored[1][first:last], stored[2][start : end + 1] - first


def check_csr(cols: int, stored: tuple[torch.Tensor, ...]) -> None:
    """ValueError unless the csr row offsets and column indices are in range for the stored values."""
    values, col_indices, offsets = stored
    nnz = values.numel()
    ok = int(offsets[0]) == 0 and int(offsets[-1]) == nnz and bool((offsets[1:] >= offsets[:-1]).all())
    ok = ok and col_indices.numel() == nnz and (nnz == 0 or (int(col_indices.min()) >= 0 and int(col_indices.max()) < cols))
    if not ok:
        raise ValueError("sparse matrix in the csr layout has row offsets or column indices out of range")


def make_plan(layout: str, cols: int, stored: tuple[torch.Tensor, ...]) -> _KernelPlan:
    """What the kernels read for `stored` in their current state, checked for consistency (ValueError)."""
    values = stored[0]
    state = tuple((weakref.ref(t), t.data_ptr(), 0 if t.is_inference() else t._version) for t in stored)
    if values.device.type == "cpu":
        narrow = layout == "bitmask" or stored[1].dtype == torch.int16
        kernel = narrow and cpu_kernels.available(values)
    else:
        kernel = layout == "bitmask" and gpu_kernels.available(values)
    if not (kernel and all(t.is_contiguous() for t in stored)):
        return _KernelPlan(state, None, None)
    if layout == "csr":
        check_csr(cols, stored)
        return _KernelPlan(state, stored[2], cpu_kernels.csr_matmul_fn(stored[0], stored[1], stored[2], cols))
    if values.device.type != "cpu":  # the GPU kernels start each split of the columns
        return _KernelPlan(state, outside_graph_pools(
            lambda: gpu_kernels.split_starts(bitmask_row_starts(stored[1], cols, values.numel()), stored[1], cols)), None)
    starts = bitmask_row_starts(stored[1], cols, values.numel())
    return _KernelPlan(state, starts, cpu_kernels.bitmask_matmul_fn(values, stored[1], starts, cols))


def outside_graph_pools(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """make() run in a helper thread and finished there: torch.compile's CUDA graphs (mode="reduce-overhead")
    put every allocation of the thread running a compiled graph into the graph's private memory pool, and
    refuse a tensor that outlives the run there; a kernel plan is made on the first call and kept, so it is
    allocated from the ordinary pool of another thread."""
    result: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(make())
            if result[0].is_cuda:  # done before the caller's stream reads it
                torch.cuda.synchronize(result[0].device)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    helper = threading.Thread(target=run, name="lrc-kernel-plan")
    helper.start()
    helper.join()
    if errors:
        raise errors[0]
    return result[0]


def multiply(layout: str, rows: int, cols: int, stored: tuple[torch.Tensor, ...], plan: _KernelPlan,
             x: torch.Tensor) -> torch.Tensor:
    """x (tokens, cols) -> x Sᵀ (tokens, rows) for the matrix S of `stored`, `plan` made for them: the kernel's
    product from the stored layout up to KERNEL_MAX_TOKENS tokens, the matrix densified for the call above."""
    tokens = x.shape[0]
    values = stored[0]
    if cpu_kernels.gradients_flow(x, values):  # lrc's kernels have no backward: torch's densifying has
        return torch_product(layout, rows, cols, stored, x)
    matmul = plan.cpu_matmul
    if matmul is not None and tokens <= KERNEL_MAX_TOKENS and x.dtype == matmul.dtype and x.is_cpu:  # decoding
        return matmul(x)
    starts = plan.starts if x.dtype == values.dtype else None
    if starts is not None and not x.is_cpu and tokens and not gpu_kernels.agree(
            values, stored[1], starts, cols, lambda: stored_to_dense(layout, rows, cols, stored), x):
        starts = None
    if starts is None:
        if not x.is_cpu and x.device.type not in _warned_devices:  # once per process and device type
            _warned_devices.add(x.device.type)
            warnings.warn(DENSIFIED_ON_DEVICE.format(device=x.device.type), stacklevel=3)
        return torch_product(layout, rows, cols, stored, x)
    if tokens > KERNEL_MAX_TOKENS and x.is_cpu:  # compute bound: dense matmuls, the matrix densified by blocks
        return cpu_kernels.product_by_row_blocks(
            x, rows, lambda start, end: kernel_dense(layout, cols, stored, starts, start, end))
    if tokens > KERNEL_MAX_TOKENS:  # densified for this call, one dense matmul
        return cpu_kernels.linear(x, kernel_dense(layout, cols, stored, starts))
    return gpu_kernels.bitmask_matmul(values, stored[1], starts, cols, x)  # memory bound on a GPU


def torch_product(layout: str, rows: int, cols: int, stored: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """x Sᵀ with the matrix densified by torch (differentiable in the stored values and x): on CPU a block of
    rows at a time (torch's densifying holds several times a block's bytes), elsewhere whole."""
    if x.is_cpu:
        return cpu_kernels.product_by_row_blocks(x, rows, torch_dense_rows(layout, rows, cols, stored))
    return cpu_kernels.linear(x, stored_to_dense(layout, rows, cols, stored))


_OP_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # stored values -> their plan, for calls through the op


def _sparse_matmul(x: torch.Tensor, stored: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """`multiply` for the stored tensors alone ([values, bitmask] or [values, col_indices, row_offsets]), the plan
    kept per values tensor: what a compiled graph calls."""
    tensors = tuple(stored)
    layout = "bitmask" if len(tensors) == 2 else "csr"
    plan = _OP_PLANS.get(tensors[0])
    if plan is None or not plan.made_for(tensors):
        plan = _OP_PLANS[tensors[0]] = make_plan(layout, cols, tensors)
    return multiply(layout, rows, cols, tensors, plan, x)


# the product as one custom op for torch.compile / torch.export (see cpu_kernels.register_op)
sparse_matmul_op = cpu_kernels.register_op(__name__, "sparse_matmul", _sparse_matmul,
                                           "(Tensor x, Tensor[] stored, int rows, int cols) -> Tensor",
                                           lambda x, stored, rows, cols: x.new_empty(x.shape[0], rows))


class SparseMatrix(nn.Module):
    """A rows x cols matrix with `nnz` stored entries, in the "csr" or "bitmask" layout (see module doc).

    `to_dense()` rebuilds the matrix (zeros included); `forward(h)` = h @ Sᵀ, h (..., cols) -> (..., rows).
    In memory the matrix holds its stored tensors only (plus, for the bitmask, the start of each row's
    values: 8 bytes per row). On CPU in float32 / bfloat16 the C kernels of `cpu_kernels`, on a GPU (the
    bitmask layout, where torch has Triton) the Triton kernels of `gpu_kernels`, multiply from the stored
    layout for up to KERNEL_MAX_TOKENS tokens, and densify the matrix for the call (one pass) before a dense
    matmul above that; elsewhere (other dtypes, the csr layout on a GPU, no C compiler or no Triton) it is
    densified with torch on every call. In a graph torch.compile traces, the product is the custom op
    `sparse_matmul_op`, which runs the same code.
    """

    col_indices: torch.Tensor
    row_offsets: torch.Tensor
    bitmask: torch.Tensor

    def __init__(
        self,
        rows: int,
        cols: int,
        nnz: int,
        layout: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (use one of {LAYOUTS})")
        self.rows, self.cols, self.nnz, self.layout = rows, cols, nnz, layout
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype), requires_grad=False)
        if layout == "csr":
            self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype(cols), device=device))
            self.register_buffer("row_offsets", torch.zeros(rows + 1, dtype=torch.int32, device=device))
        else:
            self.register_buffer("bitmask", torch.zeros(rows, math.ceil(cols / 8), dtype=torch.uint8, device=device))
        self._plan: _KernelPlan | None = None  # what the kernels read, for the stored tensors' state

    def __getstate__(self) -> dict[str, object]:
        """Pickled and deep-copied without the kernel plan (weak references and C addresses): a copy makes
        its own on its first call."""
        return {**self.__dict__, "_plan": None}

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor, layout: str | None = None) -> SparseMatrix:
        """Store dense[mask] (rows x cols); layout None picks the cheaper one at dense's dtype."""
        rows, cols = dense.shape
        nnz = int(mask.sum())
        layout = layout or best_layout(rows, cols, nnz, dense.element_size())[0]
        matrix = cls(rows, cols, nnz, layout, device=dense.device, dtype=dense.dtype)
        matrix.values.data = dense[mask].contiguous()  # boolean indexing is row-major, as both layouts need
        if layout == "csr":
            matrix.col_indices = mask.nonzero()[:, 1].to(index_dtype(cols))
            offsets = torch.zeros(rows + 1, dtype=torch.int64, device=dense.device)
            offsets[1:] = mask.sum(1).cumsum(0)
            matrix.row_offsets = offsets.to(torch.int32)
        else:
            matrix.bitmask = pack_bits(mask)
        return matrix

    def mask(self) -> torch.Tensor:
        """bool (rows, cols): where the stored entries are."""
        if self.layout == "bitmask":
            return unpack_bits(self.bitmask, self.cols)
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool, device=self.values.device)
        mask[csr_row_ids(self.row_offsets, self.nnz), self.col_indices.long()] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        """The rows x cols matrix, zeros included (see stored_to_dense)."""
        return stored_to_dense(self.layout, self.rows, self.cols, self._stored())

    def stored_bytes(self) -> int:
        """Bytes of every tensor this matrix stores (values, indices or bitmask, offsets)."""
        return sum(t.numel() * t.element_size() for t in [self.values, *self.buffers()])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, self.cols)
        if torch.compiler.is_compiling():  # one opaque op in the graph (see sparse_matmul_op)
            y = sparse_matmul_op(x, list(self._stored()), self.rows, self.cols)
        else:
            y = multiply(self.layout, self.rows, self.cols, self._stored(), self._kernel_plan(), x)
        return y.reshape(*h.shape[:-1], self.rows)

    def after_dense(self, first: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        """(h firstᵀ) Sᵀ in one kernel call, first (cols, in) dense, h (..., in) -> (..., rows), for as many tokens
        as cpu_kernels.kernel_tokens takes, in the bitmask layout; None elsewhere (the caller makes two products).
        The token count is checked first: a prefill call costs no plan check here."""
        tokens = cpu_kernels.kernel_tokens(h, first)
        if not tokens:
            return None
        matmul = self._kernel_plan().cpu_matmul
        return None if matmul is None else matmul.after_dense(first, h, tokens)

    def kernel_dense(self, starts: torch.Tensor) -> torch.Tensor:
        """to_dense() through a kernel (one pass over the stored layout); `starts` from kernel_row_starts."""
        return kernel_dense(self.layout, self.cols, self._stored(), starts)

    def _stored(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, read from the module's dicts: this runs on every call, and nn.Module's attribute
        lookup cost more than the rest of the check."""
        values, buffers = self._parameters["values"], self._buffers
        if self.layout == "bitmask":
            return values, buffers["bitmask"]  # type: ignore[return-value]
        return values, buffers["col_indices"], buffers["row_offsets"]  # type: ignore[return-value]

    def kernel_row_starts(self) -> torch.Tensor | None:
        """None where no kernel runs (on CPU: not float32 / bfloat16, int32 indices, no compiler; on a GPU: not
        the bitmask layout, no Triton); else the start of each row's values ((rows + 1,) int64 for the bitmask,
        the row offsets for csr; on a GPU, per split of the columns: gpu_kernels.split_starts)."""
        return self._kernel_plan().starts

    def _kernel_plan(self) -> _KernelPlan:
        """What the kernels read, checked once per state of the stored tensors (the same tensor objects, at the
        same addresses, unchanged in place): it must be consistent (ValueError otherwise). The plan refers to
        the tensors weakly, so a tensor freed and another made at its address is a new state. Tensors made
        under torch.inference_mode have no version counter: for them a change in place is not seen."""
        stored = self._stored()
        plan = self._plan
        if plan is None or not plan.made_for(stored):
            plan = self._plan = self._make_plan(stored)
        return plan

    def _make_plan(self, stored: tuple[torch.Tensor, ...]) -> _KernelPlan:
        if self.values.numel() != self.nnz:
            raise ValueError(f"sparse matrix holds {self.values.numel()} values for {self.nnz} entries")
        return make_plan(self.layout, self.cols, stored)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, nnz={self.nnz}, layout={self.layout}"

"""`cpu_kernels.linear`: a few bfloat16 tokens through the C kernel, more in float32 on an x86 CPU without
AMX, each against a float64 product; everything else is torch's own."""

from __future__ import annotations

import pytest
import torch

from lrc.forms import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler for lrc's kernels")


@needs_kernels
@pytest.mark.parametrize("rows, cols", [(1, 5), (3, 16), (7, 33), (61, 300), (130, 576)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("tokens", [1, 3, cpu_kernels.DENSE_KERNEL_MAX_TOKENS])
def test_few_bf16_tokens_run_the_kernel_and_match_float64(monkeypatch, rows, cols, bias, tokens):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=g).bfloat16()
    b = torch.randn(rows, generator=g).bfloat16() if bias else None
    x = torch.randn(tokens, 1, cols, generator=g).bfloat16()
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    monkeypatch.setattr(torch.nn.functional, "linear", None)  # the kernel must not fall back to torch
    y = cpu_kernels.linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, 1, rows)
    # float32 accumulation, then one rounding to bfloat16 (relative 2^-9)
    bound = 2.0**-8 * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("in_float32", [True, False], ids=["x86 without AMX", "elsewhere"])
@pytest.mark.parametrize("tokens", [cpu_kernels.DENSE_KERNEL_MAX_TOKENS + 1, 64])
def test_more_bf16_tokens_run_in_float32_without_amx_and_match_float64(monkeypatch, in_float32, tokens):
    monkeypatch.setattr(cpu_kernels, "BF16_PRODUCTS_IN_FLOAT32", in_float32)
    g = torch.Generator().manual_seed(tokens)
    w, b = torch.randn(130, 576, generator=g).bfloat16(), torch.randn(130, generator=g).bfloat16()
    x = torch.randn(1, tokens, 576, generator=g).bfloat16()
    exact = x.double() @ w.double().T + b.double()
    torch_linear, products = torch.nn.functional.linear, []

    def recorded(*args):
        products.append(args[0].dtype)
        return torch_linear(*args)

    monkeypatch.setattr(torch.nn.functional, "linear", recorded)
    y = cpu_kernels.linear(x, w, b)
    assert products == [torch.float32 if in_float32 else torch.bfloat16]
    assert y.dtype == torch.bfloat16 and y.shape == (1, tokens, 130)
    bound = 2.0**-8 * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 37, 130])
@pytest.mark.parametrize("tokens", [20, 1152], ids=["weight-bound", "product-bound"])
def test_a_product_by_row_blocks_makes_its_weight_a_block_at_a_time(monkeypatch, dtype, rows, tokens):
    """The weight's rows are asked for in blocks of at most BLOCK_BYTES at the product's dtype (bfloat16 made
    in float32: CONVERTED_BLOCK_BYTES), as weight rows (rows x 576) and as product columns (tokens x rows),
    each once, in order; the product is x Wᵀ + b as float64 computes it, in x's dtype."""
    monkeypatch.setattr(cpu_kernels, "BLOCK_BYTES", 4 * 576 * 16)  # 16 float32 rows of 576, 8 columns of 1152
    monkeypatch.setattr(cpu_kernels, "CONVERTED_BLOCK_BYTES", 4 * 576 * 8)  # bfloat16 made in float32: half that
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(rows, 576, generator=g).to(dtype), torch.randn(rows, generator=g).to(dtype)
    x = torch.randn(2, tokens // 2, 576, generator=g).to(dtype)
    asked: list[tuple[int, int]] = []

    def block(start, end):
        asked.append((start, end))
        return w[start:end]

    y = cpu_kernels.product_by_row_blocks(x, rows, block, b)
    assert y.dtype == dtype and y.shape == (2, tokens // 2, rows)
    per_block = 16 if tokens <= 576 else 8
    if dtype == torch.bfloat16:  # in float32 (half the bytes per block), or bfloat16 (half the bytes per value)
        per_block = per_block // 2 if cpu_kernels.BF16_PRODUCTS_IN_FLOAT32 else per_block * 2
    assert asked == [(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]
    exact = x.double() @ w.double().T + b.double()
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    bound = rounding * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("case", ["float32", "gradient"])
def test_other_calls_are_torchs_linear(case):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    w = torch.randn(9, 40, generator=g).to(dtype).requires_grad_(case == "gradient")
    x = torch.randn(1, 40, generator=g).to(dtype)
    y = cpu_kernels.linear(x, w)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    if case == "gradient":
        y.sum().backward()
        assert w.grad is not None and torch.equal(w.grad, x.expand(9, 40))  # d Σ x wᵀ / dw: x in every row


def rounded_chain(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x firstᵀ, rounded to x's dtype) secondᵀ + bias in float64: what two products of the dtype compute."""
    between = (x.double() @ first.double().T).to(x.dtype).double()
    return between @ second.double().T + (0 if bias is None else bias.double())


def assert_near(y: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
    """Within float32 accumulation of both products, one rounding of the result (and of the product between)."""
    unit = 2.0**-8 if y.dtype == torch.bfloat16 else 2.0**-20
    magnitude = (x.double().abs() @ first.double().abs().T) @ second.double().abs().T
    assert ((y.double() - exact).abs() <= unit * (exact.abs() + magnitude)).all()


@needs_kernels
@pytest.mark.parametrize("rank, cols, rows", [(1, 5, 3), (9, 48, 37), (61, 576, 300)])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("tokens", [1, 3, cpu_kernels.DENSE_KERNEL_MAX_TOKENS])
def test_low_rank_product_in_one_call_matches_two_products(monkeypatch, rank, cols, rows, bias, tokens):
    dtype = torch.bfloat16  # float32 keeps torch's two products (see lowrank_linear)
    g = torch.Generator().manual_seed(rank + tokens)
    down, up = torch.randn(rank, cols, generator=g).to(dtype), torch.randn(rows, rank, generator=g).to(dtype)
    b = torch.randn(rows, generator=g).to(dtype) if bias else None
    x = torch.randn(1, tokens, cols, generator=g).to(dtype)
    exact = rounded_chain(x, down, up, b)
    monkeypatch.setattr(torch.nn.functional, "linear", None)  # one kernel call, no torch product
    y = cpu_kernels.lowrank_linear(x, down, up, b)
    assert y is not None and y.dtype == dtype and y.shape == (1, tokens, rows)
    assert_near(y, exact, x, down, up)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("atoms, cols, rows, density", [(20, 48, 37, 0.5), (416, 576, 1536, 0.12), (70, 33, 5, 0.02)])
@pytest.mark.parametrize("tokens", [1, 2, cpu_kernels.DENSE_KERNEL_MAX_TOKENS])
def test_sparse_after_dense_in_one_call_matches_two_products(monkeypatch, dtype, atoms, cols, rows, density, tokens):
    from lrc.forms.sparse_matrix import SparseMatrix

    g = torch.Generator().manual_seed(atoms + tokens)
    first = torch.randn(atoms, cols, generator=g).to(dtype)
    mask = torch.rand(rows, atoms, generator=g) < density
    mixing = SparseMatrix.from_dense((torch.randn(rows, atoms, generator=g) * mask).to(dtype), mask, "bitmask")
    x = torch.randn(tokens, 1, cols, generator=g).to(dtype)
    exact = rounded_chain(x, first, mixing.to_dense(), None)
    monkeypatch.setattr(torch.nn.functional, "linear", None)
    y = mixing.after_dense(first, x)
    assert y is not None and y.dtype == dtype and y.shape == (tokens, 1, rows)
    assert_near(y, exact, x, first, mixing.to_dense())


@needs_kernels
@pytest.mark.parametrize("case", ["prefill", "float64", "gradient", "mixed dtypes", "csr", "float32 low rank"])
def test_products_in_one_call_decline_what_they_do_not_take(case):
    """None: the layer then makes its two products with torch (or the sparse matrix's own path)."""
    from lrc.forms.sparse_matrix import SparseMatrix

    tokens = cpu_kernels.DENSE_KERNEL_MAX_TOKENS + 1 if case == "prefill" else 1
    dtype = {"float64": torch.float64, "float32 low rank": torch.float32}.get(case, torch.bfloat16)
    down, up = torch.randn(4, 16, dtype=dtype), torch.randn(8, 4, dtype=dtype)
    x = torch.randn(tokens, 16, dtype=torch.float32 if case == "mixed dtypes" else dtype)
    if case == "gradient":
        down.requires_grad_(True)
    mask = torch.rand(8, 4) < 0.5
    mixing = SparseMatrix.from_dense(torch.randn(8, 4, dtype=dtype) * mask, mask, "csr" if case == "csr" else "bitmask")
    if case != "csr":
        assert cpu_kernels.lowrank_linear(x, down, up) is None
    if case != "float32 low rank":
        assert mixing.after_dense(down, x) is None
    else:  # the sparse dictionary's one call takes float32
        assert mixing.after_dense(down, x) is not None

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

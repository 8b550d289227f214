"""Layer forms against the dense reference x @ dense_weight().T (float32, bfloat16; decode and prefill shapes),
fused first factors against unfused layers, and a loaded lrc output: tensors in memory = bytes in the file,
same outputs after save / load."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch
from torch import nn

import lrc
from lrc.forms import LowRankLinear, cpu_kernels
from lrc.forms.fused import fuse_down_factors, release_freed_heap, unfuse
from lrc.forms.sparse_linear import LowRankSparseLinear, SparseDictionaryLinear
from lrc.forms.sparse_matrix import KERNEL_MAX_TOKENS
from lrc.peak_memory import held_tensor_bytes, process_status_bytes

from ..test_pipeline import config, logits

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPES = [(1, 1), (3, 1), (1, KERNEL_MAX_TOKENS), (2, 7), (1, 40)]  # decode, batched decode, a few tokens, prefill


def random_layers(n: int, m: int, seed: int, bias: bool = False) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, generator=g) if bias else None
    mixing = torch.randn(m, 20, generator=g) * (torch.rand(m, 20, generator=g) < 0.5)
    residual = torch.randn(m, n, generator=g) * (torch.rand(m, n, generator=g) < 0.03)
    return {
        "low-rank": LowRankLinear.from_factors(torch.randn(m, 9, generator=g), torch.randn(9, n, generator=g), b),
        "sparse-dictionary": SparseDictionaryLinear.from_factors(mixing, torch.randn(20, n, generator=g), b),
        "low-rank-sparse": LowRankSparseLinear.from_factors(
            torch.randn(m, 5, generator=g), torch.randn(5, n, generator=g), residual, b, layout="csr"),
    }


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_bytes", [cpu_kernels.BLOCK_BYTES, 1000], ids=["", "blocks of rows"])
def test_every_form_computes_its_dense_weight(monkeypatch, kernels, dtype, shape, block_bytes):
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels)
    for constant in ("BLOCK_BYTES", "CONVERTED_BLOCK_BYTES"):  # 1000: prefill weights made 5-12 rows at a time
        monkeypatch.setattr(cpu_kernels, constant, block_bytes)
    for name, layer in random_layers(48, 37, seed=shape[1], bias=True).items():
        layer = layer.to(dtype)
        x = torch.randn(*shape, 48).to(dtype)
        bias = layer.up.bias if isinstance(layer, LowRankLinear) else layer.bias
        expected = x.double() @ layer.dense_weight().double().T + bias.double()
        got = layer(x)
        assert got.dtype == dtype and got.shape == (*shape, 37), name
        tol = TOLERANCE[dtype] * expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=TOLERANCE[dtype], atol=tol, msg=name)


def qkv_like(dtype: torch.dtype) -> list[nn.Module]:
    """Three layers reading one 48-wide input: two sparse dictionaries and a low-rank layer."""
    a, b, c = random_layers(48, 37, seed=1).values(), random_layers(48, 16, seed=2).values(), random_layers(48, 16, seed=3).values()
    return [next(iter(b)).to(dtype), list(a)[1].to(dtype), list(c)[1].to(dtype)]  # low-rank 16, sd 37, sd 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 40)])
def test_fused_layers_give_the_unfused_outputs(dtype, shape):
    layers = qkv_like(dtype)
    reference = copy.deepcopy(layers)
    shared = fuse_down_factors(layers)
    assert shared is not None and shared.weight.shape == (9 + 20 + 20, 48)
    x = torch.randn(*shape, 48).to(dtype)
    for _ in range(2):  # the same input twice: the product is recomputed, never stale
        for layer, ref in zip(layers, reference):
            torch.testing.assert_close(layer(x), ref(x), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert getattr(shared._per_thread, "product", None) is None  # every layer took its share: nothing held between calls
    y = torch.randn(*shape, 48).to(dtype)  # another input after one layer only: recomputed for that input
    layers[0](x)
    for layer, ref in zip(layers, reference):
        torch.testing.assert_close(layer(y), ref(y), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    x.mul_(2)  # an input changed in place between two layers of the group
    layers[0](x)
    x.mul_(-1)
    torch.testing.assert_close(layers[1](x), reference[1](x), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("group", ["f32 low rank", "bf16 low rank", "f32 with a sparse dictionary"])
def test_a_decoding_group_shares_its_product_unless_a_layer_makes_one_call(monkeypatch, group):
    """Decode-sized inputs on CPU: layers that make both products in one kernel call (bfloat16 low rank, a
    bitmask sparse dictionary) take no share, so their group computes no stacked product then; a prefill
    always does. Outputs as unfused either way."""
    from lrc.forms import fused

    dtype = torch.bfloat16 if group.startswith("bf16") else torch.float32
    low_rank = [random_layers(48, m, seed=m)["low-rank"].to(dtype) for m in (16, 37)]
    layers = low_rank if "low rank" in group else [low_rank[0], qkv_like(dtype)[1]]
    reference = copy.deepcopy(layers)
    assert fuse_down_factors(layers) is not None
    stacked = []
    monkeypatch.setattr(fused, "linear", lambda x, w: stacked.append(x.shape) or torch.nn.functional.linear(x, w))
    for shape in [(1, 1), (1, 40)]:
        stacked.clear()
        x = torch.randn(*shape, 48).to(dtype)
        for layer, ref in zip(layers, reference):
            torch.testing.assert_close(layer(x), ref(x), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        assert len(stacked) == (1 if shape[1] > 1 or group == "f32 low rank" else 0), shape


@pytest.mark.parametrize("tokens", [1, 8, KERNEL_MAX_TOKENS, 40])
@pytest.mark.parametrize("form", ["low-rank", "sparse-dictionary", "low-rank-sparse"])
def test_gradients_through_every_form_equal_the_dense_layers(form, tokens):
    """Where gradients flow, every product is torch's (lrc's kernels have no backward): the input's gradient is
    that of x Wᵀ, and each stored factor's (the sparse values too) that of W = the product of the factors,
    taken by autograd through their dense matrices."""
    layer = random_layers(48, 37, seed=4, bias=True)[form].requires_grad_(True)
    x = torch.randn(tokens, 48, requires_grad=True)
    g = torch.randn(tokens, 37)
    (layer(x) * g).sum().backward()
    params = dict(layer.named_parameters())
    dense = {name: (p.detach().clone().requires_grad_(True) if name.endswith("values") else p) for name, p in params.items()}
    x_ref = x.detach().clone().requires_grad_(True)
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in params.items() if not n.endswith("values")}
    matrices = {name.removesuffix(".values"): layer.get_submodule(name.removesuffix(".values")).mask()
                for name in params if name.endswith("values")}

    def matrix(name: str) -> torch.Tensor:  # a sparse factor as a dense matrix of its (differentiable) values
        mask = matrices[name]
        return torch.zeros(mask.shape, dtype=x.dtype).masked_scatter(mask, dense[f"{name}.values"])

    if form == "low-rank":
        w = reference["up.weight"] @ reference["down.weight"]
    elif form == "sparse-dictionary":
        w = matrix("mixing") @ reference["atoms.weight"]
    else:
        w = reference["up.weight"] @ reference["down.weight"] + matrix("residual")
    bias = reference["up.bias" if form == "low-rank" else "bias"]
    ((x_ref @ w.T + bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for name, p in params.items():
        expected = dense[name].grad if name.endswith("values") else reference[name].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-4)


def test_fused_factors_train_and_each_thread_shares_its_own_product():
    """A fused group where gradients flow: each layer's factor gets its own gradient (the group's stacked
    product is not used); and two threads running the group at once each get their own input's product."""
    layers = [layer.requires_grad_(True) for layer in qkv_like(torch.float32)]
    reference = copy.deepcopy(layers)
    shared = fuse_down_factors(layers)
    assert shared is not None
    x = torch.randn(2, 5, 48)
    for group in (layers, reference):
        sum(layer(x).square().sum() for layer in group).backward()
    for layer, ref in zip(layers, reference):
        for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    threads_share_one_group(layers, reference)


def threads_share_one_group(layers: list[nn.Module], reference: list[nn.Module], calls: int = 300) -> None:
    """Two threads run a fused group on their own inputs at once, the interpreter switching threads every
    microsecond: every output is its own input's (the group's input and product are per thread)."""
    import threading

    inputs = [torch.randn(1, 40, 48) for _ in range(2)]
    expected = [[ref(x).detach() for ref in reference] for x in inputs]
    wrong: list[int] = []

    def run(which: int) -> None:
        with torch.no_grad():
            for _ in range(calls):
                for layer, want in zip(layers, expected[which]):
                    if not torch.allclose(layer(inputs[which]), want, rtol=1e-5, atol=1e-5):
                        wrong.append(which)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(which,)) for which in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} calls got the other thread's product"


def test_fused_factors_are_views_and_follow_a_move():
    layers = qkv_like(torch.float32)
    reference = copy.deepcopy(layers)
    before = sum(held_tensor_bytes(layer) for layer in layers)
    shared = fuse_down_factors(layers)
    assert shared is not None
    assert held_tensor_bytes(nn.ModuleList(layers)) <= before + 8 * 64  # stacked once; the factors are views of it
    state = layers[1].state_dict()
    assert state["atoms.weight"].untyped_storage().nbytes() == state["atoms.weight"].numel() * 4  # saved on its own
    torch.testing.assert_close(state["atoms.weight"], reference[1].state_dict()["atoms.weight"])
    for layer in layers:
        layer.to(torch.float64)  # no longer views of the stacked factor: each layer computes its own product
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    for layer, ref in zip(layers, reference):
        torch.testing.assert_close(layer(x), ref.to(torch.float64)(x))
    assert all(layer.shared_input is None for layer in layers)  # they left the group: its stacked weight is freed
    unfuse(nn.ModuleList(layers))
    assert all(layer.shared_input is None for layer in layers)


@pytest.fixture(scope="module")
def sparse_output(tmp_path_factory, calib_file):
    from ..conftest import save_tiny_model

    root = tmp_path_factory.mktemp("sparse-output")
    model = save_tiny_model(root / "model", "llama")
    out = root / "out"
    lrc.compress(str(model), config(calib_file, budget=0.3, method="sparse-dictionary"), out)
    return out


def file_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_loaded_output_holds_its_file_bytes_and_round_trips(sparse_output, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sparse_output)
    kinds = {type(m) for m in model.modules()}
    assert SparseDictionaryLinear in kinds
    assert any(getattr(m, "shared_input", None) is not None for m in model.modules()), "no group was fused"
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    one = logits(model, ids[:, :1])
    assert held_tensor_bytes(model) <= 1.05 * file_bytes(sparse_output)  # after running: caches included
    unfused = AutoModelForCausalLM.from_pretrained(sparse_output)
    unfuse(unfused)
    torch.testing.assert_close(logits(unfused, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(unfused, ids[:, :1]), one, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=0)
    assert file_bytes(tmp_path / "again") <= 1.01 * file_bytes(sparse_output)
    # the saved folder carries lrc's modeling code as the output did: it loads without lrc too
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert type(remote).__name__ == "LrcLlamaForCausalLM"
    torch.testing.assert_close(logits(remote, ids), expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "not-main", False)  # is_main_process=False: transformers writes nothing
    assert not (tmp_path / "not-main" / "modeling_lrc.py").exists()
    copied = pickle.loads(pickle.dumps(model))  # torch.save, multiprocessing: the model pickles and keeps saving
    torch.testing.assert_close(logits(copied, ids), expected, rtol=0, atol=0)
    copied.save_pretrained(tmp_path / "from-copy")
    assert (tmp_path / "from-copy" / "modeling_lrc.py").is_file()


def test_loaded_at_another_dtype_keeps_no_pages_of_the_file(sparse_output):
    """float32 files loaded in bfloat16: the values are converted copies; the bitmasks / indices are copied out
    of the memory-mapped file too, so no tensor keeps the mapping (and every page it read) resident."""
    from transformers import AutoModelForCausalLM

    from lrc.forms.fused import file_mappings
    from lrc.forms.sparse_matrix import SparseMatrix

    model = AutoModelForCausalLM.from_pretrained(sparse_output, dtype=torch.bfloat16)
    mappings = file_mappings()
    matrices = [m for m in model.modules() if isinstance(m, SparseMatrix)]
    assert matrices
    for matrix in matrices:
        for t in [matrix.values, *matrix.buffers()]:
            assert not any(start <= t.data_ptr() < end for start, end in mappings)
    reference = AutoModelForCausalLM.from_pretrained(sparse_output)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, ids).float(), logits(reference, ids), rtol=0.1, atol=0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_heap_freed_while_loading_goes_back_to_the_os():
    """Blocks freed below a live one stay resident (the heap cannot shrink past it) until the process trims
    them: release_freed_heap hands their pages back, the live block untouched."""
    mib = 2**20
    blocks = [bytearray(b"x" * (60 * 1024)) for _ in range(800)]  # ~47 MiB of heap blocks, every page written
    live = bytearray(b"y" * (60 * 1024))
    del blocks
    resident = process_status_bytes("VmRSS")
    release_freed_heap()
    trimmed = process_status_bytes("VmRSS")
    assert resident is not None and trimmed is not None
    assert resident - trimmed > 30 * mib
    assert live == b"y" * (60 * 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_loaded_output_compiles_into_one_graph(sparse_output, dtype):
    """torch.compile(fullgraph=True) traces the whole model (fused groups, sparse products as lrc's custom op,
    no break at the kernels' checks) and gives the eager outputs for a prefill and a one-token call."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sparse_output, dtype=dtype)
    assert any(isinstance(m, SparseDictionaryLinear) for m in model.modules())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    for probe in (ids, ids[:, :1]):
        torch.testing.assert_close(logits(compiled, probe), logits(model, probe), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_a_sparse_layer_exports_with_lrcs_op():
    """torch.export keeps a sparse-dictionary layer's sparse product as lrc's custom op, and the exported program
    computes the layer's outputs."""
    layer = random_layers(48, 24, seed=5)["sparse-dictionary"]
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(6))
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "lrc.sparse_matmul.default" in targets
    torch.testing.assert_close(exported.module()(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)

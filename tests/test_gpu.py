"""CUDA results against the float64 CPU path (marker `gpu`; skipped, with the reason shown, without a GPU).

Tolerances, and why:
- statistics (input Grams Σ x xᵀ, output-gradient Grams): relative Frobenius difference <= 1e-4. The
  blocks run in float32 on both devices with different kernels (and summation orders), so activations
  differ by ~1e-6 relative; the products are summed in float64 on both.
- decompositions from the same (CPU) statistics: errors of every rank (relative to the total) and relative
  output errors within 1e-8 absolute: both devices decompose in float64 (eigh of the weighted Gram).
- sparse-dictionary options: errors within 1e-3 relative (the support selection may break a near-tie the
  other way, which moves an option's error slightly).
- the device executor against the serial one, both on the GPU: the same kernels on the same inputs, so
  within 1e-10 relative.
- end to end (statistics, decompositions, allocation on the GPU): held-out perplexity within 1% of the CPU run.

LRC_TEST_GPU_DEVICE=cpu runs this module on the CPU against itself (a dry run of the code paths only).
"""

from __future__ import annotations

import os

import pytest
import torch

from lrc.config import CompressionConfig
from lrc.engine import decompose_all
from lrc.sources import load_model
from lrc.stats.collect import collect_statistics

from .conftest import save_tiny_model, synthetic_text

DEVICE = os.environ.get("LRC_TEST_GPU_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE != "cpu" and not torch.cuda.is_available(),
                       reason=f"needs a CUDA GPU: torch {torch.__version__} sees none (bench/gpu_check.sh runs these)"),
]


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    text = root / "calib.txt"
    text.write_text(synthetic_text(60_000), encoding="utf-8")
    return save_tiny_model(root / "model", "llama"), text


def config_for(text, device: str, method: str = "loss-aware") -> CompressionConfig:
    return CompressionConfig(method=method, calib=str(text), samples=8, seq_len=32, batch_size=4, device=device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def test_statistics_on_the_gpu_match_the_cpu(model_and_text):
    model, text = model_and_text
    loaded = load_model(str(model))
    cpu = collect_statistics(loaded, config_for(text, "cpu"))
    gpu = collect_statistics(loaded, config_for(text, DEVICE))
    assert list(cpu.inputs) == list(gpu.inputs) and cpu.shares == gpu.shares
    for name, stats in cpu.inputs.items():
        assert gpu.inputs[name].gram.device.type == "cpu"  # handed back on the CPU
        assert relative(gpu.inputs[name].gram, stats.gram) <= 1e-4, name
        assert relative(gpu.inputs[name].abs_sum, stats.abs_sum) <= 1e-4, name
        assert gpu.inputs[name].tokens == stats.tokens
    for name, stats in cpu.outputs.items():
        other = gpu.outputs[name]
        assert relative(other.diag, stats.diag) <= 1e-4, name
        if stats.gram is not None:
            assert other.gram is not None and relative(other.gram, stats.gram) <= 1e-4, name


@pytest.mark.parametrize("method", ["loss-aware", "sparse-dictionary"])
def test_decompositions_on_the_gpu_match_the_float64_cpu_path(model_and_text, method):
    model, text = model_and_text
    loaded = load_model(str(model))
    stats = collect_statistics(loaded, config_for(text, "cpu", method))
    cpu = decompose_all(loaded, config_for(text, "cpu", method), stats, executor="serial")
    gpu = decompose_all(loaded, config_for(text, DEVICE, method), stats)  # the device executor on CUDA
    for name, dec in cpu.decompositions.items():
        other = gpu.decompositions[name]
        assert other.errors.device.type == "cpu" and other.up_full.device.type == "cpu"
        torch.testing.assert_close(other.relative_errors(), dec.relative_errors(), rtol=0, atol=1e-8)
        torch.testing.assert_close(gpu.output_errors[name], cpu.output_errors[name], rtol=0, atol=1e-8)
        assert other.up_full.shape == dec.up_full.shape and other.down_full.shape == dec.down_full.shape
        assert len(other.sparse_options) == len(dec.sparse_options)
        for a, b in zip(other.sparse_options, dec.sparse_options):
            assert a.error == pytest.approx(b.error, rel=1e-3), name


def test_device_executor_matches_serial_on_the_gpu(model_and_text):
    model, text = model_and_text
    loaded = load_model(str(model))
    config = config_for(text, DEVICE)
    stats = collect_statistics(loaded, config_for(text, "cpu"))
    serial = decompose_all(loaded, config, stats, executor="serial")
    device = decompose_all(loaded, config, stats, executor="device")
    for name, dec in serial.decompositions.items():
        other = device.decompositions[name]
        torch.testing.assert_close(other.errors, dec.errors, rtol=1e-10, atol=0)
        torch.testing.assert_close(other.up_full, dec.up_full, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(device.output_errors[name], serial.output_errors[name], rtol=1e-10, atol=0)


def test_compression_on_the_gpu_matches_the_cpu(model_and_text, tmp_path):
    from lrc.pipeline import compress

    model, text = model_and_text
    reports = {}
    for label, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        config = config_for(text, device).replace(heldout_windows=2)
        reports[label] = compress(str(model), config, tmp_path / label).report
    cpu, gpu = reports["cpu"]["held_out"], reports["gpu"]["held_out"]
    assert gpu["compressed_perplexity"] == pytest.approx(cpu["compressed_perplexity"], rel=0.01)
    assert gpu["dense_perplexity"] == pytest.approx(cpu["dense_perplexity"], rel=1e-4)
    assert (tmp_path / "gpu" / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["csr", "bitmask"])
def test_sparse_layers_on_the_gpu_compute_their_dense_product(layout, recwarn):
    """On the GPU a bitmask factor runs lrc's Triton kernels where torch has Triton (one token at a time up to
    KERNEL_MAX_TOKENS, densified by a kernel above), anything else is densified with torch for each call and
    says so once: every path's matrix equals the CPU's exactly, and a layer's output equals x @ Wᵀ with W its
    multiplied-out weight (float32, 1e-5 relative) at 3 and at 40 tokens."""
    from lrc.forms import LowRankSparseLinear, SparseDictionaryLinear, gpu_kernels, sparse_matrix
    from lrc.forms.sparse_matrix import SparseMatrix

    sparse_matrix._warned_devices.clear()
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(96, 40, generator=g) * (torch.rand(96, 40, generator=g) < 0.3)
    matrix = SparseMatrix.from_dense(dense, dense != 0, layout).to(DEVICE)
    assert torch.equal(matrix.to_dense().cpu(), dense)
    layers = [SparseDictionaryLinear.from_factors(dense, torch.randn(40, 64, generator=g), layout=layout),
              LowRankSparseLinear.from_factors(torch.randn(96, 8, generator=g), torch.randn(8, 64, generator=g),
                                               torch.randn(96, 64, generator=g) * (torch.rand(96, 64, generator=g) < 0.2),
                                               layout=layout)]
    for tokens in (3, 40):
        x = torch.randn(tokens, 64, generator=g)
        for layer in layers:
            reference = x.double() @ layer.dense_weight().double().cpu().T
            with torch.no_grad():
                y = layer.to(DEVICE)(x.to(DEVICE)).cpu()
            assert relative(y, reference) < 1e-5
    if DEVICE != "cpu":
        kernels = layout == "bitmask" and gpu_kernels.available(matrix.values)
        told = [w for w in recwarn if "densified with torch for every call" in str(w.message)]
        assert len(told) == (0 if kernels else 1)
        if kernels:
            starts = matrix.kernel_row_starts()
            assert torch.equal(matrix.kernel_dense(starts).cpu(), dense)


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_sparse_layer_replays_in_a_cuda_graph():
    """Serving stacks capture decode steps in CUDA graphs: after a first (eager) call, a sparse layer's call
    launches kernels only (no host synchronisation), so it captures, and a replay on new input gives the eager
    result (1 and 5 tokens: the kernels' two paths)."""
    from lrc.forms.sparse_linear import SparseDictionaryLinear

    g = torch.Generator().manual_seed(3)
    mixing = torch.randn(96, 40, generator=g) * (torch.rand(96, 40, generator=g) < 0.5)
    layer = SparseDictionaryLinear.from_factors(mixing, torch.randn(40, 300, generator=g), layout="bitmask")
    layer = layer.to(device=DEVICE, dtype=torch.bfloat16).eval()
    for tokens in (1, 5):
        static = torch.randn(tokens, 300, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
        with torch.inference_mode():
            layer(static)  # the eager first call: checks, first-use agreement
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(static)
            fresh = torch.randn(tokens, 300, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
            static.copy_(fresh)
            graph.replay()
            assert relative(out, layer(fresh)) < 1e-2  # the new input's product (bfloat16 outputs)


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor's CUDA graphs need a GPU")
def test_sparse_layer_compiles_with_cuda_graphs():
    """torch.compile(mode="reduce-overhead"), as serving stacks compile decode steps: the sparse product is one
    custom op in a single graph (fullgraph), replayed from a CUDA graph, with the eager outputs (1 and 5 tokens)."""
    from lrc.forms.sparse_linear import SparseDictionaryLinear

    g = torch.Generator().manual_seed(4)
    mixing = torch.randn(96, 40, generator=g) * (torch.rand(96, 40, generator=g) < 0.5)
    layer = SparseDictionaryLinear.from_factors(mixing, torch.randn(40, 300, generator=g), layout="bitmask")
    layer = layer.to(device=DEVICE, dtype=torch.bfloat16).eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for tokens in (1, 5):
        with torch.inference_mode():
            for _ in range(3):  # warm-up runs, then the recorded graph replays
                x = torch.randn(tokens, 300, generator=g).to(device=DEVICE, dtype=torch.bfloat16)
                assert relative(compiled(x).clone(), layer(x)) < 1e-2


def test_latency_table_is_measured_on_the_gpu(tmp_path):
    """`--objective latency --device cuda` prices layers by times measured on the GPU (synchronized): every entry
    positive, the table keyed by the GPU's name, a low-rank layer holding r (m + n) bfloat16 values."""
    from lrc.allocate.layer_costs import LayerCostTable, LayerShape

    shapes = [LayerShape("dense", 256, 128), LayerShape("low-rank", 256, 128, 32),
              LayerShape("sparse-dictionary", 256, 128, 64, 4096, "bitmask")]
    table = LayerCostTable(DEVICE, torch.bfloat16, tokens=64, cache_dir=tmp_path)
    table.fill(shapes)
    assert table.measured == 3 and all(table.seconds(s) > 0 for s in shapes)
    expected = torch.cuda.get_device_name(0) if DEVICE != "cpu" else table.identity["device"]
    assert table.identity["device"] == expected
    assert table.resident_bytes(shapes[1]) == 32 * (256 + 128) * 2

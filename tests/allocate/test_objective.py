"""The budget priced by what the user pays for: disk bytes, resident bytes, or measured latency."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
import yaml
from torch import nn

from lrc.allocate import layer_costs, objective
from lrc.allocate.base import DENSE, MatrixCandidates
from lrc.allocate.knapsack import KnapsackAllocator
from lrc.allocate.layer_costs import LayerCostTable, LayerShape, linear_fit, rounded, time_outside
from lrc.allocate.objective import layer_shape, measured_price
from lrc.config import CompressionConfig
from lrc.factorize.base import SparseOption
from lrc.forms import cpu_kernels
from tests.conftest import run_main, save_tiny_model


def small_instance(seed: int) -> list[MatrixCandidates]:
    """Three matrices with decreasing random error curves, one with two sparse options."""
    g = torch.Generator().manual_seed(seed)
    matrices = []
    for index, (m, n) in enumerate([(24, 16), (16, 16), (32, 16)]):
        top = min(m, n)
        errors = torch.sort(torch.rand(top + 1, generator=g, dtype=torch.float64), descending=True).values
        errors[top] = 0.0
        sparse = []
        if index == 2:
            sparse = [SparseOption("sparse-dictionary", 8, nnz, "bitmask", 4 * (8 * n + nnz) + m, 8 * n + nnz + m // 4,
                                   float(torch.rand(1, generator=g)) * 0.5) for nnz in (40, 120)]
        matrices.append(MatrixCandidates(f"m{index}", (m, n), errors, max_rank=m * n // (m + n), sparse=sparse))
    return matrices


def fake_table(tmp_path, matrices, seed: int) -> LayerCostTable:
    """A table whose entries are random times (no measurement): the knapsack must optimise whatever they are."""
    g = torch.Generator().manual_seed(seed)
    table = LayerCostTable(cache_dir=tmp_path)
    for m in matrices:
        for choice in [DENSE, *range(1, m.max_rank + 1), *m.sparse]:
            key = rounded(layer_shape(m, choice)).key()
            dense = choice == DENSE
            table.entries[key] = {"seconds": 1.0 if dense else float(torch.rand(1, generator=g)) * 0.9 + 0.05,
                                  "resident_bytes": 1.0}
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_with_a_latency_table_finds_the_brute_force_optimum(tmp_path, seed):
    """Least Σ error with Σ table seconds <= (1 - budget) Σ dense seconds, checked over every combination."""
    matrices = small_instance(seed)
    table = fake_table(tmp_path, matrices, seed)
    price = measured_price(table, "seconds")
    allocator = KnapsackAllocator(rank_step=1)
    allocator.price = price
    budget = 0.4
    picked = allocator.allocate(matrices, budget)

    def error(m, c):
        return c.error if isinstance(c, SparseOption) else (0.0 if c == DENSE else float(m.errors[c]))

    allowed = (1 - budget) * sum(price(m, DENSE) for m in matrices)
    options = [[DENSE, *range(1, m.max_rank + 1), *m.sparse] for m in matrices]
    best = min(
        (sum(error(m, c) for m, c in zip(matrices, combo)), combo)
        for combo in itertools.product(*options)
        if sum(price(m, c) for m, c in zip(matrices, combo)) <= allowed
    )
    got = [picked[m.name] for m in matrices]
    assert sum(price(m, c) for m, c in zip(matrices, got)) <= allowed
    assert sum(error(m, c) for m, c in zip(matrices, got)) == pytest.approx(best[0], abs=1e-12)


def test_latency_table_is_measured_once_and_cached(tmp_path, monkeypatch):
    """The first table measures every entry and saves them; a second one with the same device, torch, threads,
    dtype, tokens and layer forms' source reads them back and measures nothing; another dtype, forms whose
    source changed, or a CPU with AMX where this one has none (or the reverse), is another table. Resident bytes of dense and low-rank layers are their weights'
    bytes."""
    shapes = [LayerShape("dense", 48, 32), LayerShape("low-rank", 48, 32, 8),
              LayerShape("sparse-dictionary", 48, 32, 8, 100, "csr"), LayerShape("low-rank-sparse", 48, 32, 4, 300, "bitmask")]
    first, reports = LayerCostTable(tokens=16, cache_dir=tmp_path), []
    first.fill(shapes, progress=lambda *r: reports.append(r))
    assert first.measured == 4 and first.path.is_file()
    steps = layer_costs.PASSES * len(shapes)  # every shape once per pass, the dense one too
    assert reports == [(layer_costs.MEASURE_PHASE, done, steps) for done in range(steps + 1)]
    saved = json.loads(first.path.read_text())
    assert saved["identity"]["threads"] == torch.get_num_threads() and saved["identity"]["tokens"] == 16
    assert all(first.seconds(s) > 0 for s in shapes)
    assert first.resident_bytes(shapes[0]) == 48 * 32 * 4
    assert first.resident_bytes(shapes[1]) == 8 * (48 + 32) * 4
    assert first.resident_bytes(shapes[2]) >= 8 * 32 * 4 + 100 * (4 + 2)  # atoms + values + int16 indices

    again, reports = LayerCostTable(tokens=16, cache_dir=tmp_path), []
    again.fill(shapes, progress=lambda *r: reports.append(r))
    assert again.measured == 0 and again.seconds(shapes[1]) == first.seconds(shapes[1]) and not reports
    other = LayerCostTable(dtype=torch.bfloat16, tokens=16, cache_dir=tmp_path)
    assert other.path != first.path and not other.entries
    assert saved["identity"]["forms"] == layer_costs.forms_source_digest()
    monkeypatch.setattr(layer_costs, "forms_source_digest", lambda: "other kernels")
    changed = LayerCostTable(tokens=16, cache_dir=tmp_path)
    assert changed.path != first.path and not changed.entries
    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "HAS_AMX", not cpu_kernels.HAS_AMX)  # the same CPU model, AMX hidden or shown
    other_cpu = LayerCostTable(tokens=16, cache_dir=tmp_path)
    assert other_cpu.path != first.path and not other_cpu.entries


def test_unknown_objective_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(Exception, match="objective must be one of disk, memory, latency"):
        CompressionConfig(objective="speed")
    code, _, stderr = run_main(capsys, "compress", tmp_path, "--objective", "speed", "-o", tmp_path / "out")
    assert code == 2 and stderr.count("\n") == 1 and "objective must be one of" in stderr
    code, _, stderr = run_main(capsys, "compress", tmp_path, "--objective", "latency", "--allocator", "uniform",
                               "-o", tmp_path / "out")
    assert code == 2 and "knapsack" in stderr
    with pytest.raises(Exception, match="needs the model in memory"):
        CompressionConfig(objective="latency", stream=True)  # it times the whole model's forward pass
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(CompressionConfig(objective="latency", latency_tokens=1).to_yaml())
    assert CompressionConfig.from_yaml(recipe) == CompressionConfig(objective="latency", latency_tokens=1)


def test_latency_objective_prices_by_the_cached_table(tmp_path, calib_file, capsys, monkeypatch):
    """`--objective latency --budget B` reads the device's table from the cache (prepared here with made-up
    times that do not follow the parameter counts: dense 1, rank r 0.3 + r / 100), measures nothing more,
    and the chosen layers' times plus the rest of the model's (set here to a share s = 0.25 of the dense
    layers') sum to at most (1 - B) of the dense model's; the report names the objective and states that
    predicted fraction."""
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(objective, "outside_share", lambda model, names, tokens: 0.25)
    model = save_tiny_model(tmp_path / "model", "llama")
    table = LayerCostTable(tokens=64)
    for m, n in [(64, 64), (32, 64), (96, 64), (64, 96)]:
        table.entries[LayerShape("dense", m, n).key()] = {"seconds": 1.0, "resident_bytes": 4.0 * m * n}
        for r in range(1, 65):
            table.entries[LayerShape("low-rank", m, n, r).key()] = {"seconds": 0.3 + r / 100, "resident_bytes": 4.0 * r * (m + n)}
    table.save()
    before = table.path.read_bytes()
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, "compress", model, "-o", out, "--calib", calib_file, "--samples", 4, "--seq-len", 32,
                               "--method", "loss-aware", "--budget", 0.4, "--objective", "latency", "--latency-tokens", 64)
    assert code == 0, stderr
    assert table.path.read_bytes() == before  # every price came from the cached table
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["objective"] == "latency" and report["settings"]["latency_tokens"] == 64
    dense = sum(1.0 for _ in report["layers"])
    chosen = sum(1.0 if layer["kind"] == "dense" else 0.3 + layer["rank"] / 100 for layer in report["layers"])
    assert chosen + 0.25 * dense <= 0.6 * 1.25 * dense
    assert chosen > 0.6 * 1.25 * dense - 0.25 * dense - 0.05 * dense  # the time was spent, up to a rank step
    # by parameters, the same budget keeps ranks up to half the break-even rank; by these times ranks cost little
    assert report["params"]["targeted"]["removed_fraction"] < 0.4
    predicted = report["predicted_cost"]  # the same sums, as the report states them
    assert predicted["fraction_of_dense"] == pytest.approx((chosen + 0.25 * dense) / (1.25 * dense), abs=1e-4)
    assert predicted["targeted_layers_fraction"] == pytest.approx(chosen / dense, abs=1e-4)
    assert predicted["outside_share"] == pytest.approx(0.25)
    code, stdout, _ = run_main(capsys, "report", out)
    assert code == 0 and "predicted cost" in stdout and f"{predicted['fraction_of_dense']:.1%} of dense" in stdout


def test_low_rank_times_are_priced_by_a_line_in_rank(tmp_path):
    """A low rank is priced by the least-squares line through its shape's measured ranks (slope >= 0), so a
    rank that measured fast by chance is not picked for it; other forms are priced as measured."""
    assert linear_fit([1.0, 2.0], [2.0, 1.0]) == (1.5, 0.0)
    table = LayerCostTable(cache_dir=tmp_path)
    measured = {8: 1.0, 16: 3.0, 24: 2.0, 32: 4.0}
    for rank, seconds in measured.items():
        table.entries[LayerShape("low-rank", 48, 32, rank).key()] = {"seconds": seconds, "resident_bytes": 0.0}
    table.entries[LayerShape("dense", 48, 32).key()] = {"seconds": 0.5, "resident_bytes": 0.0}
    # mean rank 20, mean time 2.5, slope Σ(dx dy) / Σ dx² = 32 / 320
    assert [table.seconds(LayerShape("low-rank", 48, 32, r)) for r in measured] == pytest.approx([1.3, 2.1, 2.9, 3.7])
    assert table.seconds(LayerShape("dense", 48, 32)) == 0.5
    # a line crossing zero at the low ranks is held at the least time measured, never priced at or below zero
    for rank, seconds in {8: 0.01, 16: 0.02, 24: 2.0, 32: 4.0}.items():
        table.entries[LayerShape("low-rank", 64, 32, rank).key()] = {"seconds": seconds, "resident_bytes": 0.0}
    assert table.seconds(LayerShape("low-rank", 64, 32, 8)) == 0.01


def test_latency_pricing_measures_a_sample_of_ranks_and_prices_the_rest_on_their_line(tmp_path, monkeypatch):
    """A matrix with hundreds of candidate ranks (Llama-3-8B's gate has about 400 at a step of 8) gets at most
    RANK_SAMPLES of them measured, the least and the greatest among them; every other rank is priced on the
    line through the measured ones: here times are made exactly linear in rank (t = 1 + r / 100 against dense
    10), so each rank's price is that line, measured or not."""
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path))

    def made_up(layer, tokens, in_features, dtype, device):
        rank = getattr(layer, "rank", None)
        return 1.0 + rank / 100 if rank is not None else 10.0

    monkeypatch.setattr(layer_costs, "measure", made_up)
    errors = torch.linspace(1, 0, 1025, dtype=torch.float64)
    matrix = MatrixCandidates("mlp.gate_proj", (2048, 2048), errors, max_rank=1024)
    config = CompressionConfig(objective="memory")  # no model needed; the same table (seconds and bytes) is filled
    pricing = objective.price_for(config, [matrix], rank_step=8)
    table = LayerCostTable(cache_dir=tmp_path)
    measured = sorted(int(key.split(":r")[1].split(":")[0]) for key in table.entries if key.startswith("low-rank"))
    assert len(measured) == layer_costs.RANK_SAMPLES and measured[0] == 8 and measured[-1] == 1024
    for rank in (8, 16, 520, 1000, 1024):
        assert table.seconds(LayerShape("low-rank", 2048, 2048, rank)) == pytest.approx(1 + rank / 100)
        assert pricing.price(matrix, rank) == pytest.approx(rank * 4096 * 4)  # float32 bytes, measured or not


class Pause(torch.nn.Module):
    """An untargeted step of known duration."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_time_outside_splits_a_forward_into_the_hooked_modules_and_the_rest():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), Pause(), torch.nn.Linear(64, 64))
    x = torch.randn(4, 64)
    inside, outside = time_outside(model, ["0", "2"], lambda: model(x), rounds=3)
    assert 0.02 <= outside < 0.03  # the pause (and the little else) is outside
    assert 0 < inside < 0.005  # two small matmuls
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # hooks removed


def test_forms_are_priced_by_their_ratio_to_dense_timed_back_to_back(tmp_path, monkeypatch):
    """A machine that runs 3x slower while the dense layer is first timed (another run's table) and at full
    speed when a low-rank layer of its shape is: the low rank is priced at its true ratio to dense (0.5),
    not at its fast time against dense's slow one."""
    from lrc.forms import LowRankLinear

    speed = {"now": 3.0}
    cost = {nn.Linear: 1.0, LowRankLinear: 0.5}
    monkeypatch.setattr(layer_costs, "measure", lambda layer, *args: speed["now"] * cost[type(layer)])
    dense, low = LayerShape("dense", 48, 32), LayerShape("low-rank", 48, 32, 8)
    table = LayerCostTable(tokens=16, cache_dir=tmp_path)
    table.fill([dense])
    assert table.seconds(dense) == 3.0
    speed["now"] = 1.0
    table.fill([low])
    assert table.seconds(low) / table.seconds(dense) == pytest.approx(0.5)
    assert table.seconds(dense) == 1.0  # the least of every measurement of the shape


def test_outside_share_times_the_prefill_generate_makes(monkeypatch):
    """The dense model's rest is timed on a forward that computes the last position's logits only, as
    generate()'s prefill does, not the head over every position."""
    import transformers

    from tests.conftest import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    seen = []

    def timed(model, names, forward, rounds=7):
        seen.append(forward())
        return 1.0, 0.5

    monkeypatch.setattr(objective, "time_outside", timed)
    assert objective.outside_share(model, ["model.layers.0.mlp.up_proj"], tokens=8) == pytest.approx(0.5)
    assert seen[0].logits.shape[1] == 1  # one position's logits, not 8

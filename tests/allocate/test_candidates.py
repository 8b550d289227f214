"""What the allocator is offered (lrc.allocate.candidates): a budget that keep_dense and min_kept put out of
reach is refused before any statistics are collected."""

from __future__ import annotations

import pytest

import lrc
from lrc.allocate import check_budget_reachable, check_patterns_match
from lrc.errors import ConfigError

from ..conftest import run_main, tiny_compress_args


def test_an_unreachable_budget_is_refused_before_calibration(capsys, tmp_path, llama_dir, calib_file):
    """keep_dense on every MLP matrix and min_kept 0.5 elsewhere: the share that must stay, computed here from
    the layer shapes, is above 1 - budget, so the run stops before the statistics pass with that share."""
    model = lrc.load(str(llama_dir)).model
    sizes = {name: module.weight.numel() for name, module in model.named_modules()
             if name.startswith("model.layers.") and isinstance(module, type(model.lm_head))}
    kept = sum(s if ".mlp." in n else 0.5 * s for n, s in sizes.items()) / sum(sizes.values())
    args = tiny_compress_args(llama_dir, calib_file, tmp_path / "out", "--keep-dense", r"\.mlp\.", "--min-kept", 0.5,
                              "--budget", 0.3)
    code, _, stderr = run_main(capsys, *args)
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [
        f"error: the budget cannot be met under these constraints: keep_dense and min_kept keep at least "
        f"{kept:.1%} of the targeted parameters, so at most {1 - kept:.1%} can be removed, not 30.0%; lower "
        "--budget or relax them"]
    assert not (tmp_path / "out").exists()


def test_a_reachable_budget_passes_and_other_objectives_are_left_to_the_allocator(llama_dir):
    model = lrc.load(str(llama_dir)).model
    check_budget_reachable(model, lrc.CompressionConfig(budget=0.3, keep_dense=[r"\.mlp\."]))  # attention holds enough
    with pytest.raises(ConfigError, match="keep at least 100.0%"):
        check_budget_reachable(model, lrc.CompressionConfig(budget=0.3, keep_dense=["layers"]))
    check_budget_reachable(model, lrc.CompressionConfig(budget=0.3, keep_dense=["layers"], objective="memory",
                                                        allocator="knapsack"))


def test_a_pattern_that_matches_nothing_is_refused_before_calibration(capsys, tmp_path, llama_dir, calib_file):
    # a misspelt --keep-dense would otherwise be ignored and the layers it names compressed
    args = tiny_compress_args(llama_dir, calib_file, tmp_path / "out", "--keep-dense", r"self_attn\.qproj")
    code, _, stderr = run_main(capsys, *args)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        r"error: keep_dense pattern 'self_attn\\.qproj' matches no targeted layer (they are named like "
        "model.layers.0.self_attn.q_proj); correct it or leave it out")
    assert "calibrate" not in stderr and not (tmp_path / "out").exists()
    model = lrc.load(str(llama_dir)).model
    with pytest.raises(ConfigError, match="exclude pattern 'mlp_typo' matches no module"):
        check_patterns_match(model, lrc.CompressionConfig(exclude=["mlp_typo"]))
    check_patterns_match(model, lrc.CompressionConfig(keep_dense=[r"q_proj$"], exclude=[r"(^|\.)lm_head$", "down_proj"]))

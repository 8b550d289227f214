"""Mixture-of-experts models whose blocks are all experts blocks, some of them, or none (Qwen3-30B-A3B has
no dense block; mlp_only_layers / decoder_sparse_step make dense ones): each compresses, with its experts
unfused and its routers and scalar gates left dense, or is refused with a one-line reason."""

from __future__ import annotations

import dataclasses
import subprocess
import warnings

import pytest
import torch
import transformers
from torch import nn

import lrc
from lrc.errors import ConfigError, ModelLoadError
from lrc.factorize import METHODS
from lrc.forms import LowRankLinear
from lrc.model.targets import matrix_type, replace_module, target_linears
from lrc.sequential import sequential_factorize

from ..conftest import (
    lrc_command,
    lrc_env,
    save_hunyuan_moe,
    save_tiny_model,
    tiny_compress_args,
)

SAMPLES, SEQ_LEN, BATCH = 24, 24, 4  # 576 tokens: each expert sees more than its 64 inputs
ATTENTION = {f"self_attn.{p}_proj" for p in "qkvo"}
DENSE_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
# family -> (the unfused names of one expert's matrices, the other projections of an experts block)
EXPERTS = {
    "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), set()),
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"),
                  {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"}),
    "mixtral": (("w1", "w3", "w2"), set()),
    "olmoe": (("gate_proj", "up_proj", "down_proj"), set()),
}
# (family, which blocks are experts blocks): mlp_only_layers lists the dense blocks; Mixtral has no dense block
LAYOUTS = [
    ("qwen3_moe", "all"), ("qwen3_moe", "mixed"), ("qwen3_moe", "none"),
    ("qwen2_moe", "all"), ("qwen2_moe", "mixed"), ("qwen2_moe", "none"),
    ("mixtral", "all"), ("olmoe", "all"),
]
DENSE_BLOCKS = {"all": [], "mixed": [0], "none": [0, 1]}


def save_layout(folder, family, layout):
    overrides = {} if family in ("mixtral", "olmoe") else {"mlp_only_layers": DENSE_BLOCKS[layout]}
    return save_tiny_model(folder, family, **overrides)


@pytest.mark.parametrize(("family", "layout"), LAYOUTS)
def test_every_block_layout_compresses_and_loads_back(family, layout, tmp_path, calib_file):
    folder = save_layout(tmp_path / "dense", family, layout)
    fused = transformers.AutoModelForCausalLM.from_pretrained(folder)
    moe_blocks = [i for i, block in enumerate(fused.model.layers) if hasattr(block.mlp, "experts")]
    assert moe_blocks == [i for i in range(2) if i not in DENSE_BLOCKS[layout]]  # the config built that layout

    model = lrc.load(str(folder)).model
    targets = target_linears(model)
    names, others = EXPERTS[family]
    for index in range(2):
        kinds = {matrix_type(n) for n in targets if n.startswith(f"model.layers.{index}.")}
        if index in moe_blocks:  # every matrix of every expert; no router, no shared-expert gate
            expected = {f"mlp.experts.{e}.{n}" for e in range(4) for n in names} | others
        else:
            expected = DENSE_MLP
        assert kinds == ATTENTION | expected

    config = lrc.CompressionConfig(calib=str(calib_file), samples=SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH,
                                   budget=0.3, method="loss-aware", allocator="uniform")
    result = lrc.compress(str(folder), config, tmp_path / "out")
    assert set(result.ranks) == set(targets)
    ids = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = result.model(input_ids=ids).logits
        assert not torch.allclose(expected_logits, fused(input_ids=ids).logits, atol=1e-3)
        for loaded in (lrc.load(str(tmp_path / "out")).model,
                       transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
            assert all(isinstance(loaded.get_submodule(name), LowRankLinear) for name in targets)
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected_logits, rtol=1e-5, atol=1e-5)

    # sequential mode: refused where a block routes tokens to experts, run where none does
    fresh = lrc.load(str(folder)).model
    run = lambda: sequential_factorize(  # noqa: E731
        fresh, ids, target_linears(fresh), dict.fromkeys(targets, 4), METHODS.create("svd"), {})
    if moe_blocks:
        with pytest.raises(ConfigError, match="mixture-of-experts"):
            run()
    else:
        assert set(run()) == set(targets)


def test_a_block_with_neither_mlp_form_is_a_clear_error(tmp_path):
    model = lrc.load(str(save_layout(tmp_path / "m", "qwen3_moe", "all"))).model
    for expert in model.model.layers[1].mlp.experts:
        expert.up_proj = nn.Identity()  # not a projection: layer 1 holds experts' gate and down only
    with pytest.raises(ModelLoadError, match=r"layer 1 of model\.layers in Qwen3MoeForCausalLM holds neither "
                                             r"mlp\.gate_proj, mlp\.up_proj, mlp\.down_proj nor mlp\.experts\.\*\.gate_proj"):
        target_linears(model)


def test_projections_already_compressed_count_as_held_but_are_not_targets(tmp_path):
    """--stream builds block by block: when block 1 is built, every projection of block 0 may be compressed."""
    model = lrc.load(str(save_layout(tmp_path / "m", "qwen3_moe", "none"))).model
    before = target_linears(model)
    for name in [n for n in before if n.startswith("model.layers.0.")]:
        linear = model.get_submodule(name)
        replace_module(model, name, LowRankLinear.from_factors(linear.weight[:, :2], linear.weight[:2]))
    assert set(target_linears(model)) == {n for n in before if n.startswith("model.layers.1.")}


def test_stream_compresses_a_moe_model_type_without_experts_blocks(tmp_path, calib_file):
    folder = save_layout(tmp_path / "m", "qwen3_moe", "none")
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=SEQ_LEN, method="svd-llm",
                                   allocator="uniform", budget=0.3)  # every projection compressed
    lrc.compress(str(folder), config, tmp_path / "memory")
    lrc.compress(str(folder), dataclasses.replace(config, stream=True), tmp_path / "stream")
    assert (tmp_path / "memory" / "model.safetensors").read_bytes() == (tmp_path / "stream" / "model.safetensors").read_bytes()


def test_generic_fallback_skips_routers_and_warns_once_that_fused_experts_stay_dense(tmp_path, calib_file):
    folder = save_hunyuan_moe(tmp_path / "hunyuan")
    model = lrc.load(str(folder)).model
    assert isinstance(model.model.layers[0].mlp.gate.wg, nn.Linear)
    with pytest.warns(UserWarning, match=r"keeps its fused experts dense \(2 blocks, first model\.layers\.0\.mlp\.experts\)"):
        targets = target_linears(model)
    assert {matrix_type(n) for n in targets} == ATTENTION | {f"mlp.shared_mlp.{p}_proj" for p in ("gate", "up", "down")}

    # the compress log says it once, however many times the run lists its targets
    out = subprocess.run(lrc_command(*tiny_compress_args(folder, calib_file, tmp_path / "out")), env=lrc_env(),
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("keeps its fused experts dense") == 1


@pytest.mark.parametrize("family", list(EXPERTS))
def test_registered_moe_adapters_unfuse_without_warning(family, tmp_path):
    model = lrc.load(str(save_layout(tmp_path / "m", family, "all"))).model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target_linears(model)

"""Every supported architecture on a tiny random model: exact statistics, save/load round trip, evaluation.

For each family: (a) the block-by-block statistics pass gives the input Grams of one plain forward pass
of the whole model (to float64 round-off), and the output-gradient statistics equal gradients taken
with torch.autograd.grad of the model's own loss; (b) compress -> save -> load with lrc.load and with
transformers gives the outputs of the compressed model in memory; (c) `lrc eval` measures it.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
import transformers
import yaml

import lrc
from lrc.calibration import token_windows
from lrc.cli import main
from lrc.errors import CalibrationError, ConfigError, ModelLoadError
from lrc.factorize import METHODS
from lrc.forms import LowRankLinear
from lrc.io.checkpoint import write_checkpoint
from lrc.model.adapters import GENERIC, adapter_for, registered
from lrc.model.experts import UnfusedExperts
from lrc.model.targets import target_linears
from lrc.sequential import sequential_factorize
from lrc.stats.gradients import collect_output_stats
from lrc.stats.inputs import collect_input_stats
from lrc.stats.walker import LayerWalk

from ..conftest import (
    ARCHITECTURES,
    ENCODERS,
    save_tiny_model,
    tiny_config,
    whole_model_reference,
)

SAMPLES, SEQ_LEN, BATCH = 24, 24, 2  # 24 tokens > the sliding window of 8; 576 tokens > every input width (gpt2: 256)
MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


TIED = {"gpt2", "opt", "gemma2", "gemma3"}  # families whose checkpoints tie the LM head to the embedding


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    """(family, folder of its tiny model saved by transformers)."""
    family = request.param
    return family, save_tiny_model(tmp_path_factory.mktemp(family), family, tie=family in TIED)


def test_every_registered_architecture_is_tested():
    assert set(registered()) <= {tiny_config(family).model_type for family in ARCHITECTURES}


@pytest.fixture(scope="module")
def text(calib_file):
    return calib_file.read_text()


def windows_for(loaded, text):
    return token_windows(loaded.tokenizer, text, SAMPLES, SEQ_LEN, seed=0)


def forward(model, ids, encoder):
    """The model's output tensor: logits of a causal LM, final hidden states of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if encoder else out.logits


def test_adapter_is_the_registered_one(arch):
    family, folder = arch
    loaded = lrc.load(str(folder))
    adapter = adapter_for(loaded.model)
    assert (adapter is GENERIC) == (family in ("starcoder2", "falcon"))
    if family in ENCODERS:  # no task head, nothing initialised at random
        assert type(loaded.model).__name__ in ("BertModel", "RobertaModel", "XLMRobertaModel", "ElectraModel")


def test_layer_by_layer_input_grams_equal_one_forward_pass(arch, text):
    family, folder = arch
    loaded = lrc.load(str(folder))
    model = loaded.model
    windows = windows_for(loaded, text)
    targets = target_linears(model)
    stats, shares = {}, {}
    collect_input_stats(model, windows, targets, lambda i, layer, s, sh: (stats.update(s), shares.update(sh)), BATCH)

    seen = {name: [] for name in targets}
    hooks = [p.module.register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].reshape(-1, a[0].shape[-1])))
             for name, p in targets.items()]
    with torch.no_grad():
        for batch in windows.split(BATCH):
            model(input_ids=batch)  # the whole model, as transformers runs it
    for h in hooks:
        h.remove()
    for name in targets:
        x = torch.cat(seen[name]).double()
        s = stats[shares.get(name, name)]
        expected = x.T @ x
        assert s.tokens == x.shape[0]
        torch.testing.assert_close(s.gram, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        torch.testing.assert_close(s.abs_sum, x.abs().sum(0), rtol=1e-12, atol=1e-12 * float(x.abs().sum(0).max()))
    if adapter_for(model) is not GENERIC:  # the generic fallback declares nothing
        assert shared_groups(shares) == declared_groups(adapter_for(model), model, list(targets))


def shared_groups(shares):
    """The sets of projections that share one Gram, from {name: owner}."""
    groups: dict[str, set[str]] = {}
    for name, owner in shares.items():
        groups.setdefault(owner, {owner}).add(name)
    return sorted(sorted(g) for g in groups.values())


def declared_groups(adapter, model, names):
    """The sets of projections the adapter's shared_inputs declare to read one tensor (per expert for `*`)."""
    stack_name, _ = adapter.layer_stack(model)
    groups: dict[tuple, set[str]] = {}
    for name in names:
        index, rel = name.removeprefix(stack_name + ".").split(".", 1)
        for g, group in enumerate(adapter.shared_inputs):
            pattern = next((p for p in group if fnmatch.fnmatchcase(rel, p)), None)
            if pattern is not None:
                groups.setdefault((index, g, rel.rsplit(".", 1)[0] if "*" in pattern else ""), set()).add(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def test_output_gradient_stats_equal_autograd(arch, text):
    family, folder = arch
    encoder = family in ENCODERS
    loaded = lrc.load(str(folder))
    model = loaded.model
    windows = windows_for(loaded, text)
    targets = target_linears(model)
    stats = collect_output_stats(model, windows, targets, full_max=4096, fisher=True, batch_size=1)

    reference = whole_model_reference(model, windows, targets, 1, encoder)
    for n in targets:
        s = stats[n]
        gram, diag, fisher, tokens = reference[n]
        assert s.tokens == tokens > 0
        for got, want in ((s.gram, gram), (s.diag, diag), (s.fisher_rows, fisher)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.detach().abs().max()))


@pytest.fixture(scope="module")
def compressed(arch, calib_file, tmp_path_factory):
    """(family, dense folder, output folder, the compressed model in memory) at 30% with loss-aware ranks."""
    family, folder = arch
    out = tmp_path_factory.mktemp(f"{family}-out") / "out"
    config = lrc.CompressionConfig(calib=str(calib_file), samples=SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH,
                                   budget=0.3, method="loss-aware", allocator="uniform")
    result = lrc.compress(str(folder), config, out)
    return family, folder, out, result


def test_compress_save_load_gives_the_same_outputs(compressed, text):
    family, folder, out, result = compressed
    encoder = family in ENCODERS
    targets = target_linears(lrc.load(str(folder)).model)
    assert set(result.ranks) == set(targets)  # every projection (Conv1D, fused, each expert) was factorized
    ids = windows_for(lrc.load(str(folder)), text)
    in_memory = forward(result.model, ids, encoder)
    dense = forward(lrc.load(str(folder)).model, ids, encoder)
    assert not torch.allclose(in_memory, dense, atol=1e-3)  # compression changed the model

    if family in TIED:  # tied in memory, and after the round trip below
        assert result.model.get_output_embeddings().weight is result.model.get_input_embeddings().weight
    by_lrc = lrc.load(str(out)).model
    auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    by_transformers = auto.from_pretrained(str(out))
    for model in (by_lrc, by_transformers):
        assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in targets)
        if family in TIED:
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        torch.testing.assert_close(forward(model, ids, encoder), in_memory, rtol=1e-5, atol=1e-5)


def test_eval_measures_the_compressed_model(compressed, calib_file, tmp_path, capsys):
    family, folder, out, _ = compressed
    results = tmp_path / "eval.yaml"
    args = ["eval", str(out), "--data", str(calib_file), "--seq-len", str(SEQ_LEN), "--windows", "3", "-o", str(results)]
    if family in ENCODERS:
        assert main(args) == 2  # an encoder has no perplexity: it needs the dense model to compare with
        assert "--baseline" in capsys.readouterr().err
        assert main([*args, "--baseline", str(folder)]) == 0
    else:
        assert main(args) == 0
    measured = yaml.safe_load(results.read_text())["results"][0]
    loaded = lrc.load(str(out))
    ids = loaded.tokenizer(calib_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: 3 * SEQ_LEN].view(3, SEQ_LEN)
    if family in ENCODERS:
        h = forward(loaded.model, windows, True).double().mean(1)
        h_dense = forward(lrc.load(str(folder)).model, windows, True).double().mean(1)
        expected = float((h * h_dense).sum(-1).div(h.norm(dim=-1) * h_dense.norm(dim=-1)).mean())
        assert measured["cosine_similarity"] == pytest.approx(expected, rel=1e-6)
        assert 0 < measured["cosine_similarity"] < 1
        assert yaml.safe_load(results.read_text())["results"][1]["cosine_similarity"] == pytest.approx(1.0, abs=1e-9)
    else:
        with torch.no_grad():
            nll = sum(float(loaded.model(input_ids=w[None], labels=w[None]).loss) for w in windows) / 3
        assert measured["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_unfused_experts_compute_what_transformers_computes(family, tmp_path, text):
    folder = save_tiny_model(tmp_path / family, family)
    loaded = lrc.load(str(folder))
    assert any(isinstance(m, UnfusedExperts) for m in loaded.model.modules())
    fused = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    assert not any(isinstance(m, UnfusedExperts) for m in fused.modules())
    ids = windows_for(loaded, text)
    expected = forward(fused, ids, False)
    torch.testing.assert_close(forward(loaded.model, ids, False), expected, rtol=1e-5, atol=1e-5)
    # written dense under the Hub checkpoints' per-expert names, transformers merges them back by itself
    write_checkpoint(loaded.model, tmp_path / "dense", loaded.tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(forward(reloaded, ids, False), expected, rtol=1e-5, atol=1e-5)


def test_an_expert_no_token_reaches_is_an_error(tmp_path, calib_file):
    folder = save_tiny_model(tmp_path / "moe", "qwen3_moe")
    loaded = lrc.load(str(folder))
    router = loaded.model.model.layers[1].mlp.gate

    def never_two(hidden_states):  # the router as transformers computes it, but expert 2 is never chosen
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, 2] = -1e9
        top, index = logits.softmax(-1).topk(router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    router.forward = never_two
    config = lrc.CompressionConfig(calib=str(calib_file), samples=SAMPLES, seq_len=SEQ_LEN, budget=0.3,
                                   method="svd-llm", allocator="uniform")
    with pytest.raises(CalibrationError, match=r"no calibration token reached model\.layers\.1\.mlp\.experts\.2\.gate_proj"):
        lrc.compress(loaded, config)


def test_sequential_mode_refuses_mixture_of_experts(tmp_path):
    loaded = lrc.load(str(save_tiny_model(tmp_path / "moe", "mixtral")))
    targets = target_linears(loaded.model)
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        sequential_factorize(loaded.model, torch.zeros(2, SEQ_LEN, dtype=torch.long), targets, dict.fromkeys(targets, 1),
                             METHODS.create("svd"), {})


def test_walker_refuses_a_model_that_changes_hidden_states_between_blocks(llama_dir, text):
    loaded = lrc.load(str(llama_dir))
    layers = loaded.model.model.layers
    handle = layers[1].register_forward_pre_hook(lambda module, args: (args[0] * 2, *args[1:]))
    with pytest.raises(ModelLoadError, match="block 1 of model.layers does not receive block 0's output"):
        LayerWalk(loaded.model, windows_for(loaded, text), BATCH, "cpu")
    handle.remove()


def test_unknown_architecture_without_one_layer_stack_is_a_clear_error(tmp_path):
    """An architecture with no adapter whose blocks lrc cannot find: exit 2, naming what it searched for."""
    config = transformers.T5Config(vocab_size=260, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5")
    with pytest.raises(ModelLoadError, match=r"no adapter for model_type 't5'.*num_hidden_layers=2 blocks and found 2: "
                                             r"encoder\.block, decoder\.block"):
        target_linears(model)


@pytest.mark.parametrize("family", ["gpt2", "qwen3_moe"])
def test_sparse_layers_replace_conv1d_and_experts_and_load_back(family, calib_file, tmp_path, text):
    """The default recipe (sparse-dictionary layers) on Conv1D projections and on experts: saved, loaded, same outputs."""
    folder = save_tiny_model(tmp_path / family, family)
    config = lrc.CompressionConfig(calib=str(calib_file), samples=SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH, budget=0.3,
                                   method_options={"reselect": 0})
    result = lrc.compress(str(folder), config, tmp_path / "out")
    sparse = [r.name for r in result.matrices if r.nnz]
    kinds = {"gpt2": "attn.c_attn", "qwen3_moe": "mlp.experts."}
    assert any(kinds[family] in name for name in sparse), sparse
    ids = windows_for(lrc.load(str(folder)), text)
    expected = forward(result.model, ids, False)
    for model in (lrc.load(str(tmp_path / "out")).model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert type(model.get_submodule(sparse[0])) is type(result.model.get_submodule(sparse[0]))
        torch.testing.assert_close(forward(model, ids, False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["distilbert", "modernbert", "deberta-v2", "xlm"])
def test_an_encoder_without_an_adapter_is_refused(model_type):
    """An encoder lrc has no adapter for would otherwise get the generic one: loaded through its causal-LM class
    where it has one, attending to later tokens (statistics of a loss that can read its answer)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    with pytest.raises(ModelLoadError, match=f"model_type {model_type} is an encoder"):
        adapter_for(config)
    if model_type == "xlm":  # a model of such a type trained as a decoder is not an encoder
        config.is_decoder = True
        assert adapter_for(config) is GENERIC



@pytest.mark.parametrize(("name", "why"), [("model.layers.1.mlp.experts.2.up_proj", "an expert the router never picked"),
                                           ("backbone.layers.0.mixer.dt_proj", "the block reads its weight without calling it")])
def test_a_projection_no_token_reached_is_named_with_its_likely_cause(name, why):
    """An expert the router skipped can be reached by more text; a layer whose weight its block reads directly
    (Mamba's dt_proj) cannot: the advice is to exclude it."""
    from lrc.stats.inputs import check_reached

    with pytest.raises(CalibrationError, match=f"no calibration token reached {name} in the statistics pass \\({why}"):
        check_reached({name: None}, set(), "the statistics pass")

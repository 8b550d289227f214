"""GGUF -> safetensors conversion, one tensor at a time: transformers' own load, bit for bit, and what it refuses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lrc.errors import ModelLoadError, NumericalError
from lrc.sources import gguf_folder

from ..conftest import byte_tokenizer, file_hashes

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


def gpt2_byte_tokens() -> list[str]:
    """GPT-2's 256 byte-level symbols (bytes_to_unicode), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(
    path: Path, tied: bool = True, drop: str | None = None, shapes: dict[str, tuple[int, ...]] | None = None,
    nan_in: str | None = None, arch: str = "llama",
) -> Path:
    """A 2-layer GGUF (`arch` llama or gpt2, hidden 64, random weights) with a BPE tokenizer transformers reads:
    Q8_0, F16 and F32 tensors; `drop`: a tensor left out; `shapes`: tensors written with another shape; `nan_in`:
    a tensor with a NaN."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, quants

    rng = np.random.default_rng(0)
    tokens = gpt2_byte_tokens() + ["Ġt", "he", "<|endoftext|>"]
    ffn = FFN if arch == "llama" else 4 * HIDDEN  # GPT-2's MLP is 4 x hidden
    context = 128 if arch == "llama" else 1024  # GPT-2's position table is n_positions (1024), not the context
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    if arch == "llama":
        writer.add_head_count_kv(KV_HEADS)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(HIDDEN // HEADS)
    else:
        writer.add_layer_norm_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def add(name: str, shape: tuple[int, ...], kind: Q) -> None:
        if name == drop:
            return
        values = rng.standard_normal((shapes or {}).get(name, shape)).astype(np.float32) * 0.1
        if name == nan_in:
            values.flat[3] = np.nan
        if kind == Q.F32:
            writer.add_tensor(name, values)
        elif kind == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            packed = quants.quantize(values, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)

    kv = HIDDEN // HEADS * KV_HEADS
    add("token_embd.weight", (len(tokens), HIDDEN), Q.Q8_0)
    if arch == "gpt2":
        add("position_embd.weight", (context, HIDDEN), Q.F32)
    for i in range(LAYERS):
        if arch == "llama":
            add(f"blk.{i}.attn_norm.weight", (HIDDEN,), Q.F32)
            add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), Q.F32)
            add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), Q.Q8_0)  # rows permuted back by the llama processor
            add(f"blk.{i}.attn_k.weight", (kv, HIDDEN), Q.Q8_0)
            add(f"blk.{i}.attn_v.weight", (kv, HIDDEN), Q.F16)
            add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), Q.Q8_0)
            add(f"blk.{i}.ffn_gate.weight", (ffn, HIDDEN), Q.Q8_0)
            add(f"blk.{i}.ffn_up.weight", (ffn, HIDDEN), Q.F32)
            add(f"blk.{i}.ffn_down.weight", (HIDDEN, ffn), Q.Q8_0)
            continue
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", (HIDDEN,), Q.F32)
            add(f"blk.{i}.{norm}.bias", (HIDDEN,), Q.F32)
        # Conv1D weights are stored transposed, and transposed back by the GPT-2 processor
        for name, rows, cols, kind in [("attn_qkv", 3 * HIDDEN, HIDDEN, Q.Q8_0), ("attn_output", HIDDEN, HIDDEN, Q.F16),
                                       ("ffn_up", ffn, HIDDEN, Q.Q8_0), ("ffn_down", HIDDEN, ffn, Q.Q8_0)]:
            add(f"blk.{i}.{name}.weight", (rows, cols), kind)
            add(f"blk.{i}.{name}.bias", (rows,), Q.F32)
    add("output_norm.weight", (HIDDEN,), Q.F32)
    if arch == "gpt2":
        add("output_norm.bias", (HIDDEN,), Q.F32)
    if not tied:
        add("output.weight", (len(tokens), HIDDEN), Q.Q8_0)  # GPT-2's processor stores it as lm_head itself
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)],
                         ids=["llama-tied", "llama-lm_head", "gpt2-tied", "gpt2-lm_head"])
def test_tensors_are_transformers_gguf_load_bit_for_bit(tmp_path, cache, monkeypatch, arch, tied):
    from transformers import AutoModelForCausalLM

    import lrc.io.gguf as converter

    monkeypatch.setattr(converter, "CHUNK_BYTES", 200)  # Q8_0 rows (68 bytes) dequantized 2 at a time
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied, arch=arch)
    folder = gguf_folder(path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    expected = model.state_dict()
    stored = load_file(folder / "model.safetensors")
    assert set(stored) == set(expected) - ({"lm_head.weight"} if tied else set())  # a tied head is not stored
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    for name, tensor in stored.items():
        assert tensor.dtype == expected[name].dtype == torch.float32
        assert torch.equal(tensor.view(torch.int32), expected[name].view(torch.int32)), name
    assert {p.name for p in folder.iterdir()} >= {"config.json", "generation_config.json", "tokenizer.json"}
    assert list(cache.joinpath("gguf").iterdir()) == [folder]  # no temporary sibling left


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("gpt2", False)], ids=["llama-tied", "gpt2-lm_head"])
def test_streamed_folder_is_the_whole_model_conversion(tmp_path, cache, monkeypatch, arch, tied):
    """Every file (weights, config, generation config, tokenizer) has the bytes of the in-memory conversion, which
    is what lrc wrote before and still writes for what cannot be streamed: one cache entry serves both."""
    import lrc.io.gguf as converter

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied, arch=arch)
    streamed = file_hashes(gguf_folder(path))
    monkeypatch.setenv("LRC_CACHE_DIR", str(tmp_path / "whole"))
    monkeypatch.setattr(converter, "whole_model_reason", lambda architecture: "forced")
    assert file_hashes(gguf_folder(path)) == streamed


def test_whole_model_kept_for_merging_processors():
    from lrc.io.gguf import whole_model_reason

    assert whole_model_reason("llama") is None and whole_model_reason("gpt2") is None
    assert "Qwen2MoeTensorProcessor" in (whole_model_reason("qwen3moe") or "")
    if importlib.util.find_spec("transformers.integrations.gguf"):  # transformers' newer loader (5.17 on)
        assert whole_model_reason("qwen35") is not None  # its architectures have their own operations


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (dict(drop="blk.1.ffn_up.weight"), r"lacks 1 tensor\(s\) the LlamaForCausalLM architecture needs: "
                                           r"model.layers.1.mlp.up_proj.weight; refusing"),
        (dict(shapes={"blk.0.ffn_up.weight": (96, HIDDEN)}), r"tensor blk.0.ffn_up.weight has shape \[96, 64\] but "
                                                            r"the model's model.layers.0.mlp.up_proj.weight is \[128, 64\]"),
    ],
    ids=["missing", "shape"],
)
def test_incomplete_gguf_refused_and_nothing_cached(tmp_path, cache, how, message):
    path = write_tiny_gguf(tmp_path / "bad.gguf", **how)
    with pytest.raises(ModelLoadError, match=message) as error:
        gguf_folder(path)
    assert "\n" not in str(error.value)
    assert not any(cache.joinpath("gguf").iterdir())  # neither the folder nor a temporary sibling


def test_non_finite_tensor_refused(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "nan.gguf", nan_in="blk.1.ffn_norm.weight")
    with pytest.raises(NumericalError, match="model.layers.1.post_attention_layernorm.weight is not finite"):
        gguf_folder(path)
    assert not any(cache.joinpath("gguf").iterdir())


def test_gguf_input_loads_as_transformers_reads_it(tmp_path, cache):
    """lrc.load of a .gguf (converted, then loaded from the cache folder): transformers' GGUF model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lrc

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = lrc.load(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = torch.tensor([tokenizer("the tether")["input_ids"]])
    assert loaded.tokenizer("the tether")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    assert loaded.folder.parent == cache / "gguf"


def test_a_saved_tokenizer_is_checked_against_the_ggufs(tmp_path):
    """transformers' class of some architectures rebuilds a saved byte-level tokenizer differently (its own
    pre-tokenizer): the folder then names the generic fast tokenizer, which reads tokenizer.json as written; a
    tokenizer that still differs is refused."""
    import json

    from transformers import AutoTokenizer

    from lrc.io.gguf import TOKENIZER_PROBE, check_saved_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) | {"tokenizer_class": "GemmaTokenizer"}  # what a gemma GGUF names
    config_path.write_text(json.dumps(config))
    check_saved_tokenizer(tokenizer, tmp_path, tmp_path / "model.gguf")
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved(TOKENIZER_PROBE).input_ids == tokenizer(TOKENIZER_PROBE).input_ids
    other = byte_tokenizer()
    other.backend_tokenizer.pre_tokenizer = None  # a tokenizer.json that splits text otherwise
    other.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="does not save the tokenizer of .*model.gguf faithfully"):
        check_saved_tokenizer(tokenizer, tmp_path, tmp_path / "model.gguf")

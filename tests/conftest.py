"""Shared fixtures: tiny config-built models (random weights, seconds to run) and real WikiText-2 text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import lrc  # noqa: F401  (registers the lrc loader with transformers)

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKI = SHARED / "data" / "wikitext-2"
WIKI_VALID = WIKI / "wiki.valid.tokens"
WIKI_TEST = WIKI / "wiki.test.raw"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer with 256 byte tokens + <s>, </s> (no merges): 258 ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return fast


TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256, eos_token_id=257)


def tiny_config(family: str, tie: bool = False):
    if family == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=tie)
    if family == "qwen2":  # q/k/v carry biases
        return Qwen2Config(**TINY, tie_word_embeddings=tie)
    raise ValueError(family)


def save_tiny_model(folder: Path, family: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A random tiny model saved by transformers itself (as a user's folder would be) plus its tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """A tiny model folder of each architecture family (llama with GQA; qwen2 with q/k/v biases)."""
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """The first 40 kB of WikiText-2 valid: real text, enough for a few windows of the byte tokenizer."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(WIKI_VALID.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    """{path relative to root: SHA-256 of its bytes (or '-> target' for a symlink)} of every file under root."""
    import hashlib

    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"-> {path.readlink()}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def save_trained_tiny_model(folder: Path, text: str, steps: int = 40, seed: int = 0) -> Path:
    """A tiny llama trained for a few Adam steps on `text` (byte tokens; loss 5.6 -> 2.9 nats, seconds):
    unlike a random model it predicts the text, so a harmful compression shows as a loss increase."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    tokenizer = byte_tokenizer()
    ids = tokenizer(text[:20_000], return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids[: (ids.numel() // 32) * 32].view(-1, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, windows.shape[0], (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

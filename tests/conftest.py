"""Shared fixtures: tiny config-built models (random weights, seconds to run) and real WikiText-2 text."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModel, AutoModelForCausalLM, HunYuanMoEV1Config, PreTrainedTokenizerFast

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
IDS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=257)
ALTERNATING = ["sliding_attention", "full_attention"]  # layer 0 sliding-window, layer 1 full attention
SLIDING_WINDOW = 8  # tokens: calibration windows in the tests are longer, so the two masks differ

# family -> transformers config class name and its arguments: 2 layers, hidden 64, every variant of the family
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", TINY),
    "mistral": ("MistralConfig", TINY | {"sliding_window": SLIDING_WINDOW}),
    "qwen2": ("Qwen2Config", TINY),  # q/k/v carry biases
    "qwen3": ("Qwen3Config", TINY | {"head_dim": 16}),
    "gemma2": ("Gemma2Config", TINY | IDS | {"head_dim": 16, "sliding_window": SLIDING_WINDOW, "layer_types": ALTERNATING}),
    "gemma3": ("Gemma3TextConfig", TINY | IDS | {"head_dim": 16, "sliding_window": SLIDING_WINDOW,
                                                 "layer_types": ALTERNATING}),  # local layers: their own rope base too
    "phi3": ("Phi3Config", TINY | IDS),  # fused qkv_proj, gate_up_proj
    "gpt2": ("GPT2Config", dict(vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=256,
                                eos_token_id=257)),  # Conv1D projections
    "opt": ("OPTConfig", dict(vocab_size=260, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=64) | IDS),
    "falcon": ("FalconConfig", dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=256) | IDS),  # reads a block's output as outputs[0]; parallel MLP
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256) | IDS),
    "qwen3_moe": ("Qwen3MoeConfig", TINY | {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4,
                                             "num_experts_per_tok": 2, "mlp_only_layers": [0]}),  # layer 0 dense MLP
    "qwen2_moe": ("Qwen2MoeConfig", TINY | {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                                             "num_experts": 4, "num_experts_per_tok": 2,
                                             "mlp_only_layers": [0]}),  # layer 0 dense; a shared expert and its gate
    "mixtral": ("MixtralConfig", TINY | {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", TINY | {"intermediate_size": 32, "num_experts": 4,
                                     "num_experts_per_tok": 2}),  # q_norm / k_norm; experts in every block
    "bert": ("BertConfig", dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256) | IDS),  # encoder, no head
    "roberta": ("RobertaConfig", dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=258) | IDS
                        | {"pad_token_id": 1}),  # positions start after the padding id, as in RoBERTa checkpoints
    "xlm-roberta": ("XLMRobertaConfig", dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=258) | IDS | {"pad_token_id": 1}),
    "electra": ("ElectraConfig", dict(vocab_size=260, embedding_size=32, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
                | IDS),  # embeddings 32 wide, projected to 64; no pooler
    "starcoder2": ("Starcoder2Config", TINY | {"sliding_window": SLIDING_WINDOW}),  # no adapter: the generic fallback
}
ENCODERS = {"bert", "roberta", "xlm-roberta", "electra"}


def tiny_config(family: str, tie: bool = False, **overrides):
    import transformers

    name, kwargs = ARCHITECTURES[family]
    return getattr(transformers, name)(**(kwargs | overrides), tie_word_embeddings=tie)


def save_tiny_model(folder: Path, family: str = "llama", tie: bool = False, seed: int = 0, **overrides) -> Path:
    """A random tiny model saved by transformers itself (as a user's folder would be) plus its tokenizer.

    Encoders are saved without a task head (AutoModel), as an embedding model is. overrides: config fields.
    """
    torch.manual_seed(seed)
    auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(tiny_config(family, tie, **overrides))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def save_hunyuan_moe(folder: Path) -> Path:
    """A model type lrc has no adapter for (the generic fallback) with fused experts, an nn.Linear router
    (mlp.gate.wg, hidden -> experts) and a shared MLP."""
    config = HunYuanMoEV1Config(
        vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=4, moe_topk=2,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
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


WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "been", "has", "more", "when", "will", "would", "who", "so", "no", "time", "year", "people", "river", "city", "music", "film", "game", "war", "team", "world", "house", "water", "light", "history", "school", "number", "church", "station"]


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Sentences of common English words, Zipf-weighted, seeded: calibration text where no data files exist
    (the GPU check's machine has only the checkout)."""
    import random

    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    parts: list[str] = []
    size = 0
    while size < chars:
        words = rng.choices(WORDS, weights, k=rng.randint(5, 16))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ",", "?"]) + " "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:chars]


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


REPO = Path(__file__).resolve().parents[1]


def lrc_command(*args: object) -> list[str]:
    """`python -m lrc ARGS` as a subprocess argv (run it with lrc_env() so this checkout's lrc is used)."""
    return [sys.executable, "-m", "lrc", *[str(a) for a in args]]


def lrc_env() -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout first on PYTHONPATH, no terminal assumed."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_lrc(*args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess with stdout and stderr to pipes (as a CI job would) and wait for it."""
    return subprocess.run(lrc_command(*args), cwd=cwd, env=lrc_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, hidden ones included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lrc ARGS` run in this process through lrc.cli.main."""
    from lrc.cli import main

    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_compress_args(model: Path, calib: Path, out: Path, *extra: object) -> list[str]:
    """A fast `lrc compress` of a tiny model: loss-aware + knapsack, 4 windows of 32 tokens."""
    return [str(a) for a in ("compress", model, "-o", out, "--calib", calib, "--samples", 4, "--seq-len", 32,
                             "--method", "loss-aware", "--budget", 0.3, *extra)]


@dataclass
class CompressedRun:
    """One `lrc compress --json` run in a subprocess, its output pipes and its folders."""

    model: Path
    calib: Path
    out: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def compressed_run(tmp_path_factory, calib_file) -> CompressedRun:
    """A tiny llama compressed once per session by the CLI, stdout and stderr to pipes; tests only read it."""
    root = tmp_path_factory.mktemp("compressed")
    model = save_tiny_model(root / "model", "llama")
    out = root / "out"
    result = run_lrc(*tiny_compress_args(model, calib_file, out, "--json"), cwd=root)
    assert result.returncode == 0, result.stderr
    return CompressedRun(model, calib_file, out, result)


def whole_model_reference(model, windows, targets, batch_size, encoder):
    """{name: [gram, diag, fisher_rows, tokens]} of the output gradients from one whole-model backward per batch.

    Written independently of lrc.stats.gradients: the model's own objective through the full model (summed
    next-token cross-entropy; for an encoder the seeded probe Σ ε·h), torch.autograd.grad at every targeted
    projection's output, products over one batch in float32 summed in float64 (lrc's convention).
    """
    from lrc.stats.gradients import PROBE_SEED

    acc = {n: [0.0, 0.0, 0.0, 0] for n in targets}
    outs, ins = {}, {}

    def record(name):
        def hook(module, args, output):
            outs[name], ins[name] = output, args[0]

        return hook

    hooks = [p.module.register_forward_hook(record(n)) for n, p in targets.items()]
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    try:
        for index, batch in enumerate(windows.split(batch_size)):
            outs.clear()
            ins.clear()
            with torch.enable_grad():
                if encoder:  # Σ ε·h with ε ~ N(0, I), batch `index` drawn from a generator seeded PROBE_SEED + index
                    h = model(input_ids=batch).last_hidden_state
                    probe = torch.Generator().manual_seed(PROBE_SEED + index)
                    loss = (h * torch.randn(h.shape, generator=probe)).sum()
                else:  # summed next-token cross-entropy: transformers' mean loss times the predicted tokens
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss * batch[:, 1:].numel()
                names = list(outs)
                grads = torch.autograd.grad(loss, [outs[n] for n in names])
            for name, g in zip(names, grads):
                g = g.float()
                flat = g.reshape(-1, g.shape[-1])
                x = ins[name].float()
                per_window = zip(g, x) if g.dim() == 3 else [(g, x)]  # an expert: one flat list per batch
                a = acc[name]
                a[0] = a[0] + (flat.T @ flat).double()
                a[1] = a[1] + flat.square().sum(0).double()
                a[2] = a[2] + sum((gw.T @ xw).square().sum(1).double() for gw, xw in per_window)
                a[3] += flat.shape[0]
    finally:
        for handle in hooks:
            handle.remove()
    return acc


# family, extra compress options: low rank (llama), Conv1D with a sparse residual (gpt2), routed experts with
# a sparse dictionary (mixtral), an encoder (bert)
COMPRESSED_CASES = {
    "llama": (),
    "gpt2": ("--method", "low-rank-sparse", "--samples", 18),
    "mixtral": ("--method", "sparse-dictionary", "--samples", 24),
    "bert": (),
}


@pytest.fixture(scope="session")
def compressed_outputs(tmp_path_factory, calib_file) -> dict[str, Path]:
    """{family: an lrc output folder} compressed once per session (the tests only read them)."""
    from lrc.cli import main

    root = tmp_path_factory.mktemp("remote")
    made = {}
    for family, extra in COMPRESSED_CASES.items():
        model = save_tiny_model(root / f"{family}-model", family)
        out = root / f"{family}-out"
        assert main(tiny_compress_args(model, calib_file, out, *extra)) == 0
        made[family] = out
    return made


def auto_class(family: str) -> str:
    """The transformers auto class lrc loads a tiny model of `family` with."""
    return "AutoModel" if family in ENCODERS else "AutoModelForCausalLM"


def probe_input_ids() -> torch.Tensor:
    """2 x 24 token ids of the tiny models' vocabulary, the same in every process."""
    return (torch.arange(48).reshape(2, 24) * 7) % 250


def lrc_output(folder: Path) -> torch.Tensor:
    """Logits (or the encoder's last hidden state) of lrc.load(folder) on probe_input_ids()."""
    model = lrc.load(str(folder), need_tokenizer=False).model
    with torch.no_grad():
        out = model(input_ids=probe_input_ids())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state

"""Evaluation: perplexity by the standard protocol (or, for an encoder, embedding similarity to the dense
model), parameter count, file size, forward speed.

Perplexity protocol (GPTQ, SVD-LLM, ASVD): tokenize the whole text once, cut it into non-overlapping windows
of seq_len tokens, drop the tail, ppl = exp(mean next-token cross-entropy over every predicted token).
`windows` limits the count to a fixed prefix of windows (for quick CPU runs); the result states it.
An encoder has no next-token head: on the same windows it is compared with a reference model (the dense
one) by the cosine similarity of their embeddings (see `embedding_similarity`).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .calibration import read_text
from .device import resolve_device
from .errors import ConfigError
from .forms import count_params
from .io.checkpoint import tensor_bytes
from .model.adapters import CAUSAL_LM, adapter_for
from .peak_memory import held_tensor_bytes
from .progress import Progress, no_progress
from .sources import LoadedModel, load_model, model_argument


def perplexity(
    model: Any,
    token_ids: torch.Tensor,
    seq_len: int,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Perplexity of `model` on the 1-D `token_ids`, in non-overlapping windows of `seq_len` (tail dropped)."""
    data, available = evaluation_windows(token_ids, seq_len, windows)
    count = data.shape[0]
    dev = resolve_device(device)
    model.to(dev)
    nll = 0.0
    predicted = 0
    warm_up(model, data[:batch_size], dev)
    start = time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(data.split(batch_size)):
            batch = batch.to(dev)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            nll += float(loss)
            predicted += targets.numel()
            progress("perplexity", min((i + 1) * batch_size, count), count)
    seconds = time.perf_counter() - start
    mean_nll = nll / predicted
    return {
        "perplexity": math.exp(mean_nll) if mean_nll < MAX_EXP else math.inf,
        "mean_nll": mean_nll,
        "seq_len": seq_len,
        "windows": count,
        "windows_available": available,
        "tokens": count * seq_len,
        **speed(count * seq_len, seconds, batch_size, dev),
    }


MAX_EXP = 709.0  # math.exp overflows past ~709.78: a larger mean loss is an infinite perplexity


def warm_up(model: Any, batch: torch.Tensor, device: torch.device) -> None:
    """One untimed forward on `batch`: the first call's allocations, kernel compilation and plans are not the
    model's speed."""
    if batch.numel():
        with torch.inference_mode():
            model(input_ids=batch.to(device))


def speed(tokens: int, seconds: float, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The timed passes' throughput and the conditions it was measured under (after one untimed pass)."""
    return {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "threads": torch.get_num_threads(), "batch_size": batch_size, "device": str(device)}


def evaluation_windows(token_ids: torch.Tensor, seq_len: int, windows: int | None) -> tuple[torch.Tensor, int]:
    """(the first `windows` non-overlapping windows of `seq_len` tokens (count x seq_len), windows available)."""
    available = token_ids.numel() // seq_len
    if available == 0:
        raise ConfigError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    if windows is not None and windows < 1:
        raise ConfigError(f"windows must be at least 1, got {windows}")
    count = available if windows is None else min(windows, available)
    return token_ids[: count * seq_len].view(count, seq_len), available


def embedding_similarity(
    model: Any,
    reference: Any,
    token_ids: torch.Tensor,
    seq_len: int,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """How close an encoder's embeddings are to `reference`'s on the same windows (as `perplexity` cuts them).

    cosine_similarity: mean over windows of cos(mean_t h_t, mean_t h'_t), the mean-pooled final hidden
    states (a sentence embedding); token_cosine_similarity: mean over tokens of cos(h_t, h'_t).
    """
    data, available = evaluation_windows(token_ids, seq_len, windows)
    count = data.shape[0]
    dev = resolve_device(device)
    model.to(dev)
    reference.to(dev)
    pooled = token = 0.0
    seconds = 0.0
    warm_up(model, data[:batch_size], dev)
    with torch.inference_mode():
        for i, batch in enumerate(data.split(batch_size)):
            batch = batch.to(dev)
            start = time.perf_counter()
            h = model(input_ids=batch).last_hidden_state.double()
            seconds += time.perf_counter() - start
            h_ref = reference(input_ids=batch).last_hidden_state.double()
            pooled += float(torch.nn.functional.cosine_similarity(h.mean(1), h_ref.mean(1), dim=-1).sum())
            token += float(torch.nn.functional.cosine_similarity(h, h_ref, dim=-1).sum())
            progress("embeddings", min((i + 1) * batch_size, count), count)
    return {
        "cosine_similarity": pooled / count,
        "token_cosine_similarity": token / (count * seq_len),
        "seq_len": seq_len,
        "windows": count,
        "windows_available": available,
        "tokens": count * seq_len,
        **speed(count * seq_len, seconds, batch_size, dev),
    }


def model_size(loaded: LoadedModel) -> dict[str, Any]:
    """Parameters (tied weights once), bytes on disk (safetensors bytes, or the GGUF file for a GGUF source) and
    bytes in memory: what the loaded model's tensors hold (`held_tensor_bytes`; a GGUF is dequantized)."""
    source = loaded.source
    if source.kind in ("gguf", "alias"):
        disk = source.path.stat().st_size
        what = "gguf file"
    else:
        disk = tensor_bytes(Path(loaded.folder))
        what = "safetensors files"
    return {"params": count_params(loaded.model), "bytes": disk, "bytes_of": what,
            "memory_bytes": held_tensor_bytes(loaded.model)}


def check_same_tokens(model: str, baseline: str, data: str) -> None:
    """Raise ConfigError unless `model` and `baseline` split the text `data` into the same tokens (its first
    100,000 characters): a perplexity is per token, so the ratio of two from different tokenizers measures the
    tokenizers, not the compression. Reads the tokenizers only (a .gguf is converted, as loading would)."""
    from .sources import load_tokenizer, local_folder, resolve_model

    head = read_text(data, what="evaluation")[:100_000]
    ids = []
    for spec in (model, baseline):
        tokenizer = load_tokenizer(local_folder(resolve_model(spec)))
        ids.append(tokenizer(head, add_special_tokens=False).input_ids)
    if ids[0] != ids[1]:
        raise ConfigError(
            f"{model} and the baseline {baseline} tokenize {data} differently ({len(ids[0])} against {len(ids[1])} "
            "tokens in its first 100,000 characters): their perplexities are per token of different tokenizers "
            "and cannot be compared; give the model's own dense original as --baseline"
        )


def check_integer(name: str, value: object, minimum: int, why: str = "") -> None:
    """ConfigError unless `value` is an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer of at least {minimum}{f' ({why})' if why else ''}, got {value!r}")


def evaluate(
    model: str | os.PathLike[str] | LoadedModel,
    data: str | os.PathLike[str],
    seq_len: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Progress = no_progress,
    reference: str | LoadedModel | None = None,
) -> dict[str, Any]:
    """Perplexity on the text file `data`, parameter count and size of `model` (path, Hub id, alias or loaded).

    An encoder (no next-token head) gets `embedding_similarity` to `reference` (the dense model) instead of
    a perplexity; it needs one. A decoder ignores `reference`.
    """
    model = model_argument(model)
    reference = None if reference is None else model_argument(reference, "reference")
    check_integer("seq_len", seq_len, 2, "a window predicts its tokens after the first")
    check_integer("batch_size", batch_size, 1)
    if windows is not None:
        check_integer("windows", windows, 1)
    if not isinstance(data, (str, os.PathLike)):
        raise ConfigError(f"data must be the path of a text file (str or os.PathLike), not {type(data).__name__}")
    data = str(os.fspath(data))
    loaded = load_model(model, progress=progress) if isinstance(model, str) else model
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"seq_len {seq_len} is longer than the model's context ({context} tokens)")
    text = read_text(data, what="evaluation")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if adapter_for(loaded.model).objective == CAUSAL_LM:
        result = perplexity(loaded.model, ids, seq_len, windows, batch_size, device, progress)
    else:
        if reference is None:
            raise ConfigError(
                f"{loaded.source.spec} is an encoder (model_type {loaded.model.config.model_type}): it has no perplexity; "
                "give the dense model as --baseline to measure the cosine similarity of its embeddings to it"
            )
        if reference is model or reference == model:
            ref = loaded
        else:
            ref = load_model(reference, progress=progress) if isinstance(reference, str) else reference
        if adapter_for(ref.model).objective == CAUSAL_LM:
            raise ConfigError(f"{loaded.source.spec} is an encoder and its reference {ref.source.spec} a decoder: "
                              "compare a model with the dense model it was compressed from")
        result = embedding_similarity(loaded.model, ref.model, ids, seq_len, windows, batch_size, device, progress)
    return {"model": loaded.source.spec, "data": data, **result, **model_size(loaded)}

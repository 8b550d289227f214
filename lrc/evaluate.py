"""Evaluation: perplexity by the standard protocol, parameter count, file size, forward speed.

Perplexity protocol (GPTQ, SVD-LLM, ASVD): tokenize the whole text once, cut it into non-overlapping windows
of seq_len tokens, drop the tail, ppl = exp(mean next-token cross-entropy over every predicted token).
`windows` limits the count to a fixed prefix of windows (for quick CPU runs); the result states it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from .calibration import read_text
from .device import resolve_device
from .errors import ConfigError
from .forms import count_params
from .io.checkpoint import tensor_bytes
from .progress import Progress, no_progress
from .sources import LoadedModel, load_model


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
    available = token_ids.numel() // seq_len
    if available == 0:
        raise ConfigError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    count = available if windows is None else min(windows, available)
    if windows is not None and windows < 1:
        raise ConfigError(f"windows must be at least 1, got {windows}")
    data = token_ids[: count * seq_len].view(count, seq_len)
    dev = resolve_device(device)
    model.to(dev)
    nll = 0.0
    predicted = 0
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
    return {
        "perplexity": math.exp(nll / predicted),
        "mean_nll": nll / predicted,
        "seq_len": seq_len,
        "windows": count,
        "windows_available": available,
        "tokens": count * seq_len,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(count * seq_len / seconds, 1),
    }


def model_size(loaded: LoadedModel) -> dict[str, Any]:
    """Parameters (tied weights once) and bytes on disk: safetensors bytes, or the GGUF file for a GGUF source."""
    source = loaded.source
    if source.kind in ("gguf", "alias"):
        disk = source.path.stat().st_size
        what = "gguf file"
    else:
        disk = tensor_bytes(Path(loaded.folder))
        what = "safetensors files"
    return {"params": count_params(loaded.model), "bytes": disk, "bytes_of": what}


def evaluate(
    model: str | LoadedModel,
    data: str,
    seq_len: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Perplexity on the text file `data`, parameter count and size of `model` (path, Hub id, alias or loaded)."""
    loaded = load_model(model, progress=progress) if isinstance(model, str) else model
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ConfigError(f"seq_len {seq_len} is longer than the model's context ({context} tokens)")
    text = read_text(data, what="evaluation")
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    result = perplexity(loaded.model, ids, seq_len, windows, batch_size, device, progress)
    return {"model": loaded.source.spec, "data": data, **result, **model_size(loaded)}

"""Calibration text: reading it, cutting it into token windows, or sampling it from the model (data-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError
from ..hub import network_failure, quiet_retries

SELF_SAMPLED = "self-sampled"


def read_text(source: str, what: str = "calibration") -> str:
    """Text of a .txt file, a .jsonl file (the `text` field of each line), or `hf://datasets/OWNER/NAME/FILE`.

    Line ends are read as "\n" whatever the file uses ("\r\n", "\r"), as Python's text mode reads them: the
    same text gives the same tokens whichever system wrote it."""
    path = _fetch(source) if source.startswith("hf://") else Path(source).expanduser()
    if path.is_dir():
        raise CalibrationError(f"{what} file {source} is a folder; give a .txt or .jsonl file")
    if not path.is_file():
        raise CalibrationError(f"{what} file not found: {source}")
    raw = path.read_bytes()
    if b"\x00" in raw[:1 << 20]:
        raise CalibrationError(f"{what} file {source} looks binary (contains NUL bytes); give UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{what} file {source} is not UTF-8 text") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Python's text mode reads
    if path.suffix.lower() == ".jsonl":
        text = _jsonl_text(text, source)
    if not text.strip():
        raise CalibrationError(f"{what} file {source} is empty")
    return text


def _jsonl_text(text: str, source: str) -> str:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CalibrationError(f"{source} line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{source} line {number} has no string field 'text'")
        docs.append(record["text"])
    return "\n\n".join(docs)


def _fetch(source: str) -> Path:
    """Download `hf://datasets/OWNER/NAME/PATH/IN/REPO` with huggingface_hub (needs the network)."""
    parts = source.removeprefix("hf://").split("/")
    if len(parts) < 4 or parts[0] != "datasets":
        raise CalibrationError(f"a Hub calibration source looks like hf://datasets/OWNER/NAME/FILE, got {source}")
    repo, filename = "/".join(parts[1:3]), "/".join(parts[3:])
    from huggingface_hub import hf_hub_download

    try:
        with quiet_retries():
            return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as exc:
        reason = "the network is unreachable and it is not in the local cache" if network_failure(exc) else type(exc).__name__
        raise CalibrationError(
            f"cannot download {filename} of dataset {repo} from the Hub ({reason}); offline, give a local .txt or .jsonl file"
        ) from None


def token_windows(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` non-overlapping windows of `seq_len` tokens, chosen at random (seeded) from the whole text.

    Returns a (samples, seq_len) int64 tensor. The text is tokenized once, as in the perplexity protocol.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available < samples:
        raise CalibrationError(
            f"calibration text has {ids.numel()} tokens; {samples} windows x {seq_len} tokens = "
            f"{samples * seq_len} needed (lower --samples or --seq-len, or give more text)"
        )
    return _windows(ids, window_order(available, seed)[:samples], seq_len)


def window_order(available: int, seed: int) -> torch.Tensor:
    """The seeded random order of the `available` non-overlapping windows: calibration takes the first
    `samples`, the held-out check (see heldout_token_windows) the next ones, so the two never overlap."""
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))


def _windows(ids: torch.Tensor, picked: torch.Tensor, seq_len: int) -> torch.Tensor:
    starts = picked.sort().values * seq_len
    if not starts.numel():
        return torch.zeros(0, seq_len, dtype=torch.long)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def heldout_token_windows(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int, count: int) -> torch.Tensor:
    """Up to `count` windows of the text that `token_windows(..., samples, seq_len, seed)` does not use
    (the next ones in the same seeded order); fewer, or none, when the text has no more. (k, seq_len) int64."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return _windows(ids, window_order(ids.numel() // seq_len, seed)[samples : samples + count], seq_len)


def sample_windows(model: Any, tokenizer: Any, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Data-free calibration: `samples` sequences of `seq_len` tokens sampled from the model itself.

    Each starts from the BOS token (or EOS if the model has none) and continues with plain sampling
    (temperature 1, top-k 50), seeded. Returns (samples, seq_len) int64, an ordinary tensor: generated under
    torch.no_grad, not torch.inference_mode, whose tensors autograd refuses to save, and the output-gradient
    pass's loss saves the token ids (its cross-entropy targets).
    """
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise CalibrationError(f"data-free calibration samples text from the model, and {type(model).__name__} "
                               "cannot generate; give --calib FILE instead")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("data-free calibration needs a BOS or EOS token; give --calib FILE instead")
    torch.manual_seed(seed)
    prompt = torch.full((samples, 1), start, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=50,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=start,
        )
    return out[:, :seq_len].cpu()

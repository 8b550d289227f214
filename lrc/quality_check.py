"""The held-out check: the compressed model's loss on calibration-text windows the statistics never saw,
next to the dense model's loss on the same windows.

Per-matrix `rel_error` is measured on the calibration data itself, so it can say "fine" for a model that
only fits those few tokens. This check cannot: it runs the whole model on `heldout_windows` other windows
of the same text (the next ones in the calibration's seeded window order, so disjoint from the
calibration windows and the same for the same seed; for self-sampled calibration, sequences sampled from
the dense model with another seed). loss = mean next-token cross-entropy; the perplexity ratio
exp(loss_compressed - loss_dense) above `heldout_max_ratio` stops the run before anything is written.
Models without a language-model head (encoders) skip it, saying so in the report.
Cost: 2 x heldout_windows forward passes (dense before, compressed after factorization), about
2 x 4 / 128 = 6% of the default calibration's forward pass, without its backward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import SELF_SAMPLED, read_text, sample_windows
from .calibration.text import heldout_token_windows
from .config import CompressionConfig
from .errors import QualityError
from .factorize import METHODS
from .sources import LoadedModel

SELF_SAMPLED_SEED_OFFSET = 7919  # held-out sequences of a self-sampled run use seed + this


def mean_loss(model: Any, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) of `model` over every predicted token of `windows` (k x seq_len)."""
    home = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
                count += batch[:, 1:].numel()
    finally:
        model.to(home)
    return total / count


def held_out_advice(method: str) -> str:
    """What to do when the compressed model fails the held-out check: more data helps only a method that
    weighs it."""
    if METHODS.get(method).weighs_data:
        return "give more calibration data (--samples) or remove less (--budget)"
    return (f"remove less (--budget), or use a method that weighs the calibration data (method {method} does not; "
            "e.g. --method loss-aware)")


@dataclass
class HeldOutCheck:
    """The held-out windows and the dense model's loss on them, measured before the model is compressed."""

    windows: torch.Tensor
    dense_loss: float | None
    max_ratio: float
    batch_size: int
    device: torch.device
    skipped: str = ""
    advice: str = ""  # what to do when the ratio is past the limit (held_out_advice)

    @classmethod
    def measure_dense(
        cls, loaded: LoadedModel, config: CompressionConfig,
        loss_of: Callable[[Any, torch.Tensor, int, torch.device], float] = mean_loss,
    ) -> HeldOutCheck:
        """Pick the held-out windows and measure the (still dense) model on them with `loss_of` (a streamed
        model's: block by block, lrc.stream.pipeline)."""
        from .device import resolve_device

        device = resolve_device(config.device)
        count = config.heldout_windows
        none = torch.zeros(0, config.seq_len, dtype=torch.long)
        if count == 0:
            return cls(none, None, config.heldout_max_ratio, config.batch_size, device, "heldout_windows is 0")
        head = getattr(loaded.model, "get_output_embeddings", lambda: None)()
        if head is None:  # an encoder (BertModel): no next-token loss to compare
            return cls(none, None, config.heldout_max_ratio, config.batch_size, device,
                       f"{type(loaded.model).__name__} has no language-model head")
        if config.calib is None or config.calib == SELF_SAMPLED:
            with torch.random.fork_rng():
                windows = sample_windows(loaded.model, loaded.tokenizer, count, config.seq_len,
                                         config.seed + SELF_SAMPLED_SEED_OFFSET)
        else:
            text = read_text(config.calib)
            windows = heldout_token_windows(loaded.tokenizer, text, config.samples, config.seq_len, config.seed, count)
        if windows.shape[0] == 0:
            reason = (f"the calibration text has no {config.seq_len}-token window left beyond the {config.samples} "
                      "used for the statistics")
            warnings.warn(f"lrc: held-out quality check skipped: {reason}; give more text to enable it", stacklevel=2)
            return cls(windows, None, config.heldout_max_ratio, config.batch_size, device, reason)
        dense_loss = loss_of(loaded.model, windows, config.batch_size, device)
        if not math.isfinite(dense_loss):  # no ratio can be taken to it
            raise QualityError(
                f"the dense model's own loss on {windows.shape[0]} held-out calibration windows is {dense_loss}: it "
                "does not predict this text, so the compressed model cannot be judged against it; check the model "
                "and --calib (or skip the held-out check with heldout_windows: 0); nothing was written"
            )
        return cls(windows, dense_loss, config.heldout_max_ratio, config.batch_size, device,
                   advice=held_out_advice(config.method))

    def compare(self, model: Any) -> dict[str, Any]:
        """The report entry for the compressed `model`; raises QualityError past the perplexity-ratio limit."""
        if self.dense_loss is None:
            return {"windows": 0, "skipped": self.skipped}
        return self.entry(mean_loss(model, self.windows, self.batch_size, self.device))

    def entry(self, loss: float) -> dict[str, Any]:
        """The report entry for the compressed model's held-out `loss`; raises QualityError past the limit."""
        assert self.dense_loss is not None
        ratio = math.exp(min(loss - self.dense_loss, 700.0))
        entry = {
            "windows": int(self.windows.shape[0]),
            "tokens": int(self.windows.numel()),
            "dense_loss": round(self.dense_loss, 6),
            "compressed_loss": round(loss, 6),
            "dense_perplexity": round(math.exp(min(self.dense_loss, 700.0)), 4),
            "compressed_perplexity": round(math.exp(min(loss, 700.0)), 4),
            "perplexity_ratio": round(ratio, 4),
            "max_ratio": self.max_ratio,
        }
        if not math.isfinite(loss) or ratio > self.max_ratio:
            raise QualityError(
                f"the compressed model's perplexity on {entry['windows']} held-out calibration windows is "
                f"{entry['compressed_perplexity']:.4g}, {ratio:.3g}x the dense model's {entry['dense_perplexity']:.4g} "
                f"(limit {self.max_ratio:g}x): the model is broken; {self.advice}; nothing was written"
            )
        return entry

"""Whether the calibration data determines the statistics the factorization relies on.

Every method weighs a matrix W (m x n) by its input Gram G = X Xᵀ (n x n, X = the n x T calibration
inputs). rank G <= T, so with fewer tokens T than the input width n, G is singular in at least n - T
directions: the decomposition then fits W only on the subspace the few tokens span and reports a tiny
error there, while the model is ruined on everything else (SmolLM2-135M at 256 tokens: largest
rel_error 0.0095, perplexity 2e9 against 46 dense). Damping (λ = 1e-6 · mean diag G) only makes G
invertible; it does not supply the missing directions.

Two checks, both before any decomposition:
- tokens: every input sees at least as many tokens as its width n (a necessary condition). A dense
  layer sees all T tokens; a mixture-of-experts expert only those routed to it, so the message names the
  input needing the most calibration tokens and that number.
- numerical rank: for each distinct input Gram, r = #{eigenvalues λ > n · ε · λ_max} (ε = float64
  machine epsilon, numpy's matrix_rank rule for a Gram). If r < MIN_RANK_FRACTION · n, the data spans
  too few directions (text repeating itself: 1 of 64 for "aaaa...", 5 for "abab..."), even with T >= n.
  Some deficiency is the model's own and more data would not lift it: heads sharing a key/value head
  that attend alike give identical outputs (a tiny GQA model trained 20 steps: o_proj input rank 52 of
  64 on natural text), dead channels; damping hides those, so only a Gram missing more than half of its
  directions is refused. An input of the first decoder layer whose rank is at most the number of
  distinct tokens in the data is not refused: its first input is the normalised token embedding, whose
  rank is that number (28 of 64 on 128 tokens of text with a byte tokenizer), a vocabulary coverage
  limit rather than a failure of the statistics, and in a parallel block (GPT-J, GPT-NeoX, Phi-2,
  Falcon, Cohere) the MLP's inputs are functions of that embedding alone too (43 of 256 directions on
  512 tokens of 43 distinct bytes). Every input of a later layer mixes context.
Cost: one float64 eigvalsh per distinct Gram: SmolLM2-135M's 30 layers x (3 of 576 + 1 of 1536) take
about 7 s on one CPU thread (0.24 s a layer, measured), against ~34 s for its loss-aware decompositions
and ~750 s for the default calibration (128 x 512).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import CalibrationError
from ..factorize import InputStats

# least share of an input's directions the data must span (the rest may be the model's own deficiency)
MIN_RANK_FRACTION = 0.5


def numerical_rank(gram: torch.Tensor) -> int:
    """#{λ > n ε λ_max} of a symmetric positive semi-definite n x n Gram, in float64."""
    g = gram.to(torch.float64)
    evals = torch.linalg.eigvalsh(g)
    top = float(evals[-1])
    if not top > 0:
        return 0
    return int((evals > g.shape[0] * torch.finfo(torch.float64).eps * top).sum())


def check_token_count(in_features: Mapping[str, int], samples: int, seq_len: int) -> None:
    """The tokens check before any statistics are collected, on the inputs every token reaches: raise
    CalibrationError when samples · seq_len is below the widest of them. in_features: {targeted matrix: its
    input width}; experts (names with `.experts.`, which see only the tokens routed to them) are checked
    after the statistics pass (check_sufficiency)."""
    widths = {name: n for name, n in in_features.items() if ".experts." not in name}
    if not widths:
        return
    name = max(widths, key=lambda key: widths[key])
    total, width = samples * seq_len, widths[name]
    if total < width:
        raise CalibrationError(
            f"calibration has {total} tokens, fewer than the {width} inputs of {name}: the statistics cannot "
            f"determine the factorization (it would fit only the {total} directions seen). Give at least {width} "
            f"tokens, e.g. --samples {-(-width // seq_len)} at --seq-len {seq_len} (more is better; the default is "
            "128 x 512)"
        )


def check_sufficiency(inputs: Mapping[str, InputStats], windows: torch.Tensor, first_layer: str) -> None:
    """Raise CalibrationError when the input statistics cannot determine the decompositions.

    inputs: the input statistics of every targeted linear that owns one (shared Grams appear once);
    windows: the calibration token ids (samples x seq_len); first_layer: the module-name prefix of the first
    decoder layer (e.g. "model.layers.0."), whose inputs may span as few directions as there are distinct
    tokens (see the module docstring).
    """
    if not inputs:
        return
    samples, seq_len = int(windows.shape[0]), int(windows.shape[1])
    total = samples * seq_len
    distinct_tokens = int(windows.unique().numel())

    def needed(item: tuple[str, InputStats]) -> float:  # total tokens for this input to see its width
        stats = item[1]
        return math.inf if stats.tokens == 0 else stats.gram.shape[0] * total / stats.tokens

    name, worst = max(inputs.items(), key=needed)
    width, seen = worst.gram.shape[0], worst.tokens
    if seen < width:
        need = math.ceil(needed((name, worst))) if seen else None
        what = (f"calibration has {seen} tokens, fewer than the {width} inputs of {name}" if seen == total else
                f"calibration has {total} tokens, of which {seen} reach {name} (routed), fewer than its {width} inputs")
        advice = (f"Give at least {need} tokens, e.g. --samples {-(-need // seq_len)} at --seq-len {seq_len} (more is "
                  "better; the default is 128 x 512)" if need else "Give more calibration data")
        raise CalibrationError(
            f"{what}: the statistics cannot determine the factorization (it would fit only the {seen} directions "
            f"seen). {advice}"
        )
    for name, stats in inputs.items():
        n = stats.gram.shape[0]
        rank = numerical_rank(stats.gram)
        if rank < MIN_RANK_FRACTION * n and not (name.startswith(first_layer) and rank <= distinct_tokens):
            raise CalibrationError(
                f"the calibration inputs of {name} span only {rank} of its {n} directions ({stats.tokens} tokens in "
                f"{samples} windows): the text repeats itself too much to determine the factorization; give "
                f"more varied calibration text"
            )

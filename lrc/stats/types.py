"""`CalibrationStats`: everything the calibration passes measured, reusable across methods, allocators and budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..factorize import InputStats, OutputStats


@dataclass
class CalibrationStats:
    """The statistics of one model on one set of calibration windows.

    windows: token ids (samples x seq_len); inputs: input statistics per linear that owns them; shares:
    linear -> owner for linears reading the same tensor (q/k/v, gate/up); outputs: output-gradient
    statistics per linear (empty unless gradients were collected).
    """

    windows: torch.Tensor
    calib_source: str
    inputs: dict[str, InputStats]
    shares: dict[str, str]
    outputs: dict[str, OutputStats]
    timing: dict[str, float]

    def input_of(self, name: str) -> InputStats:
        return self.inputs[self.shares.get(name, name)]

    def merged(self, other: CalibrationStats) -> CalibrationStats:
        """The statistics of both window sets together (every statistic is a sum over tokens)."""
        inputs = {
            n: InputStats(s.gram + other.inputs[n].gram, s.abs_sum + other.inputs[n].abs_sum, s.tokens + other.inputs[n].tokens)
            for n, s in self.inputs.items()
        }
        outputs = {}
        for n, o in self.outputs.items():
            p = other.outputs[n]
            gram = o.gram + p.gram if o.gram is not None and p.gram is not None else None
            outputs[n] = OutputStats(gram, o.diag + p.diag, o.fisher_rows + p.fisher_rows, o.tokens + p.tokens)
        timing = {k: v + other.timing.get(k, 0.0) for k, v in self.timing.items()}
        return CalibrationStats(
            torch.cat([self.windows, other.windows]), self.calib_source, inputs, self.shares, outputs, timing
        )

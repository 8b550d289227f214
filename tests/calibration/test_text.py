"""Calibration windows: seeded, non-overlapping, and a clear error when the text is too short."""

from __future__ import annotations

import pytest
import torch

import lrc
from lrc.calibration import read_text, token_windows
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


def test_line_ends_are_read_as_newlines_whatever_wrote_the_file(tmp_path):
    """A file written with Windows ("\\r\\n") or old Mac ("\\r") line ends reads as the "\\n" text, so it gives the
    same tokens and the same statistics-cache key; a "\\n" file's key stays the SHA-256 of its bytes."""
    import hashlib

    from lrc.calibration import read_text
    from lrc.stats.store import data_fingerprint

    lines = ["= Valkyria Chronicles =", "", " The game began development in 2010 ."]
    unix, windows, mac = tmp_path / "unix.txt", tmp_path / "windows.txt", tmp_path / "mac.txt"
    unix.write_bytes("\n".join(lines).encode())
    windows.write_bytes("\r\n".join(lines).encode())
    mac.write_bytes("\r".join(lines).encode())
    assert read_text(str(windows)) == read_text(str(mac)) == read_text(str(unix)) == "\n".join(lines)
    assert data_fingerprint(str(windows)) == data_fingerprint(str(unix)) == hashlib.sha256(unix.read_bytes()).hexdigest()


def test_a_folder_is_not_a_calibration_file(tmp_path):
    with pytest.raises(CalibrationError, match=r"is a folder; give a .txt or .jsonl file"):
        read_text(str(tmp_path))
    with pytest.raises(CalibrationError, match="calibration file not found"):
        read_text(str(tmp_path / "missing.txt"))

"""Calibration data: text -> seeded token windows, or windows sampled from the model itself (data-free)."""

from .text import SELF_SAMPLED, read_text, sample_windows, token_windows

__all__ = ["SELF_SAMPLED", "read_text", "sample_windows", "token_windows"]

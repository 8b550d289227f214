"""Calibration: text -> token windows -> per-linear input statistics, one decoder layer at a time."""

from .gradients import collect_output_stats
from .layerwise import calibrate_layerwise, capture_first_layer_inputs
from .text import SELF_SAMPLED, read_text, sample_windows, token_windows

__all__ = ["SELF_SAMPLED", "calibrate_layerwise", "collect_output_stats", "capture_first_layer_inputs", "read_text", "sample_windows",
           "token_windows"]

"""Calibration statistics: how they are collected (one layer walker, the input and output-gradient passes) and kept."""

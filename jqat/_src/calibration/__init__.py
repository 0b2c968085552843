"""Calibration: statistics states, threshold searches and PyTree helpers."""

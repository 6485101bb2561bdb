"""Latency and hardware: measured timing, the latency model, hardware profiles, calibration."""

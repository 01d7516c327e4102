"""Closed-form distortion approximations: numpy and scipy only (no torch, no I/O, no plots)."""

"""Triton kernels for the LUT linear (forward, decode GEMV, fused backward)."""

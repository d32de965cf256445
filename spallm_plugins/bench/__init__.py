"""Benchmarks: quality, fine-tuning and kernels; each writes JSON."""

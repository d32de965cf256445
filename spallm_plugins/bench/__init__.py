"""Benchmarks (``spallm bench ...``): each writes JSON, and a plot when matplotlib is installed."""


class BenchUnavailableError(RuntimeError):
    """A benchmark or plot cannot run here (no CUDA device, or an optional package is missing)."""

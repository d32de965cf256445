"""Benchmarks (``spallm bench ...``): each writes JSON, and a plot when matplotlib is installed."""

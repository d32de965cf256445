"""Sketching one linear in row chunks: the budget bounds the workspace and never changes the result."""

import argparse
import itertools
import subprocess
import sys

import pytest
import torch

from spallm_plugins.cli.common import memory_size
from spallm_plugins.config import SketchConfig
from spallm_plugins.sketch import sketch_linear
from spallm_plugins.sketch.memory import ROW_QUANTUM, WORKSPACE_BYTES_PER_WEIGHT, parse_memory, row_chunks


def _problem(out_f=200, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f))
    return torch.randn(out_f, in_f, generator=g) * 0.05, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize(
    "config",
    [
        SketchConfig(bits=4, groups_per_row=2),
        SketchConfig(bits=3, groups_per_row=4, method="gptq", nsamples=1, seqlen=1, refit_rounds=2),
        SketchConfig(bits=2, groups_per_row=1, method="gptq", nsamples=1, seqlen=1, act_order=True),
    ],
    ids=["data-free", "calibrated", "calibrated-act-order"],
)
def test_the_sketch_does_not_depend_on_the_chunk_size(config):
    weight, hessian = _problem()
    hessian = hessian if config.method == "gptq" else None
    one_chunk = sketch_linear(weight, config, hessian)
    smallest = 1  # one ROW_QUANTUM per chunk: 64, 64, 64, 8 rows
    assert len(row_chunks(200, 128, smallest)) == 4
    chunked = sketch_linear(weight, config, hessian, max_memory=smallest)
    assert torch.equal(chunked.codes, one_chunk.codes)
    assert torch.equal(chunked.tables, one_chunk.tables)
    assert chunked.loss == pytest.approx(one_chunk.loss, rel=1e-6)


def test_row_chunks_cover_the_rows_in_quantum_multiples():
    for out_f, in_f, budget in [(11008, 4096, 2 << 30), (28672, 8192, 1 << 30), (100, 64, 1), (64, 64, 10**12)]:
        chunks = row_chunks(out_f, in_f, budget)
        assert chunks[0].start == 0 and chunks[-1].stop == out_f
        assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
        assert all((c.stop - c.start) % ROW_QUANTUM == 0 for c in chunks[:-1])
        rows = chunks[0].stop - chunks[0].start
        assert rows == ROW_QUANTUM or rows * in_f * WORKSPACE_BYTES_PER_WEIGHT <= budget


def test_memory_sizes_parse_and_bad_ones_are_named():
    assert parse_memory("2GiB") == 2 << 30
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("512 MiB") == 512 << 20
    assert parse_memory("4096") == 4096
    for bad in ("lots", "2XB", "-1GB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="'lots'"):
        memory_size("lots")


_PEAK = """
import sys, torch
from spallm_plugins.config import SketchConfig
from spallm_plugins.sketch import sketch_linear

def status_kib(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

weight = torch.randn(2048, 2048).to(torch.bfloat16)
x = torch.randn(256, 2048)
hessian = 2 * x.T @ x / 256
config = SketchConfig(bits=4, groups_per_row=4, method="gptq", nsamples=1, seqlen=1, kmeans_restarts=0, kmeans_iters=5)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the high-water mark (VmHWM) to the current resident size
base = status_kib("VmRSS")
sketch_linear(weight, config, hessian, max_memory=int(sys.argv[1]))
print((status_kib("VmHWM") - base) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets Linux's VmHWM")
def test_a_smaller_budget_means_a_smaller_workspace():
    """Peak RSS growth of a calibrated sketch of a 2048 x 2048 matrix, one chunk vs 64-row chunks (own processes).

    The high-water mark is reset right before the sketch, so what imports allocated does not hide it.
    """

    def growth(budget: int) -> int:
        run = subprocess.run([sys.executable, "-c", _PEAK, str(budget)], capture_output=True, text=True, check=True)
        return int(run.stdout.strip().splitlines()[-1])

    whole, chunked = growth(1 << 40), growth(1)
    assert whole > 2048 * 2048 * 40  # one chunk: tens of bytes per weight (measured ~70)
    assert chunked < whole / 2  # measured ~0.3

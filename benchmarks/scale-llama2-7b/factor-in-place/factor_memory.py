"""Peak resident memory of preparing one Hessian (damping, Cholesky, inverse, Cholesky) at a given width.

Run once per version of the package (put another checkout first on ``PYTHONPATH`` to measure it), with the
sketcher's malloc setting, e.g. at Llama-3-70B's down_proj width:

    MALLOC_MMAP_THRESHOLD_=1048576 python factor_memory.py 28672

Prints JSON: the width, the seconds and the growth of peak RSS over the handed Hessian, in bytes and in
``[width, width]`` float32 matrices.
"""

import json
import resource
import sys
import time

import torch

import spallm_plugins
from spallm_plugins.sketch.gptq import prepare_hessian


def main(width: int) -> dict:
    torch.cholesky_inverse(torch.linalg.cholesky(torch.eye(64)))  # LAPACK's first use, outside the measurement
    g = torch.Generator().manual_seed(0)
    hessian = torch.zeros(width, width)
    x = torch.randn(8, width, generator=g)
    hessian.addmm_(x.T, x).diagonal().add_(1.0)  # positive definite, built with one [width, width] alive
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    prepare_hessian(hessian, 0.01, overwrite=True)
    seconds = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "package": spallm_plugins.__file__,
        "width": width,
        "seconds": round(seconds, 1),
        "peak_rss_growth_bytes": growth,
        "peak_rss_growth_matrices": round(growth / (4 * width * width), 2),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))

"""``spallm bench kmeans``: our batched weighted k-means against scikit-learn's KMeans run per row.

scikit-learn (optional) is what the reference implementation runs, once per row, with the
loss-error-aware sample weights; both solve the same weighted 1-D problems here, side by side.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..sketch.kmeans import weighted_kmeans_1d, weighted_sse
from . import BenchUnavailableError


def run_kmeans_bench(
    weight: torch.Tensor, column_weights: torch.Tensor, k: int = 16, iters: int = 50
) -> dict[str, Any]:
    """``weight [rows, n]``, ``column_weights [n]``: time and total objective of both solvers."""
    try:
        import numpy as np
        from sklearn.cluster import KMeans
    except ImportError:
        raise BenchUnavailableError("this benchmark needs scikit-learn: pip install scikit-learn") from None
    w = weight.float()
    cw = column_weights.float().expand_as(w)
    start = time.perf_counter()
    centroids, assign = weighted_kmeans_1d(w, k, cw, iters=iters)
    ours_seconds = time.perf_counter() - start
    ours = float(weighted_sse(w, centroids, assign, cw).sum())

    data, sample_weight = w.numpy().astype(np.float64), column_weights.float().numpy().astype(np.float64)
    start = time.perf_counter()
    total = 0.0
    for row in data:
        km = KMeans(n_clusters=k, n_init=1, init="k-means++", random_state=0, max_iter=100, tol=1e-6)
        km.fit(row[:, None], sample_weight=sample_weight)
        c = torch.from_numpy(km.cluster_centers_.reshape(1, -1)).float().sort(1).values
        r = torch.from_numpy(row).float()[None]
        a = (r[..., None] - c[:, None, :]).abs().argmin(-1)
        total += float(weighted_sse(r, c, a, column_weights.float()[None]).sum())
    sklearn_seconds = time.perf_counter() - start
    return {
        "rows": w.shape[0],
        "columns": w.shape[1],
        "k": k,
        "ours_seconds": round(ours_seconds, 4),
        "sklearn_seconds": round(sklearn_seconds, 3),
        "speedup": round(sklearn_seconds / ours_seconds, 1),
        "ours_objective": ours,
        "sklearn_objective": total,
        "objective_ratio": round(ours / total, 5),
    }

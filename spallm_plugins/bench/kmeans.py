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


def loss_error_aware_column_weights(model, tokenizer, layer: str, calibration: str, nsamples: int, seqlen: int):
    """The column weights a calibrated sketch gives ``layer``'s k-means: its Hessian over the calibration
    data (captured at that layer's input as the model runs), damped and inverted as the sketcher does."""
    from ..config import SketchConfig
    from ..sketch.calibration import calibration_batch
    from ..sketch.gptq import loss_error_aware_weights, prepare_hessian
    from ..sketch.hessians import HessianCollector

    ids = calibration_batch(calibration, tokenizer, nsamples, seqlen)
    with HessianCollector({layer: model.get_submodule(layer)}, block_index=-1) as collector, torch.no_grad():
        for batch in ids.split(8):
            collector.new_batch()
            model(batch, use_cache=False)
    prepared = prepare_hessian(collector.hessian(layer), SketchConfig().damping, layer)
    return loss_error_aware_weights(prepared.inverse_cholesky, SketchConfig().grid_exponent)


def run_layer_kmeans_bench(
    model_ref: str,
    layer: str,
    *,
    bits: int = 4,
    calibration: str | None = None,
    nsamples: int = 16,
    seqlen: int = 256,
    revision: str | None = None,
) -> dict[str, Any]:
    """:func:`run_kmeans_bench` on one linear of a model: uniform column weights, or the loss-error-aware
    ones of a calibrated sketch when ``calibration`` data is given."""
    from ..models import load_model

    model, tokenizer = load_model(model_ref, dtype=torch.float32, revision=revision)
    weight = model.get_submodule(layer).weight.detach()
    column_weights = torch.ones(weight.shape[1])
    if calibration:
        column_weights = loss_error_aware_column_weights(model, tokenizer, layer, calibration, nsamples, seqlen)
    kind = "loss-error-aware" if calibration else "uniform"
    return {"layer": layer, "weights": kind, **run_kmeans_bench(weight, column_weights, k=1 << bits)}

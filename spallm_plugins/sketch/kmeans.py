"""Batched weighted 1-D k-means: one independent problem per row-group, all solved at once.

Each row-group's values are scalars, so Lloyd's algorithm needs no distance matrix: with sorted
centroids, the nearest one is found by ``searchsorted`` on the midpoints, and the update is a
weighted ``scatter_add``. Memory is O(rows * n), never O(rows * n * k). Initialisation uses the
weighted quantiles of each row, which makes the result deterministic and independent of the seed.
"""

from __future__ import annotations

import torch


def assign_nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for ``values [R, n]`` given sorted ``centroids [R, k]``."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def weighted_quantile_init(values: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    order = values.argsort(dim=1)
    v = values.gather(1, order)
    cw = weights.gather(1, order).cumsum(1)
    total = cw[:, -1:].clamp_min(torch.finfo(cw.dtype).tiny)
    targets = (torch.arange(k, device=values.device, dtype=values.dtype) + 0.5) / k * total
    idx = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp_max(v.shape[1] - 1)
    return v.gather(1, idx)


def weighted_kmeans_1d(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 50,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum_j w[r, j] * (values[r, j] - c[r, assign[r, j]])**2`` for every row ``r``.

    ``weights`` broadcasts to ``values`` (``None`` = all ones; a ``[n]`` vector = the same column
    weights for every row). Returns ``(centroids [R, k] sorted, assignments [R, n] int64)``.
    Empty clusters keep their previous centroid. Stops early when no assignment changes.
    """
    values = values.float()
    w = torch.ones_like(values) if weights is None else weights.float().expand_as(values).contiguous()
    centroids = weighted_quantile_init(values, w, k)
    assign = assign_nearest(values, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).scatter_add_(1, assign, w * values)
        mass = torch.zeros_like(centroids).scatter_add_(1, assign, w)
        updated = torch.where(mass > 0, sums / mass.clamp_min(torch.finfo(mass.dtype).tiny), centroids)
        centroids = updated.sort(dim=1).values
        new_assign = assign_nearest(values, centroids)
        changed = (new_assign != assign).any()
        assign = new_assign
        if not changed:
            break
    return centroids, assign


def weighted_sse(values: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, weights=None) -> torch.Tensor:
    """The k-means objective per row."""
    err = (values.float() - centroids.gather(1, assign)) ** 2
    if weights is not None:
        err = err * weights.float()
    return err.sum(1)

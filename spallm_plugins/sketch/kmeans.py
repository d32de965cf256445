"""Batched weighted 1-D k-means: one independent problem per row-group, all solved at once.

Each row-group's values are scalars, so Lloyd's algorithm needs no distance matrix: with sorted
centroids, the nearest one is found by ``searchsorted`` on the midpoints, and clusters are
contiguous runs of the sorted values. Memory is O(rows * n), never O(rows * n * k). Initialisation uses the
weighted quantiles of each row, which makes the result deterministic and independent of the seed.
"""

from __future__ import annotations

import torch


def assign_nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for ``values [R, n]`` given sorted ``centroids [R, k]``."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def weighted_quantile_init(v_sorted: torch.Tensor, cum_weights: torch.Tensor, k: int) -> torch.Tensor:
    """The ``(i + 0.5) / k`` weighted quantiles of each row (rows sorted, cumulative weights given)."""
    total = cum_weights[:, -1:].clamp_min(1e-300)
    targets = (torch.arange(k, device=v_sorted.device, dtype=cum_weights.dtype) + 0.5) / k * total
    idx = torch.searchsorted(cum_weights.contiguous(), targets.contiguous()).clamp_max(v_sorted.shape[1] - 1)
    return v_sorted.gather(1, idx)


def weighted_kmeans_1d(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 50,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum_j w[r, j] * (values[r, j] - c[r, assign[r, j]])**2`` for every row ``r``.

    ``weights`` broadcasts to ``values`` (``None`` = all ones; a ``[n]`` vector = the same column
    weights for every row). Returns ``(centroids [R, k] sorted, assignments [R, n] int64)``.

    In 1-D each cluster is a contiguous run of the sorted values, so after one sort per row an
    iteration only needs the ``k - 1`` cut points (``searchsorted`` of the centroid midpoints into the
    sorted values) and prefix sums of ``w`` and ``w * v``: O(R * k * log n) per iteration instead of
    O(R * n). Empty clusters keep their centroid; iteration stops when no cut point moves.
    ``init`` (``[R, k]``, sorted) replaces the weighted-quantile start.
    """
    values = values.float()
    w = torch.ones_like(values) if weights is None else weights.float().expand_as(values).contiguous()
    v_sorted, order = values.sort(dim=1)
    w_sorted = w.gather(1, order).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    mass_prefix = torch.cat([zero, w_sorted.cumsum(1)], 1)
    centroids = weighted_quantile_init(v_sorted, mass_prefix[:, 1:], k) if init is None else init.float()
    sum_prefix = torch.cat([zero, (w_sorted * v_sorted.double()).cumsum(1)], 1)
    n = values.shape[1]
    full = torch.full_like(zero, n, dtype=torch.long)
    cuts = None
    for _ in range(iters):
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) * 0.5).contiguous()
        new_cuts = torch.searchsorted(v_sorted, midpoints, right=True)
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        bounds = torch.cat([torch.zeros_like(full), cuts, full], 1)
        mass = mass_prefix.gather(1, bounds[:, 1:]) - mass_prefix.gather(1, bounds[:, :-1])
        sums = sum_prefix.gather(1, bounds[:, 1:]) - sum_prefix.gather(1, bounds[:, :-1])
        updated = torch.where(mass > 0, sums / mass.clamp_min(1e-300), centroids.double())
        centroids = updated.float().sort(dim=1).values
    return centroids, assign_nearest(values, centroids)


def weighted_sse(values: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, weights=None) -> torch.Tensor:
    """The k-means objective per row."""
    err = (values.float() - centroids.gather(1, assign)) ** 2
    if weights is not None:
        err = err * weights.float()
    return err.sum(1)

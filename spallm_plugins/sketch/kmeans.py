"""Batched weighted 1-D k-means: one independent problem per row-group, all solved at once.

Each row-group's values are scalars, so Lloyd's algorithm needs no distance matrix: with sorted
centroids, the nearest one is found by ``searchsorted`` on the midpoints, and clusters are
contiguous runs of the sorted values. Memory is O(rows * n), never O(rows * n * k) (k-means++
seeding briefly holds O(rows * n * trials)). Several starts, the best kept per row; seeded, so
deterministic.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 20  # values per k-means pass (measured fastest on 2 cores: 256K-1M)


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


def uniform_grid_init(v_sorted: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spaced cell centres between each row's min and max (the round-to-nearest grid)."""
    lo, hi = v_sorted[:, :1], v_sorted[:, -1:]
    steps = (torch.arange(k, device=v_sorted.device, dtype=v_sorted.dtype) + 0.5) / k
    return lo + (hi - lo) * steps


def kmeans_uniforms(rows: int, k: int, seed: int, restarts: int, trials: int = 2) -> torch.Tensor:
    """The uniform draws of ``restarts`` k-means++ seedings of ``rows`` rows: ``[restarts, rows, draws]``.

    Drawn once per layer from a generator seeded with ``seed``, so that sketching the rows in chunks
    (any chunk size) gives every row the same draws as sketching them all at once.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(restarts, rows, 1 + (k - 1) * trials, generator=generator)


def kmeans_plus_plus_init(values: torch.Tensor, weights: torch.Tensor, k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """Greedy weighted k-means++ seeding for every row at once.

    Each new centre is the best of ``trials`` candidates drawn with probability ``w * D(x)**2``,
    "best" meaning the lowest resulting potential ``sum w * D**2`` (scikit-learn draws
    ``2 + log k``; 2 costs half and, with two restarts, loses little). ``uniforms`` ``[R, 1 + (k-1)
    * trials]`` are the row's draws in [0, 1) (:func:`kmeans_uniforms`). Returns sorted ``[R, k]``.
    """
    rows, n = values.shape
    trials = (uniforms.shape[1] - 1) // max(k - 1, 1)
    uniforms = uniforms.to(values.device)
    w = weights.clamp_min(0)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))

    def sample(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:  # inverse-CDF draws, per row
        cdf = probs.cumsum(1)
        return torch.searchsorted(cdf, draws.to(cdf.dtype) * cdf[:, -1:]).clamp_max(n - 1)

    centers = [values.gather(1, sample(w, uniforms[:, :1]))]
    dist = (values - centers[0]) ** 2
    for step in range(1, k):
        probs = w * dist
        probs = torch.where(probs.sum(1, keepdim=True) > 0, probs, w)
        draws = uniforms[:, 1 + (step - 1) * trials : 1 + step * trials]
        candidates = values.gather(1, sample(probs, draws))
        new_dist = torch.minimum(dist[:, None, :], (values[:, None, :] - candidates[:, :, None]) ** 2)
        best = (new_dist * w[:, None, :]).sum(-1).argmin(1)
        centers.append(candidates.gather(1, best[:, None]))
        dist = new_dist[torch.arange(rows, device=values.device), best]
    return torch.cat(centers, 1).sort(1).values


def _lloyd(
    v_sorted: torch.Tensor, mass_prefix: torch.Tensor, sum_prefix: torch.Tensor, centroids: torch.Tensor, iters: int
) -> torch.Tensor:
    rows, n = v_sorted.shape
    zeros = torch.zeros(rows, 1, dtype=torch.long, device=v_sorted.device)
    full = torch.full_like(zeros, n)
    cuts = None
    for _ in range(iters):
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) * 0.5).contiguous()
        new_cuts = torch.searchsorted(v_sorted, midpoints, right=True)
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        bounds = torch.cat([zeros, cuts, full], 1)
        mass = mass_prefix.gather(1, bounds[:, 1:]) - mass_prefix.gather(1, bounds[:, :-1])
        sums = sum_prefix.gather(1, bounds[:, 1:]) - sum_prefix.gather(1, bounds[:, :-1])
        updated = torch.where(mass > 0, sums / mass.clamp_min(1e-300), centroids.double())
        centroids = updated.float().sort(dim=1).values
    return centroids


def weighted_kmeans_1d(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 50,
    init: torch.Tensor | None = None,
    seed: int = 0,
    restarts: int = 2,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum_j w[r, j] * (values[r, j] - c[r, assign[r, j]])**2`` for every row ``r``.

    ``weights`` broadcasts to ``values`` (``None`` = all ones; a ``[n]`` vector = the same column
    weights for every row). Returns ``(centroids [R, k] sorted, assignments [R, n] int64)``.

    In 1-D each cluster is a contiguous run of the sorted values, so after one sort per row an
    iteration only needs the ``k - 1`` cut points (``searchsorted`` of the centroid midpoints into the
    sorted values) and prefix sums of ``w`` and ``w * v``: O(R * k * log n) per iteration instead of
    O(R * n). Empty clusters keep their centroid; iteration stops when no cut point moves.

    Lloyd only finds a local optimum, so by default it runs from several starts and keeps the best
    result per row: the weighted quantiles, the uniform min-max grid (which guarantees a result no
    worse than round-to-nearest on the same group), and ``restarts`` greedy k-means++ seedings drawn
    from a generator seeded with ``seed`` (deterministic; ``uniforms``, a slice of
    :func:`kmeans_uniforms` drawn for all rows of a layer, replaces the generator when the caller
    works on row chunks). ``init`` (``[R, k]``, sorted) replaces all starts. Every row is solved
    independently of the others, so a result does not depend on which rows are solved together;
    the rows are solved ``CHUNK_ELEMENTS`` values at a time, which bounds the workspace (sorted
    copies, float64 prefix sums, k-means++ distances: ~100 bytes per value) and is 2-8x faster than
    one pass over a large matrix (the working set stays in cache).
    """
    if uniforms is None:
        uniforms = kmeans_uniforms(values.shape[0], k, seed, restarts)
    if uniforms.shape[:2] != (restarts, values.shape[0]):
        raise ValueError(f"uniforms: shape {tuple(uniforms.shape)}, expected ({restarts}, {values.shape[0]}, draws)")
    if weights is not None:
        weights = weights.expand_as(values)
    rows = max(1, CHUNK_ELEMENTS // max(1, values.shape[1]))
    parts = [
        _kmeans_rows(
            values[s : s + rows],
            k,
            None if weights is None else weights[s : s + rows],
            iters,
            None if init is None else init[s : s + rows],
            uniforms[:, s : s + rows],
        )
        for s in range(0, values.shape[0], rows)
    ]
    return torch.cat([c for c, _ in parts]), torch.cat([a for _, a in parts])


def _kmeans_rows(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None,
    iters: int,
    init: torch.Tensor | None,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    restarts = uniforms.shape[0]
    values = values.float()
    w = torch.ones_like(values) if weights is None else weights.float().contiguous()
    v_sorted, order = values.sort(dim=1)
    w_sorted = w.gather(1, order).double()
    zero = torch.zeros(values.shape[0], 1, dtype=torch.float64, device=values.device)
    mass_prefix = torch.cat([zero, w_sorted.cumsum(1)], 1)
    sum_prefix = torch.cat([zero, (w_sorted * v_sorted.double()).cumsum(1)], 1)
    if init is not None:
        centroids = _lloyd(v_sorted, mass_prefix, sum_prefix, init.float(), iters)
        return centroids, assign_nearest(values, centroids)
    starts = [lambda: weighted_quantile_init(v_sorted, mass_prefix[:, 1:], k), lambda: uniform_grid_init(v_sorted, k)]
    starts += [lambda r=r: kmeans_plus_plus_init(values, w, k, uniforms[r]) for r in range(restarts)]
    best, best_assign, best_sse = None, None, None
    for start in starts:
        centroids = _lloyd(v_sorted, mass_prefix, sum_prefix, start(), iters)
        assign = assign_nearest(values, centroids)
        sse = weighted_sse(values, centroids, assign, w)
        if best is None:
            best, best_assign, best_sse = centroids, assign, sse
        else:
            better = sse < best_sse
            best = torch.where(better[:, None], centroids, best)
            best_assign = torch.where(better[:, None], assign, best_assign)
            best_sse = torch.minimum(sse, best_sse)
    return best, best_assign


def weighted_sse(values: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, weights=None) -> torch.Tensor:
    """The k-means objective per row."""
    err = (values.float() - centroids.gather(1, assign)) ** 2
    if weights is not None:
        err = err * weights.float()
    return err.sum(1)

"""Batched weighted 1-D k-means: one independent problem per row-group, all solved at once.

Each row-group's values are scalars, so Lloyd's algorithm needs no distance matrix: with sorted
centroids, the nearest one is found by ``searchsorted`` on the midpoints, and clusters are
contiguous runs of the sorted values, whose sums are differences of prefix sums. Memory is
O(rows * n), never O(rows * n * k). Several starts, the best kept per row; seeded, so
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 20  # values per k-means pass: bounds a pass's temporaries, large enough to vectorise


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


@dataclass(frozen=True)
class SortedRows:
    """Each row's values sorted, with float64 prefix sums of ``w``, ``w * v`` and ``w * v**2``.

    In 1-D every cluster of a sorted centroid set is a contiguous run of the sorted values, so the
    weighted cost of any centroid set, and of any run, is a few differences of these prefix sums:
    ``O(k log n)`` per row instead of a pass over its ``n`` values.
    """

    values: torch.Tensor  # [R, n] float32, sorted
    mass: torch.Tensor  # [R, n + 1] float64: sum of w over values[:, :i]
    prefix: torch.Tensor  # [R, n + 1, 3] float64: sums of w, w * v, w * v**2 over values[:, :i]

    @classmethod
    def build(cls, values: torch.Tensor, weights: torch.Tensor) -> SortedRows:
        """Sort ``values [R, n]`` with their ``weights``."""
        v_sorted, order = values.float().sort(dim=1)
        w = weights.float().gather(1, order).double()
        v = v_sorted.double()
        terms = torch.stack([w, w * v, w * v * v], -1)
        prefix = torch.cat([torch.zeros_like(terms[:, :1]), terms.cumsum(1)], 1)
        return cls(v_sorted, prefix[..., 0].contiguous(), prefix)

    def select(self, index: torch.Tensor) -> SortedRows:
        """The rows ``index`` (a copy)."""
        return SortedRows(self.values[index], self.mass[index], self.prefix[index])

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The three prefix sums before positions ``index [R, ...]``: ``[R, ..., 3]``."""
        rows, length = self.mass.shape
        start = torch.arange(0, rows * length, length, device=index.device).view(rows, *[1] * (index.dim() - 1))
        return self.prefix.view(-1, 3).index_select(0, (index + start).view(-1)).view(*index.shape, 3)

    def runs(self, bounds: torch.Tensor) -> torch.Tensor:
        """Sums of ``w``, ``w v``, ``w v**2`` over the runs between consecutive ``bounds [R, ..., m]``:
        ``[R, ..., m - 1, 3]``."""
        at = self.at(bounds)
        return at[..., 1:, :] - at[..., :-1, :]

    def clusters(self, centroids: torch.Tensor) -> torch.Tensor:
        """Bounds ``[R, ..., k + 1]`` of the clusters of sorted ``centroids [R, ..., k]``: cluster ``j`` is
        the sorted values ``bounds[j]:bounds[j + 1]``, split at the centroid midpoints as
        :func:`assign_nearest` splits them (a value on a midpoint goes to the lower centroid)."""
        rows, n = self.values.shape
        midpoints = (centroids[..., 1:] + centroids[..., :-1]) * 0.5
        cuts = torch.searchsorted(self.values, midpoints.reshape(rows, -1).contiguous(), right=True)
        edge = torch.zeros(*centroids.shape[:-1], 1, dtype=torch.long, device=centroids.device)
        return torch.cat([edge, cuts.view(midpoints.shape), edge + n], -1)

    def cluster_costs(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum w (v - c)**2`` of each cluster of sorted ``centroids [R, ..., k]`` (nearest assignment).

        Returns ``(costs [R, ..., k] float64, bounds [R, ..., k + 1])`` (:meth:`clusters`).
        """
        bounds = self.clusters(centroids)
        return _cost(self.runs(bounds), centroids.double()), bounds

    def draw(self, fractions: torch.Tensor) -> torch.Tensor:
        """Indices drawn with probability proportional to ``w``, by inverse CDF of ``fractions [R, T]``
        in [0, 1); uniform over the row if it has no weight."""
        n = self.values.shape[1]
        total = self.mass[:, -1:]
        index = torch.searchsorted(self.mass, (fractions * total).contiguous(), right=True) - 1
        uniform = (fractions * n).long()
        return torch.where(total > 0, index, uniform).clamp(0, n - 1)


def _cost(sums: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``sum w (v - centre)**2`` of a run from its sums ``[..., 3]`` of ``w``, ``w v``, ``w v**2``."""
    mass, first, second = sums.unbind(-1)
    return (second - 2 * centre * first + centre * centre * mass).clamp_min(0)


def _draw_within(rows: SortedRows, start, stop, centre, target) -> torch.Tensor:
    """The index ``i`` in ``[start, stop)`` where ``sum_{start <= j <= i} w_j (v_j - centre)**2`` first
    exceeds ``target``: a batched binary search over prefix-sum differences (all ``[R, T]``)."""
    n = rows.values.shape[1]
    base = rows.at(start)
    lo, hi = start.clone(), stop.clone()
    for _ in range(n.bit_length() + 1):
        searching = lo < hi
        if not searching.any():
            break
        mid = (lo + hi) // 2
        past = _cost(rows.at((mid + 1).clamp_max(n)) - base, centre) > target  # settled rows may sit at n
        hi = torch.where(searching & past, mid, hi)
        lo = torch.where(searching & ~past, mid + 1, lo)
    return torch.minimum(lo, stop - 1).clamp_min(start).clamp_max(n - 1)


def kmeans_plus_plus_init(rows: SortedRows, k: int, uniforms: torch.Tensor) -> torch.Tensor:
    """Greedy weighted k-means++ seeding for every row at once.

    The first centre is drawn with probability ``w``; each next one is the best of ``trials``
    candidates drawn with probability ``w * D(x)**2``, "best" meaning the lowest resulting
    potential ``sum w * D**2`` (scikit-learn draws ``2 + log k``; 2 costs half and, with two
    restarts, loses little). Draws are inverse-CDF over the sorted values: a run (cluster) is chosen
    from the clusters' costs, then the value inside it by binary search, and each candidate's
    potential comes from :meth:`SortedRows.cluster_costs`: no step touches all ``n`` values of a
    row. ``uniforms`` ``[R, 1 + (k-1) * trials]`` are the row's draws in [0, 1)
    (:func:`kmeans_uniforms`). Returns sorted ``[R, k]``.
    """
    count = rows.values.shape[0]
    trials = (uniforms.shape[1] - 1) // max(k - 1, 1)
    uniforms = uniforms.to(rows.values.device, torch.float64)
    centres = rows.values.gather(1, rows.draw(uniforms[:, :1]))
    for step in range(1, k):
        costs, bounds = rows.cluster_costs(centres)
        cumulative = costs.cumsum(1)
        total = cumulative[:, -1:]
        draws = uniforms[:, 1 + (step - 1) * trials : 1 + step * trials]
        target = draws * total
        cluster = torch.searchsorted(cumulative, target, right=True).clamp_max(step - 1)
        inside = target - (cumulative.gather(1, cluster) - costs.gather(1, cluster))
        index = _draw_within(
            rows, bounds.gather(1, cluster), bounds.gather(1, cluster + 1), centres.gather(1, cluster).double(), inside
        )
        if not bool((total > 0).all()):  # every value already a centre: draw by weight alone
            index = torch.where(total > 0, index, rows.draw(draws))
        candidates = rows.values.gather(1, index)
        sets = torch.cat([centres[:, None, :].expand(-1, trials, -1), candidates[..., None]], -1).sort(-1).values
        potential = rows.cluster_costs(sets)[0].sum(-1)
        centres = sets[torch.arange(count, device=sets.device), potential.argmin(1)]
    return centres


def _lloyd(rows: SortedRows, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations until no row's clusters change. A row whose clusters did not change is at a
    fixed point (its update would give the same centroids), so once half of the rows still moving
    have settled, the settled ones are set aside and the rest iterate on a compacted copy."""
    centroids, bounds = centroids.float(), None
    result = centroids.clone()
    ids = torch.arange(centroids.shape[0], device=centroids.device)
    for _ in range(iters):
        new_bounds = rows.clusters(centroids)
        if bounds is not None:
            moving = (new_bounds != bounds).any(1)
            settled = int(moving.numel() - moving.sum())
            if settled == moving.numel():
                break
            if 2 * settled >= moving.numel():
                result[ids[~moving]] = centroids[~moving]
                keep = moving.nonzero().squeeze(1)
                ids, rows, centroids, new_bounds = ids[keep], rows.select(keep), centroids[keep], new_bounds[keep]
        bounds = new_bounds
        mass, first, _ = rows.runs(bounds).unbind(-1)
        updated = torch.where(mass > 0, first / mass.clamp_min(1e-300), centroids.double())
        centroids = updated.float().sort(dim=1).values
    result[ids] = centroids
    return result


def weighted_kmeans_1d(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 50,
    init: torch.Tensor | None = None,
    seed: int = 0,
    restarts: int = 2,
    uniforms: torch.Tensor | None = None,
    *,
    assignments: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Minimise ``sum_j w[r, j] * (values[r, j] - c[r, assign[r, j]])**2`` for every row ``r``.

    ``weights`` broadcasts to ``values`` (``None`` = all ones; a ``[n]`` vector = the same column
    weights for every row). Returns ``(centroids [R, k] sorted, assignments [R, n] int64)``; the
    assignments are ``None`` with ``assignments=False`` (the sketchers assign against the rounded
    tables themselves, and the assignment is the one pass over all values after the sort).

    In 1-D each cluster is a contiguous run of the sorted values, so after one sort per row an
    iteration only needs the ``k - 1`` cut points (``searchsorted`` of the centroid midpoints into the
    sorted values) and prefix sums of ``w`` and ``w * v``: O(R * k * log n) per iteration instead of
    O(R * n). Empty clusters keep their centroid; iteration stops when no cut point moves. The
    k-means++ seeding and each start's cost come from the same prefix sums (:class:`SortedRows`),
    so after the sort nothing passes over all values but the final assignment.

    Lloyd only finds a local optimum, so by default it runs from several starts and keeps the best
    result per row: the weighted quantiles, the uniform min-max grid (which guarantees a result no
    worse than round-to-nearest on the same group), and ``restarts`` greedy k-means++ seedings drawn
    from a generator seeded with ``seed`` (deterministic; ``uniforms``, a slice of
    :func:`kmeans_uniforms` drawn for all rows of a layer, replaces the generator when the caller
    works on row chunks). ``init`` (``[R, k]``, sorted) replaces all starts. Every row is solved
    independently of the others, so a result does not depend on which rows are solved together;
    the rows are solved ``CHUNK_ELEMENTS`` values at a time, which bounds the workspace (the sorted
    copy, its order and weights, three float64 prefix sums: ~50 bytes per value).
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
    centroids = torch.cat(parts)
    return centroids, assign_nearest(values.float(), centroids) if assignments else None


def _kmeans_rows(
    values: torch.Tensor,
    k: int,
    weights: torch.Tensor | None,
    iters: int,
    init: torch.Tensor | None,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    restarts = uniforms.shape[0]
    values = values.float()
    rows = SortedRows.build(values, torch.ones_like(values) if weights is None else weights)
    if init is not None:
        return _lloyd(rows, init.float(), iters)
    starts = [
        lambda: weighted_quantile_init(rows.values, rows.mass[:, 1:], k),
        lambda: uniform_grid_init(rows.values, k),
    ]
    starts += [lambda r=r: kmeans_plus_plus_init(rows, k, uniforms[r]) for r in range(restarts)]
    best, best_cost = None, None
    for start in starts:
        centroids = _lloyd(rows, start(), iters)
        cost = rows.cluster_costs(centroids)[0].sum(1)
        if best is None:
            best, best_cost = centroids, cost
        else:
            better = cost < best_cost
            best = torch.where(better[:, None], centroids, best)
            best_cost = torch.minimum(cost, best_cost)
    return best


def weighted_sse(values: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, weights=None) -> torch.Tensor:
    """The k-means objective per row."""
    err = (values.float() - centroids.gather(1, assign)) ** 2
    if weights is not None:
        err = err * weights.float()
    return err.sum(1)

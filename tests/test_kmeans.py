import itertools

import pytest
import torch

from spallm_plugins.sketch.kmeans import weighted_kmeans_1d, weighted_sse


def naive_lloyd(values, weights, centroids, iters):
    """Textbook weighted Lloyd on one row, with a full distance matrix."""
    c = centroids.clone().double()
    v, w = values.double(), weights.double()
    for _ in range(iters):
        assign = (v[:, None] - c[None, :]).abs().argmin(1)
        for j in range(len(c)):
            m = assign == j
            if w[m].sum() > 0:
                c[j] = (w[m] * v[m]).sum() / w[m].sum()
        c = c.sort().values
    return c


@pytest.mark.parametrize("k", [4, 16])
def test_matches_textbook_lloyd_from_the_same_start(k):
    torch.manual_seed(0)
    values = torch.randn(3, 40)
    weights = torch.rand(3, 40) + 0.1
    init = values.sort(1).values[:, torch.linspace(0, 39, k).long()]
    ours, _ = weighted_kmeans_1d(values, k, weights, iters=200, init=init)
    for r in range(3):
        naive = naive_lloyd(values[r], weights[r], init[r], iters=200)
        torch.testing.assert_close(ours[r].double(), naive, atol=1e-5, rtol=1e-5)


def test_fixed_point_properties():
    torch.manual_seed(1)
    values = torch.randn(8, 64)
    weights = torch.rand(64) + 0.05
    c, a = weighted_kmeans_1d(values, 8, weights, iters=100)
    assert torch.all(c[:, 1:] >= c[:, :-1])
    centroids_only, none = weighted_kmeans_1d(values, 8, weights, iters=100, assignments=False)
    assert none is None and torch.equal(centroids_only, c)
    nearest = (values[..., None] - c[:, None, :]).abs().argmin(-1)
    assert torch.equal(a, nearest)
    w = weights.expand_as(values)
    for r in range(8):
        for j in range(8):
            m = a[r] == j
            if m.any():
                mean = (w[r, m] * values[r, m]).sum() / w[r, m].sum()
                torch.testing.assert_close(c[r, j], mean, atol=1e-5, rtol=1e-5)


def test_lloyd_never_increases_the_objective_and_is_deterministic():
    torch.manual_seed(2)
    values = torch.randn(16, 96)
    sse = [weighted_sse(values, *weighted_kmeans_1d(values, 16, iters=i)).sum() for i in (0, 1, 5, 50)]
    assert all(b <= a + 1e-4 for a, b in itertools.pairwise(sse))
    c1, a1 = weighted_kmeans_1d(values, 16)
    c2, a2 = weighted_kmeans_1d(values.clone(), 16)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)


def test_weights_pull_centroids_toward_heavy_points():
    values = torch.tensor([[0.0, 1.0, 10.0, 11.0]])
    c_plain, _ = weighted_kmeans_1d(values, 2)
    c_heavy, _ = weighted_kmeans_1d(values, 2, torch.tensor([1.0, 100.0, 1.0, 100.0]))
    assert c_plain.tolist() == [[0.5, 10.5]]
    assert c_heavy[0, 0] > 0.95 and c_heavy[0, 1] > 10.95


def test_exact_when_fewer_distinct_values_than_centroids():
    values = torch.tensor([[3.0, -1.0, 3.0, 2.0, -1.0, 2.0, 2.0, 3.0]])
    c, a = weighted_kmeans_1d(values, 4)
    torch.testing.assert_close(c.gather(1, a), values)


def test_never_worse_than_round_to_nearest_on_heavy_tailed_rows():
    torch.manual_seed(3)
    values = torch.distributions.StudentT(2.0).sample((64, 128))
    c, a = weighted_kmeans_1d(values, 16)
    ours = weighted_sse(values, c, a)
    lo, hi = values.min(1, keepdim=True).values, values.max(1, keepdim=True).values
    scale = (hi - lo) / 15
    rtn = ((values - lo) / scale).round() * scale + lo
    assert torch.all(ours <= ((values - rtn) ** 2).sum(1) + 1e-4)
    quantile_only, qa = weighted_kmeans_1d(values, 16, init=values.sort(1).values[:, torch.linspace(4, 123, 16).long()])
    assert ours.sum() < weighted_sse(values, quantile_only, qa).sum()


def test_kmeans_plus_plus_restarts_only_improve_and_are_seeded():
    torch.manual_seed(4)
    centres = torch.randn(32, 24) * 3
    values = centres.repeat_interleave(8, dim=1) + 0.05 * torch.randn(32, 192)  # 24 tight clusters, k=16
    sse = {r: weighted_sse(values, *weighted_kmeans_1d(values, 16, restarts=r)).sum() for r in (0, 1, 3)}
    assert sse[1] <= sse[0] and sse[3] <= sse[1]
    assert sse[3] < 0.9 * sse[0]
    a = weighted_kmeans_1d(values, 16, restarts=2, seed=7)
    b = weighted_kmeans_1d(values, 16, restarts=2, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def naive_kmeans_plus_plus(values, weights, k, draws, trials):
    """Textbook k-means++ with best-of-trials on one row: every step passes over all values (float64)."""
    v, w = values.double().sort().values, weights.double()[values.argsort()]
    first = int(torch.searchsorted(w.cumsum(0), draws[0] * w.sum(), right=True))
    centres = [float(v[first])]
    for step in range(1, k):
        dist = ((v[:, None] - torch.tensor(centres, dtype=torch.float64)[None]) ** 2).min(1).values
        cdf = (w * dist).cumsum(0)
        best = None
        for u in draws[1 + (step - 1) * trials : 1 + step * trials]:
            candidate = float(v[int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(len(v) - 1))])
            potential = (w * torch.minimum(dist, (v - candidate) ** 2)).sum()
            if best is None or potential < best[0]:
                best = (potential, candidate)
        centres.append(best[1])
    return sorted(centres)


def test_kmeans_plus_plus_seeding_draws_as_the_textbook_algorithm():
    from spallm_plugins.sketch.kmeans import SortedRows, kmeans_plus_plus_init, kmeans_uniforms

    torch.manual_seed(5)
    values = torch.distributions.StudentT(3.0).sample((6, 50))
    weights = torch.rand(6, 50) + 0.05
    uniforms = kmeans_uniforms(6, 8, seed=3, restarts=1)[0]
    rows = SortedRows.build(values, weights)
    ours = kmeans_plus_plus_init(rows, 8, uniforms)
    for r in range(6):
        naive = naive_kmeans_plus_plus(values[r], weights[r], 8, uniforms[r].double(), trials=2)
        assert ours[r].tolist() == torch.tensor(naive, dtype=torch.float32).tolist()


def test_start_costs_from_prefix_sums_match_the_direct_objective():
    from spallm_plugins.sketch.kmeans import SortedRows

    torch.manual_seed(6)
    values, weights = torch.randn(5, 33), torch.rand(5, 33)
    centroids = torch.randn(5, 3, 4).sort(-1).values
    rows = SortedRows.build(values, weights)
    costs = rows.cluster_costs(centroids)[0].sum(-1)
    direct = (weights[:, None, :, None] * (values[:, None, :, None] - centroids[:, :, None, :]) ** 2).min(-1).values
    torch.testing.assert_close(costs.float(), direct.sum(-1), rtol=1e-5, atol=1e-6)


def test_rows_without_weight_are_seeded_uniformly_and_solved():
    from spallm_plugins.sketch.kmeans import SortedRows, kmeans_plus_plus_init, kmeans_uniforms

    torch.manual_seed(7)
    values = torch.randn(4, 40)
    weights = torch.rand(4, 40)
    weights[1] = 0
    uniforms = kmeans_uniforms(4, 4, seed=1, restarts=1)[0]
    rows = SortedRows.build(values, weights)
    seeds = kmeans_plus_plus_init(rows, 4, uniforms)
    assert torch.isfinite(seeds).all() and torch.all(seeds[:, 1:] >= seeds[:, :-1])
    assert len(set(seeds[1].tolist())) > 1  # draws spread over the row, not stuck on one value
    assert rows.draw(uniforms[:, :1].double())[1].item() == int(uniforms[1, 0] * 40)
    centroids, assign = weighted_kmeans_1d(values, 4, weights)
    assert torch.isfinite(centroids).all() and assign.shape == values.shape


@pytest.mark.parametrize(("n", "k"), [(4, 8), (8, 16), (16, 16), (20, 16)])
@pytest.mark.parametrize("weighted", [False, True])
def test_as_many_centroids_as_values_or_more(n, k, weighted):
    """Every value can become a centre: seeding runs out of cost to draw from, searches settle at a row's end."""
    torch.manual_seed(8)
    values = torch.randn(96, n)
    c, a = weighted_kmeans_1d(values, k, torch.rand(96, n) + 0.1 if weighted else None)
    assert torch.isfinite(c).all() and torch.all(c[:, 1:] >= c[:, :-1])
    if n <= k:
        torch.testing.assert_close(c.gather(1, a), values)

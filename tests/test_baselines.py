"""Peer (baseline) aggregators: median, trimmed mean, Krum, Multi-Krum, Bulyan,
geometric median, centered clipping, bucketing and nearest-neighbour mixing.

Every rule is checked against its *defining property*, usually an independent
brute-force reference on small inputs (explicit ``(R, R, d)`` distances, explicit
per-coordinate sorting, scipy for the geometric median), plus: torch inputs stay
torch (dtype kept), float32 works, translation equivariance, robustness to 20% far
outliers, and input validation.  All instances are seeded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from flwr_byzantine.aggregators.base import AggregationResult, Aggregator
from flwr_byzantine.aggregators.clipping import CenteredClipping
from flwr_byzantine.aggregators.coordinate import CoordinateMedian, TrimmedMean
from flwr_byzantine.aggregators.geomed import GeometricMedian
from flwr_byzantine.aggregators.krum import Bulyan, Krum, MultiKrum
from flwr_byzantine.aggregators.mean import Mean
from flwr_byzantine.aggregators.preagg import Bucketing, NearestNeighborMixing

# ---------------------------------------------------------------------------------------
# brute-force references (deliberately naive)
# ---------------------------------------------------------------------------------------


def brute_sq_dist(G: np.ndarray) -> np.ndarray:
    """Explicit ``(R, R, d)`` differences: fine for the tiny test inputs."""
    diff = G[:, None, :] - G[None, :, :]
    return (diff**2).sum(-1)


def brute_krum_scores(G: np.ndarray, k: int) -> np.ndarray:
    D = brute_sq_dist(G)
    R = G.shape[0]
    return np.array([sorted(D[i, j] for j in range(R) if j != i)[:k] for i in range(R)]).sum(1) if k else np.zeros(R)


def brute_trimmed_mean(G: np.ndarray, b: int) -> np.ndarray:
    R, d = G.shape
    return np.array([np.mean(sorted(G[:, j])[b : R - b]) for j in range(d)])


def brute_bulyan(G: np.ndarray, f: int, selection: str) -> tuple[np.ndarray, list[int]]:
    R, d = G.shape
    theta, beta = R - 2 * f, R - 4 * f
    if selection == "multi-krum":
        scores = brute_krum_scores(G, R - f - 2)
        sel = [int(i) for i in np.argsort(scores, kind="stable")[:theta]]
    else:
        remaining = list(range(R))
        sel = []
        while len(sel) < theta:
            n = len(remaining)
            if n == 1:
                pick = remaining[0]
            else:
                k = min(max(n - f - 2, 1), n - 1)
                scores = brute_krum_scores(G[remaining], k)
                pick = remaining[int(np.argmin(scores))]
            sel.append(pick)
            remaining.remove(pick)
    S = G[sel]
    out = np.empty(d)
    for j in range(d):
        col = S[:, j]
        med = np.median(col)
        closest = sorted(col, key=lambda x: abs(x - med))[:beta]
        out[j] = np.mean(closest)
    return out, sel


def separated(scores: np.ndarray, m: int = 1) -> bool:
    """The m-th and (m+1)-th smallest scores are clearly apart (no near ties)."""
    s = np.sort(scores)
    return m >= len(s) or s[m] - s[m - 1] > 1e-6 * max(1.0, abs(s[m]))


class Recorder(Mean):
    """The mean, remembering what it was given (to inspect pre-aggregation)."""

    name = "recorder"

    def _aggregate(self, updates):
        self.seen = updates.copy() if isinstance(updates, np.ndarray) else updates.clone()
        return super()._aggregate(updates)


def data(seed: int, R: int = 15, d: int = 6, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(R, d)).astype(dtype)


# ---------------------------------------------------------------------------------------
# defining properties
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("R", [1, 2, 7, 10])
def test_median_equals_numpy_median(R):
    G = data(R, R=R, d=9)
    res = CoordinateMedian()(G)
    np.testing.assert_array_equal(res.estimate, np.median(G, axis=0))
    assert res.weights.sum() == pytest.approx(1.0)


def test_median_weights_and_kept():
    G = data(1, R=11, d=200)
    G[3] += 1e3  # a far outlier is never the median of any coordinate
    res = CoordinateMedian()(G)
    assert res.weights[3] == 0.0 and 3 not in res.kept
    # weight = fraction of coordinates where the row is the median (odd R)
    brute = np.array([(np.argsort(G, axis=0, kind="stable")[5] == i).mean() for i in range(11)])
    np.testing.assert_allclose(res.weights, brute)


@pytest.mark.parametrize("R,b", [(9, 0), (9, 2), (10, 4), (12, 3)])
def test_trimmed_mean_bruteforce(R, b):
    G = data(100 + R, R=R, d=8)
    res = TrimmedMean(num_trim=b)(G)
    np.testing.assert_allclose(res.estimate, brute_trimmed_mean(G, b), rtol=1e-12, atol=1e-12)
    assert res.weights.sum() == pytest.approx(1.0)
    # trim_fraction: b = floor(beta R)
    res2 = TrimmedMean(trim_fraction=0.2)(G)
    np.testing.assert_allclose(res2.estimate, brute_trimmed_mean(G, int(np.floor(0.2 * R))), rtol=1e-12)


@pytest.mark.parametrize("f", [0, 1, 3])
def test_krum_selects_lowest_bruteforce_score(f):
    for seed in range(20):
        G = data(seed, R=12, d=5)
        G[:f] += 3.0 * np.random.default_rng(seed).normal(size=(f, 5))
        ref = brute_krum_scores(G, 12 - f - 2)
        if not separated(ref):
            continue
        res = Krum(num_byzantine=f)(G)
        best = int(np.argmin(ref))
        assert res.kept.tolist() == [best]
        np.testing.assert_array_equal(res.estimate, G[best])
        assert res.statistic == pytest.approx(ref[best], rel=1e-9)
        np.testing.assert_allclose(res.info["scores"], ref, rtol=1e-9, atol=1e-9)
        assert res.weights[best] == 1.0 and res.weights.sum() == 1.0


@pytest.mark.parametrize("m", [1, 4, 9])
def test_multikrum_averages_m_best(m):
    f = 2
    G = data(7, R=13, d=4)
    G[:f] += 5.0
    ref = brute_krum_scores(G, 13 - f - 2)
    assert separated(ref, m)
    best = np.sort(np.argsort(ref)[:m])
    res = MultiKrum(num_byzantine=f, num_selected=m)(G)
    assert res.kept.tolist() == best.tolist()
    np.testing.assert_allclose(res.estimate, G[best].mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.weights[best], 1.0 / m)
    if m == 1:
        np.testing.assert_allclose(res.estimate, Krum(num_byzantine=f)(G).estimate)


@pytest.mark.parametrize("selection", ["iterative", "multi-krum"])
@pytest.mark.parametrize("R,f", [(7, 1), (12, 2), (15, 3), (20, 4)])
def test_bulyan_bruteforce(R, f, selection):
    G = data(R * 10 + f, R=R, d=7)
    G[:f] += 4.0  # a cluster of outliers
    ref, sel = brute_bulyan(G, f, selection)
    res = Bulyan(num_byzantine=f, selection=selection)(G)
    assert res.info["selected"] == sel
    usage = np.asarray(res.info["usage"])
    assert res.kept.tolist() == [i for i in sorted(sel) if usage[i] >= (R - 4 * f) / (2 * (R - 2 * f))]
    np.testing.assert_allclose(res.estimate, ref, rtol=1e-12, atol=1e-12)
    assert res.weights.sum() == pytest.approx(1.0)
    outside = np.setdiff1d(np.arange(R), sel)
    assert np.all(res.weights[outside] == 0.0)


def test_geometric_median_optimality_and_scipy():
    G = data(3, R=9, d=4)
    res = GeometricMedian()(G)
    z = res.estimate
    diff = z - G
    dist = np.linalg.norm(diff, axis=1)
    assert dist.min() > 1e-3  # generic instance: the median is not an input point
    grad = (diff / dist[:, None]).sum(0)
    assert np.linalg.norm(grad) < 1e-4 * G.shape[0]
    # the estimate is the convex combination G^T w reported in the result
    np.testing.assert_allclose(G.T @ res.weights, z, atol=1e-12)
    assert res.weights.min() > 0 and res.weights.sum() == pytest.approx(1.0)
    obj = lambda x: np.linalg.norm(x - G, axis=1).sum()  # noqa: E731
    ref = minimize(obj, G.mean(0), method="BFGS", options={"gtol": 1e-10}).x
    assert obj(z) <= obj(ref) + 1e-9
    np.testing.assert_allclose(z, ref, atol=1e-4)
    assert res.statistic == pytest.approx(obj(z), rel=1e-9)
    # ... and it is not the mean (the test could fail)
    assert np.linalg.norm(G.mean(0) - z) > 1e-2


def test_geometric_median_median_at_a_data_point():
    """Weiszfeld with smoothing reaches a median located at an input (the 1-D median)."""
    G = np.array([[0.0], [1.0], [2.0], [10.0], [-7.0]])
    res = GeometricMedian()(G)
    assert res.estimate[0] == pytest.approx(1.0, abs=1e-5)


def test_centered_clipping_inf_tau_is_mean():
    G = data(4, R=10, d=5)
    res = CenteredClipping(tau=float("inf"), num_iters=1)(G)
    np.testing.assert_allclose(res.estimate, G.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.weights, 0.1)


def test_centered_clipping_step_formula_and_bound():
    G = data(5, R=10, d=5)
    G[:2] += 50.0
    centre = np.full(5, 0.3)
    tau = 0.8
    cc = CenteredClipping(tau=tau, num_iters=1)
    cc.reset(centre)
    res = cc(G)
    diffs = G - centre
    norms = np.linalg.norm(diffs, axis=1)
    ref = centre + (diffs * np.minimum(1.0, tau / norms)[:, None]).mean(0)
    np.testing.assert_allclose(res.estimate, ref, rtol=1e-12, atol=1e-12)
    assert np.linalg.norm(res.estimate - centre) <= tau * (1 + 1e-12)
    assert res.info["centre"] == "given"
    # output = beta * centre + sum_i c_i g_i with beta + sum c = 1
    beta = res.info["centre_weight"]
    np.testing.assert_allclose(beta * centre + G.T @ res.weights, res.estimate, atol=1e-12)
    assert beta + res.weights.sum() == pytest.approx(1.0)
    assert 0 not in res.kept and 1 not in res.kept  # the far points are clipped hard
    # several iterations with automatic tau: every step is at most tau_l
    res3 = CenteredClipping(num_iters=4)(G)
    assert all(s <= t * (1 + 1e-9) for s, t in zip(res3.info["step_norms"], res3.info["taus"]))


def test_centered_clipping_state_and_reset():
    G = data(6, R=9, d=4)
    cc = CenteredClipping(tau=0.5, num_iters=1)
    first = cc(G)
    assert first.info["centre"] == "median"
    # the first call starts from the coordinate-wise median
    med = np.median(G, axis=0)
    diffs = G - med
    ref = med + (diffs * np.minimum(1.0, 0.5 / np.linalg.norm(diffs, axis=1))[:, None]).mean(0)
    np.testing.assert_allclose(first.estimate, ref, atol=1e-12)
    second = cc(G + 1.0)
    assert second.info["centre"] == "previous"
    diffs = G + 1.0 - first.estimate
    ref2 = first.estimate + (diffs * np.minimum(1.0, 0.5 / np.linalg.norm(diffs, axis=1))[:, None]).mean(0)
    np.testing.assert_allclose(second.estimate, ref2, atol=1e-12)
    cc.reset()
    assert cc.centre is None and cc(G).info["centre"] == "median"
    # momentum: centre = m * old + (1 - m) * output
    ccm = CenteredClipping(tau=0.5, num_iters=1, momentum=0.5)
    a = ccm(G).estimate
    b = ccm(G + 1.0).estimate
    np.testing.assert_allclose(ccm.centre, 0.5 * a + 0.5 * b, atol=1e-12)
    # a different dimension restarts from the median
    assert cc(data(0, R=9, d=3)).info["centre"] == "median"


def test_bucketing_is_permutation_and_average():
    G = data(8, R=11, d=3)
    rec = Recorder()
    bk = Bucketing(rec, bucket_size=3, seed=42)
    res = bk(G)
    perm = np.random.default_rng(42).permutation(11)
    groups = [perm[i : i + 3] for i in range(0, 11, 3)]
    expected = np.stack([G[g].mean(0) for g in groups])
    np.testing.assert_allclose(rec.seen, expected, rtol=1e-12)
    assert res.info["buckets"] == [g.tolist() for g in groups]
    # inner = mean of bucket means; mapped weights reproduce the estimate
    np.testing.assert_allclose(G.T @ res.weights, res.estimate, atol=1e-12)
    # deterministic under the seed: same sequence of permutations after reset / new object
    second = bk(G).info["buckets"]
    bk.reset()
    assert bk(G).info["buckets"] == res.info["buckets"]
    assert Bucketing(Recorder(), 3, seed=42)(G).info["buckets"] == res.info["buckets"]
    assert bk(G).info["buckets"] == second


@pytest.mark.parametrize("inner", [CoordinateMedian(), TrimmedMean(num_trim=2), GeometricMedian()])
def test_bucketing_size_one_equals_inner(inner):
    G = data(9, R=10, d=4)
    res = Bucketing(inner, bucket_size=1, seed=3)(G)
    np.testing.assert_allclose(res.estimate, inner(G).estimate, rtol=1e-10, atol=1e-12)


def test_bucketing_maps_kept_buckets_back():
    G = data(10, R=12, d=4)
    G[5] += 100.0
    res = Bucketing(Krum(num_byzantine=1), bucket_size=2, seed=1)(G)
    bucket = res.info["buckets"][res.info["inner_kept"][0]]
    assert res.kept.tolist() == sorted(bucket)
    np.testing.assert_allclose(res.estimate, G[bucket].mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.weights[bucket], 0.5)


def test_nnm_f0_mixes_everything():
    G = data(11, R=8, d=5)
    rec = Recorder()
    NearestNeighborMixing(rec, num_byzantine=0)(G)
    np.testing.assert_allclose(rec.seen, np.tile(G.mean(0), (8, 1)), rtol=1e-12, atol=1e-12)


def test_nnm_bruteforce_neighbours():
    G = data(12, R=9, d=4)
    G[:2] += 20.0
    f = 2
    rec = Recorder()
    res = NearestNeighborMixing(rec, num_byzantine=f)(G)
    D = brute_sq_dist(G)
    expected = np.stack([G[np.argsort(D[i])[: 9 - f]].mean(0) for i in range(9)])
    np.testing.assert_allclose(rec.seen, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(G.T @ res.weights, res.estimate, atol=1e-12)
    # with a robust inner rule the two far points drop out
    res2 = NearestNeighborMixing(Krum(num_byzantine=f), num_byzantine=f)(G)
    assert 0 not in res2.kept and 1 not in res2.kept


# ---------------------------------------------------------------------------------------
# generic properties of every rule
# ---------------------------------------------------------------------------------------

RULES = {
    "median": lambda: CoordinateMedian(),
    "trimmed-mean": lambda: TrimmedMean(num_trim=4),
    "krum": lambda: Krum(num_byzantine=4),
    "multi-krum": lambda: MultiKrum(num_byzantine=4, num_selected=10),
    "bulyan": lambda: Bulyan(num_byzantine=4),
    "bulyan-mk": lambda: Bulyan(num_byzantine=4, selection="multi-krum"),
    "geomed": lambda: GeometricMedian(),
    "cclip": lambda: CenteredClipping(),
    "bucketing": lambda: Bucketing(CoordinateMedian(), bucket_size=2, seed=0),
    "nnm": lambda: NearestNeighborMixing(CoordinateMedian(), num_byzantine=4),
    "nnm-krum": lambda: NearestNeighborMixing(Krum(num_byzantine=4), num_byzantine=4),
}


def corrupted(seed: int, R: int = 20, d: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """20% far outliers (a tight cluster at distance ~100 sqrt(d)) around honest N(mu, I)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d)
    G = mu + rng.normal(size=(R, d))
    G[: R // 5] = mu + 100.0 + 0.1 * rng.normal(size=(R // 5, d))
    return G, mu


@pytest.mark.parametrize("name", sorted(RULES))
def test_robust_to_far_outliers(name):
    G, mu = corrupted(0)
    res = RULES[name]()(G)
    err = np.linalg.norm(res.estimate - mu)
    mean_err = np.linalg.norm(G.mean(0) - mu)
    assert err < 0.05 * mean_err, (err, mean_err)
    assert isinstance(res, AggregationResult) and res.weights.shape == (20,)
    assert not set(range(4)) & set(res.kept.tolist())  # outliers are not kept
    assert res.kept.size > 0 and np.all(np.diff(res.kept) > 0)


@pytest.mark.parametrize("name", sorted(RULES))
def test_translation_equivariance(name):
    G, _ = corrupted(1)
    a = np.random.default_rng(5).normal(size=G.shape[1]) * 10.0
    r1 = RULES[name]()(G).estimate
    r2 = RULES[name]()(G + a).estimate
    np.testing.assert_allclose(r2, r1 + a, rtol=0, atol=1e-8 * (1 + np.abs(a).max()))


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_input_and_float32(name, dtype):
    G, _ = corrupted(2)
    ref = RULES[name]()(G)
    t = torch.tensor(G, dtype=dtype)
    res = RULES[name]()(t)
    assert isinstance(res.estimate, torch.Tensor)
    assert res.estimate.dtype == dtype and res.estimate.device == t.device and res.estimate.shape == (G.shape[1],)
    assert isinstance(res.kept, np.ndarray) and isinstance(res.weights, np.ndarray)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(res.estimate.numpy(), ref.estimate, rtol=tol, atol=tol * 100)
    # numpy float32 stays float32 and agrees
    r32 = RULES[name]()(G.astype(np.float32))
    assert r32.estimate.dtype == np.float32
    np.testing.assert_allclose(r32.estimate, ref.estimate, rtol=1e-4, atol=1e-2)


def test_float32_large_offset():
    """Float32 inputs sharing a large offset: the centred Gram keeps Krum/geomed exact enough."""
    G, mu = corrupted(3)
    G32 = (G + 1e4).astype(np.float32)
    for agg in (Krum(num_byzantine=4), GeometricMedian(), Bulyan(num_byzantine=4), CenteredClipping()):
        est = np.asarray(agg(G32).estimate, dtype=np.float64) - 1e4
        assert np.linalg.norm(est - mu) < 0.05 * np.linalg.norm(G.mean(0) - mu)


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "bulyan", "cclip"])
def test_column_chunking_is_exact(name, monkeypatch):
    """Results do not depend on how the coordinates are split into chunks."""
    import flwr_byzantine.aggregators.coordinate as coordinate

    G, _ = corrupted(5)
    G32 = G.astype(np.float32)
    full = RULES[name]()(G)
    full_t = RULES[name]()(torch.tensor(G32))
    monkeypatch.setattr(coordinate, "COORD_BUDGET", 3 * G.shape[0])  # chunks of 3 columns
    chunked = RULES[name]()(G)
    chunked_t = RULES[name]()(torch.tensor(G32))
    np.testing.assert_allclose(chunked.estimate, full.estimate, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chunked.weights, full.weights, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(chunked_t.estimate.numpy(), full_t.estimate.numpy(), rtol=1e-6, atol=1e-6)


def test_deterministic():
    G, _ = corrupted(4)
    for name, make in RULES.items():
        np.testing.assert_array_equal(make()(G).estimate, make()(G).estimate, err_msg=name)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


def test_validation_errors():
    G = data(0, R=6, d=3)
    with pytest.raises(ValueError, match="2b < R"):
        TrimmedMean(num_trim=3)(G)
    with pytest.raises(ValueError, match="either"):
        TrimmedMean(num_trim=1, trim_fraction=0.1)
    with pytest.raises(ValueError):
        TrimmedMean(trim_fraction=0.5)
    with pytest.raises(ValueError):
        TrimmedMean(num_trim=-1)
    with pytest.raises(ValueError, match="R > 2f"):
        Krum(num_byzantine=2)(G)
    with pytest.raises(ValueError, match="num_selected"):
        MultiKrum(num_byzantine=1, num_selected=7)(G)
    with pytest.raises(ValueError):
        MultiKrum(num_byzantine=1, num_selected=0)
    with pytest.raises(ValueError, match="4f"):
        Bulyan(num_byzantine=1)(G)
    with pytest.raises(ValueError):
        Bulyan(num_byzantine=1, selection="random")
    with pytest.raises(ValueError):
        Krum(num_byzantine=-1)
    with pytest.raises(ValueError):
        GeometricMedian(max_iter=0)
    with pytest.raises(ValueError):
        CenteredClipping(tau=0.0)
    with pytest.raises(ValueError):
        CenteredClipping(momentum=1.0)
    with pytest.raises(ValueError):
        Bucketing(Mean(), bucket_size=0)
    with pytest.raises(ValueError, match="R > 2f"):
        NearestNeighborMixing(Mean(), num_byzantine=3)(G)
    with pytest.raises(ValueError):
        CoordinateMedian()(np.array([[1.0, np.nan]]))


def test_preagg_inner_by_name():
    G = data(1, R=8, d=3)
    res = Bucketing("mean", bucket_size=2)(G)
    np.testing.assert_allclose(res.estimate, G.mean(0), rtol=1e-12)
    assert isinstance(Bucketing("mean").inner, Aggregator)
    with pytest.raises(ValueError, match="unknown aggregator"):
        Bucketing("no-such-rule")

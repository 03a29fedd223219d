"""Fast decode paths (issue 12): one-pass input screening, the sketched Gram matrix, the projection.

* ``Mean`` and ``RGE`` screen NaN/Inf on a reduction they compute anyway; a bad entry is
  still rejected, and finite inputs whose sum overflows are still accepted (the
  elementwise scan decides).
* The sketch is unbiased for inner products, never lets two coordinates collide in both
  halves, and RGE on it removes the same far outliers as the exact filter and returns the
  exact mean of the survivors.
* The capped-simplex projection (safeguarded Newton) satisfies its KKT conditions on long
  rows (n up to 400) where the cvxpy comparison of ``test_rge.py`` is too slow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flwr_byzantine._backend import centred_gram, check_matrix
from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.aggregators.saddle import project_capped_rows
from flwr_byzantine.aggregators.sketch import sketch_buckets, sketch_rows, sketched_centred_gram


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rule", [Mean, RGE])
def test_one_pass_screen_rejects_non_finite(backend, bad, rule):
    G = np.random.default_rng(0).normal(size=(9, 7)).astype(np.float32)
    G[4, 3] = bad
    X = torch.as_tensor(G) if backend == "torch" else G
    with pytest.raises(ValueError, match="NaN or Inf"):
        rule().aggregate(X)
    with pytest.raises(ValueError):
        check_matrix(X)
    check_matrix(X, screen=False)  # shape/dtype only


def test_overflowing_but_finite_input_is_averaged_in_float64():
    G = np.full((4, 3), 3e38, dtype=np.float32)  # every entry finite, the float32 sum overflows
    with np.errstate(over="ignore"):
        res = Mean().aggregate(G)  # the screen falls back to the elementwise scan and widens
    assert res.estimate.dtype == np.float32
    np.testing.assert_allclose(res.estimate, 3e38, rtol=1e-6)


def test_mean_is_numpy_mean():
    G = np.random.default_rng(1).normal(size=(13, 100)).astype(np.float32)
    res = Mean().aggregate(G)
    np.testing.assert_array_equal(res.estimate, np.mean(G, axis=0))
    assert res.estimate.dtype == np.float32


@pytest.mark.parametrize("d", [10, 997, 4096, 10_001])
def test_sketch_buckets_coprime_and_cover(d):
    k1, k2 = sketch_buckets(d, 64)
    assert math.gcd(k1, k2) == 1 and k1 * k2 >= d and k1 + k2 >= 63
    # no two distinct coordinates collide in both sketches
    i = np.arange(d)
    pairs = {}
    for a, b in zip(i % k1, i % k2):
        assert (a, b) not in pairs
        pairs[(a, b)] = True


def test_sketch_is_unbiased_for_inner_products():
    rng = np.random.default_rng(2)
    d = 3000
    X = rng.normal(size=(3, d))
    X[2, :50] += 40.0  # a concentrated deviation
    exact = X @ X.T
    est = np.mean([(lambda Y: Y @ Y.T)(sketch_rows(X, 128, np.random.default_rng(s))) for s in range(400)], axis=0)
    np.testing.assert_allclose(est, exact, rtol=0, atol=0.05 * np.abs(exact).max())


def test_sketch_sees_deviation_hidden_in_one_bucket_class():
    """A deviation on coordinates that all collide in the first sketch (a residue class mod k1)
    is spread over distinct buckets of the second, so its norm is seen at >= ~1/2 in every draw."""
    d = 20_000
    k1, k2 = sketch_buckets(d, 256)
    dev = np.zeros((1, d))
    dev[0, ::k1] = 1.0  # all collide in sketch 1
    true = float(np.sum(dev**2))
    seen = [float(np.sum(sketch_rows(dev, 256, np.random.default_rng(s)) ** 2)) / true for s in range(50)]
    assert min(seen) >= 0.45


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sketched_rge_removes_far_outliers_and_returns_exact_survivor_mean(backend):
    rng = np.random.default_rng(3)
    R, d, f = 40, 20_000, 8
    G = rng.normal(size=(R, d)).astype(np.float32)
    u = rng.normal(size=d)
    G[:f] += (3.0 * math.sqrt(d) * u / np.linalg.norm(u)).astype(np.float32)
    X = torch.as_tensor(G) if backend == "torch" else G
    exact = RGE(eps_tilde=0.2).aggregate(X)
    for seed in range(3):
        sk = RGE(eps_tilde=0.2, sketch_dim=512, seed=seed).aggregate(X)
        assert sk.info["sketch_dim"] == 512
        np.testing.assert_array_equal(sk.kept, exact.kept)
        np.testing.assert_array_equal(sk.kept, np.arange(f, R))
        est = sk.estimate.numpy() if backend == "torch" else sk.estimate
        np.testing.assert_allclose(est, G[f:].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_sketched_gram_tracks_exact_gram_spectrum():
    rng = np.random.default_rng(4)
    R, d = 30, 50_000
    G = rng.normal(size=(R, d))
    G[:5] += 0.5 * rng.normal(size=d)  # a common shift: one large eigenvalue
    exact = np.linalg.eigvalsh(centred_gram(G))[-3:]
    sk = np.linalg.eigvalsh(sketched_centred_gram(G, 2048, np.random.default_rng(0)))[-3:]
    np.testing.assert_allclose(sk[-1], exact[-1], rtol=0.15)


def test_small_d_uses_the_exact_gram():
    G = np.random.default_rng(5).normal(size=(10, 100))
    assert RGE(sketch_dim=64).aggregate(G).info["sketch_dim"] is None
    with pytest.raises(ValueError):
        RGE(sketch_dim=2)


@pytest.mark.parametrize("n", [50, 200, 400])
def test_projection_kkt_long_rows(n):
    rng = np.random.default_rng(n)
    V = rng.normal(size=(7, n)) * np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1.0, 1.0])[:, None]
    V[5] = np.round(V[5], 1)  # ties
    cap = 3.0 / n
    X = project_capped_rows(V, cap)
    assert X.min() >= 0 and X.max() <= cap + 1e-15
    np.testing.assert_allclose(X.sum(axis=1), 1.0, atol=1e-12)
    for v, x in zip(V, X):  # x = clip(v - t, 0, cap) for one t
        free = (x > 1e-12) & (x < cap - 1e-12)
        if free.any():
            t = v[free] - x[free]
            assert np.ptp(t) <= 1e-9 * max(1.0, np.abs(v).max())
            assert np.all(v[x <= 1e-12] <= t[0] + 1e-9 * max(1.0, np.abs(v).max()))
            assert np.all(v[x >= cap - 1e-12] - cap >= t[0] - 1e-9 * max(1.0, np.abs(v).max()))


def _stable_window_counts(G: np.ndarray, positions) -> np.ndarray:
    order = np.argsort(G, axis=0, kind="stable")
    return np.bincount(order[positions].ravel(), minlength=G.shape[0])


@pytest.mark.parametrize("R,b", [(9, 4), (10, 4), (12, 3), (7, 1)])
def test_partition_window_usage_with_ties_matches_a_stable_sort(R, b):
    """Rows tied at the window's edges are attributed as a stable column sort would (row-index order)."""
    from flwr_byzantine.aggregators.coordinate import trimmed_window

    rng = np.random.default_rng(R + b)
    G = rng.integers(0, 4, size=(R, 300)).astype(np.float32)  # many ties
    G[:, :50] = 1.0  # whole columns equal
    est, counts = trimmed_window(G, b)
    srt = np.sort(G, axis=0)
    np.testing.assert_allclose(est, srt[b : R - b].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(counts, _stable_window_counts(G, slice(b, R - b)))


def test_bulyan_window_with_ties_matches_the_stable_definition():
    from flwr_byzantine.aggregators.krum import _closest_to_median_mean

    rng = np.random.default_rng(7)
    for theta, beta in [(11, 3), (12, 4), (9, 5)]:
        sub = rng.integers(0, 5, size=(theta, 200)).astype(np.float64)
        est, counts = _closest_to_median_mean(sub, beta)
        # reference: stable sort of the values, stable sort of the distances to the median
        order = np.argsort(sub, axis=0, kind="stable")
        vals = np.take_along_axis(sub, order, axis=0)
        lo, hi = (theta - 1) // 2, theta // 2
        dev = np.abs(vals - 0.5 * (vals[lo] + vals[hi]))
        rows = np.argsort(dev, axis=0, kind="stable")[:beta]
        np.testing.assert_allclose(est, np.take_along_axis(vals, rows, axis=0).mean(axis=0), rtol=1e-12)
        ref = np.bincount(np.take_along_axis(order, rows, axis=0).ravel(), minlength=theta)
        np.testing.assert_array_equal(counts, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bulyan_compiled_window_matches_the_definition(dtype):
    """The compiled window (kernels.closest_window) and counts (kernels.window_counts) against the stable-sort
    definition, on continuous values with some exact ties and columns of one value."""
    from flwr_byzantine.aggregators.krum import _closest_to_median_mean

    rng = np.random.default_rng(11)
    for theta, beta in [(60, 20), (23, 7), (8, 8), (5, 1)]:
        sub = rng.normal(size=(theta, 3000)).astype(dtype)
        sub[: theta // 3, :500] = sub[theta // 2, :500]  # ties around the median
        sub[:, 500:600] = 2.5
        est, counts = _closest_to_median_mean(sub, beta)
        order = np.argsort(sub, axis=0, kind="stable")
        vals = np.take_along_axis(sub, order, axis=0).astype(np.float64)
        lo, hi = (theta - 1) // 2, theta // 2
        rows = np.argsort(np.abs(vals - 0.5 * (vals[lo] + vals[hi])), axis=0, kind="stable")[:beta]
        ref = np.take_along_axis(vals, rows, axis=0).mean(axis=0)
        assert est.dtype == dtype
        np.testing.assert_allclose(est, ref, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-7)
        np.testing.assert_array_equal(counts, np.bincount(np.take_along_axis(order, rows, axis=0).ravel(),
                                                          minlength=theta))


def test_sigma0_lanczos_matches_the_dense_solver(monkeypatch):
    import flwr_byzantine.aggregators.sigma as sigma

    rng = np.random.default_rng(8)
    G = rng.normal(size=(300, 400))
    G[:60] += 0.8 * rng.normal(size=400)
    K = centred_gram(G)
    fast = sigma.estimate_sigma0_sq(K, 0.2)
    monkeypatch.setattr(sigma, "LANCZOS_MIN_N", 10**9)
    dense = sigma.estimate_sigma0_sq(K, 0.2)
    assert fast == pytest.approx(dense, rel=1e-8)


def test_sigma0_batches_removals_beyond_max_steps(monkeypatch):
    import flwr_byzantine.aggregators.sigma as sigma

    calls = []
    orig = sigma.top_eig_centred
    monkeypatch.setattr(sigma, "top_eig_centred", lambda *a: calls.append(1) or orig(*a))
    K = centred_gram(np.random.default_rng(9).normal(size=(200, 30)))
    sigma.estimate_sigma0_sq(K, 0.25)  # 50 removals
    per_step = math.ceil(50 / sigma.MAX_TRIM_STEPS)
    assert len(calls) == math.ceil(50 / per_step) + 1 <= sigma.MAX_TRIM_STEPS + 1
    calls.clear()
    sigma.estimate_sigma0_sq(centred_gram(np.random.default_rng(9).normal(size=(400, 30))), 0.25)  # 100 removals
    assert len(calls) == sigma.MAX_TRIM_STEPS_LARGE + 1


def test_spectral_passes_remove_far_outliers_at_large_r():
    from flwr_byzantine.aggregators.saddle import capped_simplex_cap, solve_saddle, spectral_step

    rng = np.random.default_rng(10)
    R, d, f = 300, 2000, 60
    G = rng.normal(size=(R, d))
    u = rng.normal(size=d)
    G[:f] += 10.0 * math.sqrt(d) * u / np.linalg.norm(u)
    res = RGE(eps_tilde=0.2, spectral_above=100).aggregate(G)
    assert res.info["spectral_passes"] >= 1
    np.testing.assert_array_equal(res.kept, np.arange(f, R))
    np.testing.assert_allclose(res.estimate, G[f:].mean(axis=0), rtol=1e-12)
    # the spectral step's statistic bounds the saddle value from above (same K, c)
    K = centred_gram(G[:40])
    c = rng.uniform(0.5, 1.0, size=40)
    cap = capped_simplex_cap(0.8, 40)
    sp = spectral_step(K, c, cap)
    sol = solve_saddle(K, c, cap, tol_rel=1e-4)
    assert sp.upper >= sol.lower
    assert float(c @ sp.tau) == pytest.approx(sp.value, rel=1e-9)


def test_saddle_solve_after_spectral_steps_starts_from_their_w(monkeypatch):
    """The filter's first pass reads the Gram matrix itself (no copy), and a saddle solve that follows spectral
    steps (the active set shrunk to spectral_above or fewer) starts from the last step's W on the kept points."""
    from flwr_byzantine.aggregators import rge as rge_mod
    from flwr_byzantine.aggregators import saddle

    rng = np.random.default_rng(12)
    R, d, f = 40, 300, 8
    G = rng.normal(size=(R, d))
    G[:f] += 6.0 * rng.normal(size=(f, d))  # spread outliers: several passes
    seen: list[tuple[str, object]] = []
    real_step, real_solve = saddle.spectral_step, saddle.solve_saddle

    def step(K, c, cap, **kw):
        sol = real_step(K, c, cap, **kw)
        seen.append(("step", (K, sol)))
        return sol

    def solve(K, c, cap, **kw):
        seen.append(("solve", (K, kw.get("W0"))))
        return real_solve(K, c, cap, **kw)

    monkeypatch.setattr(rge_mod, "spectral_step", step)
    monkeypatch.setattr(rge_mod, "solve_saddle", solve)
    rule = RGE(eps_tilde=0.2, spectral_above=R - 4)
    gram = centred_gram(G)
    res = rule.filter_gram(gram)
    kinds = [k for k, _ in seen]
    assert kinds[0] == "step" and "solve" in kinds, kinds
    assert seen[0][1][0] is gram  # the whole matrix, not a copy
    first_solve = kinds.index("solve")
    K_step, sp = seen[first_solve - 1][1]
    K_solve, W0 = seen[first_solve][1]
    # the points the step kept are those of the solve's matrix (found by their diagonal entries, all distinct)
    diag_step, diag_solve = np.diag(K_step), np.diag(K_solve)
    assert np.unique(diag_step).size == diag_step.size
    keep = np.array([int(np.flatnonzero(diag_step == v)[0]) for v in diag_solve])
    np.testing.assert_array_equal(W0, np.asarray(sp.W)[np.ix_(keep, keep)])
    assert res.kept.size >= R - f - 2


def test_blas_threads_parameter():
    G = np.random.default_rng(11).normal(size=(12, 50))
    assert RGE(blas_threads=2).aggregate(G).kept.size >= 1
    np.testing.assert_array_equal(RGE(blas_threads=None).aggregate(G).kept, RGE().aggregate(G).kept)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            RGE(blas_threads=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "cclip", "rge",
                                  "rge-sketch"])
def test_cuda_gives_the_cpu_result(name):
    from flwr_byzantine.aggregators import build_for_federation

    rng = np.random.default_rng(12)
    R, d, f = 24, 30_000, 4
    G = rng.normal(size=(R, d)).astype(np.float32)
    u = rng.normal(size=d)
    G[:f] += (3.0 * math.sqrt(d) * u / np.linalg.norm(u)).astype(np.float32)

    def rule():
        if name == "rge-sketch":
            return RGE(eps_tilde=0.2, sketch_dim=1024, seed=0)
        return build_for_federation(name, R, 0.2)

    cpu = rule().aggregate(G)
    gpu = rule().aggregate(torch.as_tensor(G, device="cuda"))
    assert gpu.estimate.device.type == "cuda"
    np.testing.assert_array_equal(gpu.kept, cpu.kept)
    np.testing.assert_allclose(gpu.estimate.cpu().numpy(), cpu.estimate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [3.0, 1e4])
def test_sketched_survivor_mean_downdate_or_exact(shift):
    """Moderate outliers: the survivors' mean is a float64 downdate of the full mean (close to exact);
    huge ones (whose size dominated the full mean's rounding): the exact mean of the survivors."""
    rng = np.random.default_rng(13)
    R, d, f = 40, 20_000, 8
    G = (1.0 + rng.normal(size=(R, d))).astype(np.float32)
    u = rng.normal(size=d)
    G[:f] += (shift * math.sqrt(d) * u / np.linalg.norm(u)).astype(np.float32)
    res = RGE(eps_tilde=0.2, sketch_dim=512, seed=0).aggregate(G)
    np.testing.assert_array_equal(res.kept, np.arange(f, R))
    exact = G[f:].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(res.estimate, exact, rtol=0, atol=1e-5 * (1 + np.abs(exact).max()))
    if shift > 100:
        np.testing.assert_array_equal(res.estimate, RGE(eps_tilde=0.2).aggregate(G).estimate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R", [2, 3, 8, 20, 33, 64])
def test_window_network_is_the_partition_window(dtype, R, monkeypatch):
    """Few rows: the compiled sorting network gives the partition path's window means (to rounding: the sums run in
    another order) and exactly its usage counts, ties included; more rows keep the partition path."""
    import flwr_byzantine.aggregators.coordinate as coord

    rng = np.random.default_rng(R)
    G = rng.standard_normal((R, 1500)).astype(dtype)
    G[:, :300] = np.round(G[:, :300])  # ties at the window's edges
    G[:, 300:320] = 0.5  # whole columns equal
    for b in sorted({0, 1, (R - 1) // 2, R // 4} - {b for b in range(R) if 2 * b >= R}):
        fast = coord.trimmed_window(G, b)
        monkeypatch.setattr(coord, "WINDOW_NETWORK_MAX_ROWS", 0)
        slow = coord.trimmed_window(G, b)
        monkeypatch.undo()
        np.testing.assert_array_equal(fast[1], slow[1])
        tol = 1e-5 if dtype == np.float32 else 1e-13  # sums of up to 64 values of order 1, in another order
        np.testing.assert_allclose(fast[0], slow[0], rtol=0, atol=tol)
        srt = np.sort(G, axis=0)
        np.testing.assert_allclose(fast[0], srt[b : R - b].mean(axis=0), rtol=0, atol=tol)


@pytest.mark.parametrize("m,b", [(5, -1), (5, 3), (4, 2), (1, 1)])
def test_window_network_refuses_an_empty_window(m, b):
    from flwr_byzantine.aggregators.kernels import window_network

    with pytest.raises(ValueError):
        window_network(m, b)


@pytest.mark.parametrize("subset", [False, True])
def test_sketch_without_column_sums_takes_the_same_decisions(subset):
    """``column_sums=False``: the same signs and sketch, the same kept rows; the survivors' mean is their exact
    mean (one compiled read of their rows, summed in float64, not a downdate), the noise floor's energy the rows' own
    squared norms."""
    rng = np.random.default_rng(21)
    R, d, f = 120, 20_000, 24
    G = rng.normal(size=(R, d)).astype(np.float32)
    G[:f] += 2.0
    rows = np.arange(5, R) if subset else np.arange(R)
    out = []
    for sums in (True, False):
        rule = RGE(eps_tilde=0.2, sketch_dim=1024, spectral_above=64, seed=4, threshold_factor=1.5, column_sums=sums)
        out.append(rule.aggregate_rows(G, rows) if subset else rule.aggregate(G))
    with_sums, without = out
    np.testing.assert_array_equal(without.kept, with_sums.kept)
    survivors = rows[without.kept]
    assert set(survivors.tolist()) == set(range(f, R))
    exact = G[survivors].astype(np.float64).mean(axis=0)
    assert without.estimate.dtype == np.float32
    np.testing.assert_allclose(without.estimate, exact, rtol=0, atol=1e-7 * np.abs(exact).max())
    np.testing.assert_allclose(without.estimate, with_sums.estimate, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sketch_without_column_sums_screens_non_finite_rows(bad):
    G = np.random.default_rng(2).normal(size=(60, 10_000)).astype(np.float32)
    G[7, 123] = bad
    rule = RGE(sketch_dim=1024, seed=1, column_sums=False)
    state = rule._rng.bit_generator.state
    with pytest.raises(ValueError, match="NaN or Inf"):
        rule.aggregate(G)
    assert rule._rng.bit_generator.state == state  # the signs were rewound
    G[7, 123] = 0.0
    res = rule.aggregate(G)
    assert res.kept.size > 0 and np.isfinite(res.estimate).all()
    assert rule._rng.bit_generator.state != state


def test_spectral_step_lanczos_basis_gives_the_dense_top_eigenpair(monkeypatch):
    """From 256 points the spectral step's eigenpair comes from Lanczos with a SPECTRAL_NCV basis: the top eigenvalue
    and vector of the weighted centred matrix, as a dense solve gives them."""
    import scipy.sparse.linalg

    from flwr_byzantine.aggregators import saddle

    rng = np.random.default_rng(4)
    n = 300
    X = rng.normal(size=(n, 500))
    X[:30] += 3.0 * rng.normal(size=500)  # a direction of its own for a tenth of the points
    K = centred_gram(X)
    c = rng.uniform(0.6, 1.0, size=n)
    seen = []
    real = scipy.sparse.linalg.eigsh

    def eigsh(*a, **k):
        seen.append(k.get("ncv"))
        return real(*a, **k)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    sp = saddle.spectral_step(K, c, saddle.capped_simplex_cap(0.8, n))
    assert seen == [saddle.SPECTRAL_NCV]
    w = project_capped_rows((c / c.sum())[None, :], saddle.capped_simplex_cap(0.8, n))[0]
    H = np.eye(n) - w[None, :]  # (I - 1 w^T)
    P = np.sqrt(c)[:, None] * (H @ K @ H.T) * np.sqrt(c)[None, :]
    vals, vecs = np.linalg.eigh(0.5 * (P + P.T))
    assert sp.upper == pytest.approx(vals[-1], rel=1e-9)
    assert abs(float(sp.eigvecs[:, 0] @ vecs[:, -1])) == pytest.approx(1.0, abs=1e-8)


def test_spectral_steps_start_from_the_sigma_estimators_top_vectors(monkeypatch):
    """The sigma_0 estimator's first solve is the top eigenvector of the centred Gram matrix of every point, the matrix
    of the filter's first spectral step (all weights 1): that step's Lanczos solve starts from it.  Its last solve is
    the top eigenvector of the trimmed points' centred Gram matrix: a later step on about those points starts from it
    (zero on the points the trimming removed), and a step on points where it has too little of its norm from ARPACK's
    own start."""
    import scipy.sparse.linalg

    from flwr_byzantine.aggregators import sigma

    rng = np.random.default_rng(8)
    R, d, f = 600, 3000, 120
    G = rng.normal(size=(R, d))
    G[:f] += 4.0 * rng.normal(size=d)
    K = centred_gram(G)
    est = sigma.estimate_sigma0(K, 0.2)
    assert est.value == pytest.approx(sigma.estimate_sigma0_sq(K, 0.2), rel=1e-6)  # from ARPACK's random start
    np.testing.assert_array_equal(est.kept, np.arange(f, R))  # the trimming removed the cluster
    H = np.eye(R) - 1.0 / R
    vals, vecs = np.linalg.eigh(H @ K @ H)
    assert abs(float(est.top @ vecs[:, -1])) == pytest.approx(1.0, abs=1e-5)
    Kk = K[np.ix_(est.kept, est.kept)]
    Hk = np.eye(R - f) - 1.0 / (R - f)
    vals_k, vecs_k = np.linalg.eigh(Hk @ Kk @ Hk)
    assert est.value == pytest.approx(vals_k[-1] / (R - f), rel=1e-6)  # LANCZOS_TOL on a 0.5 % gap, float32 products
    assert abs(float(est.kept_top @ vecs_k[:, -1])) > 0.9  # a nearly flat spectrum: the vector to its tolerance
    starts = []
    real = scipy.sparse.linalg.eigsh

    from flwr_byzantine.aggregators import saddle

    def eigsh(A, *a, **k):
        if k.get("tol") == saddle.SPECTRAL_TOL:  # the spectral steps' solves (the estimator's last: LANCZOS_TOL)
            starts.append(k.get("v0"))
        return real(A, *a, **k)

    short = []
    real_short = saddle.lanczos_top

    def lanczos_top(matvec, n, v0, *a, **k):  # the steps' short runs before a tight solve (a stopping level given)
        short.append(v0)
        return real_short(matvec, n, v0, *a, **k)

    assert saddle.SPECTRAL_TOL != sigma.LANCZOS_TOL
    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    monkeypatch.setattr(saddle, "lanczos_top", lanczos_top)
    res = RGE(eps_tilde=0.2, spectral_above=100).aggregate(G)
    np.testing.assert_array_equal(res.kept, np.arange(f, R))
    # the first step: its short run from the estimator's first vector passes the stopping level at once (the
    # cluster), and the tight solve starts where it stopped; the second, on the honest points, stops after its short run
    assert len(short) == 2 and short[0] is not None and short[1] is not None
    assert len(starts) == 1 and starts[0] is not None
    np.testing.assert_allclose(np.abs(short[0]), np.abs(est.top), rtol=0, atol=1e-5)  # the same solve
    np.testing.assert_allclose(np.abs(starts[0]), np.abs(est.top), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.abs(short[1]), np.abs(est.kept_top), rtol=0, atol=0.05)  # on the same points
    # the start on other points: the estimator's entries where a point is in both, zero elsewhere; none when less than
    # START_MIN_SHARE of the vector's squared norm is left
    on = np.arange(10, 20)
    vec = np.full(10, 1.0 / np.sqrt(10.0))
    np.testing.assert_allclose(sigma.start_on(np.arange(5, 18), on, vec), np.r_[np.zeros(5), vec[:8]])
    assert sigma.start_on(np.arange(0, 14), on, vec) is None  # 4 of 10 points
    assert sigma.start_on(np.arange(12, 30), on, vec) is not None  # 8 of 10
    assert sigma.start_on(np.arange(12, 30), on, np.full(10, np.nan)) is None
    # a malformed start (wrong length, NaN, zero) is ignored, not passed on
    from flwr_byzantine.aggregators.saddle import capped_simplex_cap, spectral_step

    starts.clear()
    cap = capped_simplex_cap(0.8, R)
    ref = spectral_step(K, np.ones(R), cap)
    for bad in (np.ones(R - 1), np.full(R, np.nan), np.zeros(R)):
        assert spectral_step(K, np.ones(R), cap, v0=bad).upper == pytest.approx(ref.upper, rel=1e-9)
    assert starts[1:] == [None, None, None]


def test_sigma0_trimming_solves_are_looser_than_the_last(monkeypatch):
    """The trimming's solves (their vectors only rank points) are at most LANCZOS_TRIM_STEPS Lanczos steps to
    LANCZOS_TRIM_TOL; the last one, whose eigenvalue is the estimate, is ARPACK's to LANCZOS_TOL; on a round with a far
    cluster the estimate is that of tight solves throughout, and two calls give the same bits (no random start)."""
    import scipy.sparse.linalg

    import flwr_byzantine.aggregators.sigma as sigma

    rng = np.random.default_rng(12)
    G = rng.normal(size=(400, 600))
    G[:80] += 3.0 * rng.normal(size=600)
    K = centred_gram(G)
    tols, trims = [], []
    real, real_top = scipy.sparse.linalg.eigsh, sigma.lanczos_top

    def eigsh(*a, **k):
        tols.append(k["tol"])
        return real(*a, **k)

    def lanczos_top(*a):
        trims.append(a[3:])
        return real_top(*a)

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    monkeypatch.setattr(sigma, "lanczos_top", lanczos_top)
    est = sigma.estimate_sigma0_sq(K, 0.2)
    assert trims == [(sigma.LANCZOS_TRIM_TOL, sigma.LANCZOS_TRIM_STEPS)] * sigma.MAX_TRIM_STEPS_LARGE
    assert tols == [sigma.LANCZOS_TOL]
    assert sigma.LANCZOS_TRIM_TOL > sigma.LANCZOS_TOL
    assert sigma.estimate_sigma0_sq(K, 0.2) == est
    monkeypatch.setattr(sigma, "LANCZOS_TRIM_TOL", 1e-10)
    monkeypatch.setattr(sigma, "LANCZOS_TRIM_STEPS", 400)
    monkeypatch.setattr(sigma, "LANCZOS_TOL", 1e-10)
    assert est == pytest.approx(sigma.estimate_sigma0_sq(K, 0.2), rel=1e-6)


def test_lanczos_top_stops_at_its_tolerance_or_its_step_cap():
    """lanczos_top: the top eigenpair of a matrix with a gap to its tolerance in fewer steps than the cap; at most the
    cap on a flat spectrum (its Ritz value a lower bound on the top eigenvalue); an invariant start (a rank-one matrix)
    stops at once; a zero or NaN start is replaced by the fixed one."""
    from flwr_byzantine.aggregators.sigma import lanczos_top

    rng = np.random.default_rng(3)
    n = 300
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    gap = np.r_[np.linspace(1.0, 2.0, n - 1), 6.0]
    flat = np.linspace(1.0, 1.01, n)
    for spectrum, cap in ((gap, 40), (flat, 12)):
        A = (Q * spectrum) @ Q.T
        calls = []
        lam, v = lanczos_top(lambda x: calls.append(1) or A @ x, n, None, 1e-6, cap)
        assert len(calls) <= cap and lam <= spectrum.max() * (1 + 1e-12)
        if spectrum is gap:
            assert len(calls) < cap and lam == pytest.approx(6.0, rel=1e-10)
            assert abs(float(v @ Q[:, -1])) == pytest.approx(1.0, abs=1e-6)
        else:
            assert len(calls) == cap and lam > 1.005
        assert np.linalg.norm(v) == pytest.approx(1.0)
    u = rng.normal(size=n)
    calls = []
    lam, v = lanczos_top(lambda x: calls.append(1) or u * (u @ x), n, u, 1e-6, 12)
    assert len(calls) == 1 and lam == pytest.approx(float(u @ u)) and abs(float(v @ u)) == pytest.approx(np.linalg.norm(u))
    A = (Q * gap) @ Q.T
    ref = lanczos_top(lambda x: A @ x, n, None, 1e-6, 40)
    for bad in (np.zeros(n), np.full(n, np.nan)):
        got = lanczos_top(lambda x: A @ x, n, bad, 1e-6, 40)
        assert got[0] == ref[0] and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("R,d,params", [(300, 2000, {}), (300, 2000, {"spectral_above": 64}),
                                        (600, 10_000, {"sketch_dim": 1024, "spectral_above": 64}),
                                        (600, 10_000, {"sketch_dim": 1024, "spectral_above": 64,
                                                       "column_sums": False})])
def test_float32_rows_near_the_top_of_their_range_are_decoded_in_float64(R, d, params):
    """float32 entries near 1e37: finite, but their squares overflow float32 (the sketch's and the sigma_0 estimator's
    float32 products).  The sketch's squared norms (float64) screen them, the rows are widened to float64 and the
    estimator's products stay in float64: the far rows removed, a finite float32 estimate (it failed in ARPACK)."""
    rng = np.random.default_rng(R)
    G = (1e37 * (1.0 + 0.1 * rng.standard_normal((R, d)))).astype(np.float32)
    f = R // 6
    G[:f] *= -1.0
    with np.errstate(over="ignore"):
        res = RGE(eps_tilde=0.2, **params).aggregate(G)
    assert res.estimate.dtype == np.float32 and np.isfinite(res.estimate).all()
    np.testing.assert_array_equal(res.kept, np.arange(f, R))
    exact = G[f:].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(res.estimate.astype(np.float64), exact, rtol=1e-5)


def test_centred_factor_is_the_centred_gram_matrix():
    """:class:`CentredFactor` stands for ``centre_gram``'s matrix: the same matrix formed (bit for bit), its products,
    diagonal and row subsets."""
    from flwr_byzantine.aggregators.sketch import CentredFactor, centre_factor, centre_gram, dense_gram

    rng = np.random.default_rng(8)
    Y = rng.normal(size=(300, 64)) + 5.0
    for low in (True, False):
        F = centre_factor(Y, low)
        K = centre_gram(Y, low)
        assert isinstance(F, CentredFactor) and F.shape == (300, 300)
        assert F.dtype == (np.float32 if low else np.float64)
        np.testing.assert_array_equal(F.dense(), K)
        np.testing.assert_array_equal(dense_gram(F), K)
        v = rng.normal(size=300)
        tol = 1e-5 if low else 1e-12
        np.testing.assert_allclose(F @ v, K @ v.astype(F.dtype), rtol=0, atol=tol * np.abs(K @ v).max())
        np.testing.assert_allclose(F.diagonal(), np.diag(K), rtol=tol)
        idx = np.sort(rng.choice(300, 40, replace=False))
        np.testing.assert_allclose(F.rows(idx).dense(), K[np.ix_(idx, idx)], rtol=0, atol=tol * np.abs(K).max())
    with pytest.raises(ValueError, match="matrix"):
        CentredFactor(np.ones(3))


@pytest.mark.parametrize("kind", ["far", "alie", "clean"])
def test_many_rows_filter_on_the_factor_takes_the_formed_matrix_decisions(kind, monkeypatch):
    """From FACTOR_MIN_ROWS rows the sketched filter never forms the Gram matrix (its products come from the factor):
    the same kept rows and estimate as with the matrix formed, sigma_0 to the products' float32 rounding."""
    from flwr_byzantine.aggregators import rge as rge_mod, sketch

    rng = np.random.default_rng({"far": 1, "alie": 2, "clean": 3}[kind])
    R, d, f = 720, 4_000, 144
    G = rng.normal(size=(R, d)).astype(np.float32)
    if kind == "far":
        G[:f] += 3.0 * rng.normal(size=d).astype(np.float32)
    elif kind == "alie":
        G[:f] = G[f:].mean(0) - 0.5 * G[f:].std(0) + 0.1 * rng.normal(size=(f, d)).astype(np.float32)
    assert R >= sketch.FACTOR_MIN_ROWS
    formed = []
    real = rge_mod.centre_gram
    monkeypatch.setattr(rge_mod, "centre_gram", lambda *a: formed.append(1) or real(*a))
    out = {}
    for mode in ("factor", "matrix"):
        if mode == "matrix":
            monkeypatch.setattr(rge_mod, "FACTOR_MIN_ROWS", 10**9)
        out[mode] = RGE(eps_tilde=0.2, sketch_dim=1024, spectral_above=64, threshold_factor=1.5, seed=5).aggregate(G)
        assert len(formed) == (mode == "matrix")
    np.testing.assert_array_equal(out["factor"].kept, out["matrix"].kept)
    np.testing.assert_array_equal(out["factor"].estimate, out["matrix"].estimate)
    assert out["factor"].info["sigma0_sq"] == pytest.approx(out["matrix"].info["sigma0_sq"], rel=1e-5)
    if kind != "clean":
        assert set(out["factor"].kept.tolist()) == set(range(f, R))
    else:
        assert out["factor"].kept.size == R


def test_spectral_step_on_a_factor(monkeypatch):
    """The spectral step on a :class:`CentredFactor` gives the formed matrix's eigenpair (to the products' float32
    rounding); below 256 points it forms the matrix; when Lanczos does not converge on the float32 products it
    takes the formed matrix's step."""
    import scipy.sparse.linalg

    from flwr_byzantine.aggregators import saddle
    from flwr_byzantine.aggregators.sketch import centre_factor

    rng = np.random.default_rng(9)
    for n in (300, 100):
        Y = rng.normal(size=(n, 256))
        Y[: n // 10] += 3.0 * rng.normal(size=256)
        F = centre_factor(Y, True)
        c = rng.uniform(0.6, 1.0, size=n)
        cap = saddle.capped_simplex_cap(0.8, n)
        a, b = saddle.spectral_step(F, c, cap), saddle.spectral_step(F.dense(), c, cap)
        assert a.upper == pytest.approx(b.upper, rel=1e-5 if n >= 256 else 1e-12)
        assert abs(float(a.eigvecs[:, 0] @ b.eigvecs[:, 0])) == pytest.approx(1.0, abs=1e-5)
    calls = []
    real = scipy.sparse.linalg.eigsh

    def eigsh(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise scipy.sparse.linalg.ArpackNoConvergence("no convergence", np.zeros(0), np.zeros((300, 0)))
        return real(*a, **k)

    Y = rng.normal(size=(300, 256))
    F = centre_factor(Y, True)
    c = np.ones(300)
    cap = saddle.capped_simplex_cap(0.8, 300)
    want = saddle.spectral_step(F.dense(), c, cap)
    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", eigsh)
    got = saddle.spectral_step(F, c, cap)
    assert len(calls) == 2 and got.upper == pytest.approx(want.upper, rel=1e-9)  # (ARPACK's own random starts)
    np.testing.assert_allclose(got.tau, want.tau, rtol=1e-4, atol=1e-6 * want.tau.max())


def test_sigma0_on_a_factor_matches_the_formed_matrix():
    """The sigma_0 estimator on a :class:`CentredFactor` (products with the factor from 256 points, the formed
    submatrix below): the formed matrix's estimate on an attacked round, to the products' float32 rounding."""
    from flwr_byzantine.aggregators import sigma
    from flwr_byzantine.aggregators.sketch import centre_factor

    rng = np.random.default_rng(10)
    for n in (400, 120):
        Y = rng.normal(size=(n, 512))
        Y[: n // 5] += 4.0 * rng.normal(size=512)
        F = centre_factor(Y, True)
        a, b = sigma.estimate_sigma0(F, 0.2), sigma.estimate_sigma0(F.dense(), 0.2)
        assert a.value == pytest.approx(b.value, rel=1e-5)
        np.testing.assert_array_equal(a.kept, b.kept)


def test_tridiagonal_ritz_pairs_are_scipys_bit_for_bit():
    """The Lanczos steps' tridiagonal eigensolve calls LAPACK's ``dstevd`` directly: ``eigh_tridiagonal``'s values and
    vectors bit for bit, the 1 x 1 case included."""
    import scipy.linalg

    from flwr_byzantine.aggregators.sigma import _tridiagonal_eigh

    rng = np.random.default_rng(12)
    for n in (1, 2, 3, 7, 12, 40):
        a, b = rng.normal(size=n), np.abs(rng.normal(size=n - 1))
        w, v = _tridiagonal_eigh(a, b)
        w0, v0 = scipy.linalg.eigh_tridiagonal(a, b)
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(v, v0)


def test_spectral_step_stops_after_a_short_lanczos_run_below_its_level(monkeypatch):
    """With a stopping level above the top eigenvalue, the spectral step (from 256 points) stops after a short Lanczos
    run (its Ritz value plus its residual below the level) without ARPACK's tight solve; below the top eigenvalue it
    takes the tight solve, the dense eigenpair."""
    import scipy.sparse.linalg

    from flwr_byzantine.aggregators import saddle

    rng = np.random.default_rng(13)
    n = 400
    X = rng.normal(size=(n, 600))
    K = centred_gram(X)
    c = np.ones(n)
    cap = saddle.capped_simplex_cap(0.8, n)
    w = project_capped_rows((c / c.sum())[None, :], cap)[0]
    H = np.eye(n) - w[None, :]
    top = float(np.linalg.eigvalsh(0.5 * ((H @ K @ H.T) + (H @ K @ H.T).T))[-1])
    calls = []
    real = scipy.sparse.linalg.eigsh
    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", lambda *a, **k: calls.append(1) or real(*a, **k))
    high = saddle.spectral_step(K, c, cap, stop_below=2.0 * top)
    assert calls == [] and high.early_exit
    assert top * (1 - 1e-2) <= high.upper <= top * (1 + 1e-9)  # a Ritz value: below the top eigenvalue, near it
    low = saddle.spectral_step(K, c, cap, stop_below=0.5 * top)
    assert calls == [1] and not low.early_exit
    assert low.upper == pytest.approx(top, rel=1e-9)


def test_lanczos_top_stops_above_a_level():
    """``above``: the run stops at the first Ritz value beyond the level (Ritz values only grow)."""
    from flwr_byzantine.aggregators.sigma import lanczos_top

    rng = np.random.default_rng(14)
    n = 300
    vals = np.linspace(1.0, 2.0, n)
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    A = (Q * vals) @ Q.T
    seen = []

    def matvec(v):
        seen.append(1)
        return A @ v

    theta, _ = lanczos_top(matvec, n, None, 1e-12, 30, above=1.9)
    steps = len(seen)
    assert theta > 1.9 and 2 <= steps < 30
    seen.clear()
    before, _ = lanczos_top(matvec, n, None, 1e-12, steps - 1)
    assert len(seen) == steps - 1 and before <= 1.9 < theta  # the same run one step shorter had not passed the level
    seen.clear()
    theta_all, _ = lanczos_top(matvec, n, None, 1e-12, 30)
    assert len(seen) == 30 and theta_all >= theta

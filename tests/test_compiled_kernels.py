"""The compiled loops of :mod:`flwr_byzantine.aggregators.kernels` against plain numpy formulations.

Each kernel is checked on float32 and float64, odd sizes (a single row, sizes that are not multiples
of the tiles or of a vector's lanes, padded selection networks) and rows with NaN / Inf, which the
defence screens before these passes but the kernels must still treat as numpy does.
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators.kernels import KERNEL_TILE, selection_network
from flwr_byzantine.aggregators.streaming import clip_to_references, reference_deviation_stats
from tolerances import SUM_RTOL

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 20, 31, 33, 51, 64, 100, 251])
@pytest.mark.parametrize("dtype", DTYPES)
def test_selection_network_gives_numpys_median(m, dtype):
    rng = np.random.default_rng(m)
    X = (rng.standard_normal((m, 777)) * 10.0 ** rng.uniform(-3, 3)).astype(dtype)
    X[:, :4] = 1.0  # ties
    X[: (m + 1) // 2, 4:8] = np.inf  # a majority (or half) of +inf
    X[: m // 3, 8:12] = -np.inf
    X[:, 12:20] = np.round(X[:, 12:20])  # many ties
    G, T = X, np.zeros_like(X)
    drift, sq = reference_deviation_stats(G, np.arange(m), T, np.arange(m))
    assert drift.dtype == dtype
    with np.errstate(invalid="ignore"):
        assert np.array_equal(drift, np.median(X, axis=0), equal_nan=True)


def test_selection_network_is_pruned_and_padded():
    for m in (5, 31, 251):
        lo, hi, npad = selection_network(m)
        assert npad >= m and npad & (npad - 1) == 0
        assert lo.size == hi.size and np.all(lo < hi) and hi.max(initial=0) < npad
        full = (np.log2(npad) * (np.log2(npad) - 1) / 4 + 1) * npad  # Batcher's comparator count, at most
        assert lo.size < full
    with pytest.raises(ValueError):
        selection_network(0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_drift_with_nan_is_nan_like_numpy(dtype):
    rng = np.random.default_rng(1)
    G = rng.standard_normal((9, 300)).astype(dtype)
    T = rng.standard_normal((9, 300)).astype(dtype)
    G[3, 7] = np.nan
    G[0, 11] = np.inf
    T[0, 11] = np.inf  # inf - inf: NaN
    drift, sq = reference_deviation_stats(G, np.arange(9), T, np.arange(9))
    with np.errstate(invalid="ignore"):
        ref = np.median(G - T, axis=0)
    assert np.array_equal(drift, ref, equal_nan=True)
    assert np.isnan(drift[7]) and np.isnan(drift[11])
    assert np.all(np.isnan(sq))  # every row meets the NaN drift
    fin = np.isfinite(drift)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(drift[fin], np.median((G - T)[:, fin], axis=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(1, 1, 1), (2, 3, 2), (5, 17, 3), (12, KERNEL_TILE + 13, 5),
                                   (40, 2 * KERNEL_TILE - 1, 31), (300, 1001, 75)])
def test_drift_and_deviations_against_the_plain_formulation(dtype, n, d, m):
    rng = np.random.default_rng(n * 1000 + d)
    G = rng.standard_normal((n + 4, d)).astype(dtype)
    T = (rng.standard_normal((n + 7, d)) * 3.0).astype(dtype)
    rows = np.sort(rng.choice(n + 4, n, replace=False))
    slots = rng.permutation(n + 7)[:n]
    sample = np.sort(rng.choice(n, min(m, n), replace=False))
    drift, sq = reference_deviation_stats(G, rows, T, slots, sample)
    dev = G[rows] - T[slots]
    assert np.array_equal(drift, np.median(dev[sample], axis=0))
    full = (dev - drift).astype(np.float64)
    np.testing.assert_allclose(sq, np.sum(full * full, axis=1), rtol=SUM_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m,groups", [(1, 5, 1, 1), (2, KERNEL_TILE + 1, 2, 1), (7, 3 * KERNEL_TILE - 7, 3, 1),
                                          (10, 5000, 3, 1), (6, 40_000, 3, 1), (100, 5000, 31, 3), (60, 3000, 9, 1),
                                          (300, 2000, 255, 1)])
@pytest.mark.parametrize("with_u", [False, True])
def test_deviations_are_each_rows_own_sums(dtype, n, d, m, groups, with_u):
    """Every row's three sums are the bits that row alone gives, tile by tile, whatever the drift's sample (a few rows,
    groups of 31, a network of 255 values over blocks of 256 columns)."""
    from flwr_byzantine.aggregators.kernels import _deviation_rows

    rng = np.random.default_rng(n + d)
    G = (rng.standard_normal((n + 2, d)) * 10.0 ** rng.integers(-3, 4, (n + 2, 1))).astype(dtype)
    T = rng.standard_normal((n + 5, d)).astype(dtype)
    rows = rng.permutation(n + 2)[:n]
    slots = rng.permutation(n + 5)[:n]
    u = rng.standard_normal(d)
    u = (u / np.linalg.norm(u)).astype(dtype) if with_u else np.empty(0, dtype=dtype)
    sample = rng.choice(n, m * groups, replace=False)
    out = reference_deviation_stats(G, rows, T, slots, sample, u if with_u else None, groups=groups)
    drift = out[0]
    alone = [np.full(n, np.nan) for _ in range(3)]
    for i in range(n):
        _deviation_rows(G, rows.astype(np.intp), T, slots.astype(np.intp), drift, u, *alone, i, i + 1,
                        np.zeros(1, dtype=dtype)[0], np.empty(0, dtype=dtype), np.empty(0), np.empty(0))
    np.testing.assert_array_equal(out[1], alone[0])
    if with_u:
        np.testing.assert_array_equal(out[2], alone[1])
        np.testing.assert_array_equal(out[3], alone[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(40, 2 * KERNEL_TILE + 5, 31), (300, 1001, 75), (9, 70000, 3)])
def test_sampled_rows_stats_from_the_networks_block_copy(dtype, n, d, m):
    """A strict sample: every row's deviations and changes, sampled or not, as the plain formulation gives them."""
    rng = np.random.default_rng(n + d + m)
    G = rng.standard_normal((n, d)).astype(dtype)
    T = (rng.standard_normal((n + 3, d)) * 2.0).astype(dtype)
    rows = np.arange(n)
    slots = rng.permutation(n + 3)[:n]
    sample = np.sort(rng.choice(n, m, replace=False))
    u = rng.standard_normal(d)
    u = (u / np.linalg.norm(u)).astype(dtype)
    drift, sq, csq, cdots = reference_deviation_stats(G, rows, T, slots, sample, u)
    dev = G[rows] - T[slots]
    assert np.array_equal(drift, np.median(dev[sample], axis=0))
    full = (dev - drift).astype(np.float64)
    np.testing.assert_allclose(sq, np.sum(full * full, axis=1), rtol=SUM_RTOL[dtype])
    x = dev.astype(np.float64)
    np.testing.assert_allclose(csq, np.sum(x * x, axis=1), rtol=SUM_RTOL[dtype])
    np.testing.assert_allclose(cdots, x @ u.astype(np.float64), rtol=1e-9, atol=SUM_RTOL[dtype] * np.sqrt(csq.max()))
    # without the direction: the same deviations (to the sums' reassociation, which the compiler may vectorise
    # differently in the two loops)
    np.testing.assert_allclose(reference_deviation_stats(G, rows, T, slots, sample)[1], sq, rtol=SUM_RTOL[dtype])


def test_drift_mixed_dtypes_widen_like_numpy():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((6, 50)).astype(np.float32)
    T = rng.standard_normal((6, 50))
    drift, sq = reference_deviation_stats(G, np.arange(6), T, np.arange(6))
    assert drift.dtype == np.float64 and np.array_equal(drift, np.median(G - T, axis=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("n,d", [(1, 1), (3, 7), (10, KERNEL_TILE + 5), (33, 1000)])
def test_clip_rows_is_the_numpy_arithmetic_bit_for_bit(dtype, store, n, d):
    rng = np.random.default_rng(n + d)
    G = rng.standard_normal((n + 2, d)).astype(dtype)
    T = rng.standard_normal((n + 3, d)).astype(dtype)
    G[0, 0] = np.nan  # non-finite values go through elementwise, as in numpy
    if d > 1:
        G[-1, 1] = np.inf
    rows = np.sort(rng.choice(n + 2, n, replace=False))
    slots = rng.permutation(n + 3)[:n]
    drift = rng.standard_normal(d).astype(dtype)
    factors = np.minimum(1.0, rng.uniform(0.1, 2.0, n))
    V, T1 = np.zeros_like(G), T.copy()
    clip_to_references(V, G, rows, T1, slots, drift, factors, store=store)
    ref = T[slots]
    f = factors.astype(dtype)[:, None]
    with np.errstate(invalid="ignore"):
        expect = (ref + drift) + ((G[rows] - ref) - drift) * f
    assert np.array_equal(V[rows], expect, equal_nan=True)
    others = np.setdiff1d(np.arange(n + 2), rows)
    assert np.all(V[others] == 0)
    if store:
        assert np.array_equal(T1[slots], expect, equal_nan=True)
        untouched = np.setdiff1d(np.arange(n + 3), slots)
        assert np.array_equal(T1[untouched], T[untouched])
    else:
        assert np.array_equal(T1, T)


def test_clip_store_needs_the_rows_dtype():
    G = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError):
        clip_to_references(np.empty_like(G), G, np.arange(2), np.ones((2, 4)), np.arange(2), np.zeros(4), np.ones(2),
                           store=True)


def plain_sketch(G, dim, rng):
    """:func:`sketch_rows` as first written: signed rows in their dtype, each bucket map summed as an ``(L, k)`` view."""
    from flwr_byzantine.aggregators.sketch import sketch_buckets

    R, d = G.shape
    k1, k2 = sketch_buckets(d, dim)
    bits = np.unpackbits(np.frombuffer(rng.bytes((d + 7) // 8), dtype=np.uint8))[:d]
    signed = G * (bits.astype(G.dtype) * 2 - 1)
    out = []
    for k in (k1, k2):
        L, tail = divmod(d, k)
        s = signed[:, : L * k].reshape(R, L, k).sum(1)
        if tail:
            s[:, :tail] += signed[:, L * k:]
        out.append(s.astype(np.float64))
    return np.concatenate(out, axis=1) * (1.0 / np.sqrt(2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,d,dim", [(1, 1, 4), (2, 5, 4), (3, 5000, 64), (7, 100_003, 2048), (4, 2 * 2048 + 1, 2048)])
def test_count_sketch_is_the_numpy_sketch_bit_for_bit(dtype, R, d, dim):
    from flwr_byzantine.aggregators.sketch import sketch_rows

    rng = np.random.default_rng(R * d)
    G = (rng.standard_normal((R, d)) * 10.0 ** rng.uniform(-3, 3, (R, 1))).astype(dtype)
    sq = np.empty(R)
    Y = sketch_rows(G, dim, np.random.default_rng(7), sq_norms=sq)
    assert Y.dtype == np.float64 and np.array_equal(Y, plain_sketch(G, dim, np.random.default_rng(7)))
    # the squares of a segment are summed in the rows' dtype (float32 lanes for float32 rows), the segments in float64
    np.testing.assert_allclose(sq, np.sum(G.astype(np.float64) ** 2, axis=1), rtol=1e-12 if dtype == np.float64 else 2e-6)
    assert np.array_equal(sketch_rows(G, dim, np.random.default_rng(7)), Y)  # without the norms: the same sketch


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_sketch_flags_nan_and_inf_rows(dtype):
    from flwr_byzantine.aggregators.sketch import sketch_rows

    G = np.random.default_rng(3).standard_normal((5, 9001)).astype(dtype)
    G[1, 4000] = np.nan
    G[3, 17] = -np.inf
    sq = np.empty(5)
    with np.errstate(invalid="ignore"):
        Y = sketch_rows(G, 2048, np.random.default_rng(0), sq_norms=sq)
        Y0 = plain_sketch(G, 2048, np.random.default_rng(0))
    assert np.array_equal(Y, Y0, equal_nan=True)
    assert np.isnan(sq[1]) and sq[3] == np.inf and np.isfinite(sq[[0, 2, 4]]).all()
    assert np.isfinite(Y[[0, 2, 4]]).all() and not np.isfinite(Y[1]).all() and not np.isfinite(Y[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,d", [(1, 1), (3, 7), (9, KERNEL_TILE + 3), (40, 1000)])
def test_evidence_pass_against_the_plain_formulation(dtype, R, d):
    from flwr_byzantine.aggregators.streaming import diff_stats_and_store

    rng = np.random.default_rng(R + d)
    G = rng.standard_normal((R, d)).astype(dtype)
    table = rng.standard_normal((R + 3, d)).astype(dtype)
    slots = rng.permutation(R + 3)[:R]
    rows = np.sort(rng.choice(R, max(1, R - 2), replace=False))  # the others are new nodes
    prev = slots[rows]
    u = rng.standard_normal(d).astype(dtype)
    u /= np.linalg.norm(u)
    T = table.copy()
    sq, dots = diff_stats_and_store(G, T, rows, prev, slots, u)
    D = (G[rows] - table[prev]).astype(np.float64)
    np.testing.assert_allclose(sq, np.sum(D * D, axis=1), rtol=1e-12)
    np.testing.assert_allclose(dots, D @ u.astype(np.float64), rtol=1e-9, atol=1e-12 * np.sqrt(sq).max())
    assert np.array_equal(T[slots], G)  # every row stored, scored or new
    untouched = np.setdiff1d(np.arange(R + 3), slots)
    assert np.array_equal(T[untouched], table[untouched])
    # no scoring: only the store
    T2 = table.copy()
    sq2, dots2 = diff_stats_and_store(G, T2, np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp), slots, None)
    assert sq2.size == dots2.size == 0 and np.array_equal(T2[slots], G)


def test_evidence_pass_with_nan_rows_gives_nan_statistics():
    from flwr_byzantine.aggregators.streaming import diff_stats_and_store

    G = np.ones((3, 50))
    G[1, 3] = np.nan
    T = np.zeros((3, 50))
    sq, dots = diff_stats_and_store(G, T, np.arange(3), np.arange(3), np.arange(3), np.full(50, 50 ** -0.5))
    assert np.isnan(sq[1]) and np.isnan(dots[1]) and np.isfinite(sq[[0, 2]]).all()
    np.testing.assert_allclose(sq[[0, 2]], 50.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_count_sketch_takes_one_byte_signs(dtype, monkeypatch):
    """The signs go to the kernel as int8 (one byte a coordinate: the vector stays in L2 while the rows stream) and
    give what signs in the rows' dtype give: the sketch and the column sums bit for bit, NaN and Inf rows included."""
    from flwr_byzantine.aggregators import kernels, sketch

    rng = np.random.default_rng(6)
    G = (rng.standard_normal((4, 9001)) * 3).astype(dtype)
    G[1, 5] = np.inf
    G[2, 8000] = np.nan
    signs = np.where(rng.random(9001) < 0.5, -1, 1).astype(np.int8)
    k1, k2 = sketch.sketch_buckets(9001, 2048)
    out = []
    for s in (signs, signs.astype(dtype)):
        Y, sq, cs = np.empty((4, k1 + k2)), np.empty(4), np.empty(9001, dtype=dtype)
        with np.errstate(invalid="ignore"):
            kernels.count_sketch(G, s, k1, k2, Y, sq, cs, 1.0)
        out.append((Y, sq, cs))
    (Y8, sq8, cs8), (Yf, sqf, csf) = out
    assert np.array_equal(Y8, Yf, equal_nan=True) and np.array_equal(cs8, csf, equal_nan=True)
    np.testing.assert_allclose(sq8, sqf, rtol=1e-13)  # a reassociated float64 sum: lanes may differ, never the value
    assert np.isinf(sq8[1]) and np.isnan(sq8[2])
    seen = []
    real = kernels.count_sketch
    monkeypatch.setattr(kernels, "count_sketch", lambda G, s, *a: (seen.append(s.dtype), real(G, s, *a)))
    sketch.sketch_rows(G[[0, 3]], 2048, np.random.default_rng(0))
    assert seen == [np.dtype(np.int8)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_sketch_is_the_float64_sketch_rounded(dtype):
    """sketch_rows(dtype=np.float32): the float64 sketch's values rounded to float32 (the scale applied in the pass,
    in float64, before the rounding), from the same signs; the float64 sketch is the bucket sums times 1/sqrt(2)."""
    from flwr_byzantine.aggregators.sketch import sketch_buckets, sketch_rows

    rng = np.random.default_rng(9)
    G = (rng.standard_normal((6, 5003)) * 3).astype(dtype)
    Y64 = sketch_rows(G, 256, np.random.default_rng(1))
    Y32 = sketch_rows(G, 256, np.random.default_rng(1), dtype=np.float32)
    assert Y64.dtype == np.float64 and Y32.dtype == np.float32
    assert np.array_equal(Y32, Y64.astype(np.float32))
    k1, _ = sketch_buckets(5003, 256)
    bits = np.unpackbits(np.frombuffer(np.random.default_rng(1).bytes((5003 + 7) // 8), dtype=np.uint8))[:5003]
    signed = G.astype(np.float64) * (bits.astype(np.float64) * 2 - 1)
    first = np.zeros((6, k1))
    for i in range(5003):
        first[:, i % k1] += signed[:, i]
    np.testing.assert_allclose(Y64[:, :k1], first / np.sqrt(2.0), rtol=0, atol=1e-5 * np.abs(first).max())


def test_count_sketch_column_sums_are_numpys_mean_bit_for_bit():
    from flwr_byzantine.aggregators.sketch import sketch_rows

    rng = np.random.default_rng(4)
    for R, d in [(1, 3), (20, 650), (33, 70_001)]:
        for dtype in DTYPES:
            G = (rng.standard_normal((R, d)) * 7).astype(dtype)
            sums = np.empty(d, dtype=dtype)
            Y = sketch_rows(G, 2048, np.random.default_rng(1), col_sums=sums)
            assert np.array_equal(sums / R, G.mean(axis=0))
            assert np.array_equal(Y, sketch_rows(G, 2048, np.random.default_rng(1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sketched_filter_screens_on_its_fused_mean(dtype):
    """RGE's sketched path takes the mean from the sketching pass: a NaN/Inf row raises as screened_mean makes it
    raise (the private signs rewound), and a clean round is what the rule decided before (the same signs, the
    same mean)."""
    from flwr_byzantine.aggregators.rge import RGE

    rng = np.random.default_rng(5)
    G = rng.standard_normal((30, 5000)).astype(dtype)
    G[:5] += dtype(4.0)
    a, b = RGE(eps_tilde=0.2, sketch_dim=256, seed=1), RGE(eps_tilde=0.2, sketch_dim=256, seed=1)
    for bad in (np.nan, -np.inf):
        B = G.copy()
        B[7, 4321] = bad
        with pytest.raises(ValueError):
            a.aggregate_rows(B, np.arange(30))  # validated rows: only the fused screen sees them
    ra, rb = a.aggregate(G), b.aggregate(G)  # a's signs were rewound: the same round as b's
    assert np.array_equal(ra.kept, rb.kept) and np.array_equal(ra.estimate, rb.estimate)
    assert set(range(5)).isdisjoint(ra.kept.tolist())


@pytest.mark.parametrize("low_precision", [True, False])
@pytest.mark.parametrize("n,m", [(1, 5), (3, 7), (64, 2047), (300, 1023)])
def test_centre_gram_is_the_numpy_formulation_bit_for_bit(low_precision, n, m):
    from flwr_byzantine.aggregators.sketch import centre_gram

    Y = np.random.default_rng(n + m).standard_normal((n, m)) * 3.0 + 1.0
    Yc = Y - Y.mean(axis=0)
    if low_precision:
        Y32 = Yc.astype(np.float32)
        g = (Y32 @ Y32.T).astype(np.float64)
    else:
        g = Yc @ Yc.T
    want = 0.5 * (g + g.T)
    got = centre_gram(Y, low_precision)
    assert got.dtype == np.float64 and np.array_equal(got, want) and np.array_equal(got, got.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_direction", [False, True])
def test_compiled_distances_and_projections_match_the_tiles(dtype, with_direction):
    """The survivors' clipping pass compiled (large rounds): the distances and projections of numpy's tiles, to the
    rounding of their sums (float64 here, the rows' dtype there); small rounds keep the tiles."""
    from flwr_byzantine.aggregators.streaming import clip_survivors, distances_and_projections

    rng = np.random.default_rng(5)
    Y = rng.standard_normal((40, 2 * KERNEL_TILE + 77)).astype(dtype)
    rows = np.sort(rng.choice(40, 31, replace=False))
    centre = Y[rows].mean(axis=0).astype(dtype)
    u = rng.standard_normal(Y.shape[1])
    u /= np.linalg.norm(u)
    direction = u if with_direction else None
    d0, p0 = distances_and_projections(Y, rows, centre, direction)
    d1, p1 = distances_and_projections(Y, rows, centre, direction, compiled=True)
    exact = Y[rows].astype(np.float64) - centre.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(d1, np.linalg.norm(exact, axis=1), rtol=tol)
    np.testing.assert_allclose(d1, d0, rtol=tol)
    if with_direction:
        ref = exact @ u.astype(dtype).astype(np.float64)
        np.testing.assert_allclose(p1, ref, rtol=0, atol=tol * np.abs(ref).max())
        np.testing.assert_allclose(p1, p0, rtol=0, atol=tol * np.abs(ref).max())
    else:
        assert p0 is None and p1 is None
    v0, f0, r0 = clip_survivors(Y, rows, centre, 1.0, trim=3)
    v1, f1, r1 = clip_survivors(Y, rows, centre, 1.0, trim=3, compiled=True)
    assert r1 == pytest.approx(r0, rel=tol) and np.array_equal(f0 < 1.0, f1 < 1.0)
    np.testing.assert_allclose(v1, v0, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_weighted_deviation_matches_the_tiles(dtype):
    """The clipping's second read of its clipped rows compiled (large rounds): numpy's tiles' ``sum_k w_k (y_k - c)``
    to their rounding (float64 sums here, the rows' dtype there), in the rows' dtype."""
    from flwr_byzantine.aggregators.streaming import weighted_deviation

    rng = np.random.default_rng(6)
    Y = rng.standard_normal((50, 2 * KERNEL_TILE + 33)).astype(dtype)
    rows = np.sort(rng.choice(50, 17, replace=False))
    centre = rng.standard_normal(Y.shape[1]).astype(dtype)
    w = rng.uniform(-0.1, 0.0, size=rows.size)
    ref = w @ (Y[rows].astype(np.float64) - centre.astype(np.float64))
    tiles = weighted_deviation(Y, rows, centre, w)
    got = weighted_deviation(Y, rows, centre, w, compiled=True)
    assert got.dtype == tiles.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(got, tiles, rtol=0, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [0, 1, 3, 4, 9, 37])
def test_rows_sum_is_the_float64_sum_of_the_rows(dtype, count):
    """kernels.rows_sum (four rows at a time, float64): the float64 sum of exactly the rows asked for, in any order."""
    from flwr_byzantine.aggregators.kernels import rows_sum

    rng = np.random.default_rng(count)
    G = rng.standard_normal((40, 1001)).astype(dtype)
    rows = rng.permutation(40)[:count]
    out = np.full(1001, 0.5)
    rows_sum(G, rows.astype(np.intp), out)
    np.testing.assert_allclose(out, 0.5 + G[rows].astype(np.float64).sum(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_float32_sums_that_overflow_their_lanes_are_summed_in_float64(scale):
    """A float32 tile whose squares overflow float32 (beyond 3.4e38) is summed again in float64 (the kernels module's
    *Reductions*): the deviations, the changes, their projections and the clipped rows' distances stay the float64
    sums, finite."""
    from flwr_byzantine.aggregators import kernels

    rng = np.random.default_rng(7)
    n, d = 5, 3 * KERNEL_TILE + 9
    G = rng.standard_normal((n, d)).astype(np.float32)
    T = rng.standard_normal((n, d)).astype(np.float32)
    G[2, KERNEL_TILE + 3] = np.float32(scale)  # one huge coordinate in the second tile of one row
    G[4, :] *= np.float32(1e18)  # a whole row whose tiles' sums (512 squares of about 1e36) overflow float32
    rows, slots = np.arange(n), np.arange(n)
    u = rng.standard_normal(d)
    u = (u / np.linalg.norm(u)).astype(np.float32)
    drift, sq, csq, cdots = reference_deviation_stats(G, rows, T, slots, np.arange(3), u)
    dev = (G - T).astype(np.float64)
    full = ((G - T) - drift).astype(np.float64)
    assert np.isfinite(sq).all() and np.isfinite(csq).all() and np.isfinite(cdots).all()
    np.testing.assert_allclose(sq, np.sum(full * full, axis=1), rtol=1e-5)
    np.testing.assert_allclose(csq, np.sum(dev * dev, axis=1), rtol=1e-5)
    np.testing.assert_allclose(cdots, dev @ u.astype(np.float64), rtol=1e-5, atol=1e-5 * np.sqrt(csq.max()))
    np.testing.assert_allclose(reference_deviation_stats(G, rows, T, slots, np.arange(3))[1], sq, rtol=1e-5)
    centre = rng.standard_normal(d).astype(np.float32)
    dist = np.empty(n)
    kernels.centre_sq_distances(G, rows, centre, dist)
    plain = np.sum(np.square((G - centre).astype(np.float64)), axis=1)
    assert np.isfinite(dist).all()
    np.testing.assert_allclose(dist, plain, rtol=1e-5)
    V = np.zeros_like(G)
    csq_clip = clip_to_references(V, G, rows, T.copy(), slots, np.zeros(d, np.float32), np.ones(n), centre=centre)
    kernels.centre_sq_distances(V, rows, centre, dist)
    assert np.isfinite(csq_clip).all()
    np.testing.assert_array_equal(csq_clip, dist)  # the clipping's distances: the separate pass's, bit for bit

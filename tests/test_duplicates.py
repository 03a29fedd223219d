"""Near-duplicate replies get one vote (flwr_byzantine.aggregators.duplicates, step 8 of the default defence)."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators.defence import RobustDefence
from flwr_byzantine.aggregators.duplicates import SKETCH_ABOVE, duplicate_rows, pairwise_distances


def _round(R: int = 20, d: int = 50, copies: int = 4, seed: int = 0, jitter: float = 1e-9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(R, d))
    crafted = -G[: R - copies].mean(axis=0) + 0.3 * rng.normal(size=d)
    G[R - copies :] = crafted + jitter * rng.normal(size=(copies, d))
    return G


def test_copies_of_one_vector_keep_their_first_row():
    G = _round()
    np.testing.assert_array_equal(duplicate_rows(G, np.arange(20)), [17, 18, 19])
    # only the rows asked about are compared (the first copy left out elsewhere: the next one is kept)
    np.testing.assert_array_equal(duplicate_rows(G, np.arange(17)), [])
    np.testing.assert_array_equal(duplicate_rows(G, np.r_[0:16, 17:20]), [18, 19])


def test_independent_rows_and_degenerate_rounds_have_no_duplicates():
    rng = np.random.default_rng(1)
    for seed in range(5):
        G = np.random.default_rng(seed).normal(size=(30, 40))
        assert duplicate_rows(G, np.arange(30)).size == 0
    # honest-sized noise on the crafted vector: no longer duplicates (the rest of the defence judges them)
    assert duplicate_rows(_round(jitter=1.0), np.arange(20)).size == 0
    assert duplicate_rows(np.ones((5, 3)), np.arange(5)).size == 0  # all alike: nothing to tell apart
    assert duplicate_rows(rng.normal(size=(2, 3)), np.arange(2)).size == 0


def test_the_sketched_distances_find_the_same_duplicates():
    R, d = 24, SKETCH_ABOVE // 24 + 1
    G = _round(R=R, d=d, copies=5, seed=3).astype(np.float32)
    rng = np.random.default_rng(7)
    exact, sketched = pairwise_distances(G, np.arange(R)), pairwise_distances(G, np.arange(R), rng)
    off = ~np.eye(R, dtype=bool)
    honest = np.ix_(np.arange(R - 5), np.arange(R - 5))
    ratio = sketched[honest][off[honest]] / exact[honest][off[honest]]
    # a 64-coordinate projection: about 18 % per pair, never near the 1 % of a duplicate
    assert 0.4 < ratio.min() and ratio.max() < 1.6 and abs(float(np.median(ratio)) - 1.0) < 0.1
    np.testing.assert_array_equal(duplicate_rows(G, np.arange(R), rng=rng), [20, 21, 22, 23])


def test_the_default_defence_gives_copies_one_vote_outside_the_budget():
    G = _round(copies=4)
    res = RobustDefence(eps_tilde=0.2, seed=0).aggregate(G)
    assert res.info["duplicates"] == [17, 18, 19]
    assert not set(res.info["duplicates"]) & set(np.asarray(res.kept).tolist())
    off = RobustDefence(eps_tilde=0.2, seed=0, duplicate_tol=None).aggregate(G)
    assert off.info["duplicates"] == []
    # five copies at a budget of floor(0.2 * 20) = 4: the copies do not spend the budget (a plain mean
    # of the rest would take the kept copy at full weight), the filter still runs
    res5 = RobustDefence(eps_tilde=0.2, seed=0).aggregate(_round(copies=5))
    assert len(res5.info["duplicates"]) == 4 and "budget_spent" not in res5.info
    # a large round: the duplicates come from the gross screen's sketch of the rows
    big = _round(R=24, d=60000, copies=4, seed=5).astype(np.float32)
    assert RobustDefence(eps_tilde=0.2, seed=0).aggregate(big).info["duplicates"] == [21, 22, 23]
    for bad in (0.0, 1.0, float("nan"), -0.1):
        with pytest.raises(ValueError):
            RobustDefence(duplicate_tol=bad)


def _plain_duplicate_rows(G, rows, tol, rng):
    """``duplicate_rows`` as first written: the (n, n) distance matrix, np.median of its upper triangle."""
    n = rows.size
    D = pairwise_distances(G, rows, rng)
    med = float(np.median(D[np.triu_indices(n, 1)]))
    if not (med > 0 and np.isfinite(med)):
        return np.zeros(0, dtype=np.intp)
    close = D <= tol * med
    taken = np.zeros(n, dtype=bool)
    out = []
    for i in range(n):
        if not taken[i]:
            group = np.flatnonzero(close[i] & ~taken)
            taken[group] = True
            out.extend(int(rows[j]) for j in group if j != i)
    return np.asarray(sorted(out), dtype=np.intp)


@pytest.mark.parametrize("R,d", [(12, 30), (20, 650), (101, 2047), (400, 300)])
def test_the_compiled_median_and_count_take_the_distance_matrixs_decisions(R, d):
    """The median of the squared distances' middle pair and the compiled count give the decisions of the (n, n)
    distance matrix: distinct rows, copies (exact and within rounding), an odd number of pairs, all rows alike."""
    rng = np.random.default_rng(R)
    for trial in range(4):
        G = rng.standard_normal((R, d))
        rows = np.arange(R)
        if trial == 1:
            G[5] = G[3]
            G[9] = G[3] + 1e-9
            rows = np.setdiff1d(rows, [2])  # 10 x 9 / 2 = an odd number of pairs at R = 12
        if trial == 2:
            G[:] = G[0]
        if trial == 3:
            G[R // 2:] = G[0]  # half the rows one message: the median distance is 0
        for seed in (None, 7):
            got = duplicate_rows(G, rows, 0.01, None if seed is None else np.random.default_rng(seed))
            want = _plain_duplicate_rows(G, rows, 0.01, None if seed is None else np.random.default_rng(seed))
            assert got.tolist() == want.tolist(), (trial, seed)
            assert (got.tolist() == [5, 9]) if trial == 1 else True
    G = rng.standard_normal((12, 30))
    G[4, 2] = np.nan
    assert duplicate_rows(G, np.arange(12)).size == 0  # a NaN distance: np.median's NaN, no duplicates


def test_many_rows_take_the_median_distance_from_sampled_pairs():
    """Beyond MEDIAN_ALL_PAIRS_UP_TO pairs (with a projection) the median distance is that of MEDIAN_PAIRS random
    pairs: within a percent of all pairs' median, and the same copies found."""
    from flwr_byzantine.aggregators import duplicates as dup

    R = 600
    assert R * (R - 1) // 2 > dup.MEDIAN_ALL_PAIRS_UP_TO
    G = _round(R=R, d=300, copies=6, seed=11)
    Z = dup._projection(G, np.arange(R), np.random.default_rng(3))
    K = dup._gram(G, np.arange(R), np.random.default_rng(3))
    np.testing.assert_allclose(K, Z @ Z.T, rtol=0, atol=0)
    full = dup._median_distance(K)
    sampled = dup._sampled_median_distance(Z, np.random.default_rng(4))
    assert sampled != full and abs(sampled / full - 1.0) < 0.01
    draw = np.random.default_rng(4)  # the same pairs, their distances from the projected rows
    i = draw.integers(0, R, size=dup.MEDIAN_PAIRS)
    j = draw.integers(0, R - 1, size=dup.MEDIAN_PAIRS)
    j += j >= i
    assert sampled == pytest.approx(float(np.sqrt(np.median(((Z[i] - Z[j]) ** 2).sum(axis=1)))), rel=1e-12)
    np.testing.assert_array_equal(duplicate_rows(G, np.arange(R), rng=np.random.default_rng(3)), np.arange(595, 600))
    # only a projected round with more pairs than the bound samples them
    calls = []
    real = dup._sampled_median_distance

    def spy(Z, rng):
        calls.append(Z.shape)
        return real(Z, rng)

    dup._sampled_median_distance = spy
    try:
        duplicate_rows(G, np.arange(R), rng=np.random.default_rng(3))
        duplicate_rows(G, np.arange(500), rng=np.random.default_rng(3))  # 124,750 pairs: all of them
        duplicate_rows(G, np.arange(R))  # exact distances: all pairs
    finally:
        dup._sampled_median_distance = real
    assert calls == [(R, dup.PROJECTION_DIM)]


def test_projection_beyond_float32_range_falls_back_to_float64():
    """float64 rows too large for float32: the projection is taken in float64 and the copies still found."""
    G = _round(R=40, d=SKETCH_ABOVE // 40 + 1, copies=3, seed=2) * 1e100
    np.testing.assert_array_equal(duplicate_rows(G, np.arange(40), rng=np.random.default_rng(0)), [38, 39])


def test_many_rows_find_the_close_pairs_and_groups_of_the_distance_matrix():
    """Beyond MEDIAN_ALL_PAIRS_UP_TO pairs the close pairs come from the projected rows sorted by one coordinate (no
    (n, n) matrix): the same pairs as every pair's distance gives, and the same groups as the matrix's grouping."""
    from flwr_byzantine.aggregators import duplicates as dup

    rng = np.random.default_rng(5)
    n = 700
    Z = rng.standard_normal((n, dup.PROJECTION_DIM))
    for a, b in rng.integers(0, n, size=(40, 2)):  # near copies, chains and groups among them
        Z[b] = Z[a] + 1e-3 * rng.standard_normal(dup.PROJECTION_DIM)
    Z[[10, 20, 30]] = Z[5]
    D = np.sqrt(((Z[:, None, :] - Z[None, :, :]) ** 2).sum(axis=2))
    for thr in (0.0, 0.005, 0.05, 3.0):
        i, j = dup._close_pairs(Z, thr)
        assert np.all(i < j)
        want = {(a, b) for a, b in zip(*np.nonzero(np.triu(D <= thr, 1)))}
        assert set(zip(i.tolist(), j.tolist())) == want and len(want) == i.size
        rows = np.arange(1000, 1000 + n)  # positions map to these row numbers
        close = D <= thr
        taken = np.zeros(n, dtype=bool)
        expected: list[int] = []
        for r in range(n):  # duplicate_rows' grouping on the whole matrix
            if taken[r]:
                continue
            group = np.flatnonzero(close[r] & ~taken)
            taken[group] = True
            expected.extend(int(rows[g]) for g in group if g != r)
        np.testing.assert_array_equal(dup._groups_from_pairs(rows, i, j), sorted(expected))

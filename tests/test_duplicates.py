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

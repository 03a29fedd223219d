"""The default defence's fast passes for large rounds (issue 12).

In rounds of at least ``fast_above`` entries :class:`~flwr_byzantine.aggregators.RobustDefence`
screens gross outliers on a server-private CountSketch of the rows and takes the self-reference
drift from a random subsample of the nodes.  Small rounds (the robustness benchmark's) run the exact
passes bit for bit; large ones must take the exact passes' decisions on clear-cut data, and the
randomness must be fresh every round and deterministic under the seed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from flwr_byzantine.aggregators.defence import RobustDefence
from flwr_byzantine.aggregators.streaming import reference_deviation_stats
from flwr_byzantine.aggregators.temporal import SelfReference
from tolerances import SUM_RTOL


def _rounds(n_rounds: int, R: int, d: int, far: int, seed: int = 0) -> list[np.ndarray]:
    """float32 rounds of ``R`` heterogeneous honest rows drifting together, the first ``far`` rows far away."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(R, d)).astype(np.float32)
    out = []
    for t in range(n_rounds):
        G = centres * np.float32(0.5) + np.float32(0.1 * t) + rng.normal(size=(R, d)).astype(np.float32) * 0.3
        G[:far] += np.float32(30.0)  # gross: ~ 30 sqrt(d) away, the honest spread ~ 0.6 sqrt(d)
        out.append(G)
    return out


def test_reference_deviation_stats_median_of_a_subsample():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(12, 300)).astype(np.float32)
    table = rng.normal(size=(15, 300)).astype(np.float32)
    rows = np.array([0, 1, 2, 4, 5, 7, 8, 9, 11])
    slots = np.array([3, 0, 14, 2, 1, 9, 8, 7, 5])
    sample = np.array([0, 2, 3, 6, 8])
    drift, sq = reference_deviation_stats(G, rows, table, slots, sample)
    dev = G[rows] - table[slots]
    np.testing.assert_array_equal(drift, np.median(dev[sample], axis=0))
    full = dev - drift
    np.testing.assert_allclose(sq, np.einsum("ij,ij->i", full, full), rtol=1e-6)
    # without a sample: the median of every row's difference
    np.testing.assert_array_equal(reference_deviation_stats(G, rows, table, slots)[0], np.median(dev, axis=0))


def test_self_reference_drift_from_a_random_subsample_of_nodes():
    rng = np.random.default_rng(1)
    G0, G1 = rng.normal(size=(2, 40, 200))
    G1[:10] += 50.0  # a quarter of the nodes move together by a lot: the median of all is not moved
    ids = list(range(40))
    exact, sampled = SelfReference(), SelfReference()
    for ref in (exact, sampled):
        ref.apply(G0, ids)
    _, a = exact.apply(G1, ids)
    _, b = sampled.apply(G1, ids, drift_rows=15, rng=np.random.default_rng(3))
    assert "drift_rows" not in a and b["drift_rows"] == 15
    assert a["jumped"] == b["jumped"] == list(range(10))  # the same jumps from 15 nodes' drift as from 40
    # at most drift_rows nodes with a reference: every one of them, as without a sample
    small, plain = SelfReference(), SelfReference()
    for ref in (small, plain):
        ref.apply(G0[:10], ids[:10])
    Va, _ = small.apply(G1[:10], ids[:10], drift_rows=15, rng=np.random.default_rng(3))
    Vb, _ = plain.apply(G1[:10], ids[:10])
    np.testing.assert_array_equal(Va, Vb)


def test_small_rounds_run_the_exact_passes_bit_for_bit():
    rounds = _rounds(4, 20, 650, far=2)
    ids = list(range(20))
    a, b = RobustDefence(eps_tilde=0.2, seed=0), RobustDefence(eps_tilde=0.2, seed=0, fast_passes=False)
    for G in rounds:
        ra, rb = a.aggregate(G, client_ids=ids), b.aggregate(G, client_ids=ids)
        np.testing.assert_array_equal(ra.estimate, rb.estimate)
        assert "drift_rows" not in ra.info


def test_large_rounds_sketch_the_screen_and_sample_the_drift():
    R, d = 48, 9000
    rounds = _rounds(5, R, d, far=3)
    ids = list(range(R))
    fast = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    exact = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d, fast_passes=False)
    calls = []
    import flwr_byzantine.aggregators.defence as mod

    real = mod.sketch_rows

    def spy(G, dim, rng, **kw):
        calls.append(dim)
        return real(G, dim, rng, **kw)

    mod.sketch_rows = spy
    try:
        for G in rounds:
            ra, rb = fast.aggregate(G, client_ids=ids), exact.aggregate(G, client_ids=ids)
            assert ra.info["gross"] == rb.info["gross"] == [0, 1, 2]
            assert ra.kept.tolist() == rb.kept.tolist()
            assert ra.info["jumped"] == rb.info["jumped"]
            # the sampled drift moves only the clipped rows, by a fraction of the drift's own noise: per
            # coordinate well under the rows' noise (0.3) and the round's common drift (0.1)
            assert np.linalg.norm(ra.estimate - rb.estimate) / np.sqrt(d) < 0.02
    finally:
        mod.sketch_rows = real
    assert calls == [2048] * len(rounds)  # the fast rule's screen only (the exact rule's never sketches)
    assert ra.info["drift_rows"] == 31  # 45 nodes with a reference: the drift from 31 of them
    assert "drift_rows" not in rb.info


def test_sketched_screen_sees_a_row_concentrated_on_one_coordinate():
    R, d = 30, 20000
    rng = np.random.default_rng(4)
    G = rng.normal(size=(R, d)).astype(np.float32)
    G[5, 1234] = 1e4  # its whole excess on one (secret-signed) coordinate: no bucket map can hide it
    res = RobustDefence(eps_tilde=0.2, seed=1, fast_above=R * d).aggregate(G, client_ids=list(range(R)))
    assert res.info["gross"] == [5]


def test_fast_passes_are_fresh_every_round_and_deterministic_under_the_seed():
    R, d = 48, 9000
    rounds = _rounds(4, R, d, far=0, seed=2)
    ids = list(range(R))
    a, b = (RobustDefence(eps_tilde=0.2, seed=7, fast_above=R * d) for _ in range(2))
    c = RobustDefence(eps_tilde=0.2, seed=8, fast_above=R * d)
    ests = []
    for G in rounds:
        ra, rb, rc = (rule.aggregate(G, client_ids=ids) for rule in (a, b, c))
        np.testing.assert_array_equal(ra.estimate, rb.estimate)
        ests.append((ra.estimate, rc.estimate))
    assert any(not np.array_equal(x, y) for x, y in ests[1:])  # another seed samples another drift
    # the generator advances: the same round twice from the same state draws other signs and nodes
    twin = copy.deepcopy(a)
    s1 = twin._pass_rng.bytes(8)
    s2 = twin._pass_rng.bytes(8)
    assert s1 != s2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipped_rows_become_the_references_in_the_clipping_pass(dtype):
    """The clipping writes the references as it writes the clipped rows (no second copy): every node seen this
    round (new, clipped or not) has its row of V as reference, a mature jump the old reference plus the drift."""
    rng = np.random.default_rng(5)
    ref = SelfReference(burn_in=1)
    prev = {}
    for t in range(6):
        ids = [i for i in range(30) if (i + t) % 7]  # churn: a node is absent every seventh round
        G = (rng.normal(size=(len(ids), 300)) + 0.05 * t).astype(dtype)
        if t >= 3:
            G[:2] += dtype(40.0)  # two jumps
        V, info = ref.apply(G, ids, skip=[5])
        if t >= 3:
            assert {0, 1} <= set(info["jumped"])
        for r, node in enumerate(ids):
            if r == 5:
                assert node not in ref.refs.index
            elif r in info["jumped"] and node in prev:
                assert not np.array_equal(ref.refs.get([node])[0], V[r])  # followed the drift, not the jump
            else:
                np.testing.assert_array_equal(ref.refs.get([node])[0], V[r])
        assert ref.refs.rows.dtype == dtype
        prev = {node: ref.refs.get([node])[0].copy() for node in ref.refs.index}


def test_drift_sample_grows_with_the_round():
    """A target of max(31, min(R // 4, 127)) nodes, odd: at R = 1000 a sample of 31 would be noisier than the round's
    mean.  Above 31 the target's precision comes from groups of 31 (drift_groups: 3 groups for a target of 51, 7 for
    127), whose unrolled medians cost less than one network over the target (issue 12)."""
    import flwr_byzantine.aggregators.defence as mod

    seen = []
    real = SelfReference.apply

    def spy(self, G, ids, **kw):
        seen.append((kw.get("drift_rows"), kw.get("drift_groups")))
        return real(self, G, ids, **kw)

    for R in (40, 200, 1000):
        rule = RobustDefence(eps_tilde=0.2, seed=0, fast_above=1)
        G = np.random.default_rng(R).normal(size=(R, 50)).astype(np.float32)
        SelfReference.apply = spy
        try:
            rule.aggregate(G, client_ids=list(range(R)))
        finally:
            SelfReference.apply = real
    assert seen == [(mod.DRIFT_ROWS, 1), (93, 3), (217, 7)]


def test_drift_groups_are_as_precise_as_the_target():
    """The fewest odd groups whose median of medians has at most the variance of the target's median, for Gaussian
    changes (checked here by simulation, not by the formula the function uses)."""
    from flwr_byzantine.aggregators.defence import drift_groups

    assert [drift_groups(m, 31) for m in (5, 31, 33, 69, 71, 109, 111, 127, 149, 151)] == [1, 1, 3, 3, 5, 5, 7, 7, 7, 9]
    rng = np.random.default_rng(0)
    for target in (51, 101, 127):
        k = drift_groups(target, 31)
        X = rng.standard_normal((20000, 31 * k))
        grouped = np.median(np.median(X.reshape(-1, k, 31), axis=2), axis=1)
        plain = np.median(rng.standard_normal((20000, target)), axis=1)
        assert grouped.var() <= plain.var() * 1.05  # within the simulation's noise (about 1 %)
        # and two groups fewer would not do
        if k > 3:
            fewer = np.median(np.median(X[:, :31 * (k - 2)].reshape(-1, k - 2, 31), axis=2), axis=1)
            assert fewer.var() > plain.var()


def test_grouped_drift_is_the_median_of_the_groups_medians():
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        G = rng.normal(size=(120, 3000)).astype(dtype)
        T = rng.normal(size=(130, 3000)).astype(dtype)
        rows, slots = np.arange(120), rng.permutation(130)[:120]
        for k, size in ((3, 31), (5, 7), (7, 3)):
            sample = rng.choice(120, size=k * size, replace=False)  # any order: the groups are consecutive
            drift, sq = reference_deviation_stats(G, rows, T, slots, sample, groups=k)
            dev = G[rows] - T[slots]
            medians = np.stack([np.median(dev[sample[j * size:(j + 1) * size]], axis=0) for j in range(k)])
            np.testing.assert_array_equal(drift, np.median(medians, axis=0))
            full = (dev - drift).astype(np.float64)
            np.testing.assert_allclose(sq, np.sum(full * full, axis=1), rtol=SUM_RTOL[dtype])
        G[sample[4], 11] = np.nan  # a NaN in one group: the column's drift is NaN, as np.median gives
        drift, _ = reference_deviation_stats(G, rows, T, slots, sample, groups=7)
        assert np.isnan(drift[11]) and np.isfinite(np.delete(drift, 11)).all()
    for bad in (2, 0, 4):
        with pytest.raises(ValueError):
            reference_deviation_stats(G, rows, T, slots, np.arange(24), groups=bad)


def test_self_reference_drift_groups_draw_random_groups_and_shrink_with_fewer_nodes():
    """Groups of a random order (a client's position in the round does not pick its group); with fewer nodes than
    the groups need, two groups fewer at a time, then one group of the group size; the same jumps as the exact drift
    when a quarter of the nodes move together."""
    rng = np.random.default_rng(1)
    G0, G1 = rng.normal(size=(2, 160, 300))
    G1[:40] += 50.0  # a quarter of the nodes, first in the round, move together by a lot
    ids = list(range(160))
    exact, grouped = SelfReference(), SelfReference()
    for ref in (exact, grouped):
        ref.apply(G0, ids)
    _, a = exact.apply(G1, ids)
    _, b = grouped.apply(G1, ids, drift_rows=155, drift_groups=5, rng=np.random.default_rng(3))
    assert b["drift_rows"] == 155 and b["drift_groups"] == 5
    assert a["jumped"] == b["jumped"] == list(range(40))
    for n, rows, groups in ((100, 93, 3), (80, 31, None), (31, None, None)):
        ref = SelfReference()
        ref.apply(G0[:n], ids[:n])
        _, info = ref.apply(G1[:n], ids[:n], drift_rows=155, drift_groups=5, rng=np.random.default_rng(3))
        assert info.get("drift_rows") == rows and info.get("drift_groups") == groups
    with pytest.raises(ValueError):
        exact.apply(G0, ids, drift_rows=62, drift_groups=2)


@pytest.mark.parametrize("bad", [0, -1])
def test_fast_above_still_validated(bad):
    with pytest.raises(ValueError):
        RobustDefence(fast_above=bad)


@pytest.mark.parametrize("with_ids", [True, False])
def test_sketched_screen_is_the_input_check_of_large_rounds(with_ids):
    """Large rounds check NaN/Inf and the energy on the screen's sketching pass (no separate pass): a bad row
    raises before anything changes (the private generator rewound: the next rounds are those of a rule that
    never saw it), and rows whose energy would overflow float32 sums are widened as check_matrix widens them.
    Without node ids that pass is also the filter's (handed over), and the same holds."""
    rounds = _rounds(3, 12, 9000, far=2)
    ids = list(range(12)) if with_ids else None
    rule, ref = (RobustDefence(eps_tilde=0.2, seed=3, fast_above=1) for _ in range(2))
    assert rule._screen_sketched(rounds[0])
    rule.aggregate(rounds[0], client_ids=ids)
    ref.aggregate(rounds[0], client_ids=ids)
    for bad in (np.nan, np.inf):
        G = rounds[1].copy()
        G[4, 123] = bad
        with pytest.raises(ValueError):
            rule.aggregate(G, client_ids=ids)
    a = rule.aggregate(rounds[1], client_ids=ids)
    b = ref.aggregate(rounds[1], client_ids=ids)
    assert np.array_equal(a.estimate, b.estimate) and a.info["gross"] == b.info["gross"] == [0, 1]
    # finite rows whose squared norm passes LARGE_ENERGY: the rule works in float64, the estimate comes back float32
    huge = rounds[2] * np.float32(1e17)
    wide, plain = (RobustDefence(eps_tilde=0.2, seed=3, fast_above=1) for _ in range(2))
    out = wide.aggregate(huge, client_ids=ids)
    out64 = plain.aggregate(huge.astype(np.float64), client_ids=ids)
    assert out.estimate.dtype == np.float32 and np.isfinite(out.estimate).all()
    assert out.info["gross"] == out64.info["gross"] == [0, 1]
    np.testing.assert_allclose(out.estimate, out64.estimate.astype(np.float32), rtol=1e-6)


def test_screen_centre_from_a_sample_of_rows_on_larger_rounds(monkeypatch):
    """A sketched screen of more than SCREEN_CENTRE_ROWS rows takes its centre from that many rows drawn at random
    (fresh every round), up to it from every row; the gross rows are dropped either way, as the exact screen drops
    them."""
    import flwr_byzantine.aggregators.defence as mod

    shapes = []
    real = mod.column_median

    def spy(A):
        shapes.append(A.shape)
        return real(A)

    monkeypatch.setattr(mod, "column_median", spy)
    for R, d in ((200, 5000), (mod.SCREEN_CENTRE_ROWS, 9000)):
        rounds = _rounds(2, R, d, far=4, seed=R)
        fast = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
        exact = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d, fast_passes=False)
        centres = []
        for G in rounds:
            shapes.clear()
            assert fast.aggregate(G).info["gross"] == exact.aggregate(G).info["gross"] == [0, 1, 2, 3]
            centres.append(shapes[0])
        want = min(R, mod.SCREEN_CENTRE_ROWS)
        assert [s[0] for s in centres] == [want, want]
        assert centres[0][1] < d  # on the sketch
    # the sample is drawn from the private generator: fresh every round, the same under the seed
    R, d = 200, 5000
    G = _rounds(1, R, d, far=4, seed=1)[0]
    sketches, picks = [], []
    real_sketch = mod.sketch_rows

    def sketch_spy(*a, **k):
        sketches.append(real_sketch(*a, **k))
        return sketches[-1]

    def centre_spy(A):
        Y = sketches[-1]
        picks.append([int(np.flatnonzero((Y == row).all(axis=1))[0]) for row in A])
        return real(A)

    monkeypatch.setattr(mod, "sketch_rows", sketch_spy)
    monkeypatch.setattr(mod, "column_median", centre_spy)
    for seed in (0, 0):
        rule = RobustDefence(eps_tilde=0.2, seed=seed, fast_above=R * d)
        rule.aggregate(G)
        rule.aggregate(G)
    assert len(picks) == 4 and all(len(p) == len(set(p)) == mod.SCREEN_CENTRE_ROWS for p in picks)
    assert picks[0] != picks[1]  # fresh every round
    assert picks[0] == picks[2] and picks[1] == picks[3]  # deterministic under the seed


def test_survivors_clipping_compiled_on_large_rounds_only(monkeypatch):
    """Large rounds take the survivors' distances from the compiled pass; small ones keep numpy's tiles (their
    values bit for bit)."""
    import flwr_byzantine.aggregators.defence as mod

    seen = []
    real = mod.clip_survivors

    def spy(*a, **k):
        seen.append(k.get("compiled"))
        return real(*a, **k)

    monkeypatch.setattr(mod, "clip_survivors", spy)
    for R, d, fast in ((48, 9000, True), (20, 650, False)):
        seen.clear()
        rule = RobustDefence(eps_tilde=0.2, seed=0, fast_above=48 * 9000)
        for G in _rounds(3, R, d, far=0, seed=R):  # clean rounds: the budget unspent, every survivor clipped
            rule.aggregate(G, client_ids=list(range(R)))
        assert seen and all(c is fast for c in seen)


def test_the_filter_given_the_callers_pass_decodes_as_with_its_own():
    """RGE.aggregate_rows(presketch=...): a pass the caller took with the signs the filter would draw gives the
    filter's own result bit for bit (the sketch, the norms and the column sums stand for its pass); one it cannot use
    (another bucket count, no column sums where they are needed) is ignored."""
    from flwr_byzantine.aggregators.rge import RGE
    from flwr_byzantine.aggregators.sketch import RowSketch, sketch_rows

    G = _rounds(1, 60, 30000, far=8, seed=5)[0]
    rows = np.setdiff1d(np.arange(60), [3, 17])
    own = RGE(eps_tilde=0.2, sketch_dim=2048, spectral_above=64, threshold_factor=1.5, seed=4)
    handed = copy.deepcopy(own)
    state = copy.deepcopy(own._rng)
    sq, sums = np.empty(60), np.empty(30000, dtype=np.float32)
    Y = sketch_rows(G, 2048, state, sq_norms=sq, col_sums=sums)
    a = own.aggregate_rows(G, rows)
    b = handed.aggregate_rows(G, rows, presketch=RowSketch(Y, sq, sums, 2048))
    assert a.kept.tolist() == b.kept.tolist() and set(range(8)).isdisjoint(rows[a.kept])
    np.testing.assert_array_equal(a.estimate, b.estimate)
    assert handed._rng.bit_generator.state != own._rng.bit_generator.state  # it drew no signs of its own
    for unusable in (RowSketch(Y, sq, None, 2048),  # no column sums
                     RowSketch(sketch_rows(G, 512, np.random.default_rng(1)), sq, sums, 512)):  # other buckets
        other = RGE(eps_tilde=0.2, sketch_dim=2048, spectral_above=64, threshold_factor=1.5, seed=4)
        c = other.aggregate_rows(G, rows, presketch=unusable)
        assert c.kept.tolist() == a.kept.tolist()
        np.testing.assert_array_equal(c.estimate, a.estimate)


def test_without_node_ids_the_screen_and_the_filter_share_one_pass():
    """Without node ids the filter reads the rows the screen sketched: one sketching pass a round (it was two), the
    gross rows and the attackers still removed; with node ids the filter reads the memories, which the memories' fold
    sketches with the filter's signs (no pass of the filter's own either)."""
    import flwr_byzantine.aggregators.rge as rge_mod
    import flwr_byzantine.aggregators.defence as mod

    R, d = 60, 30000
    rounds = _rounds(3, R, d, far=3, seed=6)
    for G in rounds:
        G[3:9] = G[9:].mean(axis=0) + np.float32(3.0)  # six attackers in a tight cluster, off the honest mean
    calls, dims = [], []
    real_d, real_r = mod.sketch_rows, rge_mod.sketch_rows

    def spy(where):
        def f(G, dim, rng, **kw):
            calls.append(where)
            dims.append(dim)
            return (real_d if where == "screen" else real_r)(G, dim, rng, **kw)
        return f

    mod.sketch_rows, rge_mod.sketch_rows = spy("screen"), spy("filter")
    try:
        rule = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
        for G in rounds:
            res = rule.aggregate(G)
            assert res.info["gross"] == [0, 1, 2] and set(range(9)).isdisjoint(res.kept.tolist())
            honest = G[9:].mean(axis=0)
            assert np.linalg.norm(res.estimate - honest) < 0.05 * np.linalg.norm(G[3] - honest)
        assert calls == ["screen"] * len(rounds)
        calls.clear()
        with_ids = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
        from flwr_byzantine.aggregators import kernels

        folds = []
        real_fold = kernels.clip_fold_sketch_rows
        kernels.clip_fold_sketch_rows = lambda *a: (folds.append(1), real_fold(*a))
        try:
            for G in _rounds(3, R, d, far=0, seed=7):  # clean rounds: the filter runs (no budget spent before it)
                res = with_ids.aggregate(G, client_ids=list(range(R)))
                assert not res.info.get("budget_spent")
        finally:
            kernels.clip_fold_sketch_rows = real_fold
        assert calls == ["screen"] * 3 and len(folds) == 3
        with_ids.fuse_passes = False  # unfused: the filter's own pass over the memories
        calls.clear()
        for G in _rounds(1, R, d, far=0, seed=7):
            with_ids.aggregate(G, client_ids=list(range(R)))
        assert calls == ["screen", "filter"]
        # many rows: the screen takes the many-row filter's shorter sketch (1024), still one pass a round
        calls.clear()
        dims.clear()
        R, d = 520, 4200
        G = _rounds(1, R, d, far=5, seed=8)[0]
        res = RobustDefence(eps_tilde=0.2, seed=0).aggregate(G)
        assert res.info["gross"] == list(range(5)) and res.kept.size >= R - 5 - int(0.2 * R)
        assert calls == ["screen"] and dims == [1024]
    finally:
        mod.sketch_rows, rge_mod.sketch_rows = real_d, real_r

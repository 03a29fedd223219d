"""Self-reference clipping (flwr_byzantine.aggregators.temporal) and its use in the default defence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flwr_byzantine.aggregators import RobustDefence
from flwr_byzantine.aggregators.temporal import SPREAD_MIN, SPREAD_WINDOW, SelfReference


def _honest_stream(rng, R=20, d=30, rounds=8, spread=5.0, noise=0.3):
    """Heterogeneous clients (fixed offsets of size ``spread``) with small per-round noise and a common drift."""
    offsets = spread * rng.normal(size=(R, d))
    for t in range(rounds):
        yield offsets + 0.1 * t + noise * rng.normal(size=(R, d))


def test_first_sight_passes_unchanged_and_later_changes_are_clipped_to_the_noise_level():
    rng = np.random.default_rng(0)
    sr = SelfReference(scale=1.0, jump_factor=None)
    ids = list(range(100, 120))
    stream = list(_honest_stream(rng))
    V, info = sr.apply(stream[0], ids)
    np.testing.assert_array_equal(V, stream[0])
    assert info["self_rows"] == 0 and len(sr) == 20
    G = stream[1].copy()
    G[3] += 50.0  # node 103 moves far from its own last reply (but not far from the others' spread)
    V, info = sr.apply(G, ids)
    assert info["self_rows"] == 20 and info["self_clipped"] >= 1
    move = np.linalg.norm(V[3] - stream[0][3])
    # it moved by the common drift (0.55, estimated by a median) plus at most the radius: a small
    # fraction of the 50 * sqrt(30) it asked for
    assert move <= np.linalg.norm(np.full(30, 0.1)) + 1.0 + info["self_radius"]
    assert info["self_radius"] < 5.0 and move < 10.0
    # the reference remembers the clipped row, not the raw one
    np.testing.assert_allclose(sr.refs.get([103])[0], V[3])


def test_jumps_are_reported_and_a_mature_reference_only_follows_the_drift():
    rng = np.random.default_rng(1)
    sr = SelfReference(scale=1.0, jump_factor=4.0, burn_in=0)
    ids = list(range(20))
    stream = list(_honest_stream(rng, rounds=3))
    sr.apply(stream[0], ids)
    G = stream[1].copy()
    G[[2, 7]] *= -1.0  # two nodes turn (a sleeper waking up)
    V, info = sr.apply(G, ids)
    assert sorted(info["jumped"]) == [2, 7] and min(info["jump_ratio"]) > 4.0
    ref = sr.refs.get([2])[0]
    assert np.linalg.norm(ref - stream[0][2]) < 2.0  # its reference stayed with its old self (+ the drift)
    assert np.linalg.norm(G[2] - stream[0][2]) > 40.0
    # an honest round: nobody jumps
    _, info = sr.apply(stream[2], ids)
    assert info["jumped"] == []


def test_a_young_reference_follows_a_jump_by_one_clip_radius_and_a_mature_one_does_not():
    rng = np.random.default_rng(1)
    sr = SelfReference(scale=1.0, jump_factor=4.0, burn_in=3)
    ids = list(range(20))
    stream = list(_honest_stream(rng, rounds=8))
    sr.apply(stream[0], ids)
    G = stream[1].copy()
    G[2] *= -1.0  # young reference (age 0)
    V, info = sr.apply(G, ids)
    assert info["jumped"] == [2]
    np.testing.assert_allclose(sr.refs.get([2])[0], V[2])  # the clipped reply, one radius from the old one
    for t in range(2, 6):
        sr.apply(stream[t], ids)
    assert sr.ages[7] >= 3
    G = stream[6].copy()
    G[7] *= -1.0  # mature reference
    before = sr.refs.get([7])[0].copy()
    V, info = sr.apply(G, ids)
    assert 7 in info["jumped"]
    assert not np.allclose(sr.refs.get([7])[0], V[7])
    assert np.linalg.norm(sr.refs.get([7])[0] - before) < 1.0  # only the drift (0.1 per coordinate here)
    # the ages survive a checkpoint; a checkpoint without them counts every reference as mature
    other = SelfReference(scale=1.0, jump_factor=4.0, burn_in=3)
    other.load_state_dict(sr.state_dict())
    assert other.ages == sr.ages
    legacy = {k: v for k, v in sr.state_dict().items() if k != "ages"}
    other.load_state_dict(legacy)
    assert set(other.ages.values()) == {3}
    with pytest.raises(ValueError):
        other.load_state_dict({**sr.state_dict(), "ages": [-1] * len(ids)})


@pytest.mark.parametrize("burn_in", [5, 0])
def test_a_reference_poisoned_at_first_sight_recovers_only_with_a_burn_in(burn_in):
    """A mobile adversary holds node 2 in the round the server first sees it (its first reply is the
    reference); the node is honest afterwards.  With a burn-in its reference follows it back; without,
    the node jumps in every later round."""
    rng = np.random.default_rng(1)
    sr = SelfReference(scale=1.0, jump_factor=4.0, burn_in=burn_in)
    ids = list(range(20))
    stream = list(_honest_stream(rng, rounds=40))
    G = stream[0].copy()
    G[2] += 3.0  # |shift| about 7.5 median changes: a jump back, within reach of a few radius-long steps
    sr.apply(G, ids)
    jumped = [2 in sr.apply(stream[t], ids)[1]["jumped"] for t in range(1, 40)]
    assert jumped[0]
    if burn_in:
        assert not any(jumped[-20:])
    else:
        assert all(jumped)


def _mixed_noise_stream(rng, R=20, d=30, rounds=12, quiet=12, noise=0.5):
    """Heterogeneous clients, ``quiet`` of them full-batch (their replies change only with the common drift, 0.01
    noise) and the others mini-batch (``noise``): the round's median change is the quiet majority's."""
    offsets = 5.0 * rng.normal(size=(R, d))
    level = np.where(np.arange(R) < quiet, 0.01, noise)[:, None]
    for t in range(rounds):
        yield offsets + 0.1 * t + level * rng.normal(size=(R, d))


def test_a_noisy_honest_node_is_judged_by_its_own_changes_and_a_sleeper_among_them_still_jumps():
    """Most nodes full-batch, the rest mini-batch: against the round's median alone the mini-batch nodes jump every
    round (a 40-client digits federation at alpha 0.3 lost its 10 largest clients so); against their own scale they
    do not after their first changes, while one of them that turns (a sleeper) still jumps."""
    ids = list(range(200, 220))
    noisy = list(range(12, 20))
    stream = list(_mixed_noise_stream(np.random.default_rng(11)))
    sr = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5)
    jumped = [set(sr.apply(G, ids)[1]["jumped"]) for G in stream]
    assert set(noisy) <= jumped[1]  # first sight of their changes: the round's median (the quiet nodes') judges
    assert all(not j for j in jumped[SPREAD_MIN + 1:]), jumped  # then their own, from SPREAD_MIN changes on
    assert set(sr.spreads) == set(ids)
    own = sr.own_scales(ids)
    assert min(own[noisy]) > 10 * max(own[:12])
    G = stream[-1] + 0.1
    G[15] = -G[15]  # a noisy node turns
    _, info = sr.apply(G, ids)
    assert info["jumped"] == [15] and info["jump_ratio"][0] > 4.0
    # its scale does not take the jump in (it is mature): it jumps again from the same level next round
    before = list(sr.spreads[ids[15]])
    G = G + 0.1
    _, info = sr.apply(G, ids)
    assert 15 in info["jumped"] and sr.spreads[ids[15]] == before
    # the round's median alone (own_scale=False, the seventeenth landing's rule): the noisy nodes jump every round
    median_only = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5, own_scale=False)
    jumped = [set(median_only.apply(G, ids)[1]["jumped"]) for G in stream]
    assert all(set(noisy) <= j for j in jumped[1:]) and median_only.spreads == {}


def test_a_rotating_adversary_in_the_burn_in_does_not_raise_the_nodes_own_scales():
    """The slow end-to-end test's adversary (10 nodes, 2 taken per round in turn, scaled-negative -10x) holds every
    node once in its reference's first 5 rounds.  The burn-in follows those jumps and they enter the node's window,
    but a median of its changes does not move: after the burn-in the taken nodes jump, exactly them, every round
    (a running mean took the jumps in, and a third of the rounds were filtered exactly)."""
    R, ids = 10, list(range(400, 410))
    rng = np.random.default_rng(5)
    offsets = 5.0 * rng.normal(size=(R, 30))
    sr = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5)
    for t in range(16):
        G = offsets + 0.1 * t + 0.3 * rng.normal(size=(R, 30))
        taken = [] if t == 0 else [2 * (t % 5), 2 * (t % 5) + 1]
        G[taken] *= -10.0
        _, info = sr.apply(G, ids)
        if t >= 6:
            assert sorted(info.get("jumped", [])) == taken, (t, info.get("jumped"), taken)
    own = sr.own_scales(ids)
    assert own.max() < 2.0 * np.median(own), own  # no node's scale took a jump in


def test_a_few_noisy_nodes_cannot_raise_their_own_jump_level_beyond_the_populations_quantile():
    """Three noisy nodes of 20 (under the quarter the cap leaves to the Byzantine nodes): their own scales are
    capped at the population's 75 % quantile, a quiet node's, so their large changes still jump after their
    reference's burn-in; uncapped, they would set their own level and never jump."""
    ids = list(range(300, 320))
    noisy = [17, 18, 19]
    stream = list(_mixed_noise_stream(np.random.default_rng(21), rounds=14, quiet=17, noise=0.5))
    capped = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5)
    uncapped = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5, own_cap=None)
    jc = [set(capped.apply(G, ids)[1]["jumped"]) for G in stream]
    ju = [set(uncapped.apply(G, ids)[1]["jumped"]) for G in stream]
    assert all(set(noisy) <= j for j in jc[1:]), jc
    assert all(not j for j in ju[SPREAD_MIN + 1:]), ju
    for kw in ({"own_cap": 0.4}, {"own_cap": 1.5}, {"own_cap": float("nan")}):
        with pytest.raises(ValueError):
            SelfReference(**kw)
    from flwr_byzantine.aggregators import RobustDefence

    assert RobustDefence(eps_tilde=0.2).self_reference.own_cap == 0.8  # 1 - eps_tilde


@pytest.mark.parametrize("own_scale", [True, False])
def test_defence_keeps_honest_mini_batch_nodes_among_full_batch_ones(own_scale):
    """No attacker; 12 of 20 nodes full-batch, 8 mini-batch.  The default defence keeps every reply once the
    noisy nodes' own scales are known; judged against the round's median alone, the noisy nodes jump every round and
    take the whole Byzantine budget (floor(0.2 * 20) = 4 replies left out a round).  The evidence is off: these
    synthetic replies are not gradients of a loss along the steps taken (the robustness benchmark's 40-client
    federations measure the whole rule)."""
    ids = list(range(500, 520))
    stream = list(_mixed_noise_stream(np.random.default_rng(31), rounds=14))
    defence = RobustDefence(eps_tilde=0.2, jump_own_scale=own_scale, evidence=False)
    left_out = []
    for G in stream:
        res = defence.aggregate(G, client_ids=ids)
        left_out.append(20 - res.kept.size)
    if own_scale:
        assert left_out[SPREAD_MIN + 2:] == [0] * (14 - SPREAD_MIN - 2), left_out
    else:
        assert left_out[SPREAD_MIN + 2:] == [4] * (14 - SPREAD_MIN - 2), left_out


def test_the_nodes_own_scales_survive_a_checkpoint_and_old_checkpoints_start_without_them():
    ids = list(range(200, 220))
    stream = list(_mixed_noise_stream(np.random.default_rng(13), rounds=8))
    a = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5)
    for G in stream[:6]:
        a.apply(G, ids)
    state = a.state_dict()
    assert len(state["spreads"]) == len(ids) and all(len(w) == 5 for w in state["spreads"])
    b = SelfReference(scale=1.0, jump_factor=4.0, burn_in=5)
    b.load_state_dict(json.loads(json.dumps({**state, "refs": state["refs"].tolist()})))
    assert b.spreads == a.spreads
    np.testing.assert_array_equal(a.apply(stream[6], ids)[0], b.apply(stream[6], ids)[0])
    assert a.spreads == b.spreads
    legacy = {k: v for k, v in state.items() if k != "spreads"}
    b.load_state_dict(legacy)
    assert b.spreads == {}
    for bad in ({"spreads": [[-1.0]] * len(ids)}, {"spreads": [[float("nan")]] * len(ids)}, {"spreads": [[1.0]]},
                {"spreads": [[1.0] * (SPREAD_WINDOW + 1)] * len(ids)}, {"spreads": [1.0] * len(ids)}):
        with pytest.raises(ValueError):
            b.load_state_dict({**state, **bad})
    # a forgotten node forgets its scale too
    a.forget([ids[0]])
    assert ids[0] not in a.spreads


def test_absent_nodes_and_skipped_rows_lose_their_reference():
    sr = SelfReference()
    sr.apply(np.ones((4, 3)), [1, 2, 3, 4])
    sr.apply(np.ones((3, 3)), [1, 2, 5], skip=[1])
    assert sorted(sr.refs.index) == [1, 5]


def test_self_reference_state_round_trip_and_malformed_state():
    rng = np.random.default_rng(2)
    a = SelfReference(scale=1.5)
    ids = [11, 12, 13, 14, 15]
    for _ in range(3):
        a.apply(rng.normal(size=(5, 4)), ids)
    state = a.state_dict()
    b = SelfReference(scale=1.5)
    b.load_state_dict(json.loads(json.dumps({**state, "refs": state["refs"].tolist()})))
    G = rng.normal(size=(5, 4))
    np.testing.assert_array_equal(a.apply(G, ids)[0], b.apply(G, ids)[0])
    for bad in ({"ids": [1], "refs": np.zeros((2, 4))}, {"ids": [1], "refs": [[np.nan]]}, {"refs": np.zeros((0, 4))},
                {"ids": [1, 1], "refs": np.zeros((2, 4))}):
        with pytest.raises(ValueError):
            SelfReference().load_state_dict(bad)
    for kw in ({"scale": 0.0}, {"scale": np.inf}, {"jump_factor": 1.0}, {"min_rows": 1}):
        with pytest.raises(ValueError):
            SelfReference(**kw)


def test_defence_bounds_a_mobile_adversary_by_the_noise_level_not_the_heterogeneity():
    """Nodes honest in the previous round turn into a coordinated push: its effect is bounded by the noise."""
    rng = np.random.default_rng(3)
    R, d, f = 20, 30, 4
    ids = list(range(1000, 1000 + R))
    stream = list(_honest_stream(rng, R=R, d=d, rounds=6, spread=5.0, noise=0.3))
    p = rng.normal(size=d)
    p /= np.linalg.norm(p)
    push_noise = rng.normal(size=(f, d))
    pushes = {}
    for self_clip in (1.0, None):
        # the worker momentum off: it damps a one-round push by itself (1 - beta), this isolates the self-reference
        defence = RobustDefence(eps_tilde=0.2, self_clip_scale=self_clip, jump_factor=None, evidence=False, momentum=0.0)
        for t, G in enumerate(stream):
            if t == len(stream) - 1:
                G = G.copy()
                # inside the honest spread (rows are ~27 apart); each with its own noise, so that they
                # are not copies of one message (which the duplicates step would count once)
                G[:f] = G[f:].mean(axis=0) + 15.0 * p + 0.3 * push_noise
            res = defence.aggregate(G, client_ids=ids)
        # how far the round's estimate moved along the push, from the clean round's mean
        pushes[self_clip] = float((np.asarray(res.estimate) - stream[-1].mean(axis=0)) @ p)
    assert pushes[None] > 1.5, pushes  # without it the push gets through the cross-sectional clipping
    assert pushes[1.0] < 0.4 * pushes[None], pushes


def test_defence_leaves_out_a_jumping_node_within_the_budget():
    rng = np.random.default_rng(4)
    ids = list(range(20))
    defence = RobustDefence(eps_tilde=0.2, evidence=False)
    stream = list(_honest_stream(rng, rounds=4))
    for G in stream[:3]:
        res = defence.aggregate(G, client_ids=ids)
        assert res.info["jumped"] == []
    G = stream[3].copy()
    G[:6] *= -1.0  # six jump, the budget is floor(0.2 * 20) = 4
    res = defence.aggregate(G, client_ids=ids)
    assert set(res.info["jumped"]) == set(range(6))
    assert len(set(res.info["suspected"]) & set(range(6))) == 4
    assert len(res.info["suspected"]) == 4


def test_gross_rows_cannot_inflate_sigma0_and_slip_through():
    """Huge rows (a client-side defence-aware attack that overshoots) are dropped before the filter."""
    rng = np.random.default_rng(5)
    G = rng.normal(size=(20, 40))
    G[:4] = rng.normal(size=(4, 40)) * 1e11
    for gross in (4.0, None):
        res = RobustDefence(eps_tilde=0.2, gross_factor=gross).aggregate(G)
        if gross is not None:
            assert set(res.info["gross"]) == {0, 1, 2, 3}
            assert not set(res.kept.tolist()) & {0, 1, 2, 3}
            assert np.linalg.norm(res.estimate) < 3.0
    assert RobustDefence().gross_factor == 8.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_defence_resumes_bit_exactly_in_the_rounds_dtype(dtype):
    rng = np.random.default_rng(7)
    ids = list(range(100, 112))
    a = RobustDefence(eps_tilde=0.25)
    for _ in range(5):
        a.aggregate(rng.normal(size=(12, 9)).astype(dtype), client_ids=ids)
    state, arrays = a.state_dict()
    assert arrays["self_reference.refs"].dtype == dtype
    b = RobustDefence(eps_tilde=0.25)
    b.load_state_dict(json.loads(json.dumps(state)), arrays, dim=9)
    for _ in range(4):
        G = rng.normal(size=(12, 9)).astype(dtype)
        np.testing.assert_array_equal(a.aggregate(G, client_ids=ids).estimate, b.aggregate(G, client_ids=ids).estimate)


def test_defence_state_carries_the_references():
    rng = np.random.default_rng(6)
    ids = [3, 5, 8, 13, 21, 34, 55, 89]
    a = RobustDefence(eps_tilde=0.25)
    for _ in range(4):
        a.aggregate(rng.normal(size=(8, 6)), client_ids=ids)
    state, arrays = a.state_dict()
    assert arrays["self_reference.refs"].shape == (8, 6) and state["self_reference"]["ids"] == sorted(ids)
    b = RobustDefence(eps_tilde=0.25)
    b.load_state_dict(json.loads(json.dumps(state)), arrays, dim=6)
    G = 5.0 * rng.normal(size=(8, 6))
    np.testing.assert_array_equal(a.aggregate(G, client_ids=ids).estimate, b.aggregate(G, client_ids=ids).estimate)
    with pytest.raises(ValueError):
        RobustDefence(self_clip_scale=None).load_state_dict(state, arrays)
    with pytest.raises(ValueError):
        RobustDefence().load_state_dict(state, {**arrays, "self_reference.refs": np.zeros((8, 7))}, dim=6)


@pytest.mark.parametrize("momentum", [0.0, None])
def test_a_node_first_seen_with_a_filtered_reply_starts_fresh_next_round(momentum):
    """Round 1: two nodes send -4x (filtered; with the default worker momentum -10x, left out as far
    replies: its input clipping would pull -4x in). Round 2 they are honest: neither jumps nor is left out."""
    rng = np.random.default_rng(8)
    ids = list(range(10))
    stream = list(_honest_stream(rng, R=10, d=20, rounds=3, spread=1.0, noise=0.3))
    defence = RobustDefence(eps_tilde=0.2, evidence=False, **({} if momentum is None else {"momentum": momentum}))
    G = stream[0].copy()
    G[[2, 4]] *= -4.0 if momentum == 0.0 else -10.0  # far, but not a gross outlier
    res = defence.aggregate(G, client_ids=ids)
    assert not {2, 4} & set(res.kept.tolist())
    # momentum 0: the filter drops them; the default: the far-reply rule, reported with the gross outliers
    assert res.info["gross"] == ([] if momentum == 0.0 else [2, 4])
    assert 2 not in defence.self_reference.refs.index and 4 not in defence.self_reference.refs.index
    for G in stream[1:]:
        res = defence.aggregate(G, client_ids=ids)
        assert res.info["jumped"] == [] and res.info["suspected"] == []

"""The default defence (registry name "rge"): per-node memory, monotonicity evidence, clipping, state."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators import RGE, RobustDefence, build_for_federation, make_aggregator
from flwr_byzantine.aggregators.memory import ClientMomentum, MonotonicityEvidence
from flwr_byzantine.attacks import MemoryAware, Sleeper, make_attack


# ------------------------------------------------------------------ registry

def test_rge_is_the_default_defence_and_the_paper_preset_is_algorithm_3():
    assert isinstance(make_aggregator("rge"), RobustDefence)
    assert isinstance(build_for_federation("rge", 20, 0.2), RobustDefence)
    paper = build_for_federation("rge-paper", 20, 0.2)
    assert type(paper) is RGE and paper.threshold_factor == 4.0
    from flwr_byzantine.strategies import RobustSGD

    assert isinstance(RobustSGD().aggregator, RobustDefence)


# ------------------------------------------------------------------ memory

def test_client_momentum_is_an_ema_per_node_with_fresh_starts():
    mem = ClientMomentum(beta=0.5, max_idle_rounds=1)
    a = mem.update(np.array([[2.0, 0.0], [0.0, 4.0]]), [7, 9])
    np.testing.assert_allclose(a, [[2.0, 0.0], [0.0, 4.0]])  # first sight: m = g
    b = mem.update(np.array([[0.0, 0.0], [0.0, 0.0]]), [9, 7])  # order does not matter, ids do
    np.testing.assert_allclose(b, [[0.0, 2.0], [1.0, 0.0]])
    mem.update(np.array([[1.0, 1.0]]), [7])  # node 9 idle for one call: still continues
    c = mem.update(np.array([[6.0, 6.0]]), [9])  # idle for 2 calls > max_idle_rounds: restarts
    np.testing.assert_allclose(c, [[6.0, 6.0]])
    with pytest.raises(ValueError):
        mem.update(np.ones((2, 2)), [1, 1])  # duplicate ids in one round
    mem.update(np.ones((1, 3)), [1])  # a new dimension forgets everything
    assert len(mem) == 1


def test_client_momentum_state_round_trip_and_malformed_state():
    mem = ClientMomentum(beta=0.9)
    rng = np.random.default_rng(0)
    for _ in range(3):
        mem.update(rng.normal(size=(4, 5)), [1, 2, 3, 4])
    state = mem.state_dict()
    other = ClientMomentum(beta=0.9)
    other.load_state_dict(state)
    g = rng.normal(size=(4, 5))
    np.testing.assert_array_equal(mem.update(g, [1, 2, 3, 4]), other.update(g, [1, 2, 3, 4]))
    bad = dict(state, momenta=np.full((4, 5), np.nan))
    with pytest.raises(ValueError):
        ClientMomentum(beta=0.9).load_state_dict(bad)
    with pytest.raises(ValueError):
        ClientMomentum(beta=0.5).load_state_dict(state)  # another beta


def _quadratic_round(rng, x, A, b, flip, noise=0.05):
    """Gradients of f_i(x) = 1/2 x^T A_i x - b_i^T x (+ noise); flipped nodes send the negative."""
    G = np.stack([A[i] @ x - b[i] + noise * rng.normal(size=x.size) for i in range(len(A))])
    G[flip] *= -1.0
    return G


def test_monotonicity_evidence_suspects_sign_flippers_and_not_heterogeneous_honest_nodes():
    rng = np.random.default_rng(1)
    R, d = 12, 20
    A = [np.diag(rng.uniform(0.5, 3.0, size=d)) for _ in range(R)]  # convex, heterogeneous curvature
    b = [rng.normal(scale=3.0 if i < 2 else 1.0, size=d) for i in range(R)]  # two honest "minority" nodes
    flip = [9, 10]
    ev = MonotonicityEvidence(gamma=0.95, z_exclude=1.5, min_rounds=5)
    ids = list(range(100, 100 + R))
    x = np.zeros(d)
    prev_step = None
    for _ in range(40):
        G = _quadratic_round(rng, x, A, b, flip)
        ev.observe(G, ids, prev_step)
        prev_step = -0.1 * np.median(G, axis=0)
        x = x + prev_step
    suspected = {i - 100 for i in ids if ev.suspected(i)}
    assert suspected == set(flip)
    assert all(ev.z(100 + i) > 0 for i in range(R) if i not in flip)


def test_relative_level_follows_a_low_spread_population_down_and_is_never_stricter():
    ev = MonotonicityEvidence(z_exclude=0.0, relative=2.0, relative_above=False)  # every eligible node sets it
    # convex-like population: honest Z around 2.5, tight -> the level is -z_exclude = 0
    assert ev._level(np.array([2.4, 2.6, 2.5, 2.2, 2.8, 2.5, 2.7])) == 0.0
    # a non-convex model's first rounds: Z spread around 0.5 -> the level follows the population down
    z = np.array([-0.8, 0.6, 0.5, 0.0, -0.1, -0.7, 2.3, -0.5, 1.7, 1.2])
    med = np.median(z)
    assert ev._level(z) == pytest.approx(med - 2.0 * 1.4826 * np.median(np.abs(z - med)))
    assert ev._level(z) < -0.8  # no honest node of this population is below it
    assert ev._level(z[:4]) == 0.0  # fewer than 5 nodes with evidence: the absolute level
    assert MonotonicityEvidence(z_exclude=0.0, relative=None)._level(z) == 0.0
    assert MonotonicityEvidence(relative=None)._level(z) == -1.5  # the default level
    with pytest.raises(ValueError):
        MonotonicityEvidence(relative=0.0)


def test_relative_level_is_not_widened_by_a_cluster_below_the_fixed_level():
    """The relative level's median and MADn come from the nodes at or above -z_exclude when they are a majority: a
    quarter of the nodes far below it (sign flippers) no longer carry the level below themselves; a population whose
    bulk is above it, or whose majority is below it, sets the level as before."""
    honest = np.linspace(-0.1, 3.9, 30)  # 30 honest nodes of a 40-node MLP federation, spread over 4 units
    flippers = np.array([-3.27, -2.7, -2.59, -2.43, -2.3, -2.25, -2.19, -2.14, -1.56, -0.92])  # its sign flippers
    z = np.concatenate([honest, flippers])
    new, old = MonotonicityEvidence(), MonotonicityEvidence(relative_above=False)
    assert int(np.sum(flippers < old._level(z))) == 1  # every eligible node: the flippers widen the MADn
    assert new._level(z) == -1.5  # the bulk above -1.5 is tight: the fixed level, and 9 of the 10 flippers are below it
    assert int(np.sum(flippers < new._level(z))) == 9 and not np.any(honest < new._level(z))
    # nothing below the fixed level: the same level either way (a spread population with its bulk above -1.5)
    spread = np.array([-1.4, -1.1, 0.6, 0.5, 0.0, -0.1, -0.7, 2.3, -0.5, 1.7, 1.2])
    assert new._level(spread) == old._level(spread) < -1.4
    # most nodes below -1.5 (a non-convex model's first rounds): all of them set it, as before
    low = np.array([-3.0, -2.6, -2.2, -2.0, -1.9, -1.7, -1.6, -1.2, 0.3, 1.1])
    assert new._level(low) == old._level(low) < -3.0
    # fewer than 5 nodes above it: all of them set it
    few = np.concatenate([np.full(4, 2.0), np.full(3, -2.0)])
    assert new._level(few) == old._level(few)


def test_suspected_uses_the_last_rounds_level_and_the_state_keeps_it():
    rng = np.random.default_rng(2)
    ev = MonotonicityEvidence()
    ids = list(range(8))
    G = rng.normal(size=(8, 4))
    for t in range(8):
        G = G + rng.normal(size=(8, 4))
        ev.observe(G, ids, None if t == 0 else rng.normal(size=4))
    mask = ev.suspected_rows(ids)
    assert [ev.suspected(i) for i in ids] == mask.tolist()
    other = MonotonicityEvidence()
    other.load_state_dict(ev.state_dict())
    assert other.level == ev.level
    assert other.floor == ev.floor and ev.floor[0] > 0
    assert [other.suspected(i) for i in ids] == mask.tolist()
    for bad in ([1.0], [-1.0, 0.0], [float("nan"), 0.0]):
        with pytest.raises(ValueError):
            MonotonicityEvidence().load_state_dict({**ev.state_dict(), "floor": bad})
    old = ev.state_dict()
    del old["floor"]  # a checkpoint from before the floor: no floor until the next round sets one
    other.load_state_dict(old)
    assert other.floor == (0.0, 0.0)


def _stale_node_z(noise: float, q_floor: float | None) -> float:
    """Z of node 9, whose reply never moves along the steps (only an orthogonal wobble of size ``noise``),
    among 8 nodes sending the gradients of convex quadratics."""
    rng = np.random.default_rng(12)
    d = 6
    A = np.diag(rng.uniform(1.0, 2.0, size=d))
    ev = MonotonicityEvidence(q_floor=q_floor)
    x, step = rng.normal(size=d), None
    stale = rng.normal(size=d)
    for _ in range(30):
        honest = np.stack([A @ x + 0.05 * rng.normal(size=d) for _ in range(8)])
        move = -0.1 * honest.mean(axis=0)
        wobble = rng.normal(size=d)
        wobble -= (wobble @ move) / (move @ move) * move  # orthogonal to the coming step, up to rounding
        ev.observe(np.vstack([honest, (stale + noise * wobble)[None]]), list(range(1, 10)), step)
        ev.suspected_rows(list(range(1, 10)))  # the round's decision sets the floor
        step = move
        x = x + step
    return ev.z(9)


def test_evidence_floor_puts_a_node_whose_scores_are_rounding_noise_at_zero():
    # without the floor S / sqrt(Q) is scale-free: a node whose scores are ~1e-16 gets a ratio of rounding
    # noise, the same whatever their size (issue 10's memory-aware column); with it, Z is in the
    # population's units and such a node sits at 0
    tiny = [_stale_node_z(n, None) for n in (1e-6, 1e-3)]
    assert abs(tiny[0] - tiny[1]) < 0.2 and max(abs(z) for z in tiny) > 0.1  # a scale-free ratio
    floored = [_stale_node_z(n, 0.1) for n in (1e-6, 1e-3)]
    assert max(abs(z) for z in floored) < 0.05
    with pytest.raises(ValueError):
        MonotonicityEvidence(q_floor=-0.1)


def test_evidence_floor_barely_moves_an_honest_nodes_z():
    rng = np.random.default_rng(13)
    R, d = 10, 8
    A = [np.diag(rng.uniform(0.5, 3.0, size=d)) for _ in range(R)]
    b = [rng.normal(size=d) for _ in range(R)]
    evs = [MonotonicityEvidence(q_floor=None), MonotonicityEvidence()]
    ids = list(range(R))
    x, step = np.zeros(d), None
    for _ in range(30):
        G = _quadratic_round(rng, x, A, b, [])
        for ev in evs:
            ev.observe(G, ids, step)
            ev.suspected_rows(ids)
        step = -0.1 * np.median(G, axis=0)
        x = x + step
    z0, z1 = (np.array([ev.z(i) for i in ids]) for ev in evs)
    assert (z0 > 0.5).all()
    np.testing.assert_array_less(z1, z0 + 1e-12)
    assert np.max(1.0 - z1 / z0) < 0.1


def test_monotonicity_evidence_state_round_trip():
    rng = np.random.default_rng(2)
    ev = MonotonicityEvidence()
    for t in range(4):
        ev.observe(rng.normal(size=(3, 4)), [1, 2, 3], None if t == 0 else rng.normal(size=4))
    other = MonotonicityEvidence()
    other.load_state_dict(ev.state_dict())
    G, step = rng.normal(size=(3, 4)), rng.normal(size=4)
    ev.observe(G, [1, 2, 3], step)
    other.observe(G, [1, 2, 3], step)
    assert [ev.z(i) for i in (1, 2, 3)] == [other.z(i) for i in (1, 2, 3)]
    with pytest.raises(ValueError):
        MonotonicityEvidence().load_state_dict({**ev.state_dict(), "Q": [-1.0, 0.0, 0.0]})


# ------------------------------------------------------------------ the rule

def test_defence_on_clean_rows_keeps_everyone_and_stays_near_the_mean():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(20, 50)) + 1.0
    res = RobustDefence(eps_tilde=0.2).aggregate(G, client_ids=list(range(20)))
    assert len(res.kept) >= 19  # the calibrated threshold drops at most a rare honest row
    assert np.linalg.norm(res.estimate - G.mean(axis=0)) < 0.5 * np.linalg.norm(G.std(axis=0)) / np.sqrt(20) * 5


def test_defence_removes_far_outliers_and_bounds_their_pull():
    rng = np.random.default_rng(4)
    G = rng.normal(size=(20, 30))
    G[:4] += 100.0
    res = RobustDefence(eps_tilde=0.2).aggregate(G, client_ids=list(range(20)))
    assert set(res.dropped.tolist()) >= {0, 1, 2, 3}
    assert np.linalg.norm(res.estimate - G[4:].mean(axis=0)) < 1.0


def test_defence_excludes_a_consistent_sign_flipper_by_node_id_over_rounds():
    rng = np.random.default_rng(5)
    R, d = 12, 20
    A = [np.diag(rng.uniform(0.5, 3.0, size=d)) for _ in range(R)]
    b = [rng.normal(size=d) for _ in range(R)]
    flip = [0, 1]
    ids = [int(1e6) + 7 * i for i in range(R)]
    defence = RobustDefence(eps_tilde=0.25)
    x = np.zeros(d)
    suspected_rounds = 0
    for _ in range(40):
        res = defence.aggregate(_quadratic_round(rng, x, A, b, flip), client_ids=ids)
        suspected_rounds += set(res.info["suspected"]) == set(flip)
        x = x - 0.1 * res.estimate
    assert suspected_rounds >= 20
    assert not set(res.info["suspected"]) - set(flip)


@pytest.mark.parametrize("skip_anomalies", [True, False])
def test_a_node_held_by_a_mobile_adversary_for_one_round_is_not_suspected_afterwards(skip_anomalies):
    # honest heterogeneous quadratics; node 3 is corrupted in round 15 only (a far jump against the
    # step).  The default leaves that reply and its node's next one out of the evidence (and
    # winsorises the scores); scoring them raw plants negative evidence on an honest node.
    rng = np.random.default_rng(8)
    R, d = 12, 20
    A = [np.diag(rng.uniform(0.5, 3.0, size=d)) for _ in range(R)]
    b = [rng.normal(size=d) for _ in range(R)]
    ids = list(range(100, 100 + R))
    kw = {} if skip_anomalies else {"skip_anomalies": False, "score_clip": None}
    defence = RobustDefence(eps_tilde=0.25, **kw)
    x = np.zeros(d)
    after = []
    for t in range(30):
        G = _quadratic_round(rng, x, A, b, [])
        if t == 15:
            G[3] = G[3] + 40.0 * res.estimate
        res = defence.aggregate(G, client_ids=ids)
        if t == 15:
            assert 3 in res.info["jumped"]
        if t >= 15:
            after.append(defence.evidence.z(103))
        x = x - 0.1 * res.estimate
    z3 = defence.evidence.z(103)
    if skip_anomalies:
        assert min(after) > 1.0 and z3 > 0 and not res.info["suspected"]
    else:  # the corrupted reply's score sinks the honest node's evidence below zero for the rounds after
        assert max(after[:5]) < 0 and z3 < 1.0


def test_defence_memory_never_excludes_more_than_the_byzantine_budget():
    defence = RobustDefence(eps_tilde=0.2, momentum=0.0)
    ids = list(range(10))
    rng = np.random.default_rng(6)
    # every node's vectors move against the steps: all look non-monotone
    prev = rng.normal(size=(10, 5))
    for _ in range(12):
        res = defence.aggregate(prev, client_ids=ids)
        prev = prev + 0.5 * res.estimate[None, :] * -1.0 * -1.0 + 0.01 * rng.normal(size=(10, 5))
    assert len(res.info["suspected"]) <= 2


def test_defence_without_ids_is_stateless():
    rng = np.random.default_rng(7)
    G = rng.normal(size=(10, 8))
    d = RobustDefence(eps_tilde=0.2)
    first = d.aggregate(G).estimate
    d.aggregate(rng.normal(size=(10, 8)) * 5)
    np.testing.assert_allclose(d.aggregate(G).estimate, first)


def test_defence_state_dict_resumes_exactly_and_rejects_garbage():
    rng = np.random.default_rng(8)
    ids = [3, 5, 8, 13, 21, 34, 55, 89]
    a = RobustDefence(eps_tilde=0.25)
    for _ in range(6):
        a.aggregate(rng.normal(size=(8, 6)), client_ids=ids)
        a.observe_step(rng.normal(size=6))
    state, arrays = a.state_dict()
    import json

    json.dumps(state)  # the JSON part is JSON
    b = RobustDefence(eps_tilde=0.25)
    b.load_state_dict(json.loads(json.dumps(state)), arrays, dim=6)
    for _ in range(3):
        G = rng.normal(size=(8, 6))
        np.testing.assert_array_equal(a.aggregate(G, client_ids=ids).estimate, b.aggregate(G, client_ids=ids).estimate)
    with pytest.raises(ValueError):
        RobustDefence().load_state_dict({"format": "other"}, {})
    with pytest.raises(ValueError):
        RobustDefence().load_state_dict(state, {**arrays, "last_estimate": np.full(6, np.inf)})
    with pytest.raises(ValueError):
        RobustDefence().load_state_dict(state, arrays, dim=7)
    with pytest.raises(ValueError):
        RobustDefence(evidence=False).load_state_dict(state, arrays)


def test_defence_parameter_validation():
    for kw in ({"momentum": 1.0}, {"clip_scale": 0.0}, {"input_clip_scale": -1.0}, {"eps_tilde": 0.3}):
        with pytest.raises(ValueError):
            RobustDefence(**kw)
    with pytest.raises(ValueError):
        RobustDefence().aggregate(np.ones((3, 2)), client_ids=[1, 2])
    for bad in ("up", 1, "raise_only"):
        with pytest.raises(ValueError):
            RobustDefence(step_trim=bad)


def test_step_trim_raises_the_step_by_default():
    """The trimmed component along the step applies only where it lengthens the step (the seventeenth landing);
    ``True`` is the tenth landing's rule, either way."""
    assert RobustDefence().step_trim == "raise"
    assert RobustDefence(step_trim=True).step_trim == "both"
    assert RobustDefence(step_trim="both").step_trim == "both"
    assert RobustDefence(step_trim=False).step_trim is None
    # a round with an orthogonal bias (a fifth of the rows off the step): "both" shortens the step, "raise" does not
    rng = np.random.default_rng(5)
    d, ids = 300, list(range(20))
    mean = np.zeros(d)
    mean[0] = 1.0
    off = np.zeros(d)
    off[1] = 6.0  # inside the filter's threshold: the four rows are kept and clipped
    H = mean + 0.5 * rng.standard_normal((16, d))
    H -= H.mean(axis=0) - mean  # the honest mean exactly the step e_0
    G = np.vstack([H, mean + off + 0.01 * rng.standard_normal((4, d))])
    est = {}
    for mode in ("raise", "both", False):
        rule = RobustDefence(eps_tilde=0.2, step_trim=mode, evidence=False, momentum=0.0, self_clip_scale=None,
                             jump_factor=None, duplicate_tol=None, gross_factor=None, far_factor=None, seed=0)
        res = rule.aggregate(G, client_ids=ids)
        assert res.kept.size == 20 and res.info["step_trim"] == (0 if mode is False else 4)
        est[mode] = res.estimate
    assert est["both"][0] < 0.8 * est[False][0]  # about 1 / (1 + (0.2 * 6)^2) of the step: the centre rescaled
    np.testing.assert_array_equal(est["raise"], est[False])


# ------------------------------------------------------------------ attacks on memory

def test_sleeper_is_honest_until_it_wakes():
    honest = np.random.default_rng(9).normal(size=(5, 4))
    s = make_attack("sleeper", wake_round=10, seed=0)
    assert isinstance(s, Sleeper)
    np.testing.assert_allclose(s.craft(honest, 2, 9), np.repeat(honest.mean(axis=0)[None], 2, axis=0))
    np.testing.assert_allclose(s.craft(honest, 2, 10), -np.repeat(honest.mean(axis=0)[None], 2, axis=0))
    with pytest.raises(ValueError):
        make_attack("sleeper", wake_round=0)


@pytest.mark.parametrize("z_exclude", [1.5, 0.0])
def test_memory_aware_attack_keeps_its_own_score_inside_the_exclusion_level(z_exclude):
    rng = np.random.default_rng(10)
    d = 6
    A = np.diag(rng.uniform(1.0, 2.0, size=d))
    atk = MemoryAware(z_exclude=z_exclude, margin=0.25, seed=0)
    # the attacker models the levels, not the winsorisation of the scores (it cannot see the round's scores)
    ev = MonotonicityEvidence(z_exclude=z_exclude, score_clip=None)
    x = rng.normal(size=d)
    prev_step = None
    for t in range(1, 60):
        atk.aim_at(ev)  # the rule's level and population floor of the last round
        atk.observe_model(x)
        honest = np.stack([A @ x + 0.05 * rng.normal(size=d) for _ in range(8)])
        sent = atk.craft(honest, 1, t)[0]
        ev.observe(np.vstack([honest, sent[None]]), list(range(1, 10)), prev_step)  # the attacker is node 9
        ev.suspected_rows(list(range(1, 10)))
        step = -0.1 * honest.mean(axis=0)
        prev_step = step
        x = x + step
    assert atk.attacked_rounds < 59  # the correction was needed in some rounds
    assert not ev.suspected(9)
    assert ev.z(9) > -z_exclude


@pytest.mark.parametrize("jump_factor", [4.0, None])
def test_memory_aware_attack_never_trips_the_jump_rule_to_keep_its_score(jump_factor):
    # a level it cannot reach by a small correction (Z >= 3.25): unbounded, the correction runs away
    # (a reply the jump rule and the gross screen leave out); bounded, the attacker scales its
    # attack back towards its own gradient and moves at most jump_margin * jump_factor median changes
    rng = np.random.default_rng(11)
    d = 6
    A = np.diag(rng.uniform(1.0, 2.0, size=d))
    atk = MemoryAware(z_exclude=-3.0, margin=0.25, jump_factor=jump_factor, seed=0)
    x = rng.normal(size=d)
    last, ratios = None, []
    for t in range(1, 40):
        atk.observe_model(x)
        honest = np.stack([A @ x + 0.05 * rng.normal(size=d) for _ in range(8)])
        sent = np.asarray(atk.craft(honest, 1, t)[0])
        scale = float(np.median(np.linalg.norm(honest - honest.mean(axis=0), axis=1))) * np.sqrt(2.0)
        if last is not None:
            ratios.append(float(np.linalg.norm(sent - last)) / scale)
        last = sent
        x = x - 0.1 * honest.mean(axis=0)
    if jump_factor is None:
        assert max(ratios) > 4.0
    else:
        assert max(ratios) <= 0.8 * jump_factor + 1e-9
    with pytest.raises(ValueError):
        MemoryAware(jump_factor=0.0)


def test_a_plain_sign_flipper_is_over_the_default_exclusion_level():
    # the same federation without the memory-aware correction: the default level suspects it
    rng = np.random.default_rng(10)
    d = 6
    A = np.diag(rng.uniform(1.0, 2.0, size=d))
    ev = MonotonicityEvidence()
    assert ev.z_exclude == 1.5
    x, prev_step = rng.normal(size=d), None
    for _ in range(1, 30):
        honest = np.stack([A @ x + 0.05 * rng.normal(size=d) for _ in range(8)])
        ev.observe(np.vstack([honest, -honest[:1]]), list(range(1, 10)), prev_step)
        prev_step = -0.1 * honest.mean(axis=0)
        x = x + prev_step
    assert ev.suspected(9) and not any(ev.suspected(i) for i in range(1, 9))


def test_memory_aware_attack_aims_at_the_rules_levels():
    atk = MemoryAware(seed=0)
    assert atk.z_exclude == RobustDefence().evidence.z_exclude == 1.5  # the default defence's level
    ev = MonotonicityEvidence(gamma=0.9, z_exclude=1.5, gamma_short=0.7, z_short=2.5)
    ev.floor = (0.3, 0.2)
    atk.aim_at(ev)
    assert (atk.z_exclude, atk.gamma, atk.gamma_short, atk.z_short) == (1.5, 0.9, 0.7, 2.5)
    assert (atk.floor, atk.floor_short) == (0.3, 0.2)
    with pytest.raises(ValueError):
        MemoryAware(floor=-1.0)


def test_evidence_skips_anomalous_replies_and_the_next_reply_of_their_node():
    rng = np.random.default_rng(3)
    ev = MonotonicityEvidence(score_clip=None)
    G = rng.normal(size=(4, 5))
    step = np.ones(5)
    ev.observe(G, [1, 2, 3, 4], None)
    ev.observe(G + 1.0, [1, 2, 3, 4], step)  # every node scored once, positively
    z0 = [ev.z(i) for i in (1, 2, 3, 4)]
    ev.observe(G - 5.0, [1, 2, 3, 4], step, skip=[1])  # node 2's reply is anomalous: not scored
    assert ev.z(2) == z0[1] and ev.z(1) < z0[0]
    assert 2 not in ev.state_dict()["last_ids"]  # nor remembered ...
    ev.observe(G + 3.0, [1, 2, 3, 4], step)
    assert ev.z(2) == z0[1]  # ... so its next reply is not scored against it
    ev.observe(G + 4.0, [1, 2, 3, 4], step)
    assert ev.z(2) != z0[1]  # and scoring resumes after that
    # a skipped reply in a round that scores nobody (no step) is not remembered either
    ev.observe(G, [1, 2, 3, 4], None, skip=[1])  # row 1: node 2
    assert 2 not in ev.state_dict()["last_ids"] and 1 in ev.state_dict()["last_ids"]


def test_winsorised_scores_keep_one_anomalous_round_from_deciding_the_evidence():
    # a node with a long positive record and one round of a huge negative score (a mobile adversary
    # held it for one round): winsorised, its evidence stays positive; raw, one round flips Z to ~ -1
    rng = np.random.default_rng(4)
    d, ids = 6, list(range(10))
    out = {}
    for clip in (3.0, None):
        ev = MonotonicityEvidence(score_clip=clip)
        x, step = np.zeros(d), None
        for t in range(30):
            G = np.stack([x + 0.05 * rng.normal(size=d) for _ in ids])  # gradients of 1/2 |x|^2: monotone
            if t == 20:
                G[0] = x - 50.0 * step / np.linalg.norm(step)  # node 0's reply, corrupted once
            ev.observe(G, ids, step)
            step = -0.2 * np.ones(d) if t % 2 else 0.2 * np.ones(d)
            x = x + step
        out[clip] = ev.z(0)
    assert out[None] < 0 < out[3.0]


def test_run_config_refuses_the_memory_aware_attack_with_a_clear_message():
    from flwr_byzantine.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="needs every round's model"):
        RunConfig.from_mapping({"attack": "memory-aware"})
    assert RunConfig.from_mapping({"attack": "sleeper", "attack-scale": 5.0}).attack == "sleeper"


def test_strategies_default_defences():
    from flwr_byzantine.strategies import RobustFedAvg, RobustSGD

    sgd, fedavg = RobustSGD().aggregator, RobustFedAvg().aggregator
    assert isinstance(sgd, RobustDefence) and sgd.evidence is not None and sgd.momentum == 0.7
    # model updates after local training are not gradients: no monotonicity evidence (nor worker momentum) for them
    assert isinstance(fedavg, RobustDefence) and fedavg.evidence is None and fedavg.momentum == 0.0
    assert fedavg.self_reference is None and not fedavg.mixing and sgd.self_reference is not None and not sgd.mixing


def test_spent_budget_leaves_the_survivors_unmixed_and_unclipped():
    # 20 heterogeneous honest rows, 4 gross outliers: the screen spends the whole budget floor(0.2 * 20) = 4,
    # so the estimate is the plain mean of the 16 honest rows (mixing and clipping would pull it towards
    # the majority and away from the minority clients, here the rows with a large offset)
    rng = np.random.default_rng(3)
    d = 40
    honest = rng.normal(size=(16, d)) + np.where(np.arange(16) < 3, 6.0, 0.0)[:, None] * rng.normal(size=d)
    G = np.vstack([honest, 1e3 * rng.normal(size=(4, d))])
    spend = RobustDefence(eps_tilde=0.2)
    res = spend.aggregate(G)
    assert set(res.info["gross"]) == {16, 17, 18, 19}
    np.testing.assert_allclose(res.estimate, honest.mean(axis=0), rtol=1e-10, atol=1e-12)
    nospend = RobustDefence(eps_tilde=0.2, spend_budget=False).aggregate(G)
    assert np.linalg.norm(nospend.estimate - honest.mean(axis=0)) > 1e-3  # mixed and clipped: pulled away
    # the filter's removals complete the budget (3 of 16: the offset minority): its survivors' plain mean
    a = RobustDefence(eps_tilde=0.2).aggregate(honest)
    assert len(a.kept) == 13 and a.info["gross"] == []
    np.testing.assert_allclose(a.estimate, honest[a.kept].mean(axis=0), rtol=1e-10, atol=1e-12)
    b = RobustDefence(eps_tilde=0.2, spend_budget=False).aggregate(honest)
    assert np.array_equal(a.kept, b.kept) and np.linalg.norm(b.estimate - honest[b.kept].mean(axis=0)) > 1e-3


def test_unspent_budget_mixes_and_clips_as_before():
    # nothing left out (homogeneous rows): the budget is not spent, the two agree, and the estimate is
    # the mixed and clipped one, not the plain mean
    rng = np.random.default_rng(4)
    G = rng.normal(size=(16, 40))
    a = RobustDefence(eps_tilde=0.2).aggregate(G)
    b = RobustDefence(eps_tilde=0.2, spend_budget=False).aggregate(G)
    assert len(a.kept) == 16
    np.testing.assert_array_equal(a.estimate, b.estimate)
    assert a.info["clipped"] > 0 and np.linalg.norm(a.estimate - G.mean(axis=0)) > 1e-6


def test_zero_budget_spends_nothing():
    # floor(0.2 * 4) = 0: the rule claims no Byzantine budget, so nothing counts as spent and the
    # filter, mixing and clipping run as without the rule (a far row is not averaged in)
    rng = np.random.default_rng(5)
    G = rng.normal(size=(4, 30))
    G[3] += 50.0
    a = RobustDefence(eps_tilde=0.2).aggregate(G)
    b = RobustDefence(eps_tilde=0.2, spend_budget=False).aggregate(G)
    np.testing.assert_array_equal(a.estimate, b.estimate)
    assert "budget_spent" not in a.info
    assert np.linalg.norm(a.estimate - G.mean(axis=0)) > 1.0



def _four_nodes_one_scaled_negative(**kw) -> list[tuple[bool, list[int]]]:
    """Ten rounds of 3 honest noisy gradients and node 14 sending -10x their mean: (node 14 kept?, gross rows)."""
    rng = np.random.default_rng(4)
    d = 30
    b, x = rng.normal(size=(4, d)), rng.normal(size=d)
    rule = RobustDefence(eps_tilde=0.25, **kw)
    out = []
    for _ in range(10):
        G = np.stack([(x - b[i]) + 0.5 * rng.normal(size=d) for i in range(4)])
        G[3] = -10.0 * G[:3].mean(axis=0)
        res = rule.aggregate(G, client_ids=[11, 12, 13, 14])
        out.append((3 in res.kept.tolist(), res.info["gross"]))
        x = x - 0.1 * np.asarray(res.estimate)
    return out


def test_far_replies_are_left_out_not_clipped_into_the_worker_momentum():
    # the momentum's input clipping (radius: the median distance) would pull -10x a gradient into the cloud
    # once the gross screen (8 median distances from the coordinate-wise median) no longer catches it; the
    # far-reply rule leaves it out of every round, reported with the gross outliers
    default = _four_nodes_one_scaled_negative()
    assert all(not kept and gross == [3] for kept, gross in default)
    assert any(kept for kept, _ in _four_nodes_one_scaled_negative(far_factor=None))
    with pytest.raises(ValueError):
        RobustDefence(far_factor=1.0)

"""The default defence's monotonicity evidence, scored on each reply's change from its self-reference (issue 12).

No table of last replies is kept: the self-reference's pass, which reads every reply and its reference anyway, also
takes ``||g_i - r_i||^2`` and ``<g_i - r_i, u>`` (``r_i`` the node's last reply as clipped), and
:meth:`MonotonicityEvidence.observe_changes` scores them as :meth:`observe` scores the changes from the raw last
replies (``evidence_from_reference=False``).
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators.defence import RobustDefence
from flwr_byzantine.aggregators.memory import MonotonicityEvidence
from flwr_byzantine.aggregators.streaming import reference_deviation_stats
from tolerances import SUM_RTOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deviation_pass_takes_the_changes_from_the_references(dtype):
    rng = np.random.default_rng(0)
    R, d = 9, 5000
    G = rng.standard_normal((R, d)).astype(dtype)
    T = rng.standard_normal((R + 2, d)).astype(dtype)
    rows, slots = np.arange(1, R), rng.permutation(R + 2)[: R - 1]
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    drift, sq, csq, cdots = reference_deviation_stats(G, rows, T, slots, None, u)
    drift0, sq0 = reference_deviation_stats(G, rows, T, slots)
    assert np.array_equal(drift, drift0)
    np.testing.assert_allclose(sq, sq0, rtol=SUM_RTOL[dtype])  # two loops, which the compiler may vectorise apart
    X = (G[rows] - T[slots]).astype(np.float64)  # the change, formed in the rows' dtype
    np.testing.assert_allclose(csq, np.sum(X * X, axis=1), rtol=SUM_RTOL[dtype])
    np.testing.assert_allclose(cdots, X @ u.astype(dtype).astype(np.float64), rtol=1e-9,
                               atol=SUM_RTOL[dtype] * np.sqrt(csq).max())


def test_scores_from_changes_are_the_scores_from_last_replies():
    """Fed the changes from the raw last replies, observe_changes keeps observe's statistics; a skipped reply's node
    is scored neither that round nor the next, in both."""
    rng = np.random.default_rng(1)
    R, d = 12, 40
    ids = list(range(100, 100 + R))
    a, b = MonotonicityEvidence(), MonotonicityEvidence()
    last = None
    for t in range(12):
        G = rng.standard_normal((R, d)) + 0.1 * t
        G[0] = -G[0]
        step = rng.standard_normal(d)
        skip = [3] if t == 6 else []
        a.observe(G, ids, step if t else None, skip=skip)
        if last is None:
            b.observe_changes(ids, [], np.zeros(0), np.zeros(0), skip=skip)
        else:
            u = step / np.linalg.norm(step)
            X = G - last  # node 3's change at t = 7 is from an anomalous reply: observe had dropped it, and so must this
            b.observe_changes(ids, list(range(R)), np.sum(X * X, axis=1), X @ u, skip=skip)
        last = G.copy()
    np.testing.assert_allclose(a.z_values(ids), b.z_values(ids), rtol=1e-9, atol=1e-12)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["n"] == sb["n"] and sb["last"].shape[0] == 0  # no table of last replies


def test_unscored_nodes_survive_a_checkpoint():
    ev = MonotonicityEvidence()
    ev.observe_changes([1, 2, 3], [0, 1, 2], np.ones(3), np.ones(3), skip=[1])
    again = MonotonicityEvidence()
    again.load_state_dict(ev.state_dict())
    assert again.state_dict()["unscored"] == [2]


def _quadratic_federation(rule, rounds=20, R=24, d=5000):
    """Gradients ``(x - c_i) / 2`` of heterogeneous quadratics plus noise, node 0 sending the negation; plain steps."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(R, d)).astype(np.float32)
    x = np.zeros(d, dtype=np.float32)
    first = None
    for t in range(rounds):
        G = (x - centres) * np.float32(0.5) + rng.normal(size=(R, d)).astype(np.float32) * np.float32(0.05)
        G[0] = -G[0]
        res = rule.aggregate(G, client_ids=list(range(R)))
        x = x - np.float32(0.5) * np.asarray(res.estimate, dtype=np.float32)
        if first is None and 0 in res.info["suspected"]:
            first = t
    return res, first


def test_no_last_replies_kept_and_a_sign_flipper_caught():
    R, d = 24, 5000
    rule = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    res, first = _quadratic_federation(rule)
    assert res.info["suspected"] == [0] and first is not None and first <= 8
    assert rule.state_dict()[1]["evidence.last"].shape[0] == 0  # no table of last replies
    # with the table of raw last replies: the same decisions, nearly the same evidence
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d, evidence_from_reference=False)
    res2, first2 = _quadratic_federation(plain)
    assert res2.info["suspected"] == [0] and first2 == first
    assert plain.state_dict()[1]["evidence.last"].shape[0] == R
    ids = list(range(R))
    np.testing.assert_allclose(rule.evidence.z_values(ids), plain.evidence.z_values(ids), atol=0.25)


def test_small_rounds_score_on_the_references_too():
    """The exact passes (a round below fast_above) score on the references as well: no table of last replies."""
    R, d = 24, 300
    rule = RobustDefence(eps_tilde=0.2, seed=0)
    assert not rule._fast_round(R, d)
    res, first = _quadratic_federation(rule, R=R, d=d)
    assert res.info["suspected"] == [0] and first is not None
    assert rule.state_dict()[1]["evidence.last"].shape[0] == 0


def test_first_round_stores_no_last_replies_and_a_new_length_forgets_the_evidence():
    rule = RobustDefence(eps_tilde=0.2, seed=0)
    rng = np.random.default_rng(4)
    rule.aggregate(rng.normal(size=(10, 30)), client_ids=list(range(10)))  # no step yet: nothing scored
    assert rule.state_dict()[1]["evidence.last"].shape[0] == 0
    ev = MonotonicityEvidence()
    for _ in range(6):
        ev.observe_changes([1, 2, 3], [0, 1, 2], np.ones(3), -np.ones(3), dim=30)
    assert ev.z(1) < 0
    ev.observe_changes([1, 2, 3], [], np.zeros(0), np.zeros(0), dim=31)  # another model: a fresh start
    assert ev.z(1) == 0.0

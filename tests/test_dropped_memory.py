"""Replies left out of a round leave no trace in their node's worker momentum (``fold_dropped=False``).

Step 9 of :mod:`flwr_byzantine.aggregators.defence`: a jump or a copy of another row is not folded into its
node's memory, and that memory is held (:meth:`ClientMomentum.hold`), so the node's next reply is blended in
rather than restarting it.  ``fold_dropped=True`` is the ninth landing's rule (such replies folded in).
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators import RobustDefence
from flwr_byzantine.aggregators.memory import ClientMomentum

R, D, BETA = 10, 6, 0.7
IDS = list(range(100, 100 + R))


def _honest(rng: np.random.Generator) -> np.ndarray:
    return 1.0 + 0.1 * rng.standard_normal((R, D))


def test_hold_keeps_the_memory_and_the_next_reply_is_blended_not_restarted():
    rng = np.random.default_rng(0)
    g1, g3 = rng.standard_normal((2, 3, 4))
    held, idle = ClientMomentum(beta=BETA), ClientMomentum(beta=BETA)
    for mem in (held, idle):
        mem.update(g1, [1, 2, 3])
    # round 2: node 3's reply is left out of the round (held in one memory, simply absent in the other)
    held.update(g1[:2], [1, 2])
    held.hold([3, 999])  # an unknown node is ignored
    idle.update(g1[:2], [1, 2])
    np.testing.assert_array_equal(held.momentum_of(3), g1[2])
    assert held.momentum_of(999) is None
    held.update(g3, [1, 2, 3])
    idle.update(g3, [1, 2, 3])
    np.testing.assert_allclose(held.momentum_of(3), BETA * g1[2] + (1 - BETA) * g3[2])  # blended
    np.testing.assert_array_equal(idle.momentum_of(3), g3[2])  # absent for a call: restarted


def _rule(fold_dropped: bool, **kw) -> RobustDefence:
    # the memory alone: no input clipping (the fold is then m <- beta m + (1 - beta) g exactly), no evidence
    base = dict(eps_tilde=0.2, momentum=BETA, input_clip_scale=None, evidence=False, seed=0)
    return RobustDefence(**(base | kw), fold_dropped=fold_dropped)


@pytest.mark.parametrize("fold_dropped", [False, True])
def test_a_copied_reply_enters_no_memory_unless_fold_dropped(fold_dropped):
    rng = np.random.default_rng(1)
    rule = _rule(fold_dropped, self_clip_scale=None, jump_factor=None)
    G1 = _honest(rng)
    rule.aggregate(G1, client_ids=IDS)
    m1 = rule.memory.momentum_of(IDS[8]).copy()
    G2 = _honest(rng)
    G2[7] = G2[8] = G2[9] = 1.3  # three nodes send one crafted vector: rows 8 and 9 are copies of row 7
    res = rule.aggregate(G2, client_ids=IDS)
    assert sorted(res.info["duplicates"]) == [8, 9]
    m2 = rule.memory.momentum_of(IDS[8])
    if fold_dropped:
        np.testing.assert_allclose(m2, BETA * m1 + (1 - BETA) * G2[8])
    else:
        np.testing.assert_array_equal(m2, m1)  # held
    np.testing.assert_allclose(rule.memory.momentum_of(IDS[7]), BETA * G1[7] + (1 - BETA) * G2[7])  # the kept copy
    G3 = _honest(rng)
    rule.aggregate(G3, client_ids=IDS)
    np.testing.assert_allclose(rule.memory.momentum_of(IDS[8]), BETA * m2 + (1 - BETA) * G3[8])  # blended, not restarted


@pytest.mark.parametrize("fold_dropped", [False, True])
def test_a_jumping_reply_enters_no_memory_unless_fold_dropped(fold_dropped):
    rng = np.random.default_rng(2)
    rule = _rule(fold_dropped, gross_factor=None)
    for _ in range(3):
        G = _honest(rng)
        rule.aggregate(G, client_ids=IDS)
    m_before = rule.memory.momentum_of(IDS[5]).copy()
    G = _honest(rng)
    G[5] += 2.0  # far beyond the round's typical change of a reply: a jump
    res = rule.aggregate(G, client_ids=IDS)
    assert 5 in res.info["jumped"] and 5 not in res.kept.tolist()
    m_after = rule.memory.momentum_of(IDS[5])
    if fold_dropped:  # folded in after the self-reference clipping: the memory moves toward the jump
        assert float((m_after - m_before) @ (G[5] - m_before)) > 0
    else:
        np.testing.assert_array_equal(m_after, m_before)

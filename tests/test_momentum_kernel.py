"""The worker momentum's fused pass (issue 12): the input clipping's distances and the clip-and-blend.

:meth:`~flwr_byzantine.aggregators.memory.ClientMomentum.fold_rows` folds clipped rows into the nodes'
memories in one compiled pass (:func:`~flwr_byzantine.aggregators.kernels.clip_fold_rows`), and large
rounds of :class:`~flwr_byzantine.aggregators.RobustDefence` take the clipping's distances from one
compiled pass (:func:`~flwr_byzantine.aggregators.kernels.centre_sq_distances`).  Here both are checked
against the plain numpy formulation they replaced: a dict of per-node vectors, ``G - centre`` scaled and
shifted back, ``beta m + (1 - beta) x``.
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators import kernels
from flwr_byzantine.aggregators.defence import RobustDefence
from flwr_byzantine.aggregators.memory import ClientMomentum
from flwr_byzantine.aggregators.streaming import row_sq_norms
from tolerances import SUM_RTOL


class PlainMomentum:
    """The worker momentum as first written: one vector per node id, numpy arithmetic."""

    def __init__(self, beta: float, max_idle_rounds: int = 1) -> None:
        self.beta, self.max_idle, self.calls = beta, max_idle_rounds, 0
        self.m: dict[int, np.ndarray] = {}
        self.seen: dict[int, int] = {}

    def fold(self, G, rows, ids, centre=None, factors=None):
        self.calls += 1
        X = G[rows]
        if centre is not None:
            X = (X - centre) * factors.astype(G.dtype)[:, None] + centre
        out = np.empty_like(X)
        for k, node in enumerate(ids):
            if node in self.m and self.calls - self.seen[node] <= self.max_idle:
                out[k] = self.beta * self.m[node] + (1.0 - self.beta) * X[k]
            else:
                out[k] = X[k]
            self.m[node] = out[k].copy()
            self.seen[node] = self.calls
        return out

    def hold(self, ids):
        """A node whose reply was left out of the last call keeps its memory and counts as present."""
        for node in ids:
            if node in self.m:
                self.seen[node] = self.calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", [True, False])
def test_fold_rows_is_the_plain_momentum_bit_for_bit_under_churn(dtype, clip):
    rng = np.random.default_rng(3)
    d = 517
    mem, plain = ClientMomentum(beta=0.5, max_idle_rounds=1), PlainMomentum(0.5, 1)
    out = None
    nodes = np.arange(100, 112)
    for t in range(9):
        R = int(rng.integers(4, 9))
        ids = [int(i) for i in rng.choice(nodes, size=R, replace=False)]  # new, continuing, idle, returning
        G = (rng.normal(size=(R, d)) * rng.uniform(0.5, 20.0, size=(R, 1))).astype(dtype)
        rows = np.sort(rng.choice(R, size=R - int(rng.integers(0, 3)), replace=False))  # far rows left out
        centre = rng.normal(size=d).astype(dtype) if clip else None
        factors = rng.uniform(0.05, 1.0, size=rows.size).astype(dtype) if clip else None
        if out is not None and out.shape[0] == R:
            out[:] = -7.0  # rows not folded must be left as they are
        fresh = out is None or out.shape != G.shape
        got = mem.fold_rows(G, rows, [ids[r] for r in rows], out=out, centre=centre, factors=factors)
        assert got.dtype == dtype and (fresh or got is out)
        want = plain.fold(G, rows, [ids[r] for r in rows], centre, factors)
        np.testing.assert_array_equal(got[rows], want)
        if not fresh:
            assert np.all(np.delete(got, rows, axis=0) == -7.0)
        out = got
        for node in ids:
            if node in plain.m and plain.calls - plain.seen[node] <= plain.max_idle:
                np.testing.assert_array_equal(mem.momentum_of(node), plain.m[node])
            elif node in plain.m:  # a memory that can no longer continue (its node would restart) is forgotten
                assert mem.momentum_of(node) is None
    state = mem.state_dict()
    assert state["calls"] == plain.calls and state["last_seen"] == [plain.seen[i] for i in state["ids"]]
    assert set(state["ids"]) == {n for n, s in plain.seen.items() if plain.calls - s <= plain.max_idle}


def test_update_is_fold_rows_of_every_row():
    rng = np.random.default_rng(0)
    a, b = ClientMomentum(beta=0.9), ClientMomentum(beta=0.9)
    for _ in range(3):
        G = rng.normal(size=(5, 40))
        np.testing.assert_array_equal(a.update(G, [1, 2, 3, 4, 5]), b.fold_rows(G, np.arange(5), [1, 2, 3, 4, 5]))
    with pytest.raises(ValueError):
        a.fold_rows(G, np.arange(2), [1, 2, 3])  # one id per folded row
    with pytest.raises(ValueError):
        a.fold_rows(G, np.arange(2), [1, 2], centre=np.zeros(40))  # a centre without factors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centre_distances_are_the_sums_of_the_differences(dtype):
    rng = np.random.default_rng(1)
    R, d = 7, 9001  # three column tiles, the last one partial
    G = (rng.normal(size=(R, d)) * 3.0 + 1e3).astype(dtype)
    centre = (rng.normal(size=d) + 1e3).astype(dtype)
    sq = np.empty(R)
    kernels.centre_sq_distances(G, np.arange(R), centre, sq)
    want = np.sum(np.square((G - centre).astype(np.float64)), axis=1)  # the dtype's differences, float64 sums
    np.testing.assert_allclose(sq, want, rtol=SUM_RTOL[dtype])


def _plain_distances(G, rows, centre, sq):
    sq[:] = row_sq_norms(G[rows] - centre)


def test_large_rounds_fused_momentum_takes_the_numpy_decisions(monkeypatch):
    """A large round (forced with a small ``fast_above``) with far rows, a new node and an idle one:
    the fused passes keep the same rows and give the same estimates, to rounding, as the numpy passes."""
    rng = np.random.default_rng(5)
    R, d = 40, 6000
    truth = rng.normal(size=d).astype(np.float32)
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    plain.fuse_passes = False  # the distances from their own pass (patched below), not the deviations' sums
    ref = PlainMomentum(plain.memory.beta, plain.memory.max_idle_rounds)

    def plain_fold(G, rows, ids, out=None, centre=None, factors=None, table_view=False, source=None, sketch=None,
                   self_clip=None):
        assert sketch is None  # unfused: the filter sketches the memories itself
        assert source is None and self_clip is None  # the plain passes write the clipped rows out
        M = np.zeros(G.shape, dtype=G.dtype)
        M[rows] = ref.fold(G, rows, ids, centre, factors)
        return M

    for t in range(6):
        ids = list(range(R)) if t != 3 else list(range(1, R)) + [500]  # node 0 idle once, node 500 new
        G = truth + rng.normal(size=(R, d)).astype(np.float32) * np.float32(0.5)
        G[:3] = truth * np.float32(-6.0)  # far from the last estimate
        G[3] += np.float32(2.0)  # moderately far: clipped, not left out
        res_f = fused.aggregate(G, client_ids=ids)
        with monkeypatch.context() as mp:
            mp.setattr(kernels, "centre_sq_distances", _plain_distances)
            mp.setattr(plain, "_fast_centre", lambda *a: None)  # every distance from the patched pass
            mp.setattr(plain.memory, "fold_rows", plain_fold)
            mp.setattr(plain.memory, "hold", ref.hold)
            res_p = plain.aggregate(G, client_ids=ids)
        for key in ("gross", "suspected", "duplicates", "input_clipped"):
            assert res_f.info[key] == res_p.info[key], key
        assert res_f.info["memory"] and res_f.info["input_clipped"] > 0
        assert res_f.kept.tolist() == res_p.kept.tolist()
        np.testing.assert_allclose(res_f.estimate, res_p.estimate, rtol=1e-4, atol=1e-5)
        assert {0, 1, 2} <= set(res_f.info["gross"])
        truth = truth * np.float32(0.9)
    usable = [n for n in ref.m if ref.calls - ref.seen[n] <= ref.max_idle]  # (node 500's, idle since, is forgotten)
    assert len(usable) == len(fused.memory) > R - 5  # the far rows' nodes hold no memory
    for node in usable:
        np.testing.assert_allclose(fused.memory.momentum_of(node), ref.m[node], rtol=1e-4, atol=1e-5)
    assert all(fused.memory.momentum_of(n) is None for n in set(ref.m) - set(usable))

"""Per-node memory across rounds: the server-side worker momentum of the default defence.

``m_i <- beta m_i + (1 - beta) g_i`` for every node ``i`` that replied in a round
(Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021, Algorithm 2, worker momentum), kept by the server and keyed by the Flower
node id that the SuperLink attaches to each reply.  Kept by the server it needs no
client cooperation: a Byzantine node cannot opt out of it, and an honest client
sends the same gradient as without it.

A node seen for the first time, or back after more than ``max_idle_rounds`` calls
without a reply, starts from ``m_i = g_i``.  A change of the vectors' dimension
forgets everything.  Calls are counted by :meth:`ClientMomentum.update`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class _RowTable:
    """Vectors keyed by node id, stored as rows of one growing matrix (vectorised gathers/scatters)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.index: dict[int, int] = {}
        self.rows = np.zeros((0, 0))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int | None:
        return self.rows.shape[1] if self.index else None

    def get(self, ids: Sequence[int]) -> np.ndarray:
        return self.rows[[self.index[i] for i in ids]]

    def put(self, ids: Sequence[int], values: np.ndarray) -> None:
        new = [i for i in ids if i not in self.index]
        if new:
            if not self.index:
                self.rows = np.zeros((max(2 * len(new), 8), values.shape[1]))
            need = len(self.index) + len(new)
            if need > self.rows.shape[0]:
                grown = np.zeros((max(need, 2 * self.rows.shape[0]), self.rows.shape[1]))
                grown[: self.rows.shape[0]] = self.rows
                self.rows = grown
            for i in new:
                self.index[i] = len(self.index)
        self.rows[[self.index[i] for i in ids]] = values

    def drop(self, ids: Sequence[int]) -> None:
        """Forget ``ids`` (compacts the matrix)."""
        keep = [i for i in self.index if i not in set(ids)]
        if len(keep) == len(self.index):
            return
        vals = self.get(keep) if keep else np.zeros((0, self.rows.shape[1]))
        self.clear()
        if keep:
            self.put(keep, vals)


class ClientMomentum:
    """Exponential moving average of every node's vectors, keyed by node id.

    Parameters
    ----------
    beta:
        Momentum in ``[0, 1)``.
    max_idle_rounds:
        A node whose last reply is more than this many calls old restarts from its new vector.
    """

    def __init__(self, beta: float = 0.9, max_idle_rounds: int = 1) -> None:
        if not (np.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if isinstance(max_idle_rounds, bool) or int(max_idle_rounds) != max_idle_rounds or max_idle_rounds < 1:
            raise ValueError(f"max_idle_rounds must be a positive integer, got {max_idle_rounds!r}")
        self.beta = float(beta)
        self.max_idle_rounds = int(max_idle_rounds)
        self.reset()

    def reset(self) -> None:
        """Forget every node."""
        self.calls = 0
        self._m = _RowTable()
        self._seen: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._m)

    def momentum_of(self, node_id: int) -> np.ndarray | None:
        """A copy of node ``node_id``'s memory, or ``None``."""
        node = int(node_id)
        return self._m.get([node])[0].copy() if node in self._m.index else None

    def update(self, G: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """Fold row ``i`` of ``G`` into node ``ids[i]``'s memory; returns the memories, row-aligned with ``G``."""
        G = np.asarray(G, dtype=np.float64)
        ids = [int(i) for i in ids]
        if G.ndim != 2 or len(ids) != G.shape[0]:
            raise ValueError("G must be (R, d) with one id per row")
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be distinct within a round")
        if self._m.dim is not None and self._m.dim != G.shape[1]:
            self.reset()
        self.calls += 1
        out = G.copy()
        cont = [r for r, node in enumerate(ids) if node in self._m.index
                and self.calls - self._seen.get(node, -10**9) <= self.max_idle_rounds]
        if cont:
            prev = self._m.get([ids[r] for r in cont])
            out[cont] = self.beta * prev + (1.0 - self.beta) * G[cont]
        self._m.put(ids, out)
        for node in ids:
            self._seen[node] = self.calls
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"beta", "max_idle_rounds", "calls", "ids", "last_seen", "momenta"}`` (momenta: ``(n, d)`` float64)."""
        ids = sorted(self._m.index)
        d = self._m.dim or 0
        return {
            "beta": self.beta,
            "max_idle_rounds": self.max_idle_rounds,
            "calls": int(self.calls),
            "ids": [int(i) for i in ids],
            "last_seen": [int(self._seen[i]) for i in ids],
            "momenta": self._m.get(ids).copy() if ids else np.zeros((0, d)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; raises ``ValueError`` on anything malformed."""
        try:
            ids = [int(i) for i in state["ids"]]
            seen = [int(s) for s in state["last_seen"]]
            calls = int(state["calls"])
            mom = np.asarray(state["momenta"], dtype=np.float64)
            beta = float(state["beta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed momentum state: {exc}") from exc
        if mom.ndim != 2 or mom.shape[0] != len(ids) or len(seen) != len(ids) or len(set(ids)) != len(ids):
            raise ValueError("malformed momentum state: ids, last_seen and momenta disagree")
        if not np.isfinite(mom).all():
            raise ValueError("malformed momentum state: non-finite momenta")
        if calls < 0 or any(s > calls or s < 0 for s in seen):
            raise ValueError("malformed momentum state: last_seen after calls")
        if beta != self.beta:
            raise ValueError(f"momentum state has beta={beta}, this memory has beta={self.beta}")
        self.reset()
        self.calls = calls
        if ids:
            self._m.put(ids, mom)
        self._seen = dict(zip(ids, seen))


class MonotonicityEvidence:
    """Per-node evidence that a node's vectors are not the gradients of a (locally) convex loss.

    For an honest client the reply is a stochastic gradient ``g_i(x)`` of its loss ``f_i``.
    Gradients of a convex ``f_i`` are monotone: ``<grad f_i(x') - grad f_i(x), x' - x> >= 0``
    (for every smooth convex ``f_i``; locally, wherever ``f_i`` curves upwards along the step).
    A node that sends ``-g_i`` (sign flip), ``-eps * mean`` (inner-product manipulation) or
    any other update that *rises* its own loss makes this negative round after round.

    Each round with a step ``delta = x_t - x_{t-1}``, every node that also replied in the
    previous round gets the score ``s_i = <g_i(t) - g_i(t-1), delta> / (|delta| * scale)``,
    where ``scale`` is the round's median ``|g_i(t) - g_i(t-1)|`` (so scores are comparable
    across rounds).  Mini-batch noise is zero-mean; curvature makes honest scores positive on
    average.  The evidence is the discounted, self-normalised sum
    ``Z_i = S_i / sqrt(Q_i)`` with ``S_i <- gamma S_i + s_i``, ``Q_i <- gamma Q_i + s_i^2``
    (``gamma`` forgets old rounds, so a sleeper that turns is caught within a window of about
    ``1 / (1 - gamma)`` rounds).  A node with at least ``min_rounds`` scores and
    ``Z_i < -z_exclude``, or the same statistic over a short window (``gamma_short``) below
    ``-z_short`` (a sleeper whose long honest history keeps ``Z_i`` up), is *suspected*; the decision is re-made every round from the
    evidence, so a node that behaves again is readmitted.

    ``Z`` is a t-like statistic: for a zero-mean score sequence ``P(Z < -4)`` is tiny, and an
    honest client's (positive-mean) scores push it the other way, so honest minority clients,
    whose gradients look unusual but are still gradients, keep their voice.
    """

    def __init__(self, gamma: float = 0.95, z_exclude: float = 1.5, min_rounds: int = 5,
                 gamma_short: float = 0.8, z_short: float = 2.0) -> None:
        if not (np.isfinite(gamma) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if not (np.isfinite(z_exclude) and z_exclude > 0):
            raise ValueError(f"z_exclude must be positive, got {z_exclude!r}")
        if isinstance(min_rounds, bool) or int(min_rounds) != min_rounds or min_rounds < 1:
            raise ValueError(f"min_rounds must be a positive integer, got {min_rounds!r}")
        if not (np.isfinite(gamma_short) and 0.0 < gamma_short <= gamma):
            raise ValueError(f"gamma_short must be in (0, gamma], got {gamma_short!r}")
        if not (np.isfinite(z_short) and z_short > 0):
            raise ValueError(f"z_short must be positive, got {z_short!r}")
        self.gamma = float(gamma)
        self.z_exclude = float(z_exclude)
        self.min_rounds = int(min_rounds)
        self.gamma_short = float(gamma_short)
        self.z_short = float(z_short)
        self.reset()

    def reset(self) -> None:
        """Forget every node."""
        self._last = _RowTable()
        self._S: dict[int, float] = {}
        self._Q: dict[int, float] = {}
        self._S2: dict[int, float] = {}
        self._Q2: dict[int, float] = {}
        self._n: dict[int, int] = {}

    def z(self, node_id: int) -> float:
        """``Z_i`` of a node (0 without evidence)."""
        node = int(node_id)
        q = self._Q.get(node, 0.0)
        return float(self._S.get(node, 0.0) / np.sqrt(q)) if q > 0 else 0.0

    def z_recent(self, node_id: int) -> float:
        """The same statistic over a short window (discount ``gamma_short``): reacts to a change."""
        node = int(node_id)
        q = self._Q2.get(node, 0.0)
        return float(self._S2.get(node, 0.0) / np.sqrt(q)) if q > 0 else 0.0

    def suspected(self, node_id: int) -> bool:
        """Whether the evidence against ``node_id`` is over the exclusion level (long or short window)."""
        node = int(node_id)
        if self._n.get(node, 0) < self.min_rounds:
            return False
        return self.z(node) < -self.z_exclude or self.z_recent(node) < -self.z_short

    def observe(self, G: np.ndarray, ids: Sequence[int], delta: np.ndarray | None) -> None:
        """Score this round's rows against the previous ones along the last step ``delta``.

        ``delta`` is ``x_t - x_{t-1}`` (the step taken since the previous call), or ``None``
        when no step was taken (the rows are then only remembered).
        """
        G = np.asarray(G, dtype=np.float64)
        ids = [int(i) for i in ids]
        if self._last.dim is not None and self._last.dim != G.shape[1]:
            self.reset()
        step_norm = float(np.linalg.norm(delta)) if delta is not None else 0.0
        if delta is not None and step_norm > 0 and np.isfinite(step_norm):
            u = np.asarray(delta, dtype=np.float64) / step_norm
            pairs = [(r, node) for r, node in enumerate(ids) if node in self._last.index]
            if pairs:
                diffs = G[[r for r, _ in pairs]] - self._last.get([node for _, node in pairs])
                scale = float(np.median(np.sqrt(np.einsum("ij,ij->i", diffs, diffs))))
                if scale > 0 and np.isfinite(scale):
                    scores = diffs @ u / scale
                    for (_, node), s in zip(pairs, scores):
                        self._S[node] = self.gamma * self._S.get(node, 0.0) + float(s)
                        self._Q[node] = self.gamma * self._Q.get(node, 0.0) + float(s) ** 2
                        self._S2[node] = self.gamma_short * self._S2.get(node, 0.0) + float(s)
                        self._Q2[node] = self.gamma_short * self._Q2.get(node, 0.0) + float(s) ** 2
                        self._n[node] = self._n.get(node, 0) + 1
        seen = set(ids)
        # absent this round: its last vector is no longer comparable
        self._last.drop([node for node in self._last.index if node not in seen])
        self._last.put(ids, G)

    def state_dict(self) -> dict[str, Any]:
        """``{"ids", "S", "Q", "n", "last_ids", "last"}`` (plain lists and one ``(m, d)`` array)."""
        ids = sorted(self._S)
        last_ids = sorted(self._last.index)
        d = self._last.dim or 0
        return {
            "gamma": self.gamma, "z_exclude": self.z_exclude, "min_rounds": self.min_rounds,
            "ids": ids, "S": [self._S[i] for i in ids], "Q": [self._Q[i] for i in ids],
            "S_short": [self._S2.get(i, 0.0) for i in ids], "Q_short": [self._Q2.get(i, 0.0) for i in ids],
            "n": [self._n[i] for i in ids], "last_ids": last_ids,
            "last": self._last.get(last_ids).copy() if last_ids else np.zeros((0, d)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; raises ``ValueError`` on anything malformed."""
        try:
            ids = [int(i) for i in state["ids"]]
            S = [float(v) for v in state["S"]]
            Q = [float(v) for v in state["Q"]]
            S2 = [float(v) for v in state["S_short"]]
            Q2 = [float(v) for v in state["Q_short"]]
            n = [int(v) for v in state["n"]]
            last_ids = [int(i) for i in state["last_ids"]]
            last = np.asarray(state["last"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed evidence state: {exc}") from exc
        if not (len(ids) == len(S) == len(Q) == len(n) == len(S2) == len(Q2)) or last.ndim != 2 or last.shape[0] != len(last_ids):
            raise ValueError("malformed evidence state: lengths disagree")
        if not all(np.isfinite(v).all() for v in (S, Q, S2, Q2, last)) or min(Q + Q2, default=0) < 0:
            raise ValueError("malformed evidence state: non-finite or negative values")
        self.reset()
        for i, s, q, s2, q2, k in zip(ids, S, Q, S2, Q2, n):
            self._S[i], self._Q[i], self._S2[i], self._Q2[i], self._n[i] = s, q, s2, q2, k
        if last_ids:
            self._last.put(last_ids, last)

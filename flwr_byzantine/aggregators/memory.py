"""Per-node memory across rounds: the server-side worker momentum of the default defence.

``m_i <- beta m_i + (1 - beta) g_i`` for every node ``i`` that replied in a round
(Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
ICML 2021, Algorithm 2, worker momentum), kept by the server and keyed by the Flower
node id that the SuperLink attaches to each reply.  Kept by the server it needs no
client cooperation: a Byzantine node cannot opt out of it, and an honest client
sends the same gradient as without it.

A node seen for the first time, or back after more than ``max_idle_rounds`` calls
without a reply, starts from ``m_i = g_i``.  A change of the vectors' dimension
forgets everything.  Calls are counted by :meth:`ClientMomentum.fold_rows` (and :meth:`~ClientMomentum.update`).

The tables keep the rounds' floating dtype (float32 rounds: float32 tables, no float64 copy)
and hold the vectors as rows of one matrix (vectorised gathers, a departed node's row reused);
the evidence's pass over a round is one tiled stream (:mod:`.streaming`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .streaming import as_index, diff_stats_and_store, median_of


def _floating(x: Any) -> np.ndarray:
    """A stored array as float32 or float64 (its own dtype when it is one of those)."""
    arr = np.asarray(x)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


class _RowTable:
    """Vectors keyed by node id, stored as rows of one growing matrix.

    Gathers and scatters are vectorised; a forgotten node's row is reused by the next new node
    (no compaction), so nodes that reply every round keep their rows and a round's rows are
    usually one contiguous block (:func:`as_index`).  The matrix has the floating dtype of what
    was stored (float32 stays float32); a wider input widens it, never the other way round.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.index: dict[int, int] = {}
        self.rows = np.zeros((0, 0))
        self._free: list[int] = []
        self._fresh = True
        self._spare: np.ndarray | None = None  # an emptied table's matrix, reused by the next one of its shape

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int | None:
        return self.rows.shape[1] if self.index else None

    def slots(self, ids: Sequence[int]) -> np.ndarray:
        """Row numbers of ``ids`` (all known)."""
        return np.fromiter((self.index[i] for i in ids), dtype=np.intp, count=len(ids))

    def find(self, ids: Sequence[int]) -> np.ndarray:
        """Row numbers of ``ids``, ``-1`` for an unknown id."""
        return np.fromiter((self.index.get(i, -1) for i in ids), dtype=np.intp, count=len(ids))

    def get(self, ids: Sequence[int]) -> np.ndarray:
        """A copy of the vectors of ``ids``."""
        return self.rows[self.slots(ids)]

    def assign(self, ids: Sequence[int], dim: int, dtype: Any) -> np.ndarray:
        """Row numbers of ``ids``, giving new ids free rows (the matrix grows, or widens to ``dtype``)."""
        dtype = np.dtype(dtype)
        if self._fresh:
            spare, self._spare = self._spare, None
            if spare is not None and spare.dtype == dtype and spare.shape[1] == dim and spare.shape[0] >= len(ids):
                self.rows = spare  # its pages are mapped already (a fresh matrix of rows costs its page faults)
            else:
                self.rows = np.empty((len(ids), dim), dtype=dtype)  # most rounds repeat the same nodes
            self._fresh = False
        elif np.result_type(self.rows.dtype, dtype) != self.rows.dtype:
            self.rows = self.rows.astype(np.result_type(self.rows.dtype, dtype))
        new = [i for i in ids if i not in self.index]
        if new:
            top = len(self.index) + len(self._free)  # rows 0..top-1 are in use or free
            grow = len(new) - min(len(new), len(self._free))
            if top + grow > self.rows.shape[0]:
                grown = np.empty((max(top + grow, self.rows.shape[0] * 5 // 4), self.rows.shape[1]),
                                 dtype=self.rows.dtype)
                grown[:top] = self.rows[:top]
                self.rows = grown
            self._free.sort(reverse=True)  # lowest free rows first
            for i in new:
                if self._free:
                    self.index[i] = self._free.pop()
                else:
                    self.index[i] = top
                    top += 1
        return self.slots(ids)

    def keeps(self, dtype: Any) -> bool:
        """Whether rows of ``dtype`` stored now are held in that dtype (a new table takes it; a wider one widens them)."""
        return self._fresh or self.rows.dtype == np.dtype(dtype)

    def put(self, ids: Sequence[int], values: np.ndarray) -> None:
        """Store row ``k`` of ``values`` as the vector of ``ids[k]``."""
        slots = as_index(self.assign(ids, values.shape[1], values.dtype))
        self.rows[slots] = values

    def drop(self, ids: Sequence[int]) -> None:
        """Forget ``ids`` (their rows are reused by later new ids)."""
        for i in ids:
            slot = self.index.pop(i, None)
            if slot is not None:
                self._free.append(slot)
        if not self.index:  # a fresh table (it takes the next rows' dtype), reusing this matrix when it fits
            spare = None if self._fresh else self.rows
            self.clear()
            self._spare = spare


class ClientMomentum:
    """Exponential moving average of every node's vectors, keyed by node id.

    Parameters
    ----------
    beta:
        Momentum in ``[0, 1)``.
    max_idle_rounds:
        A node whose last reply is more than this many calls old restarts from its new vector; its memory, which
        nothing reads again, is dropped (a federation that samples a few clients of many every round keeps about
        ``max_idle_rounds + 1`` rounds' nodes, not every node it ever saw).
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
        """Fold row ``i`` of ``G`` into node ``ids[i]``'s memory; returns the memories, row-aligned with ``G``.

        The memories keep ``G``'s floating dtype (float32 input: float32 memories).
        """
        G = np.asarray(G)
        if G.ndim != 2:
            raise ValueError("G must be (R, d) with one id per row")
        return self.fold_rows(G, np.arange(G.shape[0]), ids)

    def fold_rows(self, G: np.ndarray, rows: np.ndarray, ids: Sequence[int], out: np.ndarray | None = None,
                  centre: np.ndarray | None = None, factors: np.ndarray | None = None,
                  table_view: bool = False, source: tuple[np.ndarray, np.ndarray] | None = None,
                  sketch: tuple[np.ndarray, Any] | None = None,
                  self_clip: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Fold ``x_k = centre + (G[rows[k]] - centre) * factors[k]`` (or ``G[rows[k]]`` without ``centre``) into
        node ``ids[k]``'s memory, ``m <- beta m + (1 - beta) x_k`` (a new or returning node: ``m <- x_k``), and
        write the memory into ``out[rows[k]]``.

        One compiled pass (:func:`~.kernels.clip_fold_rows`): each row and its memory read once, the memory
        and ``out``'s row written once, no temporaries; the arithmetic of the numpy formulation
        (``diff * f + centre`` in ``G``'s dtype, then ``beta * m + (1 - beta) * x``), bit for bit.  ``out``
        (``(R, d)``, the memories' dtype: that of ``G`` or wider) is reused when it fits, else a new one is
        made; its other rows are left as they are.  Returns ``out``.

        ``table_view``: when every row of ``G`` is folded in order (``rows`` is ``0..R-1``) and their memories are
        one ascending run of rows of the memories' table (nodes that reply every round keep their rows), ``out`` is
        not written: returned instead is a read-only view of those table rows, the same values (one write of the
        rows fewer), valid until the memories next change.

        ``source = (S, s)``: row ``rows[k]``'s input is ``S[s[k]]`` (e.g. the rows as the self-reference left them in
        its table, :meth:`~.temporal.SelfReference.apply` with ``into_table``), not ``G[rows[k]]``, except where
        ``s[k] < 0`` (a row that is not in that table, e.g. a new node's): there it is ``G[rows[k]]``.

        ``self_clip = (drift, f)`` (with ``source``, whose table holds the nodes' references, e.g. the self-reference's
        deferred clipping, :meth:`~.temporal.SelfReference.apply` with ``defer``): row ``rows[k]``'s input is then
        ``G[rows[k]]`` clipped against its reference ``S[s[k]]`` with factor ``f[k]``, ``(S[s[k]] + drift) +
        ((G[rows[k]] - S[s[k]]) - drift) * f[k]``, which the same pass also writes into ``S[s[k]]`` (the
        self-reference's store; :func:`~.kernels.clip_fold_rows`: one pass for the clipping and the fold, bit for
        bit the two); rows with ``s[k] < 0`` are folded from ``G[rows[k]]`` as above.

        ``sketch = (signs, Z)`` (``rows`` ascending, :meth:`keeps` the rows' dtype; ``signs`` and the zeroed
        :class:`~.sketch.RowSketch` ``Z`` of ``G.shape[0]`` rows from :meth:`~.rge.RGE.presketch_request`): the same
        pass also fills ``Z`` with what :func:`~.sketch.sketch_rows` with those signs would take of the returned matrix
        whose rows not in ``rows`` are zero (:func:`~.kernels.clip_fold_sketch_rows`: the sketch, the squared norms,
        the column sums where ``Z`` has them), bit for bit, for the sketched filter that reads the memories next (one
        pass fewer).
        """
        from .kernels import clip_fold_rows, clip_fold_sketch_rows

        G = np.asarray(G)
        if not np.issubdtype(G.dtype, np.floating):
            G = G.astype(np.float64)
        ids = [int(i) for i in ids]
        rows = np.ascontiguousarray(rows, dtype=np.intp)
        if G.ndim != 2 or rows.ndim != 1 or len(ids) != rows.size:
            raise ValueError("G must be (R, d) with one id per folded row")
        S, src = G, rows
        if self_clip is not None and source is None:
            raise ValueError("self_clip clips the rows against their references: it needs the references' table")
        if source is not None:
            from_table = np.ascontiguousarray(source[1], dtype=np.intp)
            if from_table.shape != rows.shape:
                raise ValueError("source must give one row per folded row")
            if from_table.size and int(from_table.max()) >= 0:  # (every row new, -1: the table is not read at all)
                S, src = np.asarray(source[0]), from_table
                if S.ndim != 2 or S.shape[1] != G.shape[1] or S.dtype != G.dtype:
                    raise ValueError("source must be a table of the rows' width and dtype")
                if not (-1 <= int(src.min()) and int(src.max()) < S.shape[0]):
                    raise ValueError("source rows out of range")
            else:
                self_clip = None  # no row has a reference: nothing to clip against
        if len(set(ids)) != len(ids):
            raise ValueError("node ids must be distinct within a round")
        if (centre is None) != (factors is None):
            raise ValueError("centre and factors go together")
        if self._m.dim is not None and self._m.dim != G.shape[1]:
            self.reset()
        self.calls += 1
        self._forget_stale(ids)
        cont = np.fromiter((node in self._m.index and self.calls - self._seen.get(node, -10**9) <= self.max_idle_rounds
                            for node in ids), dtype=bool, count=len(ids))
        slots = self._m.assign(ids, G.shape[1], G.dtype)
        table = self._m.rows
        run = as_index(slots) if table_view and rows.size == G.shape[0] and np.array_equal(rows, np.arange(rows.size)) \
            else None
        if isinstance(run, slice):  # the memories are rows run of the table, in the rows' order: no copy into out
            view = table[run]
            out = np.empty((0, 0), dtype=table.dtype)
        else:
            view = None
            if out is None or out.shape != G.shape or out.dtype != table.dtype:
                out = np.empty(G.shape, dtype=table.dtype)
        clip = centre is not None
        centre = np.ascontiguousarray(centre if clip else np.zeros(1), dtype=G.dtype)
        factors = np.ascontiguousarray(factors if clip else np.ones(rows.size), dtype=G.dtype)
        if self_clip is None:
            drift, sfactors = np.empty(0, dtype=G.dtype), np.empty(0, dtype=G.dtype)
        else:
            drift = np.ascontiguousarray(self_clip[0], dtype=G.dtype)
            sfactors = np.ascontiguousarray(self_clip[1], dtype=G.dtype)
            if drift.shape != (G.shape[1],) or sfactors.shape != rows.shape:
                raise ValueError("self_clip needs the drift (one value per column) and one factor per folded row")
            own_src = src[src >= 0]
            if np.unique(own_src).size != own_src.size:
                raise ValueError("self_clip writes the references: one folded row per reference")
        if sketch is None:
            clip_fold_rows(out, S, rows, src, centre, factors, clip, table, slots, cont,
                           table.dtype.type(self.beta), G.dtype.type(1.0 - self.beta), G, drift, sfactors)
        else:
            from .sketch import sketch_buckets

            signs, Z = sketch
            k1, k2 = sketch_buckets(G.shape[1], Z.dim)
            sums = np.empty(0, dtype=table.dtype) if Z.col_sums is None else Z.col_sums
            if (Z.Y.shape != (G.shape[0], k1 + k2) or Z.Y.dtype != np.float64 or signs.shape != (G.shape[1],)
                    or sums.dtype != table.dtype or (rows.size > 1 and bool(np.any(np.diff(rows) <= 0)))):
                raise ValueError("the fold's sketch needs one zeroed float64 row per row of G, one sign per column, "
                                 "ascending rows and column sums in the memories' dtype")
            clip_fold_sketch_rows(out, S, rows, src, centre, factors, clip, table, slots, cont,
                                  table.dtype.type(self.beta), G.dtype.type(1.0 - self.beta), G, drift, sfactors,
                                  np.ascontiguousarray(signs, dtype=np.int8), k1, k2, Z.Y, Z.sq_norms,
                                  sums, 1.0 / math.sqrt(2.0))
        for node in ids:
            self._seen[node] = self.calls
        if view is not None:
            view.flags.writeable = False
            return view
        return out

    def keeps(self, dtype: Any) -> bool:
        """Whether the memories of rows of ``dtype`` folded now are held (and returned) in that dtype."""
        return self._m.keeps(dtype)

    def _forget_stale(self, ids: Sequence[int]) -> None:
        """Drop the memories of the nodes absent from this call (``ids``) that can no longer continue theirs: a node
        back after more than ``max_idle_rounds`` calls restarts from its new vector anyway, so its memory is never
        read again.  Their rows are reused by new nodes: a federation that samples a few clients of many every round
        keeps a table of about the clients of its last ``max_idle_rounds`` rounds, not of every client it ever saw."""
        present = set(ids)
        stale = [node for node, seen in self._seen.items()
                 if self.calls - seen > self.max_idle_rounds and node not in present]
        if stale:
            self._m.drop(stale)
            for node in stale:
                del self._seen[node]

    def hold(self, ids: Sequence[int]) -> None:
        """Nodes that replied in the last :meth:`fold_rows` call but whose reply was not folded (left out of the
        round): their memories stay as they are and they count as present, so their next reply is blended into
        the memory (``m <- beta m + (1 - beta) x``) instead of restarting it.  Unknown nodes are ignored."""
        for node in ids:
            node = int(node)
            if node in self._m.index:
                self._seen[node] = self.calls

    def state_dict(self) -> dict[str, Any]:
        """``{"beta", "max_idle_rounds", "calls", "ids", "last_seen", "momenta"}`` (momenta: ``(n, d)``, the rounds' dtype)."""
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
            mom = _floating(state["momenta"])
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


#: Default exclusion level of :class:`MonotonicityEvidence`: a node is suspected when ``Z_i < -z_exclude``,
#: i.e. when its evidence is clearly negative.  Honest clients of a convex loss sit at Z ~ 1.5-3.5 (logistic
#: regression, 20 clients, alpha 0.3), a sign flipper below -1.7.  With the population floor
#: (:data:`DEFAULT_Q_FLOOR`) the grid (issue 10) measured levels 0, -0.5, -1, -1.5, -2 and -3: an attacker
#: that knows the rule keeps its Z just inside any level, and the higher the level, the more it must drag
#: its replies along the last step to do so, which costs the model more than the sign flip it holds back
#: (logistic regression, alpha 0.3, 4 seeds: 81.5 at 0, 84.9 at -1, 87.2 at -1.5); below -1.5 plain sign
#: flippers pass (85.1 at -2).  -1.5 lets IPM (Z between -1.5 and 0) through: 87.5 against 91.3 at 0.
DEFAULT_Z_EXCLUDE = 1.5
#: Default population floor of the evidence's normaliser: ``Z_i = S_i / sqrt(Q_i + q_floor median_j Q_j)``.
#: Without it ``S / sqrt(Q)`` is scale-free: a node whose scores are all at rounding level (a reply that
#: never moves along the steps) gets a ratio of rounding noise, anywhere in [-2, 2] (issue 10's memory-aware
#: column).  With it such a node sits at Z = 0, and an honest node's Z changes by under 5 %.  The floor is kept
#: near rounding level, not at the signal's: it enlarges every node's denominator, so a larger floor lets an
#: attacker that knows the rule (memory-aware) send more negative scores while its Z stays inside the level
#: (issue 10's grid, seeds 0-3, logreg alpha 0.3, the default otherwise: memory-aware 90.2 at 0.01, 87.4 at 0.1).
#: 0.003 (tenth landing) against 0.01: IPM, whose replies change a tenth as much as an honest one's and whose
#: ``Q`` is therefore near the floor, reaches ``Z`` below the level (logreg alpha 0.3: 91.2 against 89.6; MLP
#: alpha 0.3: 93.7 against 93.1), the memory-aware attacker has less room (MLP alpha 0.3: 92.8 against 92.4);
#: 0.001 measured the same as 0.003 on the logistic regression.
DEFAULT_Q_FLOOR = 0.003
#: Default winsorisation of the scores, in units of the round's median ``|score|``.
DEFAULT_SCORE_CLIP = 3.0
#: Default width of the relative level: ``median(Z) - 2 MADn(Z)`` where that is below ``-z_exclude``.
DEFAULT_RELATIVE = 2.0


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
    average.  The evidence is the discounted, normalised sum
    ``Z_i = S_i / sqrt(Q_i + q_floor median_j Q_j)`` with ``S_i <- gamma S_i + s_i``, ``Q_i <- gamma Q_i + s_i^2``
    (the median over the round's nodes with enough scores: the floor keeps ``Z`` in the population's
    units, so a node whose scores are all near zero gets ``Z ~ 0``, not a ratio of rounding noise)
    (``gamma`` forgets old rounds, so a sleeper that turns is caught within a window of about
    ``1 / (1 - gamma)`` rounds).  A node with at least ``min_rounds`` scores and
    ``Z_i < -z_exclude``, or the same statistic over a short window (``gamma_short``) below
    ``-z_short`` (a sleeper whose long honest history keeps ``Z_i`` up), is *suspected*; the decision is re-made every round from the
    evidence, so a node that behaves again is readmitted.

    ``Z`` is a t-like statistic: for a zero-mean score sequence ``P(Z < -4)`` is tiny, and an
    honest client's (positive-mean) scores push it the other way, so honest minority clients,
    whose gradients look unusual but are still gradients, keep their voice.
    """

    def __init__(self, gamma: float = 0.95, z_exclude: float = DEFAULT_Z_EXCLUDE, min_rounds: int = 5,
                 gamma_short: float = 0.8, z_short: float = 2.0, score_clip: float | None = DEFAULT_SCORE_CLIP,
                 relative: float | None = DEFAULT_RELATIVE, q_floor: float | None = DEFAULT_Q_FLOOR,
                 relative_above: bool = True) -> None:
        self.relative_above = bool(relative_above)
        if q_floor is not None and not (np.isfinite(q_floor) and q_floor >= 0):
            raise ValueError(f"q_floor must be a non-negative finite number or None, got {q_floor!r}")
        self.q_floor = None if q_floor is None else float(q_floor)
        if relative is not None and not (np.isfinite(relative) and relative > 0):
            raise ValueError(f"relative must be a positive finite number or None, got {relative!r}")
        self.relative = None if relative is None else float(relative)
        if score_clip is not None and not (np.isfinite(score_clip) and score_clip > 0):
            raise ValueError(f"score_clip must be a positive finite number or None, got {score_clip!r}")
        self.score_clip = None if score_clip is None else float(score_clip)
        if not (np.isfinite(gamma) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if not np.isfinite(z_exclude):
            raise ValueError(f"z_exclude must be a finite number, got {z_exclude!r}")
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
        self.level = -self.z_exclude
        self.floor = (0.0, 0.0)  # the last round's population floors of Q and Q_short
        self._last = _RowTable()
        self._pos: dict[int, int] = {}  # node id -> row of the statistics
        self._stats = np.zeros((0, 4))  # per node: S, Q, S_short, Q_short
        self._count = np.zeros(0, dtype=np.int64)  # per node: number of scores
        self._unscored: set[int] = set()  # nodes whose next reply is not scored (observe_changes: last one anomalous)
        self._dim: int | None = None  # the replies' length seen by observe_changes

    def _rows_of(self, ids: Sequence[int], create: bool = False) -> np.ndarray:
        """Rows of ``ids`` in the statistics (-1 for a node without any; ``create`` adds them)."""
        if create:
            new = list(dict.fromkeys(int(i) for i in ids if int(i) not in self._pos))
            if new:
                n0 = len(self._pos)
                self._pos.update((node, n0 + k) for k, node in enumerate(new))
                if len(self._pos) > self._count.size:
                    cap = max(len(self._pos), 2 * self._count.size)
                    self._stats = np.concatenate([self._stats, np.zeros((cap - self._count.size, 4))])
                    self._count = np.concatenate([self._count, np.zeros(cap - self._count.size, dtype=np.int64)])
        return np.fromiter((self._pos.get(int(i), -1) for i in ids), dtype=np.intp, count=len(ids))

    @staticmethod
    def _ratio(S: np.ndarray, Q: np.ndarray, floor: float = 0.0) -> np.ndarray:
        """``S / sqrt(Q + floor)`` where that is positive, else 0."""
        Qf = Q + floor
        pos = Qf > 0
        return np.where(pos, S / np.sqrt(np.where(pos, Qf, 1.0)), 0.0)

    def _z_long(self, st: np.ndarray) -> np.ndarray:
        return self._ratio(st[:, 0], st[:, 1], self.floor[0])

    def _z_short(self, st: np.ndarray) -> np.ndarray:
        return self._ratio(st[:, 2], st[:, 3], self.floor[1])

    def z_values(self, ids: Sequence[int]) -> np.ndarray:
        """``Z_i = S_i / sqrt(Q_i + floor)`` of every node of ``ids`` (0 without evidence; the last round's floor)."""
        k = self._rows_of(ids)
        if not self._count.size:
            return np.zeros(len(ids))
        st = self._stats[np.maximum(k, 0)]
        return np.where(k >= 0, self._z_long(st), 0.0)

    def suspected_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Boolean mask over ``ids``: the nodes whose evidence is below the round's level, vectorised.

        The long window's level is ``min(-z_exclude, median(Z) - relative * MADn(Z))`` over the nodes
        of ``ids`` with at least ``min_rounds`` scores (``-z_exclude`` with fewer than 5 of them, or
        ``relative=None``; with ``relative_above``, over those of them at or above ``-z_exclude`` when they are a
        majority: :meth:`_level`): where the honest majority's own evidence is low and spread (a non-convex
        model's first rounds) the level follows it down, so honest nodes are not excluded for the
        model's curvature; it is never stricter than ``-z_exclude``.  Kept in :attr:`level`.

        ``Z`` is normalised with the population floor ``q_floor * median(Q)`` over the same nodes (each
        window its own), kept in :attr:`floor`: a node's evidence is measured in the population's units,
        so scores at rounding level give ``Z = 0``, not a ratio of rounding noise.
        """
        k = self._rows_of(ids)
        if not self._count.size:
            return np.zeros(len(ids), dtype=bool)
        kk = np.maximum(k, 0)
        st = self._stats[kk]
        enough = (k >= 0) & (self._count[kk] >= self.min_rounds)
        if self.q_floor is not None and enough.any():
            self.floor = (self.q_floor * median_of(st[enough, 1]), self.q_floor * median_of(st[enough, 3]))
        z_long = self._z_long(st)
        self.level = self._level(z_long[enough])
        return enough & ((z_long < self.level) | (self._z_short(st) < -self.z_short))

    def _level(self, z: np.ndarray) -> float:
        """The long window's exclusion level for a round whose eligible nodes have evidence ``z``.

        ``relative_above`` (default): the median and MADn are those of the nodes at or above ``-z_exclude`` when they
        are a majority (at least 5 of them), the honest bulk without the nodes the fixed level suspects.  A cluster of
        suspects below it (sign flippers: a quarter of 40 nodes at Z ~ -2 while the honest sit at 1-4) then cannot
        widen the MADn enough to carry the level below itself, and no node lowers the level by sitting below it.
        Where most nodes are below ``-z_exclude`` (a non-convex model's first rounds) all of them set it, as before."""
        if self.relative is None or z.size < 5:
            return -self.z_exclude
        if self.relative_above:
            above = z[z >= -self.z_exclude]
            if 2 * above.size > z.size and above.size >= 5:
                z = above
        med = median_of(z)
        madn = 1.4826 * median_of(np.abs(z - med))
        return min(-self.z_exclude, med - self.relative * madn)

    def z(self, node_id: int) -> float:
        """``Z_i`` of a node (0 without evidence)."""
        return float(self.z_values([node_id])[0])

    def z_recent(self, node_id: int) -> float:
        """The same statistic over a short window (discount ``gamma_short``): reacts to a change."""
        k = self._pos.get(int(node_id))
        if k is None:
            return 0.0
        return float(self._z_short(self._stats[k : k + 1])[0])

    def suspected(self, node_id: int) -> bool:
        """Whether the evidence against ``node_id`` is over the exclusion level (long or short window).

        The long window's level is the last round's :attr:`level` (``-z_exclude`` before any round).
        """
        k = self._pos.get(int(node_id))
        if k is None or self._count[k] < self.min_rounds:
            return False
        st = self._stats[k : k + 1]
        return bool(self._z_long(st)[0] < self.level or self._z_short(st)[0] < -self.z_short)

    def observe(self, G: np.ndarray, ids: Sequence[int], delta: np.ndarray | None, skip: Sequence[int] = ()) -> None:
        """Score this round's rows against the previous ones along the last step ``delta``.

        ``delta`` is ``x_t - x_{t-1}`` (the step taken since the previous call), or ``None``
        when no step was taken (the rows are then only remembered).  Rows in ``skip`` (replies the
        round found anomalous: gross outliers, jumps) are neither scored nor remembered, so neither
        this reply nor the node's next one is scored against an anomaly: a mobile adversary that
        corrupts an honest node for one round cannot plant evidence against it.  Scores are
        winsorised at ``score_clip`` times the round's median ``|score|``.  One blocked pass over
        ``G`` and the remembered rows in ``G``'s dtype (:func:`~.streaming.diff_stats_and_store`):
        the differences' norms and projections (accumulated in float64), and the store of ``G``.
        """
        G = np.asarray(G)
        if not np.issubdtype(G.dtype, np.floating):
            G = G.astype(np.float64)
        ids = [int(i) for i in ids]
        if self._last.dim is not None and self._last.dim != G.shape[1]:
            self.reset()
        step_norm = float(np.linalg.norm(delta)) if delta is not None else 0.0
        scoring = delta is not None and step_norm > 0 and np.isfinite(step_norm)
        rows = np.array([r for r, node in enumerate(ids) if node in self._last.index] if scoring else [],
                        dtype=np.intp)
        prev = self._last.slots([ids[r] for r in rows])
        seen = set(ids)
        # absent this round: its last vector is no longer comparable
        self._last.drop([node for node in self._last.index if node not in seen])
        slots = self._last.assign(ids, G.shape[1], G.dtype)
        table = self._last.rows
        u = (np.asarray(delta) / step_norm).astype(table.dtype, copy=False) if rows.size else None
        sq, dots = diff_stats_and_store(G, table, rows, prev, slots, u)
        skip_set = {int(r) for r in skip}
        if skip_set:  # an anomalous reply is not remembered, whether or not this round scores
            self._last.drop([ids[r] for r in skip_set])
        self._unscored = set()
        self._score(ids, rows, sq, dots, skip_set)

    def observe_changes(self, ids: Sequence[int], rows: Sequence[int], sq: np.ndarray, dots: np.ndarray,
                        skip: Sequence[int] = (), dim: int | None = None) -> None:
        """Score this round from changes the caller has taken: ``sq[k] = ||g_i(t) - r_i||^2`` and ``dots[k] = <g_i(t) -
        r_i, delta / |delta|>`` for row ``rows[k]`` (node ``ids[rows[k]]``), ``r_i`` the node's previous reply as the
        caller remembers it (the default defence: the self-reference's reference, the last reply after its
        clipping, :meth:`~.temporal.SelfReference.apply`'s ``change_along``), so that no table of last replies is
        kept: it is emptied here.

        The scores are :meth:`observe`'s; rows in ``skip`` are not scored, nor are their nodes' next replies (their
        references hold an anomaly: a jump, or a gross reply's, which the self-reference forgets anyway).  ``dim``
        (the replies' length): a change of it forgets everything, as in :meth:`observe`.
        """
        if dim is not None:
            if self._dim is not None and self._dim != int(dim):
                self.reset()
            self._dim = int(dim)
        ids = [int(i) for i in ids]
        if len(self._last):
            self._last.clear()
        skip_set = {int(r) for r in skip}
        unscored, self._unscored = self._unscored, {ids[r] for r in skip_set}
        keep = [k for k, r in enumerate(rows) if ids[int(r)] not in unscored]
        rows_arr = np.asarray([int(rows[k]) for k in keep], dtype=np.intp)
        self._score(ids, rows_arr, np.asarray(sq, dtype=np.float64)[keep], np.asarray(dots, dtype=np.float64)[keep],
                    skip_set)

    def _score(self, ids: list[int], rows: np.ndarray, sq: np.ndarray, dots: np.ndarray, skip_set: set[int]) -> None:
        """Fold the scores ``s = dots / median(sqrt(sq))`` (winsorised) of ``rows`` not in ``skip_set`` into the
        nodes' statistics."""
        if not rows.size:
            return
        scale = median_of(np.sqrt(sq))
        if not (scale > 0 and np.isfinite(scale)):
            return
        s = dots / scale
        m = median_of(np.abs(s))
        if self.score_clip is not None and m > 0:
            s = np.clip(s, -self.score_clip * m, self.score_clip * m)
        if skip_set:
            keep = np.array([r not in skip_set for r in rows], dtype=bool)
            rows, s = rows[keep], s[keep]
            if not rows.size:
                return
        k = self._rows_of([ids[r] for r in rows], create=True)
        st = self._stats[k]
        st[:, 0] = self.gamma * st[:, 0] + s
        st[:, 1] = self.gamma * st[:, 1] + s * s
        st[:, 2] = self.gamma_short * st[:, 2] + s
        st[:, 3] = self.gamma_short * st[:, 3] + s * s
        self._stats[k] = st
        self._count[k] += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"ids", "S", "Q", "n", "last_ids", "last"}`` (plain lists and one ``(m, d)`` array)."""
        ids = sorted(self._pos)
        k = self._rows_of(ids)
        st = self._stats[k] if ids else np.zeros((0, 4))
        last_ids = sorted(self._last.index)
        d = self._last.dim or 0
        return {
            "gamma": self.gamma, "z_exclude": self.z_exclude, "min_rounds": self.min_rounds, "level": self.level,
            "floor": [float(self.floor[0]), float(self.floor[1])],
            "ids": ids, "S": st[:, 0].tolist(), "Q": st[:, 1].tolist(),
            "S_short": st[:, 2].tolist(), "Q_short": st[:, 3].tolist(),
            "n": [int(c) for c in self._count[k]] if ids else [], "last_ids": last_ids,
            "unscored": sorted(int(i) for i in self._unscored),
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
            last = _floating(state["last"])
            level = float(state.get("level", -self.z_exclude))  # absent in checkpoints before the relative level
            floor = tuple(float(v) for v in state.get("floor", (0.0, 0.0)))  # absent before the population floor
            unscored = {int(i) for i in state.get("unscored", [])}  # absent before observe_changes
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed evidence state: {exc}") from exc
        if not np.isfinite(level):
            raise ValueError("malformed evidence state: non-finite level")
        if len(floor) != 2 or not all(np.isfinite(v) and v >= 0 for v in floor):
            raise ValueError("malformed evidence state: floor must be two non-negative numbers")
        if not (len(ids) == len(S) == len(Q) == len(n) == len(S2) == len(Q2)) or last.ndim != 2 or last.shape[0] != len(last_ids):
            raise ValueError("malformed evidence state: lengths disagree")
        if not all(np.isfinite(v).all() for v in (S, Q, S2, Q2, last)) or min(Q + Q2, default=0) < 0:
            raise ValueError("malformed evidence state: non-finite or negative values")
        self.reset()
        if ids:
            k = self._rows_of(ids, create=True)
            self._stats[k] = np.column_stack([S, Q, S2, Q2])
            self._count[k] = n
        if last_ids:
            self._last.put(last_ids, last)
        self.level = level
        self.floor = (floor[0], floor[1])
        self._unscored = unscored

"""Self-reference clipping: each node's reply may move only a little from its own last reply.

A single round cannot tell an attacker from an honest client with unusual data, and on
heterogeneous clients the honest spread -- hence the radius of any cross-sectional clipping --
is dominated by the clients' *different* data.  A node's reply compared with *its own* previous
reply has no such term: for an honest client ``g_i(t) - g_i(t-1) = H_i (x_t - x_{t-1}) + noise``,
the same small change for every client (up to curvature), whatever its data.  So for every node
that replied in the previous call,

    delta_i = g_i(t) - r_i,     drift = coordinate-wise median_i delta_i,
    v_i     = r_i + drift + clip(delta_i - drift, scale * median_j |delta_j - drift|)

and ``r_i <- v_i`` (the clipped value is what is remembered, so a node can move its reference by
at most the radius per round).  A *mobile* adversary, which corrupts nodes that were honest in the
previous round (Data & Diggavi 2021, Sec. 2.1; :class:`~flwr_byzantine.attacks.MobileAdversary`),
can then move the estimate by at most ``(f / R) * scale * median_j |delta_j - drift|`` per round,
the clients' noise level, instead of ``(f / R)`` times the heterogeneity-dominated cross-sectional
radius (Karimireddy, He, Jaggi 2021, centered clipping, Section 4, applied per node along time).
Nodes seen for the first time (or absent in the previous call) pass unchanged and start a
reference.  The drift and the radius are medians over the nodes with a reference, so fewer than
half of them cannot set either.  A change far beyond the round's typical one *and* beyond the node's own
typical one is a *jump* (a sleeper waking up, a node the mobile adversary has just taken): the default
defence leaves that reply out of the round, and the node's reference keeps following the common drift only.
The node's own scale matters where the clients' noise differs: clients with a few dozen examples send
full-batch gradients, which change only with the model, while the others' mini-batch noise is several times
the round's median change (40 digits clients at Dirichlet alpha 0.3: 22 of them full-batch, the other 18
"jumped" every round against the median alone, and the largest clients were left out for good).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .memory import _RowTable
from .streaming import as_index, clip_to_references, median_of, reference_deviation_stats

#: Default radius, in units of the round's median distance of a node's change to the common drift.
DEFAULT_SELF_CLIP_SCALE = 1.0
#: Default jump level: a change this many times the round's median change is a jump.
DEFAULT_JUMP_FACTOR = 4.0
#: Default burn-in: for its first rounds a node's reference follows its clipped reply even after a jump.
DEFAULT_BURN_IN = 5
#: A node's own change scale is the median of its last ``SPREAD_WINDOW`` changes (:attr:`SelfReference.spreads`) ...
SPREAD_WINDOW = 9
#: ... once it has at least ``SPREAD_MIN`` of them (before that, the round's median change alone): one change in three
#: taken by an adversary does not move a median.
SPREAD_MIN = 3



@dataclass(frozen=True)
class DeferredClip:
    """The self-reference's clipping that :meth:`SelfReference.apply` with ``defer`` leaves to its caller's pass:
    row ``rows[k]`` of ``G`` (the round's rows) becomes ``(T[slots[k]] + drift) + ((G[rows[k]] - T[slots[k]]) - drift)
    * factors[k]``, stored into the references' table ``T`` (``drift`` and ``factors`` in the table's dtype)."""

    G: np.ndarray
    rows: np.ndarray
    slots: np.ndarray
    drift: np.ndarray
    factors: np.ndarray


class SelfReference:
    """Per-node reference vectors and the self-reference clipping of the module docstring.

    Parameters
    ----------
    scale:
        Radius of the clipping, in units of the round's median ``|delta_i - drift|``.
    min_rows:
        Fewest nodes with a reference needed to clip (below it every row passes unchanged).
    jump_factor:
        A change ``|delta_i - drift|`` above ``jump_factor`` times the larger of the round's median change and
        the node's own scale (:attr:`spreads`) is a *jump*: reported in ``info["jumped"]`` (row indices) and
        ``info["jump_ratio"]`` (the change over that scale), and the node's reference then follows only the
        common drift (``r_i <- r_i + drift``), so a node cannot drag its reference along with a jump; ``None``
        disables it.  A node's own scale is the median of its last :data:`SPREAD_WINDOW` changes (from
        :data:`SPREAD_MIN` of them on) in the rounds it did not jump and in its reference's first ``burn_in``
        rounds: a client whose mini-batch noise is larger than most (the others full-batch, or with less varied
        data) is judged by its own changes, and a node a mobile adversary takes over, or a sleeper that wakes,
        still jumps from its honest history.  A median, not a mean: a mobile adversary that holds a node in one
        of its first rounds (a jump, followed during the burn-in) does not raise the node's scale.
    own_scale:
        ``False``: a jump is judged against the round's median change alone (the seventeenth landing's rule, the
        robustness benchmark's ablation ``rge/jump-median``); the nodes' own scales are then not kept.
    own_cap:
        A node's own scale counts up to this quantile of the round's nodes' own scales (``None``: uncapped).  The
        default defence passes ``1 - eps_tilde``: the Byzantine nodes, at most that share, cannot set the cap, so an
        attacker that sends noise to raise its own scale (a noisy sleeper) is still judged at the honest nodes'
        level, while honest clients noisier than most (more than ``eps_tilde`` of them) keep theirs.
    burn_in:
        For the first ``burn_in`` rounds of a node's reference a jump is followed like any change
        (the reference becomes the clipped reply): a reference set from a corrupt first reply (a
        mobile adversary holding the node when the server first sees it) would otherwise stay
        poisoned, and the honest node would jump in every later round.  0: never.
    """

    def __init__(self, scale: float = DEFAULT_SELF_CLIP_SCALE, min_rows: int = 3,
                 jump_factor: float | None = DEFAULT_JUMP_FACTOR, burn_in: int = DEFAULT_BURN_IN,
                 own_scale: bool = True, own_cap: float | None = 0.75) -> None:
        self.own_scale = bool(own_scale)
        if own_cap is not None and not (np.isfinite(own_cap) and 0.5 <= own_cap <= 1.0):
            raise ValueError(f"own_cap must be a quantile in [0.5, 1] or None, got {own_cap!r}")
        self.own_cap = None if own_cap is None else float(own_cap)
        if isinstance(burn_in, bool) or int(burn_in) != burn_in or burn_in < 0:
            raise ValueError(f"burn_in must be a non-negative integer, got {burn_in!r}")
        self.burn_in = int(burn_in)
        self.ages: dict[int, int] = {}  # node id -> rounds its reference has been kept
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if isinstance(min_rows, bool) or int(min_rows) != min_rows or min_rows < 2:
            raise ValueError(f"min_rows must be an integer >= 2, got {min_rows!r}")
        self.scale = float(scale)
        self.min_rows = int(min_rows)
        if jump_factor is not None and not (np.isfinite(jump_factor) and jump_factor > 1):
            raise ValueError(f"jump_factor must be a finite number > 1 or None, got {jump_factor!r}")
        self.jump_factor = None if jump_factor is None else float(jump_factor)
        self.refs = _RowTable()
        #: node id -> its last changes ``|delta_i - drift|`` (oldest first, at most :data:`SPREAD_WINDOW`); their
        #: median is the node's own scale (:meth:`own_scales`)
        self.spreads: dict[int, list[float]] = {}
        # references that follow only the drift (mature jumps), left to :meth:`settle` by an ``into_table`` call
        self._pending: tuple[list[int], np.ndarray] | None = None
        # the clipping a ``defer`` call left to the caller's pass (:meth:`deferred`, :meth:`finish_clip`)
        self._deferred: DeferredClip | None = None

    def reset(self) -> None:
        """Forget every node's reference."""
        self.refs = _RowTable()
        self.ages = {}
        self.spreads = {}
        self._pending = None
        self._deferred = None

    def deferred(self) -> DeferredClip | None:
        """The clipping the last :meth:`apply` with ``defer`` left to the caller (``None`` when it clipped nothing, or
        :meth:`finish_clip` has run)."""
        return self._deferred

    def finish_clip(self, done: Sequence[int] = ()) -> None:
        """Clip and store the deferred rows (:meth:`apply` with ``defer``) that the caller's pass has not (``done``:
        row indices it clipped into the table, e.g. the memories' fold with ``self_clip``): the rows as
        :func:`~.streaming.clip_to_references` with ``store`` writes them.  Called by :meth:`settle` too, for every
        row not yet clipped; a no-op without a deferred clipping."""
        plan, self._deferred = self._deferred, None
        if plan is None:
            return
        done_set = {int(r) for r in done}
        rest = [k for k, r in enumerate(plan.rows.tolist()) if r not in done_set]
        if rest:
            rest_idx = np.asarray(rest, dtype=np.intp)
            clip_to_references(None, plan.G, plan.rows[rest_idx], self.refs.rows, plan.slots[rest_idx], plan.drift,
                               plan.factors[rest_idx], store=True)

    def settle(self) -> None:
        """Finish the last :meth:`apply` with ``into_table``: its deferred clipping, if the caller has not finished it
        (:meth:`finish_clip`), then its jumped nodes' references, which held their clipped rows for the caller to
        read, now follow only the common drift.  Called by the next :meth:`apply` and by :meth:`state_dict` too; a
        no-op otherwise."""
        self.finish_clip()
        if self._pending is None:
            return
        ids, values = self._pending
        self._pending = None
        keep = [k for k, node in enumerate(ids) if node in self.refs.index]  # a node forgotten since stays forgotten
        if len(keep) == len(ids):  # every one (the usual case): no gathered copy of the rows
            self.refs.put(ids, values)
        elif keep:
            self.refs.put([ids[k] for k in keep], values[keep])

    def __len__(self) -> int:
        return len(self.refs)

    def apply(self, G: np.ndarray, ids: Sequence[int], skip: Sequence[int] = (),
              out: np.ndarray | None = None, drift_rows: int | None = None,
              rng: np.random.Generator | None = None, centre: np.ndarray | None = None,
              change_along: np.ndarray | None = None, into_table: bool = False, drift_groups: int = 1,
              defer: bool = False) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Clip the rows of ``G`` (node ``ids[r]`` for row ``r``) against their references.

        Rows in ``skip`` (e.g. gross outliers dropped this round) are returned unchanged, do not
        enter the drift or the radius, and their node's reference is forgotten.  Every other
        node's reference becomes its (clipped) row.  Returns ``(V, info)``; ``V`` is ``out`` when
        given (an array of ``G``'s shape and dtype, e.g. a buffer the caller reuses every round).
        ``drift_rows`` (with ``rng``, the caller's private generator): when more nodes than that have a
        reference, the drift is the coordinate-wise median of ``drift_rows`` of them drawn at random
        (its cost falls with the sample; the radius and the jumps still see every node); ``None``: all.
        ``drift_groups`` (odd, with ``drift_rows``): the sample is that many groups of ``drift_rows // drift_groups``
        nodes, drawn in a random order, and the drift is the coordinate-wise median of the groups' medians (a group of
        31 runs the unrolled network: the drift of 217 nodes in 7 groups costs about a third of the median of 127 at
        R = 1000); with fewer nodes than the groups need, two groups fewer at a time, down to one group
        (``info["drift_groups"]``).
        ``centre`` (a vector of ``G``'s dtype): ``info["centre_sq"]`` holds every returned row's squared distance
        to it, ``||V[r] - centre||^2`` (float64): for a clipped row ``a + f e`` (``a = (r_i + drift) - centre``,
        ``e`` its deviation, ``f`` its factor) taken as ``||a||^2 + 2 f <a, e> + f^2 ||e||^2`` from sums of the
        deviations' pass (:func:`~.streaming.reference_deviation_stats` with ``centre``; agrees with the distance of
        the written row to about 1e-7 of the terms for float32 rows), known before the rows are written; for the
        others :func:`~.kernels.centre_sq_distances`' sums.
        ``change_along`` (a unit vector): the pass that takes the deviations also takes every such row's change from
        its reference, ``info["change_rows"]`` (row indices), ``info["change_sq"]`` (``||G[r] - r_i||^2``) and
        ``info["change_dots"]`` (``<G[r] - r_i, change_along>``), float64, before any reference changes (the default
        defence's monotonicity evidence, :meth:`~.memory.MonotonicityEvidence.observe_changes`).
        ``into_table`` (when the references' table holds ``G``'s dtype): the rows are not written out (one write of
        the rows fewer) and ``V`` is ``None``: every row not in ``skip`` of a node with a reference is left as row
        ``self.refs.slots([ids[r]])`` of ``self.refs.rows`` until :meth:`settle`, which the caller calls once it has
        read them (a jumped node's reference then follows the drift only).  A new node's row (``info["new_rows"]``,
        returned unchanged) is not stored then: the caller stores the references of those it keeps with :meth:`adopt`
        (a reply the round does not keep gives no reference, :meth:`forget`; storing every new row first cost a copy
        of each persistent attacker's reply every round, issue 12).  Otherwise ``V`` is returned as above.
        ``defer`` (with ``into_table``): the clipped rows are not written either: the clipping (its rows, their
        references' slots, the drift and the factors, :meth:`deferred`) is left to the caller's pass over the rows,
        which clips them into the table as it reads them (the worker momentum's fold, one pass for both: issue 12, the
        thirtieth landing), and :meth:`finish_clip` (or :meth:`settle`) clips the rest; until then the table holds the
        old references.
        """
        self.settle()
        G = np.asarray(G)
        ids = [int(i) for i in ids]
        if self.refs.dim is not None and self.refs.dim != G.shape[1]:
            self.reset()
        into_table = bool(into_table) and self.refs.keeps(G.dtype)
        skip_set = {int(r) for r in skip}
        rows = [r for r, node in enumerate(ids) if r not in skip_set and node in self.refs.index]
        info: dict[str, Any] = {"self_clipped": 0, "self_radius": float("nan"), "self_rows": len(rows), "jumped": []}
        V = None if into_table else np.empty_like(G) if out is None else out
        vtype = G.dtype if V is None else V.dtype
        centre_sq = None if centre is None else np.empty(len(ids))
        copied = False  # the rows `rows` are written by the clipping; the others are copied from G
        stored = False  # the clipping also wrote the rows `rows` into their references
        jump_fix: tuple[list[int], np.ndarray] | None = None  # references that follow only the drift
        if len(rows) >= self.min_rows:
            # streamed in blocks (:mod:`.streaming`): ref = the references, dev = G[rows] - ref - drift
            slots = self.refs.slots([ids[r] for r in rows])
            sample = None
            groups = int(drift_groups)
            if groups < 1 or groups % 2 == 0:
                raise ValueError(f"drift_groups must be a positive odd number, got {drift_groups}")
            if drift_rows is not None:
                size = int(drift_rows) // groups
                while groups > 1 and len(rows) < size * groups:
                    groups -= 2
                if groups > 1:  # the groups in the sample's (random) order: no client's position picks its group
                    sample = (rng or np.random.default_rng()).choice(len(rows), size=size * groups, replace=False)
                    info["drift_rows"], info["drift_groups"] = size * groups, groups
                elif len(rows) > size:
                    sample = np.sort((rng or np.random.default_rng()).choice(len(rows), size=size, replace=False))
                    info["drift_rows"] = size
            stats = reference_deviation_stats(G, np.asarray(rows), self.refs.rows, slots, sample, change_along,
                                              groups=groups if sample is not None else 1, centre=centre)
            drift, dev_sq = stats[0], stats[1]
            if change_along is not None:
                info.update(change_rows=list(rows), change_sq=stats[2], change_dots=stats[3])
            dist = np.sqrt(dev_sq)
            radius = self.scale * median_of(dist)
            if radius > 0 and np.isfinite(radius):
                factors = np.minimum(1.0, radius / np.maximum(dist, 1e-300))
                # the clipped rows become their nodes' references in the same pass (when the table keeps their
                # dtype); a mature jump's reference is read before that, below, and patched after the store
                stored = self.refs.rows.dtype == vtype  # always so into_table
                if self.jump_factor is not None:
                    level = np.full(len(rows), median_of(dist))
                    if self.own_scale:  # the round's typical change, or the node's own where that is larger
                        own = self.own_scales([ids[r] for r in rows])
                        known = own[own > 0]
                        if self.own_cap is not None and known.size:  # up to the population's quantile
                            np.minimum(own, float(np.quantile(known, self.own_cap)), out=own)
                        np.maximum(level, own, out=level)
                    jump = dist > self.jump_factor * level
                    if self.own_scale:
                        self._update_spreads([ids[r] for r in rows], dist, jump)
                    if jump.any():
                        jr = [rows[k] for k in np.flatnonzero(jump)]
                        # a mature reference only follows the drift; a young one (its first burn_in
                        # rounds) follows the clipped reply, so a reference poisoned at first sight recovers
                        mature = np.array([self.ages.get(ids[r], 0) >= self.burn_in for r in jr], dtype=bool)
                        if mature.any():  # stored after this round's rows, below
                            # the mature jumps' references plus the drift: one gather and an add in place (each fresh
                            # (n, d) temporary costs its page faults; the values are those of (rows + drift)[mature])
                            fix = self.refs.rows[slots[jump][mature]]
                            if fix.dtype == np.result_type(fix.dtype, drift.dtype):
                                np.add(fix, drift, out=fix)
                            else:
                                fix = fix + drift
                            jump_fix = ([ids[r] for r, m in zip(jr, mature) if m], fix.astype(vtype, copy=False))
                        info["jumped"] = [int(r) for r in jr]
                        info["jump_ratio"] = [float(x) for x in dist[jump] / np.maximum(level[jump], 1e-300)]
                if centre_sq is not None:  # a + f e away from the centre (the docstring): before any row is written
                    f = factors.astype(vtype).astype(np.float64)
                    base, cross = stats[-2], stats[-1]
                    centre_sq[rows] = np.maximum(base + 2.0 * f * cross + f * f * dev_sq, 0.0)
                if defer and V is None:  # the caller's pass clips them (deferred, finish_clip)
                    self._deferred = DeferredClip(G, np.asarray(rows, dtype=np.intp), np.asarray(slots, dtype=np.intp),
                                                  np.ascontiguousarray(drift, dtype=vtype),
                                                  np.ascontiguousarray(factors, dtype=vtype))
                else:
                    # ref + drift + dev * f
                    clip_to_references(V, G, np.asarray(rows), self.refs.rows, slots, drift, factors, store=stored)
                copied = True
                info.update(self_clipped=int(np.sum(factors < 1.0)), self_radius=radius)
        others = np.setdiff1d(np.arange(len(ids)), rows if copied else [])
        if V is not None:
            for r in others:  # row by row: no gathered temporary
                V[r] = G[r]
        if centre_sq is not None:
            if others.size:
                from .kernels import centre_sq_distances

                sq = np.empty(others.size)
                centre_sq_distances(G if V is None else V, others.astype(np.intp),
                                    np.ascontiguousarray(centre, dtype=vtype), sq)
                centre_sq[others] = sq
            info["centre_sq"] = centre_sq
        info["new_rows"] = [r for r, node in enumerate(ids) if r not in skip_set and node not in self.refs.index]
        seen = [r for r in range(len(ids)) if r not in skip_set]
        present = {ids[r] for r in seen}
        self.refs.drop([node for node in self.refs.index if node not in present])
        for node in list(self.ages):
            if node not in self.refs.index:
                del self.ages[node]
        for node in list(self.spreads):
            if node not in self.refs.index:
                del self.spreads[node]
        for r in seen:
            self.ages[ids[r]] = self.ages.get(ids[r], -1) + 1 if ids[r] in self.refs.index else 0
        if stored:  # the clipped rows are stored already: only the others (new nodes)
            done = set(rows)
            seen = [r for r in seen if r not in done]
        if V is None:  # into the table: a new node's reference waits for adopt()
            seen = [r for r in seen if ids[r] in self.refs.index]
        if seen:
            self.refs.put([ids[r] for r in seen], (G if V is None else V)[as_index(np.asarray(seen))])
        if jump_fix is not None:
            if V is None:  # the clipped rows stay in the table until the caller has read them
                self._pending = jump_fix
            else:
                self.refs.put(*jump_fix)
        return V, info

    def own_scales(self, nodes: Sequence[int]) -> np.ndarray:
        """The nodes' own change scales: the median of each node's last changes (0 below :data:`SPREAD_MIN`)."""
        out = np.zeros(len(nodes))
        for k, node in enumerate(nodes):
            window = self.spreads.get(node)
            if window is not None and len(window) >= SPREAD_MIN:
                out[k] = statistics.median(window)  # (a window of at most 9: no array)
        return out

    def _update_spreads(self, nodes: list[int], dist: np.ndarray, jump: np.ndarray) -> None:
        """Add this round's changes to the nodes' windows: every change of a node in its reference's first
        ``burn_in`` rounds, afterwards the changes that were not jumps (a jump does not raise the level it is
        judged by)."""
        for node, x, j in zip(nodes, dist.tolist(), jump.tolist()):
            if j and self.ages.get(node, 0) >= self.burn_in:
                continue
            window = self.spreads.setdefault(node, [])
            window.append(x)
            if len(window) > SPREAD_WINDOW:
                del window[0]

    def adopt(self, node_ids: Sequence[int], rows: np.ndarray) -> None:
        """Store ``rows[k]`` as the reference of ``node_ids[k]``: the new nodes of an :meth:`apply` call with
        ``into_table`` whose replies the caller keeps (their rows as that call returned them, unchanged)."""
        if len(node_ids):
            self.refs.put([int(n) for n in node_ids], np.asarray(rows))

    def forget(self, node_ids: Sequence[int]) -> None:
        """Drop the references of ``node_ids`` (they start fresh when they next reply)."""
        self.refs.drop([int(n) for n in node_ids if int(n) in self.refs.index])
        for n in node_ids:
            self.ages.pop(int(n), None)
            self.spreads.pop(int(n), None)

    def state_dict(self) -> dict[str, Any]:
        """``{"scale", "jump_factor", "ids", "ages", "spreads", "refs"}``: plain values per node (in the order of
        ``ids``; ``spreads``: each node's window of last changes, a list) and one ``(m, d)`` array."""
        self.settle()
        ids = sorted(self.refs.index)
        d = self.refs.dim or 0
        return {"scale": self.scale, "jump_factor": self.jump_factor, "ids": ids,
                "ages": [int(self.ages.get(i, self.burn_in)) for i in ids],
                "spreads": [[float(x) for x in self.spreads.get(i, [])] for i in ids],
                "refs": self.refs.get(ids).copy() if ids else np.zeros((0, d))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` on anything malformed (nothing changes then)."""
        try:
            ids = [int(i) for i in state["ids"]]
            # checkpoints written before the burn-in have no ages: their references count as mature
            ages = [int(a) for a in state.get("ages", [self.burn_in] * len(ids))]
            # checkpoints written before the nodes' own scales have none: every node starts from the round's median
            spreads = [[float(x) for x in w] for w in state.get("spreads", [[]] * len(ids))]
            refs = np.asarray(state["refs"])
            if refs.dtype.kind != "f":  # a checkpoint keeps the rounds' float dtype; anything else -> float64
                refs = refs.astype(np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed self-reference state: {exc}") from exc
        if refs.ndim != 2 or refs.shape[0] != len(ids) or len(set(ids)) != len(ids) or len(ages) != len(ids) \
                or min(ages, default=0) < 0 or len(spreads) != len(ids):
            raise ValueError("malformed self-reference state: ids and refs disagree")
        if not all(len(w) <= SPREAD_WINDOW and all(np.isfinite(x) and x >= 0 for x in w) for w in spreads):
            raise ValueError("malformed self-reference state: a node's window of changes is longer than "
                             f"{SPREAD_WINDOW} or holds a negative or non-finite number")
        if not np.isfinite(refs).all():
            raise ValueError("malformed self-reference state: non-finite reference")
        table = _RowTable()
        if ids:
            table.put(ids, refs)
        self.refs = table
        self.ages = dict(zip(ids, ages))
        self.spreads = {i: w for i, w in zip(ids, spreads) if w}
        self._pending = None


__all__ = ["DEFAULT_BURN_IN", "DEFAULT_JUMP_FACTOR", "DEFAULT_SELF_CLIP_SCALE", "SPREAD_MIN", "SPREAD_WINDOW", "SelfReference"]

"""The defence-aware attack: the largest perturbation the defence still accepts.

Shejwalkar & Houmansadr 2021, "Manipulating the Byzantine: optimizing model
poisoning attacks and defenses for federated learning" (NDSS 2021), Sec. IV.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from .._backend import ArrayLike, is_torch, to_numpy64, torch
from .base import UpdateAttack, as_update_matrix, cast_like, mean64, norm64, repeat_rows, require_rows, std64

DIRECTIONS = ("unit", "std", "sign")
SEARCHES = ("min-max", "min-sum")


def _stack(honest: ArrayLike, byz: ArrayLike) -> ArrayLike:
    if is_torch(honest):
        return torch.cat([honest, byz], dim=0)
    return np.concatenate([honest, byz], axis=0)


@dataclass
class DefenceAware(UpdateAttack):
    """Defence-aware attack of Shejwalkar & Houmansadr 2021 ("Manipulating the Byzantine", NDSS).

    Every Byzantine worker sends ``m(gamma) = mu + gamma * p`` with ``mu`` the honest
    mean and ``p`` the perturbation direction:

    * ``direction='unit'``: ``p = -mu / ||mu||`` (inverse unit vector);
    * ``direction='std'``: ``p = -sigma`` (per-coordinate honest standard deviation, ddof=0);
    * ``direction='sign'``: ``p = -sign(mu)``.

    ``gamma >= 0`` is the largest value the defence still accepts:

    * with an ``aggregator`` (an :class:`~flwr_byzantine.aggregators.Aggregator`, or
      a registry name built by ``make_aggregator(aggregator, **aggregator_params)``):
      the largest ``gamma`` such that the aggregator, run on the honest rows followed
      by ``num_byzantine`` copies of ``m(gamma)``, keeps every Byzantine row (they
      are all in ``kept``): the attack hides just inside the rule's threshold.  Found
      by bracketing (doubling / halving from a data-driven start) then bisection
      until ``hi <= lo * (1 + tol)``, where ``lo`` is accepted and ``hi`` rejected;
      ``lo`` is returned.  This assumes acceptance is monotone in ``gamma`` (as for
      threshold rules).  If every tried ``gamma`` up to ``gamma_max`` is accepted
      (e.g. the plain mean), ``gamma_max`` is used; if none down to ``0`` is, ``0``.
    * with ``aggregator=None``, the paper's aggregator-agnostic criteria, over the
      honest set ``H`` (``D`` the squared Euclidean distance):

      - ``search='min-max'``: ``max_i D(m, g_i) <= max_{i,j} D(g_i, g_j)``;
      - ``search='min-sum'``: ``sum_i D(m, g_i) <= max_i sum_j D(g_i, g_j)``.

      Both sides are quadratic in ``gamma`` (distances by the Gram trick on the
      centred honest rows), so the largest ``gamma`` is computed in closed form,
      exactly (no search tolerance).

    Attributes
    ----------
    aggregator:
        The targeted defence, its registry name, or ``None`` for the criteria.
    client_ids:
        Node ids of the rows the aggregator will see this round (the honest rows, then the
        Byzantine ones), for an omniscient attacker that knows them: a rule keyed by node id
        (the default defence's memory, self-reference and jump rule) is then simulated with them,
        each trial on a fresh copy of its state.  ``None``: the rule's stateless call.
    direction:
        ``'unit'``, ``'std'`` or ``'sign'``.
    search:
        ``'min-max'`` or ``'min-sum'`` (used only when ``aggregator`` is ``None``).
    tol:
        Relative tolerance of the bisection (> 0).
    gamma_init:
        Starting ``gamma`` of the bracketing; default: the largest honest distance
        to ``mu`` divided by ``||p||``.
    gamma_max:
        Cap on ``gamma``; default ``2**40 * gamma_init``.
    aggregator_params:
        Keyword arguments of ``make_aggregator`` when ``aggregator`` is a name.
    last_gamma, last_info:
        Diagnostics of the last :meth:`craft` (not parameters).
    """

    name: ClassVar[str] = "defence-aware"

    aggregator: Any = None
    direction: str = "unit"
    search: str = "min-max"
    tol: float = 1e-3
    gamma_init: float | None = None
    gamma_max: float | None = None
    aggregator_params: dict[str, Any] | None = None
    client_ids: Sequence[int] | None = None
    last_gamma: float = field(default=float("nan"), init=False, compare=False, repr=False)
    last_info: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {self.direction!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {list(SEARCHES)}, got {self.search!r}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and 0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol!r}")
        for name in ("gamma_init", "gamma_max"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {v!r}")
        if isinstance(self.aggregator, str):
            from ..aggregators import make_aggregator  # lazy: aggregators are optional for the other attacks

            self.aggregator = make_aggregator(self.aggregator, **(self.aggregator_params or {}))
        elif self.aggregator_params:
            raise ValueError("aggregator_params is only used with an aggregator given by name")
        if self.aggregator is not None and not callable(getattr(self.aggregator, "aggregate", None)):
            raise ValueError(f"aggregator must have an aggregate() method, got {self.aggregator!r}")

    # ------------------------------------------------------------------ pieces

    def direction_vector(self, honest: ArrayLike) -> ArrayLike:
        """The perturbation direction ``p`` (float64, honest's framework/device)."""
        mu = mean64(honest)
        if self.direction == "unit":
            n = norm64(mu)
            return -mu / n if n > 0 else mu * 0.0
        if self.direction == "std":
            return -std64(honest)
        return -(torch.sign(mu) if is_torch(mu) else np.sign(mu))

    def malicious(self, honest: ArrayLike, gamma: float) -> ArrayLike:
        """The malicious vector ``mu + gamma * p`` in honest's dtype."""
        h = self._check(honest)
        return cast_like(mean64(h) + gamma * self.direction_vector(h), h)

    def accepts(self, honest: ArrayLike, num_byzantine: int, gamma: float) -> bool:
        """Whether the configured defence accepts ``num_byzantine`` copies of ``mu + gamma * p``.

        With an aggregator: all Byzantine rows are in ``kept`` (or, for a rule that counts copies of one
        message once, one of them is kept and the others are its ``info["duplicates"]``).  Without: the
        min-max / min-sum criterion holds (up to a relative slack of 1e-9).
        """
        h = self._check(honest)
        mu, p = mean64(h), self.direction_vector(h)
        if self.aggregator is not None:
            return self._agg_accepts(h, num_byzantine, mu, p, gamma)
        lhs, rhs = self._criterion(h, p, gamma)
        return lhs <= rhs * (1 + 1e-9) + 1e-300

    def find_gamma(self, honest: ArrayLike, num_byzantine: int) -> float:
        """The largest accepted ``gamma`` (see the class docstring); sets ``last_info``."""
        h = self._check(honest)
        f = int(num_byzantine)
        if f < 1:
            raise ValueError("num_byzantine must be >= 1 to search gamma")
        mu, p = mean64(h), self.direction_vector(h)
        p_norm = norm64(p)
        if p_norm == 0.0:
            self.last_info = {"reason": "zero direction"}
            return 0.0
        if self.aggregator is None:
            return self._closed_form(h, p)
        return self._bisect(h, f, mu, p, p_norm)

    # ------------------------------------------------------------- internals

    @staticmethod
    def _check(honest: ArrayLike) -> ArrayLike:
        h = as_update_matrix(honest)
        require_rows(h, "DefenceAware")
        return h

    def _agg_accepts(self, h: ArrayLike, f: int, mu: ArrayLike, p: ArrayLike, gamma: float) -> bool:
        byz = repeat_rows(mu + gamma * p, f, h)
        if self.client_ids is not None and len(self.client_ids) == h.shape[0] + f:
            # a stateful rule keyed by node id (the default defence's memory): every trial runs on a
            # fresh copy of the rule's state, with the round's real node ids
            res = copy.deepcopy(self.aggregator).aggregate(_stack(h, byz), client_ids=list(self.client_ids))
        else:
            res = self.aggregator.aggregate(_stack(h, byz))
        n_h = h.shape[0]
        kept = np.asarray(res.kept, dtype=np.int64).reshape(-1)
        byz = np.arange(n_h, n_h + f)
        in_kept = np.isin(byz, kept)
        # a rule that counts copies of one message once (the default defence's duplicates step) keeps
        # the first copy and lists the others as its duplicates: the message is accepted, with one vote
        dups = (res.info or {}).get("duplicates", []) if isinstance(res.info, dict) else []
        return bool(in_kept.any() and (in_kept | np.isin(byz, np.asarray(dups, dtype=np.int64))).all())

    @staticmethod
    def _centred(h: ArrayLike) -> tuple[np.ndarray, ArrayLike]:
        """(centred Gram in float64 numpy, centred rows in float64, honest's framework)."""
        c = (h.to(torch.float64) if is_torch(h) else h.astype(np.float64)) - mean64(h)[None, :]
        gram = to_numpy64(c @ c.T)
        return 0.5 * (gram + gram.T), c

    def _quadratic(self, h: ArrayLike, p: ArrayLike) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """``D(mu + gamma p, g_i) = a gamma^2 - 2 b_i gamma + c_i`` and the honest distances."""
        gram, c = self._centred(h)
        a = norm64(p) ** 2
        b = to_numpy64(c @ p)
        cn = np.diag(gram).copy()
        dist = cn[:, None] + cn[None, :] - 2.0 * gram
        np.maximum(dist, 0.0, out=dist)
        np.fill_diagonal(dist, 0.0)
        return a, b, cn, dist

    def _criterion(self, h: ArrayLike, p: ArrayLike, gamma: float) -> tuple[float, float]:
        a, b, cn, dist = self._quadratic(h, p)
        d_mal = a * gamma * gamma - 2.0 * b * gamma + cn
        if self.search == "min-max":
            return float(d_mal.max()), float(dist.max())
        return float(d_mal.sum()), float(dist.sum(axis=1).max())

    def _closed_form(self, h: ArrayLike, p: ArrayLike) -> float:
        a, b, cn, dist = self._quadratic(h, p)
        if self.search == "min-max":
            # every a g^2 - 2 b_i g + c_i <= T: g <= (b_i + sqrt(b_i^2 - a (c_i - T))) / a
            thr = float(dist.max())
            disc = np.maximum(b * b - a * (cn - thr), 0.0)
            gamma = float(np.min((b + np.sqrt(disc)) / a))
        else:
            # n a g^2 - 2 B g + C <= T with B = sum_i b_i (0 up to rounding: the rows are centred)
            thr = float(dist.sum(axis=1).max())
            n = cn.size
            big_b, big_c = float(b.sum()), float(cn.sum())
            disc = max(big_b * big_b - n * a * (big_c - thr), 0.0)
            gamma = (big_b + math.sqrt(disc)) / (n * a)
        gamma = max(gamma, 0.0)
        if self.gamma_max is not None:
            gamma = min(gamma, float(self.gamma_max))
        self.last_info = {"criterion": self.search, "threshold": thr}
        return gamma

    def _bisect(self, h: ArrayLike, f: int, mu: ArrayLike, p: ArrayLike, p_norm: float) -> float:
        if self.gamma_init is not None:
            g0 = float(self.gamma_init)
        else:
            _, c = self._centred(h)
            spread = float(to_numpy64((c * c).sum(dim=1) if is_torch(c) else (c * c).sum(axis=1)).max())
            spread = math.sqrt(spread) if spread > 0 else norm64(mu)
            g0 = spread / p_norm if spread > 0 else 1.0
        g_max = float(self.gamma_max) if self.gamma_max is not None else g0 * 2.0**40
        g0 = min(g0, g_max)
        calls = 0

        def ok(g: float) -> bool:
            nonlocal calls
            calls += 1
            return self._agg_accepts(h, f, mu, p, g)

        if ok(g0):
            lo, hi = g0, None
            while hi is None:
                nxt = min(2.0 * lo, g_max)
                if nxt <= lo:  # reached the cap with everything accepted
                    self.last_info = {"calls": calls, "capped": True}
                    return lo
                if ok(nxt):
                    lo = nxt
                else:
                    hi = nxt
        else:
            hi, lo = g0, None
            floor = g0 * 2.0**-40
            while lo is None:
                nxt = 0.5 * hi
                if nxt < floor:
                    accepted0 = ok(0.0)
                    self.last_info = {"calls": calls, "rejected_down_to": hi, "zero_accepted": accepted0}
                    return 0.0
                if ok(nxt):
                    lo = nxt
                else:
                    hi = nxt
        while hi > lo * (1.0 + self.tol):
            mid = 0.5 * (lo + hi)
            if ok(mid):
                lo = mid
            else:
                hi = mid
        self.last_info = {"calls": calls, "rejected": hi}
        return lo

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, "DefenceAware")
        gamma = self.find_gamma(honest, num_byzantine)
        self.last_gamma = gamma
        mu, p = mean64(honest), self.direction_vector(honest)
        return repeat_rows(mu + gamma * p, num_byzantine, honest)


__all__ = ["DIRECTIONS", "DefenceAware", "SEARCHES"]

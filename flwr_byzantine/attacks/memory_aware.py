"""Memory-aware attack: knows the default defence's evidence rule and stays just inside it.

The default defence (:class:`~flwr_byzantine.aggregators.defence.RobustDefence`) excludes a
node whose monotonicity evidence ``Z = S / sqrt(Q + floor)`` falls below ``-z_exclude``
(:class:`~flwr_byzantine.aggregators.memory.MonotonicityEvidence`).  This attacker
replays that bookkeeping for its own replies (it knows the models it receives, hence
every step, and what it sent) and, every round, sends the inner attack; when that would
take its score within ``margin`` of ``-z_exclude`` (or of ``-z_short``, short window) it adds the smallest component along the
last step that keeps the score at that level (a drag on training that looks "monotone").
It never trips the defence's jump rule to do so: where that correction would change its reply by
more than ``jump_margin * jump_factor`` median changes, it scales the inner attack back towards its
own gradient first (:meth:`MemoryAware._fit`).  It thus attacks every round, as hard as the rule allows.

It needs the model of every round: the caller passes it with :meth:`MemoryAware.observe_model`
before :meth:`~flwr_byzantine.attacks.base.UpdateAttack.craft` (the simulator does; a
ClientApp keeps the previous model in its Context state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .._backend import ArrayLike, to_numpy64
from .base import UpdateAttack, cast_like, from_numpy64


@dataclass
class MemoryAware(UpdateAttack):
    """The attack ``inner``, corrected every round just enough to keep the defence's evidence inside its limit.

    Attributes
    ----------
    inner:
        Registry name of the attack (default ``"sign-flip"``).
    z_exclude, gamma, z_short, gamma_short:
        The defence's exclusion levels and discounts, long and short window (defaults: the
        default defence's).
    margin:
        How far inside the exclusion level the attacker keeps its score.
    floor, floor_short:
        The evidence's population floors of ``Q`` (long and short window; :meth:`aim_at` takes the
        rule's last ones), in the defence's score units.
    """

    name: ClassVar[str] = "memory-aware"
    #: It keeps the models of past rounds: the ClientApp's run config refuses it (the library and
    #: the benchmark simulator call :meth:`observe_model`).
    needs_model_history: ClassVar[bool] = True

    inner: str = "sign-flip"
    z_exclude: float = 1.5  # the default defence's level (DEFAULT_Z_EXCLUDE; not imported: clients never load the aggregators)
    gamma: float = 0.95
    margin: float = 0.25
    gamma_short: float = 0.8
    z_short: float = 2.0
    floor: float = 0.0
    floor_short: float = 0.0
    inner_params: dict[str, Any] | None = None
    jump_factor: float | None = 4.0
    jump_margin: float = 0.8
    attacked_rounds: int = field(default=0, init=False, compare=False)  # rounds sent uncorrected
    _inner: Any = field(default=None, init=False, repr=False, compare=False)
    _x: Any = field(default=None, init=False, repr=False, compare=False)
    _x_prev: Any = field(default=None, init=False, repr=False, compare=False)
    _last_sent: Any = field(default=None, init=False, repr=False, compare=False)
    _S: float = field(default=0.0, init=False, repr=False, compare=False)
    _Q: float = field(default=0.0, init=False, repr=False, compare=False)
    _S2: float = field(default=0.0, init=False, repr=False, compare=False)
    _Q2: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("z_exclude", "z_short", "margin", "floor", "floor_short"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v)) or (name in ("margin", "floor", "floor_short") and v < 0):
                raise ValueError(f"{name} must be a finite number (margin and floors >= 0), got {v!r}")
        if self.jump_factor is not None and not (np.isfinite(self.jump_factor) and self.jump_factor > 0):
            raise ValueError(f"jump_factor must be a positive number or None, got {self.jump_factor!r}")
        if not (0 < self.jump_margin <= 1):
            raise ValueError(f"jump_margin must be in (0, 1], got {self.jump_margin!r}")
        if not (0 < self.gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.inner in ("sleeper", "memory-aware"):
            raise ValueError(f"inner must be a plain attack, got {self.inner!r}")
        from . import make_attack

        self._inner = make_attack(self.inner, seed=self.seed, **(self.inner_params or {}))

    def aim_at(self, evidence: Any) -> None:
        """Take the exclusion levels and discounts of the rule it attacks.

        ``evidence``: a :class:`~flwr_byzantine.aggregators.memory.MonotonicityEvidence` (e.g. the
        default defence's ``.evidence``); the attacker knows the rule, so a defence run with other
        levels is attacked at its own levels.  Call before every :meth:`craft`: the long window's
        level of a relative rule (:attr:`MonotonicityEvidence.level`) changes from round to round.
        """
        # the long window's level of the rule's last round (relative levels move with the population)
        self.z_exclude, self.gamma = -float(getattr(evidence, "level", -evidence.z_exclude)), float(evidence.gamma)
        self.z_short, self.gamma_short = float(evidence.z_short), float(evidence.gamma_short)
        self.floor, self.floor_short = (float(v) for v in getattr(evidence, "floor", (0.0, 0.0)))

    def observe_model(self, x: ArrayLike) -> None:
        """The model broadcast this round (call before :meth:`craft`)."""
        self._x_prev, self._x = self._x, np.asarray(to_numpy64(x), dtype=np.float64).reshape(-1)

    def _score(self, vec: np.ndarray, scale: float) -> float | None:
        if self._last_sent is None or self._x is None or self._x_prev is None:
            return None
        delta = self._x - self._x_prev
        n = float(np.linalg.norm(delta))
        if n == 0 or scale <= 0:
            return None
        return float((vec - self._last_sent) @ delta / n / scale)

    def _z(self, s: float) -> float:
        """How far inside both rules a score ``s`` keeps the node: ``min(Z_long + z_exclude, Z_short + z_short)``.

        Negative: over the exclusion level of one window (the defence leaves the node out).
        """
        S, Q = self.gamma * self._S + s, self.gamma * self._Q + s * s + self.floor
        S2, Q2 = self.gamma_short * self._S2 + s, self.gamma_short * self._Q2 + s * s + self.floor_short
        z_long = S / np.sqrt(Q) if Q > 0 else 0.0
        z_recent = S2 / np.sqrt(Q2) if Q2 > 0 else 0.0
        return min(z_long + self.z_exclude, z_recent + self.z_short)

    def _drag(self, s: float) -> float:
        """The least score ``>= s`` that keeps the node ``margin`` inside both windows (bisection)."""
        lo, hi = s, s + 1.0
        while self._z(hi) < self.margin and hi - s < 1e6:
            hi = s + 2.0 * (hi - s)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self._z(mid) < self.margin else (lo, mid)
        return hi

    def _fit(self, attack: np.ndarray, own: np.ndarray, scale: float) -> np.ndarray:
        """The strongest reply that keeps the evidence inside the rule without tripping the jump rule.

        Candidates ``own + lam (attack - own)``, ``lam`` from 1 down to 0 in steps of 1/8 (the
        inner attack scaled back towards the node's own gradient), each moved along the last step
        just enough to keep ``Z`` at the bound (not at all if it is inside already); the first whose
        change from the last reply stays under ``jump_margin * jump_factor * scale`` (the defence
        leaves out a reply that changes by more than ``jump_factor`` median changes) is sent.  If
        none fits, the reply moves from the last one towards the own gradient as far as the jump
        rule allows (the evidence then recovers over the next rounds).  Updates the attacker's own
        bookkeeping.
        """
        delta = self._x - self._x_prev
        limit = None if self.jump_factor is None else self.jump_margin * self.jump_factor * scale
        chosen: tuple[np.ndarray, float] | None = None
        for lam in np.linspace(1.0, 0.0, 9):
            base = attack if lam == 1.0 else own + lam * (attack - own)
            s0 = float(self._score(base, scale))
            if self._z(s0) >= self.margin:
                vec, s = base, s0
            else:
                s = self._drag(s0)
                vec = base + (s - s0) * scale * delta / np.linalg.norm(delta)
            if limit is None or float(np.linalg.norm(vec - self._last_sent)) <= limit:
                chosen = (vec, s)
                if lam == 1.0 and s == s0:
                    self.attacked_rounds += 1  # the plain attack fits inside the rule
                break
        if chosen is None:
            # none fits: the step from the last reply towards the own gradient that the jump rule allows
            gap = own - self._last_sent
            norm = float(np.linalg.norm(gap))
            vec = self._last_sent + (min(1.0, float(limit) / norm) if norm > 0 else 0.0) * gap
            chosen = (vec, float(self._score(vec, scale)))
        vec, s = chosen
        self._S, self._Q = self.gamma * self._S + s, self.gamma * self._Q + s * s
        self._S2, self._Q2 = self.gamma_short * self._S2 + s, self.gamma_short * self._Q2 + s * s
        return vec

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike | None:  # noqa: A002
        h64 = np.asarray(to_numpy64(honest), dtype=np.float64)
        rows = self._inner.craft(honest, num_byzantine, round)
        if rows is None:
            return None
        vec = np.asarray(to_numpy64(rows), dtype=np.float64)[0].copy()
        mean = h64.mean(axis=0)
        # the defence normalises by the round's median |g_i(t) - g_i(t-1)|: estimate it by the honest spread
        scale = float(np.median(np.linalg.norm(h64 - mean, axis=1))) * np.sqrt(2.0) if h64.shape[0] > 1 else 0.0
        if scale <= 0 and self._last_sent is not None:
            scale = float(np.linalg.norm(mean - self._last_sent))
        if self._score(vec, scale) is not None:
            vec = self._fit(vec, mean, scale)
        self._last_sent = vec.copy()
        out = np.repeat(vec[None, :], num_byzantine, axis=0)
        return cast_like(from_numpy64(out, honest), honest)

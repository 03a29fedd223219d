"""One COMRADE / GIANT worker (pure numpy): what a Flower client computes per message.

The same class runs inside the ClientApp (``clients/client_app.py``, ``method`` comrade / giant) and in the
in-process driver (:mod:`flwr_byzantine.newton.simulate`) used by tests and the benchmark, so
both execute identical arithmetic.

Per message a worker holding rows S_i either

* (COMRADE, Algorithm 1) returns Q(p_i), p_i = H_i^{-1} g_i at the broadcast w_t, or
* (GIANT round 1) returns its local gradient g_i, or
* (GIANT round 2) returns Q(H_i^{-1} g_t) for the broadcast exact gradient g_t,

possibly corrupted by a Byzantine attack of the one attack registry (:mod:`flwr_byzantine.attacks`,
those whose ``methods`` name a Newton method): a data attack changes the labels it learns from
(:func:`poison_glm_labels`), an update attack the vector it sends (played on that single vector,
``attack.craft(v[None, :], 1, round)[0]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..attacks import DataAttack, UpdateAttack
from ..protocol import PHASE_DIRECTION, PHASE_GRADIENT
from .compression import Compressor, Identity
from .objectives import GLMObjective, make_objective
from .solvers import DEFAULT_CG_THRESHOLD, newton_direction

__all__ = ["NEWTON_METHODS", "PHASE_DIRECTION", "PHASE_GRADIENT", "NewtonWorker", "WorkerReply", "poison_glm_labels"]

#: The run-config methods a NewtonWorker serves.
NEWTON_METHODS = ("comrade", "giant")


def poison_glm_labels(attack: DataAttack, X, y: np.ndarray, objective: str) -> np.ndarray:
    """The labels a worker under data ``attack`` learns from (float64).

    Logistic labels are mapped to class indices for the attack and back: {0, 1} stays (when a
    0 is present), {-1, +1} becomes {0, 1} (so ``label-flip`` negates them); least-squares
    targets are real-valued (``num_classes = 0``: ``label-flip`` negates, ``random-labels``
    permutes them).
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if objective != "logistic":
        return np.asarray(attack.poison(X, y, 0)[1], dtype=np.float64)
    zero_one = 0.0 in set(np.unique(y).tolist())
    classes = y.astype(np.int64) if zero_one else (y > 0).astype(np.int64)
    out = np.asarray(attack.poison(X, classes, 2)[1], dtype=np.float64)
    return out if zero_one else 2.0 * out - 1.0


@dataclass
class WorkerReply:
    """A worker's answer to one message.

    Attributes
    ----------
    payload:
        Arrays to send (compressed direction, or ``{"g": gradient}``).
    vector:
        The dense vector the payload decodes to (what the server will see).
    metrics:
        Diagnostics (``train-loss``, ``direction-method``, ``cg-iterations``, ``rho``,
        ``rho-empirical``, ``bytes``); the server treats them as untrusted information.
    """

    payload: dict[str, np.ndarray]
    vector: np.ndarray
    metrics: dict[str, Any] = field(default_factory=dict)


class NewtonWorker:
    """A worker holding local data ``(X, y)`` of a regularised GLM.

    Parameters
    ----------
    X, y:
        Local rows (dense or sparse) and labels.
    objective:
        ``"logistic"`` (labels {-1,+1} or {0,1}) or ``"least-squares"``.
    lam:
        Ridge coefficient lambda of the global objective.
    attack:
        Byzantine behaviour: ``None`` (honest) or a registry attack whose ``methods`` name a
        Newton method (``ValueError`` otherwise).
    compressor:
        Uplink compressor Q of directions (default none).  Gradients (GIANT round 1) are sent
        uncompressed, as in GIANT.
    cg_threshold:
        Dimension above which directions are computed by conjugate gradient.
    """

    def __init__(
        self,
        X,
        y,
        objective: str = "logistic",
        lam: float = 1e-3,
        *,
        attack: UpdateAttack | DataAttack | None = None,
        compressor: Compressor | None = None,
        cg_threshold: int = DEFAULT_CG_THRESHOLD,
    ) -> None:
        if attack is not None and not (isinstance(attack, (UpdateAttack, DataAttack))
                                       and set(attack.methods) & set(NEWTON_METHODS)):
            raise ValueError(f"attack {getattr(attack, 'name', attack)!r} cannot be played by a Newton worker")
        self.attack = attack
        self.objective_kind = objective
        y_used = poison_glm_labels(attack, X, y, objective) if isinstance(attack, DataAttack) else y
        self.objective: GLMObjective = make_objective(objective, X, y_used, lam)
        self.compressor = compressor if compressor is not None else Identity()
        self.cg_threshold = int(cg_threshold)

    @property
    def d(self) -> int:
        """Model dimension."""
        return self.objective.d

    def _corrupt(self, v: np.ndarray, server_round: int) -> np.ndarray:
        """The vector sent instead of the honest ``v`` (``v`` itself unless an update attack)."""
        if not isinstance(self.attack, UpdateAttack):
            return v
        rows = self.attack.craft(np.asarray(v, dtype=np.float64)[None, :], 1, server_round)
        if rows is None:
            raise ValueError(f"attack {self.attack.name!r} erases: a Newton worker cannot play it")
        return np.asarray(rows[0], dtype=np.float64)

    def gradient(self, w: np.ndarray, server_round: int = 0) -> WorkerReply:
        """GIANT round 1: the local gradient g_i (an update attack corrupts it too)."""
        g = self._corrupt(self.objective.gradient(w), server_round)
        return WorkerReply(payload={"g": g.astype(np.float64)}, vector=g,
                           metrics={"train-loss": self.objective.value(w), "bytes": int(g.nbytes)})

    def direction(self, w: np.ndarray, g: np.ndarray | None = None, server_round: int = 0) -> WorkerReply:
        """COMRADE (``g=None``): Q(H_i^{-1} g_i); GIANT round 2: Q(H_i^{-1} g) for the given g."""
        res = newton_direction(self.objective, w, g, cg_threshold=self.cg_threshold)
        p = self._corrupt(res.p, server_round)
        comp = self.compressor.compress(p)
        metrics = {
            "train-loss": self.objective.value(w),
            "direction-method": res.method,
            "cg-iterations": int(res.iterations),
            "solve-residual": float(res.residual),
            "rho": float(comp.rho),
            "rho-empirical": float(comp.empirical_rho),
            "bytes": int(comp.nbytes),
        }
        return WorkerReply(payload=comp.payload, vector=comp.decoded, metrics=metrics)

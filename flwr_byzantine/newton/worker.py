"""One COMRADE / GIANT worker (pure numpy): what a Flower client computes per message.

The same class runs inside the ClientApp (``clients/newton_client_app.py``) and in the
in-process driver (:mod:`flwr_byzantine.newton.simulate`) used by tests and the benchmark, so
both execute identical arithmetic.

Per message a worker holding rows S_i either

* (COMRADE, Algorithm 1) returns Q(p_i), p_i = H_i^{-1} g_i at the broadcast w_t, or
* (GIANT round 1) returns its local gradient g_i, or
* (GIANT round 2) returns Q(H_i^{-1} g_t) for the broadcast exact gradient g_t,

possibly corrupted by a Byzantine :class:`~flwr_byzantine.newton.attacks.Attack` (label attacks
change the data it learns from; update attacks change the vector it sends).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attacks import Attack
from ..protocol import PHASE_DIRECTION, PHASE_GRADIENT
from .compression import Compressor, Identity
from .objectives import GLMObjective, make_objective
from .solvers import DEFAULT_CG_THRESHOLD, newton_direction

__all__ = ["PHASE_DIRECTION", "PHASE_GRADIENT", "NewtonWorker", "WorkerReply"]


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
        Byzantine behaviour (default honest).
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
        attack: Attack | None = None,
        compressor: Compressor | None = None,
        cg_threshold: int = DEFAULT_CG_THRESHOLD,
    ) -> None:
        self.attack = attack if attack is not None else Attack()
        self.objective_kind = objective
        y_used = self.attack.poison_labels(y, objective)
        self.objective: GLMObjective = make_objective(objective, X, y_used, lam)
        self.compressor = compressor if compressor is not None else Identity()
        self.cg_threshold = int(cg_threshold)

    @property
    def d(self) -> int:
        """Model dimension."""
        return self.objective.d

    def gradient(self, w: np.ndarray, server_round: int = 0) -> WorkerReply:
        """GIANT round 1: the local gradient g_i (an update attack corrupts it too)."""
        g = self.objective.gradient(w)
        g = self.attack.corrupt_update(g, server_round) if self.attack.name in ("gaussian", "negative") else g
        return WorkerReply(payload={"g": g.astype(np.float64)}, vector=g,
                           metrics={"train-loss": self.objective.value(w), "bytes": int(g.nbytes)})

    def direction(self, w: np.ndarray, g: np.ndarray | None = None, server_round: int = 0) -> WorkerReply:
        """COMRADE (``g=None``): Q(H_i^{-1} g_i); GIANT round 2: Q(H_i^{-1} g) for the given g."""
        res = newton_direction(self.objective, w, g, cg_threshold=self.cg_threshold)
        p = res.p
        if self.attack.name in ("gaussian", "negative"):
            p = self.attack.corrupt_update(p, server_round)
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

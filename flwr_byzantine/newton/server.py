"""Center-machine step of COMRADE and GIANT (pure numpy), shared by the Flower strategies and
the in-process driver.

COMRADE, Algorithm 1 (center machine): given the m received directions, keep the
ceil((1 - beta) m) smallest in norm (:func:`~flwr_byzantine.newton.trimming.trim_by_norm`),
average them into p_hat and update w_{t+1} = w_t - step * p_hat, step = 1 in the paper's
analysis (or a server-side line search, :mod:`~flwr_byzantine.newton.line_search`).

GIANT (Wang et al. 2018; Appendix A of COMRADE): round 1 averages the local gradients into the
exact g_t; round 2 averages H_i^{-1} g_t and steps the same way.  GIANT is the beta = 0 baseline;
here the same trimming may optionally be applied to both of its rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .line_search import LineSearchResult, choose_step
from .trimming import num_kept, trim_by_norm


@dataclass
class StepResult:
    """Outcome of one center-machine step.

    Attributes
    ----------
    w:
        New model (equal to the input model when ``applied`` is False).
    p_hat:
        Robust average of the kept directions (zeros when not applied).
    kept, trimmed:
        Row indices of the input matrix kept / trimmed (sorted).
    step:
        Step size used.
    applied:
        Whether the model changed.
    reason:
        Why the step was not applied ("" when applied).
    line_search:
        Step-size details.
    """

    w: np.ndarray
    p_hat: np.ndarray
    kept: np.ndarray
    trimmed: np.ndarray
    step: float
    applied: bool
    reason: str = ""
    line_search: LineSearchResult | None = None
    info: dict[str, Any] = field(default_factory=dict)


def robust_average(P: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean of the kept rows, kept indices, trimmed indices) with norm trimming at ``beta``."""
    P = np.asarray(P, dtype=np.float64)
    mean, kept = trim_by_norm(P, beta)
    mask = np.ones(P.shape[0], dtype=bool)
    mask[kept] = False
    return mean, kept, np.flatnonzero(mask)


def newton_step(
    w: np.ndarray,
    P: np.ndarray,
    beta: float,
    *,
    step_size: float = 1.0,
    server_objective=None,
    min_valid: int = 1,
) -> StepResult:
    """w_{t+1} = w_t - step * p_hat with p_hat the norm-trimmed mean of the rows of ``P``.

    ``P`` holds only *valid* directions (the caller has dropped rejected replies / erasures).
    With fewer than ``min_valid`` rows, or a non-finite result, the model is returned unchanged
    with ``applied=False`` and a reason.
    """
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    d = w.size
    P = np.asarray(P, dtype=np.float64).reshape(-1, d) if np.size(P) else np.zeros((0, d))
    empty = np.zeros(0, dtype=np.int64)
    if P.shape[0] < max(1, min_valid):
        return StepResult(w=w.copy(), p_hat=np.zeros(d), kept=empty, trimmed=np.arange(P.shape[0]),
                          step=0.0, applied=False,
                          reason=f"only {P.shape[0]} valid directions (< min_valid={max(1, min_valid)})")
    p_hat, kept, trimmed = robust_average(P, beta)
    if not np.isfinite(p_hat).all():
        return StepResult(w=w.copy(), p_hat=p_hat, kept=kept, trimmed=trimmed, step=0.0, applied=False,
                          reason="non-finite average direction")
    ls = choose_step(w, p_hat, step_size=step_size, server_objective=server_objective)
    with np.errstate(over="ignore", invalid="ignore"):
        w_new = w - ls.step * p_hat
    if not np.isfinite(w_new).all():
        return StepResult(w=w.copy(), p_hat=p_hat, kept=kept, trimmed=trimmed, step=0.0, applied=False,
                          reason="non-finite update", line_search=ls)
    if ls.step == 0.0:
        return StepResult(w=w.copy(), p_hat=p_hat, kept=kept, trimmed=trimmed, step=0.0, applied=False,
                          reason="line search found no decrease of the server objective", line_search=ls)
    return StepResult(w=w_new, p_hat=p_hat, kept=kept, trimmed=trimmed, step=ls.step, applied=True,
                      line_search=ls, info={"num_kept_expected": num_kept(P.shape[0], beta)})


def average_gradients(G: np.ndarray, beta: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GIANT round 1: g_t = mean of the local gradients (norm-trimmed if ``beta > 0``)."""
    return robust_average(G, beta)

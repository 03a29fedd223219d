"""Server-side step size for the Newton update w_{t+1} = w_t - step * p_hat.

COMRADE's analysis (Algorithm 1, Theorems 1-3) uses step = 1.  GIANT (Wang et al. 2018) adds
a line search; in COMRADE's Byzantine setting the server must not trust worker-reported
objective values, so the only admissible line search uses an objective the *server* can
evaluate itself, on data it holds.  :func:`backtracking_line_search` is Armijo backtracking
on such a server-side objective; :func:`choose_step` falls back to the fixed step (1 by
default, the paper's choice) when the server has no data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class LineSearchResult:
    """Chosen step and bookkeeping.

    Attributes
    ----------
    step:
        Step size (0 when no tried step decreased the server objective: the model stays put).
    evaluations:
        Number of objective evaluations.
    accepted:
        Whether the Armijo condition held (always ``True`` for a fixed step).
    method:
        ``"fixed"`` or ``"armijo"``.
    """

    step: float
    evaluations: int
    accepted: bool
    method: str


def backtracking_line_search(
    value: Callable[[np.ndarray], float],
    w: np.ndarray,
    p: np.ndarray,
    g: np.ndarray,
    *,
    step0: float = 1.0,
    shrink: float = 0.5,
    c: float = 1e-4,
    max_evaluations: int = 30,
) -> LineSearchResult:
    """Armijo backtracking for the update w - a p on the server objective ``value``.

    Tries a = step0, step0*shrink, ... and returns the first a with
    value(w - a p) <= value(w) - c a max(g^T p, 0), where g is the server objective's gradient
    at w.  If p is not a descent direction for the server objective (g^T p <= 0) the condition
    degenerates to "no increase".  If no tried step qualifies, step 0 is returned
    (``accepted=False``): the robust aggregate is not applied this iteration.
    """
    if not 0.0 < shrink < 1.0 or step0 <= 0.0 or not 0.0 < c < 1.0:
        raise ValueError("need step0 > 0, 0 < shrink < 1 and 0 < c < 1")
    f0 = float(value(w))
    slope = max(float(np.dot(g, p)), 0.0)
    a = float(step0)
    for k in range(1, max_evaluations + 1):
        fa = float(value(w - a * p))
        if np.isfinite(fa) and fa <= f0 - c * a * slope:
            return LineSearchResult(step=a, evaluations=k + 1, accepted=True, method="armijo")
        a *= shrink
    return LineSearchResult(step=0.0, evaluations=max_evaluations + 1, accepted=False, method="armijo")


def choose_step(
    w: np.ndarray,
    p: np.ndarray,
    *,
    step_size: float = 1.0,
    server_objective=None,
    **kwargs,
) -> LineSearchResult:
    """Fixed ``step_size`` if ``server_objective`` is None, else Armijo backtracking on it.

    ``server_objective`` needs ``value(w)`` and ``gradient(w)`` (e.g. a
    :class:`~flwr_byzantine.newton.objectives.GLMObjective` on the server's own data).
    """
    if server_objective is None:
        return LineSearchResult(step=float(step_size), evaluations=0, accepted=True, method="fixed")
    g = server_objective.gradient(w)
    return backtracking_line_search(server_objective.value, w, p, g, step0=step_size, **kwargs)

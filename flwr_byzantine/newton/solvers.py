"""Local Newton directions p = H^{-1} g (COMRADE Algorithm 1, worker step), pure numpy/scipy.

Worker i of COMRADE computes p_i = H_i^{-1} g_i, the minimiser of the local quadratic
phi_i(p) = p^T H_i p / 2 - g_i^T p (Appendix A, equation (11)); GIANT's second round computes
H_i^{-1} g_t with the exact global gradient g_t instead.  :func:`newton_direction` solves
H p = g either

* directly, by a Cholesky factorisation of the ``(d, d)`` Hessian, when ``d <= cg_threshold``; or
* matrix-free, by conjugate gradient on Hessian-vector products (H is never formed), when
  ``d > cg_threshold`` (what GIANT does for large d).

H is symmetric positive definite whenever lambda > 0 (l'' >= 0 for both GLMs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .objectives import GLMObjective

#: Default dimension above which the direction is computed by conjugate gradient.
DEFAULT_CG_THRESHOLD = 500


@dataclass
class DirectionResult:
    """A local Newton direction and how it was obtained.

    Attributes
    ----------
    p:
        The direction H^{-1} g, shape ``(d,)``.
    method:
        ``"cholesky"``, ``"lstsq"`` (fallback for a singular H, lambda = 0) or ``"cg"``.
    iterations:
        Conjugate-gradient iterations (0 for direct solves).
    residual:
        Relative residual ||H p - g|| / ||g|| (0 when g = 0).
    """

    p: np.ndarray
    method: str
    iterations: int
    residual: float


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    *,
    tol: float = 1e-10,
    maxiter: int | None = None,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, int, float]:
    """Solve A x = b for symmetric positive definite A given only ``matvec(v) = A v``.

    Plain (unpreconditioned) conjugate gradient; stops when ||b - A x|| <= tol ||b|| or after
    ``maxiter`` iterations (default ``10 * len(b)``).  Returns ``(x, iterations, relative
    residual)``.  A non-positive curvature p^T A p <= 0 (A not positive definite) stops the
    iteration early with the current iterate.
    """
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    bnorm = float(np.linalg.norm(b))
    x = np.zeros_like(b) if x0 is None else np.asarray(x0, dtype=np.float64).copy()
    if bnorm == 0.0:
        return np.zeros_like(b), 0, 0.0
    maxiter = 10 * b.size if maxiter is None else int(maxiter)
    r = b - matvec(x) if x0 is not None else b.copy()
    p = r.copy()
    rr = float(r @ r)
    it = 0
    while it < maxiter and np.sqrt(rr) > tol * bnorm:
        Ap = matvec(p)
        pAp = float(p @ Ap)
        if not pAp > 0.0:
            break
        alpha = rr / pAp
        x += alpha * p
        r -= alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return x, it, float(np.sqrt(rr) / bnorm)


def solve_direct(H: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, str]:
    """Solve H p = g by Cholesky; least squares if H is not (numerically) positive definite."""
    try:
        factor = scipy.linalg.cho_factor(H, lower=True, check_finite=True)
        return scipy.linalg.cho_solve(factor, g, check_finite=False), "cholesky"
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H, g, rcond=None)[0], "lstsq"


def newton_direction(
    objective: GLMObjective,
    w: np.ndarray,
    g: np.ndarray | None = None,
    *,
    cg_threshold: int = DEFAULT_CG_THRESHOLD,
    cg_tol: float = 1e-10,
    cg_maxiter: int | None = None,
) -> DirectionResult:
    """p = H(w)^{-1} g for the local objective (COMRADE Algorithm 1 / GIANT round 2).

    Parameters
    ----------
    objective:
        The worker's local objective (its Hessian H_i is used).
    w:
        Current model w_t.
    g:
        Right-hand side: ``None`` for the local gradient g_i (COMRADE), or the broadcast
        exact gradient g_t (GIANT).
    cg_threshold:
        ``d <= cg_threshold``: form H and solve by Cholesky; otherwise conjugate gradient on
        Hessian-vector products (no ``(d, d)`` matrix is formed).
    cg_tol, cg_maxiter:
        Conjugate-gradient stopping rule (relative residual, iterations).
    """
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    g = objective.gradient(w) if g is None else np.asarray(g, dtype=np.float64).reshape(-1)
    if g.shape != (objective.d,):
        raise ValueError(f"g has shape {g.shape}, expected ({objective.d},)")
    gnorm = float(np.linalg.norm(g))
    if objective.d <= cg_threshold:
        H = objective.hessian(w)
        p, method = solve_direct(H, g)
        res = float(np.linalg.norm(H @ p - g) / gnorm) if gnorm > 0 else 0.0
        return DirectionResult(p=p, method=method, iterations=0, residual=res)
    curvature = objective.curvature(w)
    p, it, res = conjugate_gradient(lambda v: objective.hvp(w, v, curvature), g, tol=cg_tol, maxiter=cg_maxiter)
    return DirectionResult(p=p, method="cg", iterations=it, residual=res)

"""Solver for RGE's saddle-point problem (91) in Gram space, with a duality-gap certificate.

Problem (Data & Diggavi, Algorithm 3, eq. (91)-(92); Steinhardt-Charikar-Valiant 2018)::

    max_{Y >= 0, tr Y <= 1}  min_{W in CS^n}  Phi(W, Y) = sum_i c_i (g_i - G w_i)^T Y (g_i - G w_i)

where ``CS = {w : 0 <= w_j <= cap, sum_j w_j = 1}`` is the capped simplex (one
column ``w_i`` of ``W`` per active point).  By the minimax theorem (Appendix E.1)
the value equals ``min_W f(W)`` with ``f(W) = ||G (I - W) D||_2^2 = lambda_max(P(W))``,
``D = diag(sqrt(c))`` and ``P(W) = D (I - W)^T K (I - W) D``, where ``K = G^T G`` is
the (centred) Gram matrix.  Everything is therefore an ``n x n`` computation.

Method.  ``f`` is convex but non-smooth where the top eigenvalue is repeated, so
we minimise the soft-max smoothing ``f_mu(W) = mu log tr exp(P(W)/mu)`` with
FISTA (backtracking step, projection of every column on ``CS``) and decrease
``mu`` by continuation.  The eigen-weights ``z = softmax(sigma / mu)`` define a
feasible dual point ``Y = sum_k z_k v_k v_k^T`` (``v_k`` the unit left singular
vectors of ``G (I - W) D``): Y is *not* assumed rank one, it mixes the
(near-)top eigenvectors, which is what the saddle point needs when the top
eigenvalue is repeated.  The pair certifies

* upper bound ``UB = lambda_max(P(W)) >= value`` (``W`` is primal feasible),
* lower bound ``LB = Phi(W, Y) + sum_i min_{s in CS} <grad_i, s - w_i> <= min_W' Phi(W', Y) <= value``
  (Frank-Wolfe bound of the convex quadratic ``Phi(., Y)``; the gradient of
  ``Phi(., Y)`` at ``W`` equals ``grad f_mu(W)``),

and the solver stops when ``UB - LB <= tol_abs + tol_rel * UB``.  The scores
(93) are ``tau_i = (g_i - G w_i)^T Y (g_i - G w_i) = sum_k z_k sigma_k u_k[i]^2 / c_i``
with ``(sigma_k, u_k)`` the eigenpairs of ``P(W)``; ``sum_i c_i tau_i = Phi(W, Y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

#: Eigenvalues more than _WINDOW * mu below the top get soft-max weight < exp(-_WINDOW).
_WINDOW = 40.0


@dataclass
class SaddleSolution:
    """Primal-dual pair returned by :func:`solve_saddle`.

    ``W`` is primal feasible; the dual point is ``Y = sum_k z[k] v_k v_k^T``
    (trace <= 1) where ``v_k`` are the left singular vectors of ``G (I - W) D``
    matching the eigenvectors ``eigvecs[:, k]`` of ``P(W)``.
    """

    W: np.ndarray
    z: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    upper: float
    lower: float
    value: float
    tau: np.ndarray
    iterations: int
    converged: bool
    early_exit: bool = False

    @property
    def gap(self) -> float:
        """Certified duality gap ``upper - lower`` (>= 0 up to round-off)."""
        return self.upper - self.lower


def capped_simplex_cap(alpha: float, num_points_total: int) -> float:
    """The column cap of (91): ``(4 - alpha) / (alpha (2 + alpha) R)``."""
    return (4.0 - alpha) / (alpha * (2.0 + alpha) * num_points_total)


def project_capped_simplex(V: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of every column of ``V`` on ``{0 <= w <= cap, sum w = 1}``.

    Finds the shift ``t_j`` with ``sum_i clip(V_ij - t_j, 0, cap) = 1`` by vectorised
    bisection, then solves for ``t_j`` exactly on the identified free set.
    Requires ``n * cap >= 1`` (non-empty set).
    """
    n = V.shape[0]
    if n * cap < 1.0 - 1e-12:
        raise ValueError(f"capped simplex is empty: n={n}, cap={cap}")
    lo = V.min(axis=0) - cap  # every entry clipped to cap -> sum = n*cap >= 1
    hi = V.max(axis=0)  # every entry clipped to 0 -> sum = 0 < 1
    for _ in range(45):
        mid = 0.5 * (lo + hi)
        s = np.clip(V - mid, 0.0, cap).sum(axis=0)
        big = s > 1.0
        lo = np.where(big, mid, lo)
        hi = np.where(big, hi, mid)
    t = 0.5 * (lo + hi)
    X = V - t
    upper = X >= cap
    free = (X > 0) & ~upper
    n_free = free.sum(axis=0)
    ok = n_free > 0
    sum_free = np.where(free, V, 0.0).sum(axis=0)
    t_exact = (sum_free + cap * upper.sum(axis=0) - 1.0) / np.maximum(n_free, 1)
    t = np.where(ok, t_exact, t)
    return np.clip(V - t, 0.0, cap)


def _lmo_values(grad: np.ndarray, cap: float) -> np.ndarray:
    """``min_{s in CS} <grad[:, i], s>`` for every column (greedy fill of the cap)."""
    n = grad.shape[0]
    srt = np.sort(grad, axis=0)
    m = int(math.floor(1.0 / cap + 1e-12))
    m = min(m, n)
    val = cap * srt[:m].sum(axis=0)
    rest = 1.0 - m * cap
    if rest > 1e-15 and m < n:
        val = val + rest * srt[m]
    return val


class _Objective:
    """Evaluates ``f_mu``, its gradient and the certificate for fixed ``K, c``."""

    def __init__(self, K: np.ndarray, c: np.ndarray) -> None:
        self.K = K
        self.d = np.sqrt(c)
        self.n = K.shape[0]
        self.eye = np.eye(self.n)

    def eig(self, W: np.ndarray, floor: float | None = None, reach: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eigenpairs of ``P(W)`` (ascending); only those above ``floor`` if it is given.

        The soft-max weights of eigenvalues more than ``_WINDOW * mu`` below the top are
        below ``exp(-_WINDOW)``, so the caller passes ``floor = top - _WINDOW * mu`` and a
        partial (MRRR) eigensolver returns just that window; it falls back to the full
        decomposition when the window would be empty or is most of the spectrum.
        """
        B = (self.eye - W) * self.d[None, :]  # (I - W) D
        P = B.T @ self.K @ B
        P = 0.5 * (P + P.T)
        sig = None
        if floor is not None and floor > 0 and self.n > 16:
            sig, U = scipy.linalg.eigh(P, subset_by_value=(floor, np.inf), driver="evr")
            # The window must reach _WINDOW * mu below the *new* top, else fall back.
            if sig.size == 0 or sig.size > self.n // 2 or sig[-1] - floor < reach:
                sig = None
        if sig is None:
            sig, U = np.linalg.eigh(P)
        return np.maximum(sig, 0.0), U, B

    @staticmethod
    def smooth(sig: np.ndarray, mu: float) -> tuple[float, np.ndarray]:
        smax = sig[-1]
        e = np.exp((sig - smax) / mu)
        s = e.sum()
        return smax + mu * math.log(s), e / s

    def grad(self, B: np.ndarray, U: np.ndarray, z: np.ndarray) -> np.ndarray:
        Z = (U * z[None, :]) @ U.T
        return -2.0 * (self.K @ B @ Z) * self.d[None, :]


def solve_saddle(
    K: np.ndarray,
    c: np.ndarray,
    cap: float,
    *,
    W0: np.ndarray | None = None,
    tol_rel: float = 1e-3,
    tol_abs: float = 1e-12,
    max_iter: int = 3000,
    stop_below: float | None = None,
) -> SaddleSolution:
    """Solve (91) for Gram matrix ``K`` (n x n) and weights ``c`` to a duality-gap tolerance.

    Parameters
    ----------
    K:
        Gram matrix of the active points (any translation of the points gives the
        same solution; the RGE caller passes the centred Gram matrix).
    c:
        Soft weights ``c_i`` of Algorithm 3 (positive).
    cap:
        Column cap of the capped simplex; raised to ``1/n`` when ``n * cap < 1``.
    W0:
        Warm start (projected on the feasible set); default: uniform ``1/n``.
    tol_rel, tol_abs:
        Stop when the certified gap ``UB - LB <= tol_abs + tol_rel * UB``.
    max_iter:
        Maximum number of FISTA iterations (``converged=False`` if reached).
    stop_below:
        Early exit as soon as ``UB <= stop_below`` (the saddle value is then
        certainly below Algorithm 3's threshold and the filter stops).
    """
    K = np.asarray(K, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    n = K.shape[0]
    cap = max(cap, 1.0 / n)
    obj = _Objective(K, c)
    W = np.full((n, n), 1.0 / n) if W0 is None else project_capped_simplex(W0, cap)

    sig, U, B = obj.eig(W)
    ub = float(sig[-1])
    scale = max(ub, float(np.trace(K)) * float(c.max()) / max(n, 1), 1e-300)
    tol_abs = tol_abs * scale  # relative to the problem's magnitude: scale-equivariant stopping

    def finish(z: np.ndarray, lower: float, it: int, converged: bool, early: bool) -> SaddleSolution:
        tau = (U**2 @ (z * sig)) / c
        return SaddleSolution(
            W=W, z=z, eigvals=sig, eigvecs=U, upper=float(sig[-1]), lower=lower,
            value=float(z @ sig), tau=tau, iterations=it, converged=converged, early_exit=early,
        )

    if n == 1 or ub <= tol_abs or cap * n <= 1.0 + 1e-12:
        # Single point, all-zero residuals, or W forced to uniform: the W-problem is trivial.
        z = np.zeros(n)
        z[-1] = 1.0
        if n > 1 and cap * n <= 1.0 + 1e-12:
            # W is the only feasible point; Y optimal is any top eigen-mixture.
            top = sig >= sig[-1] * (1 - 1e-9)
            z = top / top.sum()
        return finish(z, float(z @ sig), 0, True, stop_below is not None and ub <= stop_below)
    if stop_below is not None and ub <= stop_below:
        z = np.zeros(n)
        z[-1] = 1.0
        return finish(z, float(z @ sig), 0, False, True)

    log_n = math.log(n)
    mu = max(0.05 * ub, 1e-12 * scale) / log_n
    L = 2.0 * float(np.linalg.eigvalsh(K)[-1]) * float(c.max()) + 1e-300
    fval, z = obj.smooth(sig, mu)
    Yk, Wprev, t = W.copy(), W.copy(), 1.0
    lower = -math.inf
    it = 0
    for it in range(1, max_iter + 1):
        # --- one FISTA step on f_mu from the extrapolated point Yk ---
        reach = _WINDOW * mu
        win = float(sig[-1]) - reach - 0.05 * abs(float(sig[-1]))
        sig_y, U_y, B_y = obj.eig(Yk, win, reach)
        f_y, z_y = obj.smooth(sig_y, mu)
        g_y = obj.grad(B_y, U_y, z_y)
        while True:
            Wn = project_capped_simplex(Yk - g_y / L, cap)
            sig_n, U_n, B_n = obj.eig(Wn, win, reach)
            f_n, z_n = obj.smooth(sig_n, mu)
            diff = Wn - Yk
            if f_n <= f_y + float(np.sum(g_y * diff)) + 0.5 * L * float(np.sum(diff * diff)) + 1e-14 * abs(f_y):
                break
            L *= 2.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Yk = Wn + ((t - 1.0) / t_new) * (Wn - W)
        Wprev, W, t = W, Wn, t_new
        sig, U, B, z = sig_n, U_n, B_n, z_n
        L *= 0.9  # let the step grow again

        ub = float(sig[-1])
        if stop_below is not None and ub <= stop_below:
            return finish(z, float(z @ sig), it, False, True)
        # --- certificate: UB = lambda_max, LB = Phi(W,Y) + Frank-Wolfe term ---
        g = obj.grad(B, U, z)
        phi = float(z @ sig)
        fw = float(np.sum(g * W) - _lmo_values(g, cap).sum())  # >= 0
        lower = phi - fw
        gap = ub - lower
        if gap <= tol_abs + tol_rel * ub:
            return finish(z, lower, it, True, False)
        if ub - phi > fw:  # smoothing error dominates: sharpen, restart momentum
            mu = max(mu / 4.0, 1e-15 * scale)
            Yk, t = W.copy(), 1.0
    return finish(z, lower, it, False, False)

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
import scipy.sparse.linalg

#: Eigenvalues more than _WINDOW * mu below the top get soft-max weight < exp(-_WINDOW).
_WINDOW = 40.0


@dataclass
class SaddleSolution:
    """Primal-dual pair returned by :func:`solve_saddle`.

    ``W`` is primal feasible; the dual point is ``Y = sum_k z[k] v_k v_k^T``
    (trace <= 1) where ``v_k`` are the left singular vectors of ``G (I - W) D``
    matching the eigenvectors ``eigvecs[:, k]`` of ``P(W)``.  ``mu`` is the final
    soft-max smoothing parameter of the solve (0 when no iteration ran).
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
    mu: float = 0.0

    @property
    def gap(self) -> float:
        """Certified duality gap ``upper - lower`` (>= 0 up to round-off)."""
        return self.upper - self.lower


def capped_simplex_cap(alpha: float, num_points_total: int) -> float:
    """The column cap of (91): ``(4 - alpha) / (alpha (2 + alpha) R)``."""
    return (4.0 - alpha) / (alpha * (2.0 + alpha) * num_points_total)


def project_capped_simplex(V: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of every column of ``V`` on ``{0 <= w <= cap, sum w = 1}``.

    See :func:`project_capped_rows` (the same projection of the rows of ``V^T``).
    Requires ``n * cap >= 1`` (non-empty set).
    """
    return np.ascontiguousarray(project_capped_rows(np.ascontiguousarray(np.asarray(V, dtype=np.float64).T), cap).T)


def _newton_shift(
    V: np.ndarray, cap: float, t0: np.ndarray | None = None, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray | None]:
    """Root ``t`` of ``s(t) = sum_i clip(V[r, i] - t, 0, cap) = 1`` for every row: safeguarded Newton.

    ``s`` is piecewise linear and non-increasing with slope ``-#{free entries}``, so a Newton
    step lands on the root as soon as it is taken on the root's linear piece; steps that
    leave the bracket ``[lo, hi]`` (kept with ``s(lo) >= 1 > s(hi)``) are replaced by
    bisection.  A handful of passes instead of a fixed 45-step bisection; one or two from a
    warm start ``t0`` (the previous projection's shifts, inside the solver's iterations).
    Returns ``(t, P)`` with ``P = clip(V - t, 0, cap)`` when every row's sum is 1 to within
    ``1e-14`` per free entry (the projection itself), else ``P = None``.
    """
    n = V.shape[1]
    lo = V.min(axis=1) - cap  # s(lo) = n cap >= 1
    hi = V.max(axis=1)  # s(hi) = 0 < 1
    guess = (V.sum(axis=1) - 1.0) / n if t0 is None else t0  # the root when nothing is clipped
    t = np.minimum(np.maximum(guess, lo), hi)
    X = np.empty_like(V)
    for _ in range(max_iter):
        np.subtract(V, t[:, None], out=X)
        C = np.maximum(X, 0.0)
        err = np.minimum(C, cap, out=C).sum(axis=1) - 1.0
        aerr = np.abs(err)
        if aerr.max() <= 1e-14:  # exact whatever the count of free entries (the common warm-started case)
            return t, C
        n_free = ((X > 0.0) & (X < cap)).sum(axis=1)
        per = np.maximum(n_free, 1)
        exact = aerr <= 1e-14 * per
        if exact.all():
            return t, C
        big = err > 0.0
        lo = np.where(big, t, lo)
        hi = np.where(big, hi, t)
        done = exact | (hi - lo <= 1e-15 * np.maximum(np.abs(hi), 1.0))
        if done.all():
            break
        step = t + err / per
        bad = (n_free == 0) | (step <= lo) | (step >= hi)
        t = np.where(done, t, np.where(bad, 0.5 * (lo + hi), step))
    return t, None


def project_capped_rows(
    V: np.ndarray, cap: float, t0: np.ndarray | None = None, *, return_shift: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Euclidean projection of every *row* of ``V`` (``m x n``) on the capped simplex of R^n.

    The projection of a row ``v`` is ``clip(v - t, 0, cap)`` with the shift ``t``
    solving ``s(t) = sum_i clip(v_i - t, 0, cap) = 1``; ``s`` is piecewise linear and
    non-increasing, and safeguarded Newton steps (:func:`_newton_shift`, vectorised over
    rows) find its root in a few passes; when they stop on a bracket rather than on the
    root, ``t`` is finally solved for exactly on the identified free set.  ``t0`` warm-starts the shifts; ``return_shift`` also returns
    the final shifts ``t``.  Requires ``n * cap >= 1`` (non-empty set).
    """
    m, n = V.shape
    if n * cap < 1.0 - 1e-12:
        raise ValueError(f"capped simplex is empty: n={n}, cap={cap}")
    t, P = _newton_shift(V, cap, t0)
    if P is not None:
        return (P, t) if return_shift else P
    # exact shift on the free set identified by t (removes the round-off of a bracketed search)
    X = V - t[:, None]
    upper = X >= cap
    free = (X > 0) & ~upper
    n_free = np.count_nonzero(free, axis=1)
    sum_free = np.where(free, V, 0.0).sum(axis=1)
    t_exact = (sum_free + cap * np.count_nonzero(upper, axis=1) - 1.0) / np.maximum(n_free, 1)
    t = np.where(n_free > 0, t_exact, t)
    X = V - t[:, None]
    np.maximum(X, 0.0, out=X)
    np.minimum(X, cap, out=X)
    return (X, t) if return_shift else X


def _lmo_rows(grad_t: np.ndarray, cap: float) -> np.ndarray:
    """``min_{s in CS} <grad_t[i], s>`` for every *row* (greedy fill of the cap).

    The ``m = floor(1/cap)`` smallest entries get ``cap`` and the next one the rest;
    a partial sort (``np.partition``) finds them.
    """
    n = grad_t.shape[1]
    m = min(int(math.floor(1.0 / cap + 1e-12)), n)
    rest = 1.0 - m * cap
    if m >= n:
        return cap * grad_t.sum(axis=1)
    part = np.partition(grad_t, m, axis=1)  # part[:, :m] are the m smallest, part[:, m] the next
    val = cap * part[:, :m].sum(axis=1)
    if rest > 1e-15:
        val = val + rest * part[:, m]
    return val


def _lmo_values(grad: np.ndarray, cap: float) -> np.ndarray:
    """``min_{s in CS} <grad[:, i], s>`` for every column (greedy fill of the cap)."""
    return _lmo_rows(np.ascontiguousarray(grad.T), cap)


#: Below this size the full symmetric eigendecomposition is cheaper than a windowed (MRRR) one.
_FULL_EIG_MAX = 48

_SYEVD = scipy.linalg.lapack.get_lapack_funcs("syevd", (np.zeros((1, 1)),))


def sym_eig(P: np.ndarray, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Ascending eigenvalues (and eigenvectors) of a symmetric float64 matrix (its lower triangle).

    LAPACK ``dsyevd`` called directly, as ``np.linalg.eigh`` does, without its per-call wrapping
    (about 6 us of a 30 us call at n = 20; the saddle solver makes tens of calls per decode).
    """
    if vectors:
        w, v, info = _SYEVD(P, compute_v=1, lower=1)
        if info == 0:
            return w, v
        return np.linalg.eigh(P)
    w, _, info = _SYEVD(P, compute_v=0, lower=1)
    return (w, None) if info == 0 else (np.linalg.eigvalsh(P), None)


class _Objective:
    """Evaluates ``f_mu``, its gradient and the certificate for fixed ``K, c``.

    Works on ``Wt = W^T`` (row ``i`` is the column ``w_i`` of (91)) so that every
    per-point operation (projection, linear minimisation) runs along contiguous rows.
    With ``Bt = D (I - Wt)`` and ``BK = Bt K``: ``P(W) = BK Bt^T`` and the gradient of
    ``f_mu`` with respect to ``Wt`` is ``-2 D Z BK`` with ``Z = U diag(z) U^T``.
    """

    def __init__(self, K: np.ndarray, c: np.ndarray) -> None:
        self.K = K
        self.d = np.sqrt(c)
        self.n = K.shape[0]
        self.eye = np.eye(self.n)

    def eig(
        self, Wt: np.ndarray, floor: float | None = None, reach: float = 0.0, vectors: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Eigenpairs of ``P(W)`` (ascending) and ``BK``; only those above ``floor`` if it is given.

        The soft-max weights of eigenvalues more than ``_WINDOW * mu`` below the top are
        below ``exp(-_WINDOW)``, so the caller passes ``floor = top - _WINDOW * mu`` and,
        for ``n > _FULL_EIG_MAX``, a partial (MRRR) eigensolver returns just that window;
        it falls back to the full decomposition when the window would be empty or is most
        of the spectrum.  Small problems always get the full (cheaper) decomposition, and
        only the eigenvalues when ``vectors`` is false (``U`` is then ``None``).
        """
        Bt = (self.eye - Wt) * self.d[:, None]  # D (I - W^T) = ((I - W) D)^T
        BK = Bt @ self.K
        P = BK @ Bt.T
        P += P.T
        P *= 0.5
        sig = None
        if not vectors and self.n <= _FULL_EIG_MAX:
            return np.maximum(sym_eig(P, vectors=False)[0], 0.0), None, BK
        if floor is not None and floor > 0 and self.n > _FULL_EIG_MAX:
            sig, U = scipy.linalg.eigh(P, subset_by_value=(floor, np.inf), driver="evr", check_finite=False)
            # The window must reach _WINDOW * mu below the *new* top, else fall back.
            if sig.size == 0 or sig.size > self.n // 2 or sig[-1] - floor < reach:
                sig = None
        if sig is None:
            sig, U = sym_eig(P)
        return np.maximum(sig, 0.0), U, BK

    @staticmethod
    def smooth(sig: np.ndarray, mu: float) -> tuple[float, np.ndarray]:
        smax = sig[-1]
        e = np.exp((sig - smax) / mu)
        s = e.sum()
        return smax + mu * math.log(s), e / s

    def grad(self, BK: np.ndarray, U: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Gradient of ``f_mu`` with respect to ``Wt`` (rows = points)."""
        on = z > 1e-300  # eigenvectors with (numerically) zero weight do not contribute
        if not on.all():
            U, z = U[:, on], z[on]
        Z = (U * z) @ U.T
        g = Z @ BK
        g *= (-2.0 * self.d)[:, None]
        return g


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
    if W0 is None:
        Wt = np.full((n, n), 1.0 / n)
    else:
        Wt = np.ascontiguousarray(np.asarray(W0, dtype=np.float64).T)
        Wt = project_capped_rows(Wt, cap)

    sig, U, BK = obj.eig(Wt)
    ub = float(sig[-1])
    scale = max(ub, float(np.trace(K)) * float(c.max()) / max(n, 1), 1e-300)
    tol_abs = tol_abs * scale  # relative to the problem's magnitude: scale-equivariant stopping
    mu = 0.0

    def finish(z: np.ndarray, lower: float, it: int, converged: bool, early: bool) -> SaddleSolution:
        tau = (U**2 @ (z * sig)) / c
        return SaddleSolution(
            W=np.ascontiguousarray(Wt.T), z=z, eigvals=sig, eigvecs=U, upper=float(sig[-1]), lower=lower,
            value=float(z @ sig), tau=tau, iterations=it, converged=converged, early_exit=early, mu=mu,
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
    mu_floor = 1e-15 * scale
    mu = max(0.05 * ub, 1e-12 * scale) / log_n
    L = 2.0 * float(np.linalg.eigvalsh(K)[-1]) * float(c.max()) + 1e-300
    fval, z = obj.smooth(sig, mu)
    Yk, t = Wt.copy(), 1.0
    lower = -math.inf
    it = 0
    target = tol_abs + tol_rel * ub
    last_check, stride = 0, 1
    shift: np.ndarray | None = None  # the projection's shifts, warm start of the next projection
    for it in range(1, max_iter + 1):
        # --- one FISTA step on f_mu from the extrapolated point Yk ---
        reach = _WINDOW * mu
        win = float(sig[-1]) - reach - 0.05 * abs(float(sig[-1]))
        sig_y, U_y, BK_y = obj.eig(Yk, win, reach)
        f_y, z_y = obj.smooth(sig_y, mu)
        g_y = obj.grad(BK_y, U_y, z_y)
        due = it - last_check >= stride  # certificate at this iteration: the trial needs eigenvectors
        while True:
            Wn, shift = project_capped_rows(Yk - g_y / L, cap, shift, return_shift=True)
            sig_n, U_n, BK_n = obj.eig(Wn, win, reach, vectors=due)
            f_n, z_n = obj.smooth(sig_n, mu)
            diff = Wn - Yk
            if f_n <= f_y + float(np.vdot(g_y, diff)) + 0.5 * L * float(np.vdot(diff, diff)) + 1e-14 * abs(f_y):
                break
            L *= 2.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Yk = Wn + ((t - 1.0) / t_new) * (Wn - Wt)
        Wt, t = Wn, t_new
        sig, U, BK, z = sig_n, U_n, BK_n, z_n
        L *= 0.9  # let the step grow again

        ub = float(sig[-1])
        if stop_below is not None and ub <= stop_below:
            if U is None:
                sig, U, BK = obj.eig(Wt, win, reach)
                z = obj.smooth(sig, mu)[1]
            return finish(z, float(z @ sig), it, False, True)
        # --- certificate: UB = lambda_max, LB = Phi(W,Y) + Frank-Wolfe term ---
        # (every iteration once the gap is within 4x the tolerance, every 3rd before)
        if it - last_check < stride:
            continue
        last_check = it
        if U is None:
            sig, U, BK = obj.eig(Wt, win, reach)
            z = obj.smooth(sig, mu)[1]
        g = obj.grad(BK, U, z)
        phi = float(z @ sig)
        fw = float(np.vdot(g, Wt) - _lmo_rows(g, cap).sum())  # >= 0
        lower = phi - fw
        gap = ub - lower
        target = tol_abs + tol_rel * ub
        if gap <= target:
            return finish(z, lower, it, True, False)
        stride = 1 if gap <= 4.0 * target else 3
        if ub - phi > fw:  # smoothing error dominates: sharpen, restart momentum
            mu = max(mu / 4.0, mu_floor)
            Yk, t = Wt.copy(), 1.0
    if U is None:
        sig, U, BK = obj.eig(Wt)
        z = obj.smooth(sig, mu)[1]
        lower = -math.inf if not math.isfinite(lower) else lower
    return finish(z, lower, it, False, False)


def spectral_step(K: np.ndarray, c: np.ndarray, cap: float, *, stop_below: float | None = None) -> SaddleSolution:
    """One filter step at a *fixed* ``W``: every column the c-weighted mean (projected on ``CS``).

    The classical spectral filter step (the saddle problem (91) without the minimisation
    over ``W``): ``P(W)`` is formed in O(n^2), its top eigenpair ``(sigma, u)`` comes from
    Lanczos (LAPACK below 256 points), ``Y = v v^T`` for the matching singular vector and
    ``tau_i = sigma u_i^2 / c_i`` (93).  ``upper = sigma >= `` the saddle value, so
    ``upper <= stop_below`` certifies Algorithm 3's stopping test exactly as the solver's
    early exit does; otherwise ``value = upper`` over-states the saddle value, so the filter
    can only continue where Algorithm 3 might already stop.  For large R, where one
    iteration of :func:`solve_saddle` costs O(n^3).  ``converged`` is False (no certificate).
    """
    K = np.asarray(K, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    n = K.shape[0]
    cap = max(cap, 1.0 / n)
    w = project_capped_rows((c / c.sum())[None, :], cap)[0]
    Kw = K @ w
    wKw = float(w @ Kw)
    d = np.sqrt(c)
    P = K - Kw[:, None] - Kw[None, :] + wKw  # (I - 1 w^T) K (I - w 1^T)
    P *= d[:, None]
    P *= d[None, :]
    P = 0.5 * (P + P.T)
    if n >= 256:
        sig, U = scipy.sparse.linalg.eigsh(P, k=1, which="LA", tol=1e-10)
    elif n > 1:
        sig, U = scipy.linalg.eigh(P, subset_by_index=[n - 1, n - 1], driver="evr")
    else:
        sig, U = np.linalg.eigh(P)
    sig = np.maximum(sig, 0.0)
    z = np.ones(1)
    tau = (U[:, 0] ** 2 * sig[0]) / c
    ub = float(sig[0])
    return SaddleSolution(
        W=np.repeat(w[:, None], n, axis=1), z=z, eigvals=sig, eigvecs=U, upper=ub, lower=-math.inf, value=ub,
        tau=tau, iterations=1, converged=False, early_exit=stop_below is not None and ub <= stop_below,
    )

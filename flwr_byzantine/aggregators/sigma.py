"""Choosing RGE's concentration parameter sigma_0 (Data & Diggavi, Theorem 3).

Algorithm 3 stops filtering when ``sum_i c_i tau_i <= 4 R sigma_0^2``, where
``sigma_0^2`` bounds the spectral norm of the empirical covariance of the honest
gradients.  Two ways to set it:

* :func:`sigma0_from_theory` -- the paper's expression (Theorem 3)::

      sigma_0^2 = 24 sigma^2 / (b eps') * (1 + d / ((1 - (eps + eps')) R)) + 16 kappa^2

  for a user who knows the per-sample gradient variance ``sigma^2``, the batch
  size ``b``, the heterogeneity ``kappa^2`` and picks the failure fraction ``eps'``.

* :func:`estimate_sigma0_sq` -- an automatic, data-driven choice that needs only
  the assumed Byzantine fraction ``eps_tilde`` (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse.linalg

from .small_eigh import SMALL_EIGH_MAX, eigh_small
from .sketch import CentredFactor


def sigma0_from_theory(
    sigma_sq: float,
    batch_size: int,
    dim: int,
    num_workers: int,
    eps: float,
    eps_prime: float,
    kappa_sq: float = 0.0,
) -> float:
    """Return ``sigma_0`` (not squared) from Theorem 3 of Data & Diggavi.

    ``sigma_0^2 = 24 sigma^2/(b eps') (1 + d/((1-(eps+eps')) R)) + 16 kappa^2``.
    """
    if not (eps_prime > 0 and eps >= 0 and eps + eps_prime < 1):
        raise ValueError("need eps' > 0 and eps + eps' < 1")
    if batch_size < 1 or dim < 1 or num_workers < 1:
        raise ValueError("batch_size, dim and num_workers must be positive")
    s2 = 24.0 * sigma_sq / (batch_size * eps_prime) * (
        1.0 + dim / ((1.0 - (eps + eps_prime)) * num_workers)
    ) + 16.0 * kappa_sq
    return math.sqrt(s2)


#: The trimming runs at most this many eigensolves; beyond, each removes several points.
MAX_TRIM_STEPS = 16
#: The same cap from :data:`LANCZOS_MIN_N` points on (hundreds of clients: each solve removes more).
MAX_TRIM_STEPS_LARGE = 8
#: From this size on the top eigenpair comes from warm-started Lanczos (ARPACK) instead of LAPACK.
LANCZOS_MIN_N = 256
#: Relative residual tolerance of the last Lanczos solve, whose eigenvalue is the estimate (the eigenvalue's error is
#: about the residual's square over the gap: issue 12, on sketched rounds at R = 300-1000 the estimate within 3e-8 of a
#: 1e-10 solve's, as with 1e-6, in 36-51 products on 800 points against 46-76).
LANCZOS_TOL = 1e-4
#: The same for the trimming's solves before the last, whose vectors only rank the points to remove.  On a clean round
#: the top of the spectrum is nearly flat (gaps of about 1 % at R = 1000): the direction is ill-determined there at
#: any tolerance, and 1e-6 took 50-60 ms of Lanczos products at R = 1000 (issue 12).
LANCZOS_TRIM_TOL = 1e-3
#: The trimming's solves before the last run at most this many Lanczos steps (:func:`lanczos_top`; the last one, whose
#: eigenvalue is the estimate, is ARPACK's solve to :data:`LANCZOS_TOL`).  With a gap at the top (a cluster of
#: attackers) the residual reaches :data:`LANCZOS_TRIM_TOL` in fewer; on a nearly flat spectrum no tolerance
#: determines the direction, and ARPACK took 26-66 products per solve at R = 1000 (issue 12).
LANCZOS_TRIM_STEPS = 12
#: Lanczos basis size (ARPACK's ``ncv``; its default for one eigenpair is 20).  Each solve but the first starts from
#: the previous solve's vector, so a short basis that restarts converges in fewer products (issue 12: R = 1000 and
#: 300, far and ALIE-like rounds, eps 0.2 and 0.25: 129-239 products against 209-289 with 20, the same estimate to
#: 7 digits; 6 took more products in half the cases).
LANCZOS_NCV = 10


@numba.njit(cache=True)
def _centred_submatrix(K: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The centred ``K[idx][:, idx]``, symmetrised: one compiled pass (no numpy temporaries per call)."""
    n = idx.size
    Kt = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            Kt[i, j] = K[idx[i], idx[j]]
    row = np.empty(n)
    for j in range(n):
        row[j] = Kt[:, j].mean()
    tot = row.mean()
    Kc = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            Kc[i, j] = Kt[i, j] - row[j] - row[i] + tot
    return 0.5 * (Kc + Kc.T)


def _top_eig_dense(K: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Top eigenpair of the centred ``K[idx][:, idx]`` (small ``idx``): LAPACK's ``dsyevr`` for the top eigenpair
    only (relatively robust representations: the same pair to machine precision as a full solve, 3.4x faster at
    n = 100 than ``dsyevd``'s full spectrum and every vector; issue 12, the randk round's filter); a full solve if
    it reports an error.  Up to :data:`~.small_eigh.SMALL_EIGH_MAX` points every eigenpair from the compiled small
    solver (:func:`~.small_eigh.eigh_small`, the saddle solver's: no second compiled copy) instead of SciPy's wrapper
    (the estimator's five solves at the App's size: 136 us an estimate against 347 us)."""
    S = _centred_submatrix(K, idx)
    n = S.shape[0]
    if n <= SMALL_EIGH_MAX:
        w, V, ok = eigh_small(S, True)
        if ok:
            return max(float(w[-1]), 0.0), V[:, -1].copy()
    w, z, m, _, info = scipy.linalg.lapack.dsyevr(S, compute_v=1, range="I", il=n, iu=n)
    if info != 0 or m != 1:
        vals, vecs = np.linalg.eigh(S)
        return max(float(vals[-1]), 0.0), vecs[:, -1].copy()
    return max(float(w[0]), 0.0), z[:, 0].copy()


def _tridiagonal_eigh(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.linalg.eigh_tridiagonal(a, b)``: the same LAPACK routine (``dstevd``, its driver for every eigenpair)
    called directly, the same values and vectors bit for bit without the wrapper's checks (31 us against 9 us a call
    at n = 12: a Lanczos step's Ritz pair, about a hundred a round at R = 1000; issue 12)."""
    if a.size > 1:
        w, v, info = scipy.linalg.lapack.dstevd(a, b, compute_v=1)
        if info == 0:
            return w, v
    return scipy.linalg.eigh_tridiagonal(a, b)


def lanczos_top(matvec: Callable[[np.ndarray], np.ndarray], n: int, v0: np.ndarray | None, tol: float,
                max_steps: int, above: float | None = None) -> tuple[float, np.ndarray]:
    """The top Ritz pair of a symmetric operator on ``R^n`` after at most ``max_steps`` Lanczos steps from ``v0`` (a
    fixed pseudo-random start when ``None`` or zero), with full reorthogonalisation (twice, classical Gram-Schmidt),
    stopping as soon as the pair's residual norm ``beta_j |y_j|`` is at most ``tol`` times its value (ARPACK's
    criterion) or the Krylov space is invariant.  For the sigma_0 estimator's trimming solves, whose vectors only
    rank the points to remove: on a nearly flat top spectrum (a clean round) ARPACK's restarts took 26-66 products
    per solve at R = 1000 for a direction that no tolerance determines (issue 12).  ``above``: also stop as soon as the
    Ritz value exceeds it (Ritz values only grow with the steps, and the top eigenvalue is at least each of them)."""
    if v0 is None or not np.any(v0) or not np.all(np.isfinite(v0)):
        v0 = np.random.default_rng(n).standard_normal(n)
    steps = max(1, min(int(max_steps), n))
    V = np.empty((steps, n))
    alpha = np.empty(steps)
    beta = np.empty(steps)
    v = np.asarray(v0, dtype=np.float64) / float(np.linalg.norm(v0))
    theta, y, j = 0.0, np.ones(1), 0
    for j in range(steps):
        V[j] = v
        w = np.asarray(matvec(v), dtype=np.float64)
        alpha[j] = float(v @ w)
        for _ in range(2):  # full reorthogonalisation against the basis so far
            w -= V[: j + 1].T @ (V[: j + 1] @ w)
        beta[j] = float(np.linalg.norm(w))
        vals, vecs = _tridiagonal_eigh(alpha[: j + 1], beta[:j])
        theta, y = float(vals[-1]), vecs[:, -1]
        if beta[j] * abs(float(y[-1])) <= tol * abs(theta) or beta[j] <= 1e-12 * max(abs(theta), 1e-300):
            break
        if above is not None and theta > above:
            break
        v = w / beta[j]
    x = V[: j + 1].T @ y
    return theta, x / float(np.linalg.norm(x))


def top_eig_centred(K: np.ndarray | CentredFactor, idx: np.ndarray, v0: np.ndarray | None = None,
                    K32: np.ndarray | None = None, tol: float | None = None,
                    max_steps: int | None = None) -> tuple[float, np.ndarray]:
    """Top eigenpair of the centred Gram matrix of the points ``idx``.

    Below :data:`LANCZOS_MIN_N` points: the centred submatrix in one compiled pass and LAPACK's solve for the top
    eigenpair only (:func:`_top_eig_dense`: the estimator makes up to 17 such calls per round); from it on: Lanczos (``scipy.sparse.linalg.eigsh``, basis :data:`LANCZOS_NCV`),
    started from ``v0`` when given (the previous top vector restricted to ``idx``), O(n^2)
    per iteration instead of O(n^3).  ``K32`` (``K`` in float32, made once by a caller with several solves):
    the Lanczos products read it instead of ``K`` (half the bytes per product; the products of a 1000-point
    Gram matrix in float32 move the estimate in its 7th digit).  ``tol``: the Lanczos solve's relative tolerance
    (default :data:`LANCZOS_TOL`).
    ``max_steps`` (from :data:`LANCZOS_MIN_N` points): at most that many Lanczos steps, no restart
    (:func:`lanczos_top`), instead of ARPACK's solve to ``tol``.  ``K`` may be a :class:`~.sketch.CentredFactor`: its
    products (in its dtype) from :data:`LANCZOS_MIN_N` points, the formed submatrix below.
    """
    n = idx.size
    tol = LANCZOS_TOL if tol is None else float(tol)
    if isinstance(K, CentredFactor) and n < LANCZOS_MIN_N:
        sub = K.rows(idx).dense()
        return _top_eig_dense(sub, np.arange(n, dtype=np.intp))
    if n >= LANCZOS_MIN_N:
        # Centring applied implicitly (H K_T H v with H = I - 11^T/n) and K_T read through the
        # full K with zero padding: no submatrix or centred copy per step.
        Km = K if K32 is None else K32  # a CentredFactor: two products with the factor (in its dtype)
        full = np.zeros(K.shape[0], dtype=Km.dtype)

        def matvec(v: np.ndarray) -> np.ndarray:
            v = np.asarray(v).reshape(-1)
            full[idx] = v - v.mean()
            out = (Km @ full)[idx].astype(np.float64)
            return out - out.mean()

        if max_steps is not None:
            lam, vec = lanczos_top(matvec, n, v0, tol, max_steps)
            return max(lam, 0.0), vec
        op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        start = None if v0 is None or not np.any(v0) else v0
        vals, vecs = scipy.sparse.linalg.eigsh(op, k=1, which="LA", v0=start, tol=tol,
                                               ncv=min(n, LANCZOS_NCV))
        return max(float(vals[-1]), 0.0), vecs[:, -1]
    return _top_eig_dense(np.ascontiguousarray(K, dtype=np.float64), np.ascontiguousarray(idx, dtype=np.intp))


@dataclass(frozen=True)
class Sigma0Estimate:
    """What :func:`estimate_sigma0` computes: the estimate and the eigenvectors the filter's spectral steps start from.

    ``value``: ``sigma_0^2``.  ``top``: the top eigenvector of the centred Gram matrix of every point (the first
    solve).  ``kept``: the points left after the trimming (indices into the Gram matrix), and ``kept_top`` the top
    eigenvector of their centred Gram matrix (the last solve, whose eigenvalue is the estimate).
    """

    value: float
    top: np.ndarray
    kept: np.ndarray
    kept_top: np.ndarray


def estimate_sigma0_sq(gram: np.ndarray, eps_tilde: float) -> float:
    """Automatic ``sigma_0^2`` from the Gram matrix, using only ``eps_tilde``: :func:`estimate_sigma0`'s value (see
    there)."""
    return estimate_sigma0(gram, eps_tilde).value


def estimate_sigma0(gram: np.ndarray | CentredFactor, eps_tilde: float) -> Sigma0Estimate:
    """Automatic ``sigma_0^2`` from the Gram matrix, using only ``eps_tilde``, with the top eigenvectors of its first and
    last solves (:class:`Sigma0Estimate`).  The filter's spectral steps start their Lanczos solves from them: the first
    step from the first solve's vector (the same matrix: issue 12, on a clean round at R = 1000, 6 ms against 11-16 ms
    from a random start), a later step on about the trimmed points from the last one's (:func:`start_on`).

    Estimator (greedy spectral trimming).  Start from all R points; repeat
    ``floor(eps_tilde * R)`` times: compute the top principal direction of the
    current set's empirical covariance and remove the point with the largest
    absolute projection on it.  Return the top eigenvalue of the covariance of
    the ``(1 - eps_tilde) R`` survivors,
    ``sigma_0^2 = lambda_max((1/|T|) sum_{i in T} (g_i - g_T)(g_i - g_T)^T)``.

    Why it is sound.  ``sigma_0^2`` in Theorem 3 is (a bound on) exactly this
    quantity for the honest set ``S``: the spectral norm of its empirical
    covariance.  (i) It needs no knowledge of *which* clients are Byzantine,
    only their assumed fraction.  (ii) Each removal is the classical filtering
    step: a point far out along the top direction is removed first, so a
    Byzantine point that would inflate the estimate by more than the honest
    spread is removed before any honest point is.  Byzantine points that survive
    sit within the honest spread along every direction, so they cannot push the
    estimate far above the honest ``lambda_max``; by Theorem 3 the residual
    error scales as ``O(sigma_0 sqrt(eps))`` with the estimate in place of the
    true value.  (iii) On clean data it can only under-estimate the honest
    ``lambda_max`` by the trimming (a constant factor for light-tailed data, and
    none at all in the high-dimensional regime ``d >> R``, where the centred
    points are nearly orthogonal and removing points does not reduce the top
    eigenvalue per point); the factor 4 in Algorithm 3's threshold absorbs it,
    so no honest point is dropped on clean, concentrated data.
    Cost: ``min(eps_tilde * R, 16)`` top-eigenpair solves of size <= R (beyond 16 removals
    each solve removes the ``ceil(eps_tilde R / 16)`` points with the largest projections),
    by LAPACK below 256 points and warm-started Lanczos above (8 solves there, products in float32; the trimming's
    solves to :data:`LANCZOS_TRIM_TOL`, the last one to :data:`LANCZOS_TOL`): O(R^3) in all, O(R^2) per
    Lanczos iteration at large R (it was ``eps_tilde R`` full solves, O(R^4)).
    """
    R = gram.shape[0]
    if not 0.0 <= eps_tilde < 0.5:
        raise ValueError("eps_tilde must be in [0, 0.5)")
    idx = np.arange(R)
    to_remove = int(math.floor(eps_tilde * R))
    steps = MAX_TRIM_STEPS_LARGE if R >= LANCZOS_MIN_N else MAX_TRIM_STEPS
    per_step = max(1, math.ceil(to_remove / steps))
    vec: np.ndarray | None = None
    # the Lanczos solves' products in float32 (one copy for all of them), unless the entries (|K_ij| <= max_i K_ii for a
    # Gram matrix) would overflow float32 in a product: then in float64
    K32 = None
    if R >= LANCZOS_MIN_N and not isinstance(gram, CentredFactor):  # (a factor's products are in its own dtype)
        top_diag = float(np.max(np.diag(gram)))
        if np.isfinite(top_diag) and top_diag * R < float(np.finfo(np.float32).max) / 16:
            K32 = gram.astype(np.float32)
    first: np.ndarray | None = None
    while to_remove > 0 and idx.size > 2:
        _, vec = top_eig_centred(gram, idx, vec, K32, LANCZOS_TRIM_TOL, LANCZOS_TRIM_STEPS)
        if first is None:
            first = vec
        b = min(per_step, to_remove, idx.size - 2)
        out = np.argpartition(-np.abs(vec), b - 1)[:b] if b > 1 else np.array([int(np.argmax(np.abs(vec)))])
        keep = np.ones(idx.size, dtype=bool)
        keep[out] = False
        idx, vec = idx[keep], vec[keep]
        to_remove -= b
    lam, top = top_eig_centred(gram, idx, vec, K32)
    return Sigma0Estimate(value=lam / idx.size, top=top if first is None else first, kept=idx, kept_top=top)


#: :func:`start_on` gives a start only when this share of the vector's squared norm lies on the points asked for.
START_MIN_SHARE = 0.5


def start_on(points: np.ndarray, on: np.ndarray, vec: np.ndarray) -> np.ndarray | None:
    """A Lanczos start for the points ``points`` (sorted indices) from ``vec``, a unit vector on the points ``on``
    (sorted indices): ``vec``'s entries where a point is in both, zero elsewhere; ``None`` when less than
    :data:`START_MIN_SHARE` of ``vec``'s squared norm lies on ``points`` (a start far from the matrix's top vector is no
    better than a random one)."""
    if on.size == 0 or points.size == 0:
        return None
    pos = np.minimum(np.searchsorted(on, points), on.size - 1)
    hit = on[pos] == points
    v0 = np.where(hit, vec[pos], 0.0)
    if not np.all(np.isfinite(v0)) or float(v0 @ v0) < START_MIN_SHARE * float(vec @ vec):
        return None
    return v0

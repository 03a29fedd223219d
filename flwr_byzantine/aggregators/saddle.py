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
eigenvalue is repeated.  The iterations run in one compiled call (numba); an
iteration is an eigendecomposition at the extrapolated point, the eigenvalues at the
trial point (its eigenvectors too when the certificate is due), a projection and a
few small products.  Up to 24 points (:data:`~.small_eigh.SMALL_EIGH_MAX`) the eigenproblems and products run
as plain compiled loops (:mod:`.small_eigh`, :func:`_matmul`), where LAPACK's and BLAS's calls cost more than
their flops; above, eigenvectors are computed only for the eigenvalues within ``40 mu`` of the top when few lie
there (LAPACK's MRRR solver).  The pair certifies

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

import llvmlite.binding as _ll
import numba
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import get_cython_function_address, intrinsic
from .kernels import SYM_TILE
from .sigma import lanczos_top
from .sketch import CentredFactor, dense_gram
from ._flags import runtime_bool
from .small_eigh import SMALL_EIGH_MAX, eigh_small

#: Eigenvalues more than _WINDOW * mu below the top get soft-max weight < exp(-_WINDOW).
_WINDOW = 40.0
#: ``exp(-_WINDOW)``: the relative soft-max weight below which :func:`_grad` leaves an eigenvector out.
_WEIGHT_CUT = math.exp(-_WINDOW)


@dataclass
class SaddleSolution:
    """Primal-dual pair returned by :func:`solve_saddle`.

    ``W`` is primal feasible; the dual point is ``Y = sum_k z[k] v_k v_k^T``
    (trace <= 1) where ``v_k`` are the left singular vectors of ``G (I - W) D``
    matching the eigenvectors ``eigvecs[:, k]`` of ``P(W)``.  ``eigvals`` (ascending),
    ``eigvecs`` and ``z`` hold the eigenpairs that carry soft-max weight: all of them, or
    (after iterations whose window held few) at least those within ``40 mu`` of the top, the
    others' weights being below ``exp(-40)``.  ``mu`` is the final soft-max smoothing parameter
    of the solve (0 when no iteration ran).
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


@numba.njit(cache=True)
def _project_rows(V: np.ndarray, cap: float, t0: np.ndarray, warm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Compiled kernel of :func:`project_capped_rows`: ``(clip(V - t, 0, cap), t)`` row by row.

    The shift ``t`` of a row solves ``s(t) = sum_i clip(V[r, i] - t, 0, cap) = 1``; ``s`` is piecewise
    linear and non-increasing with slope ``-#{free entries}``, so a Newton step lands on the root as
    soon as it is taken on the root's linear piece; steps that leave the bracket ``[lo, hi]`` (kept
    with ``s(lo) >= 1 > s(hi)``) are replaced by bisection.  A row is done when its sum is 1 to within
    ``1e-14`` per free entry; one or two steps from a warm start ``t0`` (``warm``: the previous
    projection's shifts, inside the saddle solver's iterations), else from the shift that is the root
    when nothing is clipped.  If a row's bracket collapses first, every shift is finally solved for
    exactly on its identified free set.
    """
    m, n = V.shape
    t = np.empty(m)
    all_exact = True
    for r in range(m):
        lo = V[r, 0]
        hi = V[r, 0]
        tot = 0.0
        for j in range(n):
            v = V[r, j]
            lo = min(lo, v)
            hi = max(hi, v)
            tot += v
        lo -= cap  # s(lo) = n cap >= 1; s(hi) = 0 < 1
        guess = t0[r] if warm else (tot - 1.0) / n
        tr = min(max(guess, lo), hi)
        exact = False
        for _ in range(100):
            s = 0.0
            n_free = 0
            for j in range(n):
                x = V[r, j] - tr
                if x > 0.0:
                    if x < cap:
                        s += x
                        n_free += 1
                    else:
                        s += cap
            err = s - 1.0
            per = max(n_free, 1)
            if abs(err) <= 1e-14 * per:
                exact = True
                break
            if err > 0.0:
                lo = tr
            else:
                hi = tr
            if hi - lo <= 1e-15 * max(abs(hi), 1.0):
                break
            step = tr + err / per
            tr = 0.5 * (lo + hi) if (n_free == 0 or step <= lo or step >= hi) else step
        t[r] = tr
        all_exact = all_exact and exact
    if not all_exact:  # exact shifts on the free sets the search identified (removes a bracket's round-off)
        for r in range(m):
            sum_free = 0.0
            n_free = 0
            n_upper = 0
            for j in range(n):
                x = V[r, j] - t[r]
                if x >= cap:
                    n_upper += 1
                elif x > 0.0:
                    sum_free += V[r, j]
                    n_free += 1
            if n_free > 0:
                t[r] = (sum_free + cap * n_upper - 1.0) / n_free
    P = np.empty((m, n))
    for r in range(m):
        for j in range(n):
            P[r, j] = min(max(V[r, j] - t[r], 0.0), cap)
    return P, t


def project_capped_rows(
    V: np.ndarray, cap: float, t0: np.ndarray | None = None, *, return_shift: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Euclidean projection of every *row* of ``V`` (``m x n``) on the capped simplex of R^n.

    The projection of a row ``v`` is ``clip(v - t, 0, cap)`` with the shift ``t``
    solving ``s(t) = sum_i clip(v_i - t, 0, cap) = 1``; ``s`` is piecewise linear and
    non-increasing, and safeguarded Newton steps (the compiled :func:`_project_rows`) find its
    root in a few passes.  ``t0`` warm-starts the shifts; ``return_shift`` also returns the
    final shifts ``t``.  Requires ``n * cap >= 1`` (non-empty set).
    """
    V = np.ascontiguousarray(V, dtype=np.float64)
    m, n = V.shape
    if n * cap < 1.0 - 1e-12:
        raise ValueError(f"capped simplex is empty: n={n}, cap={cap}")
    warm = t0 is not None
    P, t = _project_rows(V, float(cap), np.ascontiguousarray(t0, dtype=np.float64) if warm else np.empty(m), warm)
    return (P, t) if return_shift else P


@numba.njit(cache=True)
def _lmo_total(G: np.ndarray, cap: float) -> float:
    """``sum_i min_{s in CS} <G[i], s>`` over the rows (greedy fill of the cap).

    In each row the ``m = floor(1/cap)`` smallest entries get ``cap`` and the next one the rest;
    the row is insertion-sorted into a buffer (O(n^2) per row, below the O(n^3) of an iteration,
    and several times faster than ``np.sort`` at the rows' sizes here).
    """
    rows, n = G.shape
    m = min(int(math.floor(1.0 / cap + 1e-12)), n)
    rest = 1.0 - m * cap
    buf = np.empty(n)
    total = 0.0
    for i in range(rows):
        for j in range(n):
            x = G[i, j]
            k = j
            while k > 0 and buf[k - 1] > x:
                buf[k] = buf[k - 1]
                k -= 1
            buf[k] = x
        val = 0.0
        for j in range(m):
            val += buf[j]
        val *= cap
        if m < n and rest > 1e-15:
            val += rest * buf[m]
        total += val
    return total


# LAPACK's MRRR eigensolver (dsyevr) from SciPy's Cython LAPACK, bound by name so that the compiled
# code that calls it can be cached (numba's own eigensolvers are full decompositions only).
_ll.add_symbol("flwr_byzantine_dsyevr", get_cython_function_address("scipy.linalg.cython_lapack", "dsyevr"))


@intrinsic
def _dsyevr(typingctx, jobz, rng, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork, iwork,
            liwork, info):
    """``dsyevr(...)`` with every argument an array (its data pointer is passed, Fortran style)."""
    sig = types.void(jobz, rng, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork, iwork,
                     liwork, info)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        ptrs = [builder.bitcast(context.make_array(ty)(context, builder, val).data, i8p)
                for ty, val in zip(signature.args, args)]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p] * 21),
                                            "flwr_byzantine_dsyevr")
        builder.call(fn, ptrs)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True)
def _eig_above(S: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric ``S`` with eigenvalues ``>= floor`` (ascending; LAPACK ``dsyevr``, MRRR).

    Returns empty arrays when LAPACK reports an error.
    """
    n = S.shape[0]
    a = S.copy()  # symmetric: its C layout is its Fortran layout
    chars = np.array([ord("V"), ord("V"), ord("L")], dtype=np.uint8)  # jobz, range, uplo
    ints = np.array([n, 0, 0, 0, 26 * n, 10 * n, 0], dtype=np.int32)  # n (= lda = ldz), il, iu, m, lwork, liwork, info
    bounds = np.array([floor, np.inf, 0.0])  # vl, vu, abstol (0: LAPACK's default accuracy)
    w = np.empty(n)
    z = np.empty((n, n))
    isuppz = np.empty(2 * n, dtype=np.int32)
    work = np.empty(26 * n)
    iwork = np.empty(10 * n, dtype=np.int32)
    _dsyevr(chars[0:1], chars[1:2], chars[2:3], ints[0:1], a, ints[0:1], bounds[0:1], bounds[1:2], ints[1:2],
            ints[2:3], bounds[2:3], ints[3:4], w, z, ints[0:1], isuppz, work, ints[4:5], iwork, ints[5:6], ints[6:7])
    m = ints[3] if ints[6] == 0 else 0
    return w[:m].copy(), np.ascontiguousarray(z[:m].T)  # z's rows are the (Fortran) eigenvector columns


@numba.njit(cache=True)
def _matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A @ B`` for C-contiguous float64 matrices; as plain loops when every side is at most
    :data:`~.small_eigh.SMALL_EIGH_MAX` (BLAS's call and packing cost more than the flops there), else BLAS."""
    m, k = A.shape
    n = B.shape[1]
    if max(m, k, n) > SMALL_EIGH_MAX:
        return A @ B
    C = np.zeros((m, n))
    for i in range(m):
        for l in range(k):
            a = A[i, l]
            for j in range(n):
                C[i, j] += a * B[l, j]
    return C


@numba.njit(cache=True)
def _eig_p(K: np.ndarray, d: np.ndarray, Wt: np.ndarray, vectors: bool,
           floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (ascending, clipped at 0), eigenvectors (if ``vectors``, else a 0 x 0 array) of ``P(W)``, and ``BK``.

    ``Wt = W^T`` (row ``i`` is the column ``w_i`` of (91)); with ``Bt = D (I - Wt)`` and ``BK = Bt K``:
    ``P(W) = BK Bt^T``.  Up to :data:`~.small_eigh.SMALL_EIGH_MAX` points only its lower triangle is formed (half
    the second product: all that :func:`~.small_eigh.eigh_small` reads; the upper one is copied from it only where
    ``eigh_small`` refers the matrix to LAPACK), and every eigenpair (or every eigenvalue) comes from ``eigh_small``,
    whatever ``floor``; above, ``P`` is symmetrised, and the full decomposition is LAPACK ``dsyevd``
    (``np.linalg.eigh``; ``floor = -inf``) and with ``vectors`` and a finite ``floor`` only the eigenpairs above
    ``floor`` (:func:`_eig_above`; empty when there are none).
    """
    n = K.shape[0]
    Bt = np.empty((n, n))
    B = np.empty((n, n))  # Bt^T, contiguous
    for i in range(n):
        for j in range(n):
            v = ((1.0 if i == j else 0.0) - Wt[i, j]) * d[i]
            Bt[i, j] = v
            B[j, i] = v
    BK = _matmul(Bt, K)
    if n <= SMALL_EIGH_MAX:
        S = np.zeros((n, n))
        for i in range(n):
            for l in range(n):
                a = BK[i, l]
                for j in range(i + 1):
                    S[i, j] += a * B[l, j]
        sig, U, ok = eigh_small(S, vectors)
        if ok:
            return np.maximum(sig, 0.0), U, BK
        for i in range(n):  # LAPACK's turn: the whole symmetric matrix
            for j in range(i):
                S[j, i] = S[i, j]
    else:
        P = _matmul(BK, B)
        S = np.empty((n, n))
        for i in range(n):
            for j in range(n):
                S[i, j] = 0.5 * (P[i, j] + P[j, i])
    if vectors and floor > -np.inf:
        sig, U = _eig_above(S, floor)
    elif vectors:
        sig, U = np.linalg.eigh(S)
    else:
        sig = np.linalg.eigvalsh(S)
        U = np.empty((0, 0))
    return np.maximum(sig, 0.0), U, BK


@numba.njit(cache=True)
def _eig_top(K: np.ndarray, d: np.ndarray, Wt: np.ndarray, top: float, reach: float,
             expected: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The eigenpairs of ``P(W)`` with soft-max weight: at least those within ``reach`` of the top.

    The soft-max weights of eigenvalues more than ``_WINDOW * mu`` below the top are below
    ``exp(-_WINDOW)``, so the solver passes ``reach = _WINDOW * mu`` and ``top``, the top eigenvalue
    at the last iterate.  When few eigenvalues (``expected``, counted at the last iterate) lie in
    the window ``[top - reach - 0.05 top, inf)`` and there are more than :data:`~.small_eigh.SMALL_EIGH_MAX`
    points, only those are computed (MRRR: cheaper than a full decomposition for one or two pairs from about 24
    points); the full decomposition is taken when the window would hold many, or does not reach ``reach`` below
    the *new* top, and always up to ``SMALL_EIGH_MAX`` points (:func:`~.small_eigh.eigh_small`).
    """
    n = K.shape[0]
    floor = top - reach - 0.05 * abs(top)
    if n > SMALL_EIGH_MAX and floor > 0.0 and expected <= max(2, n // 8):
        sig, U, BK = _eig_p(K, d, Wt, runtime_bool(True), floor)
        if sig.size > 0 and sig[-1] - floor >= reach:
            return sig, U, BK
    return _eig_p(K, d, Wt, runtime_bool(True), -np.inf)


@numba.njit(cache=True)
def _count_above(sig: np.ndarray, reach: float) -> int:
    """How many of ``sig`` lie in :func:`_eig_top`'s window below ``sig[-1]``."""
    floor = sig[-1] - reach - 0.05 * abs(sig[-1])
    k = 0
    for v in sig:
        if v >= floor:
            k += 1
    return k


@numba.njit(cache=True)
def _smooth(sig: np.ndarray, mu: float) -> tuple[float, np.ndarray]:
    """``f_mu = mu log sum exp(sig / mu)`` and the soft-max weights ``z`` (stable form)."""
    smax = sig[-1]
    e = np.exp((sig - smax) / mu)
    s = e.sum()
    return smax + mu * math.log(s), e / s


@numba.njit(cache=True)
def _grad(BK: np.ndarray, U: np.ndarray, z: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Gradient of ``f_mu`` with respect to ``Wt``: ``-2 D Z BK`` with ``Z = U diag(z) U^T``.

    Only the eigenvectors whose soft-max weight is above ``exp(-_WINDOW)`` times the largest enter ``Z`` (those
    of the eigenvalues within ``_WINDOW * mu`` of the top, the pairs that :func:`_eig_top` computes above
    :data:`~.small_eigh.SMALL_EIGH_MAX` points): the others' weights sum to less than ``n exp(-40)``, about
    ``4e-18 n``, below the rounding of the kept terms.  With ``on`` of them, ``Z BK = (U_on diag(z)) (U_on^T BK)``
    costs ``2 on n^2`` flops: on the App's rounds mostly two to four pairs instead of all 18-20 (issue 12).
    """
    n, k = U.shape
    cut = max(z.max() * _WEIGHT_CUT, 1e-300)
    on = 0
    for j in range(k):
        if z[j] > cut:
            on += 1
    Uz = np.empty((n, on))
    UoT = np.empty((on, n))
    col = 0
    for j in range(k):
        if z[j] > cut:
            for i in range(n):
                UoT[col, i] = U[i, j]
                Uz[i, col] = U[i, j] * z[j]
            col += 1
    g = _matmul(Uz, _matmul(UoT, BK))  # Uz (UoT BK): 2 on n^2 flops, not n^3 + on n^2
    for i in range(n):
        f = -2.0 * d[i]
        for j in range(n):  # (a loop, not `g[i, :] *= f`: that slice's shape check compiled for 3.7 s on first use)
            g[i, j] *= f
    return g


@numba.njit(cache=True)
def _fista(K: np.ndarray, c: np.ndarray, cap: float, Wt: np.ndarray, tol_rel: float, tol_abs: float, max_iter: int,
           has_stop: bool, stop_below: float):
    """The whole solve of :func:`solve_saddle` in one compiled call (see its docstring for the method).

    Returns ``(Wt, z, sig, U, lower, iterations, converged, early_exit, mu)``.
    """
    n = K.shape[0]
    d = np.sqrt(c)
    sig, U, BK = _eig_p(K, d, Wt, runtime_bool(True), -np.inf)
    ub = sig[-1]
    scale = max(ub, np.trace(K) * c.max() / max(n, 1), 1e-300)
    tol_abs = tol_abs * scale  # relative to the problem's magnitude: scale-equivariant stopping
    mu = 0.0
    if n == 1 or ub <= tol_abs or cap * n <= 1.0 + 1e-12:
        # Single point, all-zero residuals, or W forced to uniform: the W-problem is trivial.
        z = np.zeros(n)
        z[-1] = 1.0
        if n > 1 and cap * n <= 1.0 + 1e-12:
            # W is the only feasible point; Y optimal is any top eigen-mixture.
            top = (sig >= sig[-1] * (1 - 1e-9)).astype(np.float64)
            z = top / top.sum()
        return Wt, z, sig, U, float(z @ sig), 0, True, has_stop and ub <= stop_below, mu
    if has_stop and ub <= stop_below:
        z = np.zeros(n)
        z[-1] = 1.0
        return Wt, z, sig, U, float(z @ sig), 0, False, True, mu

    mu_floor = 1e-15 * scale
    mu = max(0.05 * ub, 1e-12 * scale) / math.log(n)
    L = 2.0 * np.linalg.eigvalsh(K)[-1] * c.max() + 1e-300
    z = _smooth(sig, mu)[1]
    Yk = Wt.copy()
    t = 1.0
    lower = -np.inf
    last_check, stride = 0, 1
    shift = np.empty(n)  # the projection's shifts, warm start of the next projection
    warm = False
    has_u = True
    at_wt = True  # Yk equals Wt exactly (no momentum yet): its eigenpairs are the ones held for Wt
    it = 0
    for it in range(1, max_iter + 1):
        # --- one FISTA step on f_mu from the extrapolated point Yk ---
        reach = _WINDOW * mu
        top = sig[-1]
        expected = _count_above(sig, reach)
        if at_wt and has_u:  # the same matrix as the last point's, whose eigenpairs are held (with the vectors)
            sig_y, U_y, BK_y = sig, U, BK
        else:
            sig_y, U_y, BK_y = _eig_top(K, d, Yk, top, reach, expected)
        f_y, z_y = _smooth(sig_y, mu)
        g_y = _grad(BK_y, U_y, z_y, d)
        due = it - last_check >= stride  # certificate at this iteration: the trial needs eigenvectors
        while True:
            Wn, shift = _project_rows(Yk - g_y / L, cap, shift, warm)
            warm = True
            if due:
                sig_n, U_n, BK_n = _eig_top(K, d, Wn, top, reach, expected)
            else:
                sig_n, U_n, BK_n = _eig_p(K, d, Wn, runtime_bool(False), -np.inf)
            f_n, z_n = _smooth(sig_n, mu)
            diff = Wn - Yk
            if f_n <= f_y + np.sum(g_y * diff) + 0.5 * L * np.sum(diff * diff) + 1e-14 * abs(f_y):
                break
            L *= 2.0
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Yk = Wn + ((t - 1.0) / t_new) * (Wn - Wt)
        at_wt = t == 1.0  # a zero momentum coefficient: Yk = Wn exactly
        Wt, t = Wn, t_new
        sig, U, BK, z, has_u = sig_n, U_n, BK_n, z_n, due
        L *= 0.9  # let the step grow again

        ub = sig[-1]
        if has_stop and ub <= stop_below:
            if not has_u:
                sig, U, BK = _eig_top(K, d, Wt, sig[-1], _WINDOW * mu, _count_above(sig, _WINDOW * mu))
                z = _smooth(sig, mu)[1]
            return Wt, z, sig, U, float(z @ sig), it, False, True, mu
        # --- certificate: UB = lambda_max, LB = Phi(W,Y) + Frank-Wolfe term ---
        # (every iteration once the gap is within 4x the tolerance, every 3rd before)
        if not due:
            continue
        last_check = it
        g = _grad(BK, U, z, d)
        phi = float(z @ sig)
        fw = np.sum(g * Wt) - _lmo_total(g, cap)  # >= 0
        lower = phi - fw
        gap = ub - lower
        target = tol_abs + tol_rel * ub
        if gap <= target:
            return Wt, z, sig, U, lower, it, True, False, mu
        stride = 1 if gap <= 4.0 * target else 3
        if ub - phi > fw:  # smoothing error dominates: sharpen, restart momentum
            mu = max(mu / 4.0, mu_floor)
            Yk = Wt.copy()
            t = 1.0
            at_wt = True
    if not has_u:
        sig, U, BK = _eig_top(K, d, Wt, sig[-1], _WINDOW * mu, _count_above(sig, _WINDOW * mu))
        z = _smooth(sig, mu)[1]
    return Wt, z, sig, U, lower, it, False, False, mu


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

    The iterations run in one compiled call (:func:`_fista`, numba): at n = 20 an iteration is
    two small eigensolves and a projection, which Python's per-call overhead would otherwise double.

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
    K = np.ascontiguousarray(K, dtype=np.float64)
    c = np.ascontiguousarray(c, dtype=np.float64)
    n = K.shape[0]
    cap = max(float(cap), 1.0 / n)
    if W0 is None:
        Wt = np.full((n, n), 1.0 / n)
    else:
        Wt = project_capped_rows(np.asarray(W0, dtype=np.float64).T, cap)
    Wt, z, sig, U, lower, it, converged, early, mu = _fista(
        K, c, cap, Wt, float(tol_rel), float(tol_abs), int(max_iter), stop_below is not None,
        0.0 if stop_below is None else float(stop_below),
    )
    tau = (U**2 @ (z * sig)) / c
    return SaddleSolution(
        W=np.ascontiguousarray(Wt.T), z=z, eigvals=sig, eigvecs=U, upper=float(sig[-1]), lower=float(lower),
        value=float(z @ sig), tau=tau, iterations=int(it), converged=bool(converged), early_exit=bool(early),
        mu=float(mu),
    )


@numba.njit(cache=True)
def _weighted_centred(K, Kw, wKw, d):
    """``0.5 (A + A^T)`` with ``A = ((K - Kw 1^T - 1 Kw^T + wKw) * d_i) * d_j``, in one pass over the upper triangle:
    numpy's ``P = K - Kw[:, None] - Kw[None, :] + wKw; P *= d[:, None]; P *= d[None, :]; 0.5 * (P + P.T)``
    elementwise in the same order, bit for bit, without its five ``(n, n)`` temporaries; in :data:`~.kernels.SYM_TILE`
    tiles."""
    n = K.shape[0]
    P = np.empty((n, n))
    for i0 in range(0, n, SYM_TILE):  # tiles of the upper triangle with their mirror tiles (kernels.SYM_TILE)
        i1 = min(n, i0 + SYM_TILE)
        for j0 in range(i0, n, SYM_TILE):
            j1 = min(n, j0 + SYM_TILE)
            for i in range(i0, i1):
                for j in range(max(i, j0), j1):
                    a = (((K[i, j] - Kw[i]) - Kw[j]) + wKw) * d[i] * d[j]
                    b = (((K[j, i] - Kw[j]) - Kw[i]) + wKw) * d[j] * d[i]
                    v = 0.5 * (a + b)
                    P[i, j] = v
                    P[j, i] = 0.5 * (b + a)
    return P


#: Lanczos basis size of :func:`spectral_step`'s eigensolve (as :data:`~.sigma.LANCZOS_NCV`).
SPECTRAL_NCV = 10
#: Relative residual tolerance of :func:`spectral_step`'s Lanczos solve.  Its eigenvalue meets Algorithm 3's stopping
#: test (error about the residual's square over the gap) and its vector gives ``tau`` (error about the residual over
#: the gap).  On the nearly flat spectrum of 800 honest points at R = 1000, 1e-10 took 51-66 products, 1e-6 takes 26-31
#: (issue 12).
SPECTRAL_TOL = 1e-6
#: With a stopping level, :func:`spectral_step` first runs at most this many Lanczos steps (:func:`~.sigma.lanczos_top`,
#: to this tolerance) and stops there when the Ritz value plus its residual's norm is at most the level: the last step
#: of a filter on the honest points (800 at R = 1000, half the level) took 26-31 products to :data:`SPECTRAL_TOL`
#: (issue 12, the sixteenth landing).
SPECTRAL_SHORT_STEPS, SPECTRAL_SHORT_TOL = 12, 1e-3


def spectral_step(K: np.ndarray | CentredFactor, c: np.ndarray, cap: float, *, stop_below: float | None = None,
                  v0: np.ndarray | None = None) -> SaddleSolution:
    """One filter step at a *fixed* ``W``: every column the c-weighted mean (projected on ``CS``).

    The classical spectral filter step (the saddle problem (91) without the minimisation
    over ``W``): the top eigenpair ``(sigma, u)`` of ``P(W)`` comes from Lanczos on its products, one with ``K`` and
    O(n) work each (below 256 points: ``P(W)`` formed in O(n^2) and LAPACK), ``Y = v v^T`` for the matching singular
    vector and
    ``tau_i = sigma u_i^2 / c_i`` (93).  ``upper = sigma >= `` the saddle value, so
    ``upper <= stop_below`` certifies Algorithm 3's stopping test exactly as the solver's
    early exit does; otherwise ``value = upper`` over-states the saddle value, so the filter
    can only continue where Algorithm 3 might already stop.  For large R, where one
    iteration of :func:`solve_saddle` costs O(n^3).  ``converged`` is False (no certificate); ``W`` (every
    column the weights ``w``) is a read-only broadcast view, not an ``(n, n)`` array.  ``v0`` (length ``n``): the
    Lanczos solve's starting vector (from 256 points; e.g. the sigma_0 estimator's top vector of the same matrix).
    ``K``: the centred Gram matrix, or a :class:`~.sketch.CentredFactor` (from 256 points its products, in the factor's
    dtype; if Lanczos does not converge on them, the step on the matrix formed in float64).
    """
    n = K.shape[0]
    if not (isinstance(K, CentredFactor) and n >= 256):
        K = dense_gram(K)  # (a factor's products from 256 points, in its dtype: the matrix is never formed)
    c = np.asarray(c, dtype=np.float64)
    cap = max(cap, 1.0 / n)
    w = project_capped_rows((c / c.sum())[None, :], cap)[0]
    d = np.sqrt(c)
    if n >= 256:
        # P = D^{1/2} (I - 1 w^T) K (I - w 1^T) D^{1/2} applied to a vector without forming it (one product with K and
        # O(n) work: forming P cost 2.5-3 ms at n = 800-1000, issue 12); a Lanczos basis of SPECTRAL_NCV vectors
        # (scipy's default is 20 for one eigenpair): the same eigenpair in fewer products (1.5 ms against 3.5 ms at
        # n = 1000, the same value to the last digit)
        def matvec(v: np.ndarray) -> np.ndarray:
            u = d * np.asarray(v).reshape(-1)
            u -= w * u.sum()
            x = np.asarray(K @ u, dtype=np.float64)
            x -= float(w @ x)
            return d * x

        op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        start = None if v0 is None or v0.shape != (n,) or not np.all(np.isfinite(v0)) or not np.any(v0) else v0
        short = None
        if stop_below is not None:
            # a short Lanczos run first: when its Ritz value plus its residual's norm is at most the stopping level the
            # step stops there (Algorithm 3's test, line 5), without the tight solve whose vector only a removal needs
            theta, x = lanczos_top(matvec, n, start, SPECTRAL_SHORT_TOL, SPECTRAL_SHORT_STEPS, above=stop_below)
            if theta <= stop_below and theta + float(np.linalg.norm(matvec(x) - theta * x)) <= stop_below:
                short = (np.array([theta]), x[:, None])
            else:
                start = x
        if short is not None:
            sig, U = short
        else:
            try:
                sig, U = scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=SPECTRAL_TOL, ncv=SPECTRAL_NCV, v0=start)
            except scipy.sparse.linalg.ArpackNoConvergence:
                if not isinstance(K, CentredFactor):
                    raise
                # products in float32 (a factor of float32 rows) too coarse for the tolerance: the matrix, in float64
                return spectral_step(K.dense(), c, cap, stop_below=stop_below, v0=v0)
    else:
        Kw = K @ w
        P = _weighted_centred(K, Kw, float(w @ Kw), d)  # D^{1/2} (I - 1 w^T) K (I - w 1^T) D^{1/2}, symmetrised
        if n > 1:
            sig, U = scipy.linalg.eigh(P, subset_by_index=[n - 1, n - 1], driver="evr")
        else:
            sig, U = np.linalg.eigh(P)
    sig = np.maximum(sig, 0.0)
    z = np.ones(1)
    tau = (U[:, 0] ** 2 * sig[0]) / c
    ub = float(sig[0])
    return SaddleSolution(
        W=np.broadcast_to(w[:, None], (n, n)), z=z, eigvals=sig, eigvecs=U, upper=ub, lower=-math.inf, value=ub,
        tau=tau, iterations=1, converged=False, early_exit=stop_below is not None and ub <= stop_below,
    )

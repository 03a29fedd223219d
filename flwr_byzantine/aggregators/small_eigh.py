"""Every eigenpair of a small symmetric matrix, in compiled code without a LAPACK call.

The saddle solver (:mod:`.saddle`) decomposes two ``n x n`` symmetric matrices an iteration, with
``n`` the points of a pass (20 at the App's size).  At these sizes LAPACK's calls cost far more than their
arithmetic: on 95 matrices of the App's solves (n = 20), ``np.linalg.eigh`` (``dsyevd``) took 32.5 us a matrix and
``eigvalsh`` 15.9 us, for about 4 n^3 = 32,000 flops with the eigenvectors.  Here the two classic steps run as
plain loops (18.9 us and 11.7 us on the same matrices):

1. Householder reduction to tridiagonal form ``S = Q T Q^T`` (Golub & Van Loan, *Matrix
   Computations*, Algorithm 8.3.1; EISPACK ``tred2``), accumulating ``Q`` when eigenvectors are wanted;
2. the implicit QL iteration with Wilkinson's shift on ``T`` (EISPACK ``tql1``/``tql2``; Golub & Van
   Loan, Section 8.3.5), applying its rotations to ``Q``.

Both are backward stable: the eigenvalues are those of ``S + E`` with ``||E|| = O(eps ||S||)``, as with
LAPACK, but not bit for bit LAPACK's.  :func:`eigh_small` returns LAPACK's layout (ascending values,
eigenvectors as columns), or says that its caller must ask LAPACK: when the QL iteration has not converged in
:data:`_MAX_SWEEPS` steps for one eigenvalue (not seen on finite input) or the input holds a non-finite entry.
:data:`SMALL_EIGH_MAX` is the size up to which the solvers use it.

Measured on the App's rounds (the 20 digits rounds of ``benchmarks.decode_time``'s small section): the saddle
solves with this solver and :func:`.saddle._matmul`'s loops took 4.9-5.0 ms a decode against 5.9-6.1 ms with
LAPACK and BLAS, interleaved in one process, with the same iterations.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Largest ``n`` for which :mod:`.saddle` decomposes with :func:`eigh_small` rather than LAPACK: measured on
#: synthetic matrices ``P(W)`` (random Gram matrices and weights), 100 of each size, one BLAS thread (every
#: eigenpair / the values):
#: n = 20: 23.5 / 14.8 us against LAPACK's 38.9 / 18.3 us; n = 28: 53.7 / 29.5 against 73.2 / 33.6; n = 36:
#: 113 / 66.6 against 217 / 64.8; n = 40: 217 / 94.3 against 163 / 77.4.  Above about 24 points the saddle solver
#: mostly asks LAPACK's MRRR solver for the top pairs only, which beats a full decomposition.
SMALL_EIGH_MAX = 24

#: QL steps allowed for one eigenvalue before giving up (EISPACK allows 30).
_MAX_SWEEPS = 60


@numba.njit(cache=True)
def _tridiagonalise(A: np.ndarray, diag: np.ndarray, off: np.ndarray, vectors: bool) -> None:
    """Householder reduction of the symmetric ``A`` (overwritten) to tridiagonal ``diag``/``off``.

    With ``vectors``, ``A`` holds the orthogonal ``Q`` on return (``S = Q T Q^T``); ``off[i]`` couples
    ``i - 1`` and ``i`` (``off[0] = 0``).  Only the lower triangle of ``A`` is read.
    """
    n = A.shape[0]
    for i in range(n - 1, 0, -1):
        last = i - 1
        h = 0.0
        if last > 0:
            scale = 0.0
            for k in range(i):
                scale += abs(A[i, k])
            if scale == 0.0:
                off[i] = A[i, last]
            else:
                for k in range(i):
                    A[i, k] /= scale
                    h += A[i, k] * A[i, k]
                f = A[i, last]
                g = -math.sqrt(h) if f >= 0.0 else math.sqrt(h)
                off[i] = scale * g
                h -= f * g
                A[i, last] = f - g
                f = 0.0
                for j in range(i):
                    if vectors:
                        A[j, i] = A[i, j] / h
                    g = 0.0
                    for k in range(j + 1):
                        g += A[j, k] * A[i, k]
                    for k in range(j + 1, i):
                        g += A[k, j] * A[i, k]
                    off[j] = g / h
                    f += off[j] * A[i, j]
                hh = f / (h + h)
                for j in range(i):
                    f = A[i, j]
                    g = off[j] - hh * f
                    off[j] = g
                    for k in range(j + 1):
                        A[j, k] -= f * off[k] + g * A[i, k]
        else:
            off[i] = A[i, last]
        diag[i] = h
    diag[0] = 0.0
    off[0] = 0.0
    for i in range(n):
        if vectors:
            if diag[i] != 0.0:
                for j in range(i):
                    g = 0.0
                    for k in range(i):
                        g += A[i, k] * A[k, j]
                    for k in range(i):
                        A[k, j] -= g * A[k, i]
            diag[i] = A[i, i]
            A[i, i] = 1.0
            for j in range(i):
                A[j, i] = 0.0
                A[i, j] = 0.0
        else:
            diag[i] = A[i, i]


@numba.njit(cache=True, inline="always")
def _hypot(a: float, b: float) -> float:
    """``sqrt(a^2 + b^2)``: the plain formula where its square is a normal number, else ``math.hypot``."""
    s = a * a + b * b
    if 1e-290 < s < 1e290:
        return math.sqrt(s)
    return math.hypot(a, b)


@numba.njit(cache=True)
def _ql_implicit(diag: np.ndarray, off: np.ndarray, Zt: np.ndarray, vectors: bool, max_steps: int) -> bool:
    """Implicit QL with Wilkinson's shift on the tridiagonal ``diag``/``off`` (``off[i]`` couples ``i - 1, i``).

    ``diag`` receives the eigenvalues (unsorted); with ``vectors`` the rotations are applied to the
    rows of ``Zt`` (the transposed ``Q``, so that the updates run along contiguous rows).  Returns
    False when an eigenvalue needed more than ``max_steps`` steps.
    """
    n = diag.shape[0]
    eps = 2.220446049250313e-16  # float64's machine epsilon
    for i in range(1, n):
        off[i - 1] = off[i]
    off[n - 1] = 0.0
    for first in range(n):
        steps = 0
        while True:
            m = first
            while m < n - 1:
                dd = abs(diag[m]) + abs(diag[m + 1])
                if abs(off[m]) <= eps * dd:
                    break
                m += 1
            if m == first:
                break
            steps += 1
            if steps > max_steps:
                return False
            g = (diag[first + 1] - diag[first]) / (2.0 * off[first])
            r = _hypot(g, 1.0)
            g = diag[m] - diag[first] + off[first] / (g + (r if g >= 0.0 else -r))
            s = 1.0
            c = 1.0
            p = 0.0
            underflow = False
            i = m - 1
            while i >= first:
                f = s * off[i]
                b = c * off[i]
                r = _hypot(f, g)
                off[i + 1] = r
                if r == 0.0:
                    diag[i + 1] -= p
                    off[m] = 0.0
                    underflow = True
                    break
                s = f / r
                c = g / r
                g = diag[i + 1] - p
                r = (diag[i] - g) * s + 2.0 * c * b
                p = s * r
                diag[i + 1] = g + p
                g = c * r - b
                if vectors:
                    for k in range(n):
                        f = Zt[i + 1, k]
                        Zt[i + 1, k] = s * Zt[i, k] + c * f
                        Zt[i, k] = c * Zt[i, k] - s * f
                i -= 1
            if underflow:
                continue
            diag[first] -= p
            off[first] = g
            off[m] = 0.0
    return True


@numba.njit(cache=True)
def eigh_small(S: np.ndarray, vectors: bool, max_steps: int = _MAX_SWEEPS) -> tuple[np.ndarray, np.ndarray, bool]:
    """Eigenvalues (ascending) and, with ``vectors``, unit eigenvectors (columns) of the symmetric ``S``, and ``ok``.

    ``np.linalg.eigh``'s layout; without ``vectors`` the second array is ``0 x 0``.  Only the lower triangle of ``S``
    is read (``S`` itself is not modified).  ``ok`` is False, with empty arrays, on a non-finite entry or when the
    QL iteration needs more than ``max_steps`` steps for one eigenvalue (tests reach it with 0): the caller then
    asks LAPACK (a fallback compiled here would double this function's compile time).
    """
    n = S.shape[0]
    A = np.empty((n, n))  # symmetric, from the lower triangle
    finite = True
    for i in range(n):
        for j in range(i + 1):
            v = S[i, j]
            finite = finite and math.isfinite(v)
            A[i, j] = v
            A[j, i] = v
    if n == 0 or not finite:
        return np.empty(0), np.empty((0, 0)), False
    diag = np.empty(n)
    off = np.empty(n)
    _tridiagonalise(A, diag, off, vectors)
    Zt = np.ascontiguousarray(A.T) if vectors else np.empty((0, 0))
    if not _ql_implicit(diag, off, Zt, vectors, max_steps):
        return np.empty(0), np.empty((0, 0)), False
    order = np.empty(n, dtype=np.intp)  # the stable ascending order of the eigenvalues (insertion)
    for i in range(n):
        v = diag[i]
        k = i
        while k > 0 and diag[order[k - 1]] > v:
            order[k] = order[k - 1]
            k -= 1
        order[k] = i
    w = diag[order]
    if not vectors:
        return w, np.empty((0, 0)), True
    V = np.empty((n, n))
    for col in range(n):
        row = Zt[order[col]]
        for k in range(n):
            V[k, col] = row[k]
    return w, V, True

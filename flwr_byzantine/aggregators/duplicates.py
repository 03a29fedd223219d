"""Near-duplicate replies: one vote for a group of (almost) identical vectors.

Honest clients compute their replies on their own mini-batches, so two honest replies
differ at least by the mini-batch noise: their distance is of the order of the round's
typical pairwise distance.  Colluding Byzantine nodes that send one crafted vector (ALIE,
IPM, an omniscient adversary's sign flip, the defence-aware attack) send *identical* rows,
which give a robust rule ``k`` votes for one message.  This is the Sybil observation of
FoolsGold (Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil
Settings", RAID 2020): replies that are far more similar to one another than honest
clients ever are carry one client's information.  Here a group of rows whose pairwise
distances are below ``tol`` times the round's median pairwise distance keeps its first row
and the others are left out of the round.

It is a screen against lazy collusion only: attackers that add independent noise of the
honest replies' size to their common vector are not duplicates (the rest of the defence
then judges them one by one).  For large rounds the distances come from a random projection
of the rows with fresh server-private randomness (a CountSketch, :func:`~.sketch.sketch_rows`,
then a Gaussian projection to 64 coordinates): identical rows have identical projections, and a
pair at the median distance keeps about that distance (relative error about 18 %, a hundred
times short of the ``tol = 0.01`` of a duplicate).
"""

from __future__ import annotations

import numba
import numpy as np

from .._backend import centred_gram
from .sketch import sketch_rows

#: Default tolerance: rows closer than this fraction of the round's median pairwise distance are duplicates.
DEFAULT_DUPLICATE_TOL = 0.01
#: Rounds with at least this many entries ``R * d`` compute the distances on a projection of the rows
#: (the App's and the robustness benchmark's rounds, 20 x 650, are exact).
SKETCH_ABOVE = 1 << 16
#: Length parameter of the CountSketch taken first when ``d`` is large (:func:`~.sketch.sketch_rows`: at least ``2 sqrt(d)``).
SKETCH_DIM = 512
#: Length of the final Gaussian projection: distances within about ``sqrt(2 / 64)`` = 18 % (one standard
#: deviation), while a duplicate stays at 0; an honest pair would need to shrink a hundredfold.
PROJECTION_DIM = 64


def _gram(G: np.ndarray, rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The ``(n, n)`` Gram matrix whose distances :func:`pairwise_distances` gives (exact, or of the projection)."""
    if rng is None or rows.size * G.shape[1] < SKETCH_ABOVE:
        return centred_gram(G, rows=rows)
    Y = sketch_rows(G, SKETCH_DIM, rng)[rows] if G.shape[1] > 4096 else np.asarray(G[rows], dtype=np.float64)
    Y = Y @ (rng.standard_normal((Y.shape[1], PROJECTION_DIM)) / np.sqrt(PROJECTION_DIM))
    Y -= Y.mean(axis=0)
    return Y @ Y.T


def pairwise_distances(G: np.ndarray, rows: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """``(n, n)`` Euclidean distances between ``G[rows]`` (float64), exact or on a random projection.

    Exact (from the centred Gram matrix, :func:`~.._backend.centred_gram`) below
    :data:`SKETCH_ABOVE` entries or without ``rng``.  Otherwise the rows are projected: a
    CountSketch (:func:`~.sketch.sketch_rows`, one pass, when ``d > 4096``) then a Gaussian
    projection to :data:`PROJECTION_DIM` coordinates, so the cost is ``O(n d + n^2)``, not
    ``O(n^2 d)``.  Identical rows have identical projections.
    """
    return _distances(_gram(G, np.asarray(rows, dtype=np.intp), rng))


def _distances(K: np.ndarray) -> np.ndarray:
    diag = np.diag(K)
    return np.sqrt(np.maximum(diag[:, None] + diag[None, :] - 2.0 * K, 0.0))


@numba.njit(cache=True, inline="always")
def _pair_sq(kii, kjj, kij):
    """``max(K_ii + K_jj - 2 K_ij, 0)`` as :func:`_distances` forms it (NaN stays NaN, flagged by the caller)."""
    v = kii + kjj - 2.0 * kij
    return v if v > 0.0 or v != v else 0.0


@numba.njit(cache=True)
def _upper_sq_distances(K, out):
    """``out`` = the squared distances ``max(K_ii + K_jj - 2 K_ij, 0)`` of the pairs ``i < j``, row after row (the
    order of ``D[np.triu_indices(n, 1)]``), in :func:`_distances`' arithmetic; returns whether one is NaN."""
    n = K.shape[0]
    p = 0
    bad = False
    for i in range(n):
        ki = K[i, i]
        for j in range(i + 1, n):
            v = _pair_sq(ki, K[j, j], K[i, j])
            bad |= v != v
            out[p] = v
            p += 1
    return bad


@numba.njit(cache=True)
def _count_close(K, thr):
    """``(diagonal, upper)``: how many ``sqrt(max(K_ii + K_jj - 2 K_ij, 0)) <= thr`` on the diagonal and for
    ``i < j`` (:func:`_distances`' values against the threshold, as ``D <= thr`` compares them)."""
    n = K.shape[0]
    diag = 0
    upper = 0
    for i in range(n):
        ki = K[i, i]
        if np.sqrt(_pair_sq(ki, ki, ki)) <= thr:
            diag += 1
        for j in range(i + 1, n):
            if np.sqrt(_pair_sq(ki, K[j, j], K[i, j])) <= thr:
                upper += 1
    return diag, upper


def duplicate_rows(G: np.ndarray, rows: np.ndarray, tol: float = DEFAULT_DUPLICATE_TOL,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """The rows of ``rows`` that repeat an earlier one: sorted row numbers of ``G`` to leave out.

    Rows ``i < j`` are duplicates when ``||g_i - g_j|| <= tol * median_{k != l} ||g_k - g_l||``; each
    group (connected by that relation to its first row) keeps its first row.  Fewer than 3 rows, or a
    median distance of 0 (every row alike: nothing to tell apart), give no duplicates.
    """
    rows = np.asarray(rows, dtype=np.intp)
    n = rows.size
    if n < 3:
        return np.zeros(0, dtype=np.intp)
    K = _gram(G, rows, rng)
    # the median of the distances between distinct rows: D is symmetric, so the off-diagonal values are the upper
    # triangle's twice over, whose median is the upper triangle's (the same middle value(s)): half the selection.
    # Taken on the squared distances in one compiled pass (no (n, n) temporaries): the square root is monotone, so
    # the middle distances are the roots of the middle squares, averaged as np.median averages them
    sq = np.empty(n * (n - 1) // 2)
    if _upper_sq_distances(K, sq):  # NaN: np.median's NaN, no duplicates
        return np.zeros(0, dtype=np.intp)
    m = sq.size
    mid = sorted({(m - 1) // 2, m // 2})
    sq.partition(mid)
    med = float(np.sqrt(sq[mid[0]])) if m % 2 else float((np.sqrt(sq[mid[0]]) + np.sqrt(sq[mid[1]])) / 2.0)
    if not (med > 0 and np.isfinite(med)):
        return np.zeros(0, dtype=np.intp)
    diag, upper = _count_close(K, tol * med)
    if diag + 2 * upper == n:  # every row close only to itself (the diagonal): no duplicates
        return np.zeros(0, dtype=np.intp)
    close = _distances(K) <= tol * med
    taken = np.zeros(n, dtype=bool)
    out: list[int] = []
    for i in range(n):
        if taken[i]:
            continue
        group = np.flatnonzero(close[i] & ~taken)  # includes i itself
        taken[group] = True
        out.extend(int(rows[j]) for j in group if j != i)
    return np.asarray(sorted(out), dtype=np.intp)

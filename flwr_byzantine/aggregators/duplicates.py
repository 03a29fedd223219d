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
then a Gaussian projection to 64 coordinates, its product in float32): identical rows have identical projections,
and a pair at the median distance keeps about that distance (relative error about 18 %, a hundred
times short of the ``tol = 0.01`` of a duplicate); beyond 131,072 pairs the median is taken over 65,536 of them
drawn at random, and the pairs within the tolerance are found along the projected rows sorted by one coordinate.
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
#: With a projection (an ``rng``) and more pairs than this, the median pairwise distance is that of
#: :data:`MEDIAN_PAIRS` pairs drawn at random (issue 12: at R = 1000 the selection over all 499,500 pairs cost 4 ms
#: of the round); the projected distances are within 18 % anyway, and the median of 65,536 of them within a
#: fraction of a percent of the whole set's, against a tolerance a hundred times below the median.
MEDIAN_ALL_PAIRS_UP_TO = 1 << 17
MEDIAN_PAIRS = 1 << 16


def projects(n: int, d: int) -> bool:
    """Whether the distances between ``n`` rows of length ``d`` are projected (given an ``rng``; else exact): from
    :data:`SKETCH_ABOVE` entries on.  A caller without such rows need not make a generator for them."""
    return n * d >= SKETCH_ABOVE


def _projection(G: np.ndarray, rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray | None:
    """The centred projected rows ``(n, PROJECTION_DIM)`` (float64) whose Gram matrix :func:`_gram` gives, or ``None``
    where the distances are exact."""
    if rng is None or not projects(rows.size, G.shape[1]):
        return None
    Y = sketch_rows(G, SKETCH_DIM, rng) if G.shape[1] > 4096 else G
    # the projection's product in float32 (its 18 % spread is the approximation; identical rows stay identical)
    P = rng.standard_normal((Y.shape[1], PROJECTION_DIM), dtype=np.float32)
    P *= np.float32(1.0 / np.sqrt(PROJECTION_DIM))
    few = rows.size < Y.shape[0] // 2  # few rows asked about: gathered first, else projected all, then gathered
    X = Y[rows] if few else Y
    with np.errstate(over="ignore", invalid="ignore"):
        Z = np.asarray(X, dtype=np.float32) @ P
    if not np.isfinite(Z).all():  # float64 rows beyond float32's range: the product in float64
        Z = np.asarray(X, dtype=np.float64) @ P.astype(np.float64)
    Z = (Z if few else Z[rows]).astype(np.float64, copy=False)
    Z -= Z.mean(axis=0)
    return Z


def _gram_and_projection(G: np.ndarray, rows: np.ndarray,
                         rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``(n, n)`` Gram matrix whose distances :func:`pairwise_distances` gives (exact, or of the projection), and
    the projected rows (:func:`_projection`; ``None`` where the distances are exact)."""
    Z = _projection(G, rows, rng)
    return _gram_of(G, rows, Z), Z


def _gram_of(G: np.ndarray, rows: np.ndarray, Z: np.ndarray | None) -> np.ndarray:
    """The exact centred Gram matrix of ``G[rows]`` (``Z`` ``None``), else that of the projected rows ``Z``."""
    return centred_gram(G, rows=rows) if Z is None else Z @ Z.T


def _gram(G: np.ndarray, rows: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The ``(n, n)`` Gram matrix of :func:`_gram_and_projection`."""
    return _gram_and_projection(G, rows, rng)[0]


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
    median distance of 0 (every row alike: nothing to tell apart), give no duplicates.  With ``rng`` (the projected
    distances of :func:`pairwise_distances`) and more than :data:`MEDIAN_ALL_PAIRS_UP_TO` pairs, the median is that of
    :data:`MEDIAN_PAIRS` pairs drawn with ``rng``, and the close pairs are found on the projected rows themselves
    (:func:`_close_pairs`: their differences' norms, along the rows sorted by one coordinate; no ``(n, n)`` matrix).
    """
    rows = np.asarray(rows, dtype=np.intp)
    n = rows.size
    if n < 3:
        return np.zeros(0, dtype=np.intp)
    pairs = n * (n - 1) // 2
    Z = _projection(G, rows, rng)
    if Z is not None and pairs > MEDIAN_ALL_PAIRS_UP_TO and np.isfinite(Z).all():
        # many rows: the median from sampled pairs, the close pairs found along a sorted coordinate; no (n, n) matrix
        med = _sampled_median_distance(Z, rng)
        if not (med > 0 and np.isfinite(med)):
            return np.zeros(0, dtype=np.intp)
        return _groups_from_pairs(rows, *_close_pairs(Z, tol * med))
    K = _gram_of(G, rows, Z)
    med = _median_distance(K)  # (NaN for a projection with a NaN/Inf: no duplicates)
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


@numba.njit(cache=True)
def _close_pairs_sorted(Z, order, thr):
    """The pairs ``(i, j)``, ``i < j``, with ``sqrt(||Z_i - Z_j||^2) <= thr`` (float64 sums of the differences): the rows
    in ``order`` (ascending first coordinate), each compared only with the rows after it whose first coordinate is
    within ``thr`` (a pair farther apart on one coordinate is farther apart in all)."""
    n, m = Z.shape
    out_i = []
    out_j = []
    for a in range(n):
        i = order[a]
        z0 = Z[i, 0]
        for b in range(a + 1, n):
            j = order[b]
            if Z[j, 0] - z0 > thr:
                break
            acc = 0.0
            for k in range(m):
                x = Z[i, k] - Z[j, k]
                acc += x * x
            if np.sqrt(acc) <= thr:
                out_i.append(min(i, j))
                out_j.append(max(i, j))
    return out_i, out_j


def _close_pairs(Z: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of rows of ``Z`` (finite, float64) within ``thr`` of one another: ``(i, j)`` arrays, ``i < j``, found
    in ``O(n log n)`` plus the pairs whose first coordinates are that close (issue 12: at R = 1000 the ``(n, n)`` Gram
    matrix of the projection and the count over it cost 8 ms of the round, about a third of ``np.mean``)."""
    Z = np.ascontiguousarray(Z, dtype=np.float64)
    order = np.argsort(Z[:, 0], kind="stable")
    pi, pj = _close_pairs_sorted(Z, order, float(thr))
    return np.asarray(pi, dtype=np.intp), np.asarray(pj, dtype=np.intp)


def _groups_from_pairs(rows: np.ndarray, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
    """:func:`duplicate_rows`' grouping on a list of close pairs (positions in ``rows``): row after row, a row not yet
    taken keeps itself and takes every close row not yet taken; the taken rows (of ``rows``) are returned, sorted."""
    if pi.size == 0:
        return np.zeros(0, dtype=np.intp)
    n = rows.size
    near: dict[int, list[int]] = {}
    for a, b in zip(pi.tolist(), pj.tolist()):
        near.setdefault(a, []).append(b)
        near.setdefault(b, []).append(a)
    taken = np.zeros(n, dtype=bool)
    out: list[int] = []
    for i in sorted(near):
        if taken[i]:
            continue
        taken[i] = True
        for j in sorted(near[i]):
            if not taken[j]:
                taken[j] = True
                out.append(int(rows[j]))
    return np.asarray(sorted(out), dtype=np.intp)


@numba.njit(cache=True, fastmath={"reassoc"})
def _pair_sq_rows(Z, i, j, out):
    """``out[p] = ||Z[i[p]] - Z[j[p]]||^2`` (float64), one compiled loop over the pairs (the rows in cache; each sum
    reassociated into vector lanes)."""
    m = Z.shape[1]
    for p in range(i.size):
        a = Z[i[p]]
        b = Z[j[p]]
        acc = 0.0
        for k in range(m):
            x = a[k] - b[k]
            acc += x * x
        out[p] = acc


def _sampled_median_distance(Z: np.ndarray, rng: np.random.Generator) -> float:
    """The median distance between the projected rows ``Z`` (finite) of :data:`MEDIAN_PAIRS` pairs ``i != j`` drawn
    uniformly at random, from the rows themselves (issue 12: reading the pairs' three entries of the ``(n, n)`` Gram
    matrix missed the cache at every pair, 3.6 ms at n = 1000)."""
    n = Z.shape[0]
    i = rng.integers(0, n, size=MEDIAN_PAIRS)
    j = rng.integers(0, n - 1, size=MEDIAN_PAIRS)
    j += j >= i  # uniform over the other rows
    sq = np.empty(MEDIAN_PAIRS)
    _pair_sq_rows(np.ascontiguousarray(Z, dtype=np.float64), i, j, sq)
    return float(np.sqrt(np.median(sq)))


def _median_distance(K: np.ndarray) -> float:
    """The median of the distances between distinct rows (NaN when one is NaN)."""
    n = K.shape[0]
    # the median of the distances between distinct rows: D is symmetric, so the off-diagonal values are the upper
    # triangle's twice over, whose median is the upper triangle's (the same middle value(s)): half the selection.
    # Taken on the squared distances in one compiled pass (no (n, n) temporaries): the square root is monotone, so
    # the middle distances are the roots of the middle squares, averaged as np.median averages them
    sq = np.empty(n * (n - 1) // 2)
    if _upper_sq_distances(K, sq):  # NaN: np.median's NaN, no duplicates
        return float("nan")
    m = sq.size
    mid = sorted({(m - 1) // 2, m // 2})
    sq.partition(mid)
    return float(np.sqrt(sq[mid[0]])) if m % 2 else float((np.sqrt(sq[mid[0]]) + np.sqrt(sq[mid[1]])) / 2.0)

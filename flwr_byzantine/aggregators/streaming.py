"""Streaming passes over an ``(R, d)`` round in the input dtype, in cache-sized tiles.

The default defence reads every round a few times beyond the filter itself (the evidence's
differences to the previous round, the survivors' distances to the estimate, the clipping).
Each such pass here walks row-major tiles of about :data:`BLOCK_BYTES`, keeps its
temporaries in cache, works in the rows' dtype (float32 stays float32: no float64 copy of
the rows) and accumulates the per-row scalars (squared norms, dot products) in float64.
Row subsets are gathered tile by tile (a contiguous run of rows is a view).
"""

from __future__ import annotations

import numpy as np

from .._backend import ArrayLike, is_torch

#: Bytes of one tile of rows x columns in a streaming pass (its temporaries stay in cache).
BLOCK_BYTES = 1 << 20
#: Columns of a tile at most: a tile holds a few long row segments, so that the hardware prefetcher
#: streams a handful of contiguous runs (column blocks of every row would stride through memory).
TILE_COLUMNS = 1 << 15


def tiles(rows: int, d: int, itemsize: int):
    """``(r0, r1, c0, c1)`` tiles covering ``rows x d``, row-major, each about :data:`BLOCK_BYTES`."""
    w = max(1, min(d, TILE_COLUMNS))
    rb = max(1, BLOCK_BYTES // (w * itemsize))
    for r0 in range(0, rows, rb):
        r1 = min(rows, r0 + rb)
        for c0 in range(0, d, w):
            yield r0, r1, c0, min(d, c0 + w)


def tile_buffer(rows: int, d: int, dtype) -> np.ndarray:
    """A buffer large enough for any tile of :func:`tiles`."""
    w = max(1, min(d, TILE_COLUMNS))
    return np.empty((min(rows, max(1, BLOCK_BYTES // (w * np.dtype(dtype).itemsize))), w), dtype=dtype)


def as_index(idx: np.ndarray) -> np.ndarray | slice:
    """``idx`` as a slice when it is a run of consecutive ascending integers (a view, no gather), else itself."""
    idx = np.asarray(idx, dtype=np.intp)
    if idx.size and int(idx[-1]) - int(idx[0]) == idx.size - 1 and (idx.size < 3 or bool(np.all(np.diff(idx) == 1))):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def sub_index(idx: np.ndarray | slice, r0: int, r1: int) -> np.ndarray | slice:
    """Entries ``r0:r1`` of an index made by :func:`as_index` (a slice stays a slice)."""
    if isinstance(idx, slice):
        return slice(idx.start + r0, idx.start + r1)
    return idx[r0:r1]


#: :func:`median_of` sorts up to this many values (numpy's SIMD sort); above, ``np.median``'s partition.
MEDIAN_SORT_MAX = 4096


def median_of(x: np.ndarray) -> float:
    """``float(np.median(x))`` of a 1-D array, bit for bit, without ``np.median``'s generic machinery for small float64
    arrays (issue 12: about 35 us a call at 20 values against 3 us; the defence takes about ten such medians a round).

    A float64 array of 1 to :data:`MEDIAN_SORT_MAX` values is sorted: the middle value, or the two middle ones added
    and halved in float64 (``np.median`` averages them with ``np.mean``: the same sum and division); NaN, which the sort
    puts last, gives NaN as ``np.median`` does.  (Of two equal zeros of opposite sign in the middle, either may be the
    one returned, here as in ``np.median``.)  Anything else (other dtypes, other shapes, empty or larger arrays) is
    ``np.median``'s."""
    x = np.asarray(x)
    n = x.size
    if x.ndim != 1 or x.dtype != np.float64 or not 0 < n <= MEDIAN_SORT_MAX:
        return float(np.median(x))
    s = np.sort(x)
    if s[-1] != s[-1]:  # NaN
        return float("nan")
    h = n // 2
    return float(s[h]) if n % 2 else float((s[h - 1] + s[h]) / 2.0)


def row_sq_norms(A: np.ndarray) -> np.ndarray:
    """``||a_i||^2`` of every row of a 2-D array, as float64 (one BLAS dot product per row, no temporary)."""
    vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0
    out = vecdot(A, A) if vecdot is not None else np.einsum("ij,ij->i", A, A)
    return np.asarray(out, dtype=np.float64)


def column_median(A: np.ndarray) -> np.ndarray:
    """``np.median(A, axis=0)`` of a 2-D float array, bit for bit, many times faster.

    ``np.median`` partially sorts each column with a scalar introselect (strided along the slow
    axis); here one compiled pass (:func:`~.kernels.column_medians`) copies blocks of every row into a
    padded buffer and a selection network, evaluated across a block's columns at once, leaves the middle
    value (or the two middle ones, added in the dtype and halved, as ``np.median`` does) of each column:
    ``O(R log^2 R)`` compare-exchanges per column, branch-free and vectorised (R = 1000 rows of 4097
    columns: 31 ms sorted, a few ms here).  A column with a NaN gives NaN, as in ``np.median``.
    """
    from .kernels import SELECT_BLOCK_VALUES, UNROLLED_MEDIAN, column_medians, column_medians31, selection_network

    A = np.asarray(A)
    R, d = A.shape
    if R == 0:
        raise ValueError("column_median of an empty set of rows")
    if A.dtype not in (np.float32, np.float64):
        A = A.astype(np.float64)
    out = np.empty(d, dtype=A.dtype)
    if R == 1:
        out[:] = A[0]
        return out
    lo, hi, npad = selection_network(R)
    if R == UNROLLED_MEDIAN:
        column_medians31(A, npad, out, SELECT_BLOCK_VALUES)
    else:
        column_medians(A, lo, hi, npad, out, SELECT_BLOCK_VALUES)
    return out


def row_sq_norms_to(A: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``||a_i - centre||^2`` of every row (float64), as ``row_sq_norms(A - centre)`` computes them, bit for bit,
    in blocks of rows of about :data:`BLOCK_BYTES` (no ``(R, d)`` temporary)."""
    R, d = A.shape
    centre = np.asarray(centre).astype(A.dtype, copy=False)
    rb = max(1, BLOCK_BYTES // max(1, d * A.itemsize))
    out = np.empty(R)
    buf = np.empty((min(R, rb), d), dtype=A.dtype)
    for r0 in range(0, R, rb):
        r1 = min(R, r0 + rb)
        D = buf[: r1 - r0]
        np.subtract(A[r0:r1], centre, out=D)
        out[r0:r1] = row_sq_norms(D)
    return out


def reference_deviation_stats(G: np.ndarray, rows: np.ndarray, table: np.ndarray, slots: np.ndarray,
                              median_of: np.ndarray | None = None, direction: np.ndarray | None = None,
                              groups: int = 1, centre: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """``drift = np.median(G[rows] - table[slots], axis=0)`` and every row's ``||G[r] - table[s] - drift||^2``.

    What :meth:`~.temporal.SelfReference.apply` computes, in one compiled pass over the rows
    (:func:`~.kernels.drift_and_deviations`): the drift exactly ``np.median``'s (a selection network
    over the sampled rows' changes, column block by column block), the differences ``(G - table) -
    drift`` in the rows' dtype as numpy forms them, their squares summed in float64 (numpy's float32
    ``einsum`` rounds more; the sums agree to float32 rounding).  ``median_of`` (ascending positions in
    ``rows``): the drift is the median of those rows' differences only (a subsample, issue 12), the
    squared norms are every row's.  Returns ``(drift, sq)`` (``sq`` float64); with ``direction`` (a unit vector) also
    every row's change from its reference, ``||G[r] - table[s]||^2`` and ``<G[r] - table[s], direction>`` (float64),
    from the same read: ``(drift, sq, change_sq, change_dots)``.  ``groups`` (odd): ``median_of`` (in any order) is that
    many consecutive groups of equal size, and the drift is the coordinate-wise median of the groups' medians.
    ``centre`` (a vector): also, last in the tuple, every row's ``||a||^2`` and ``<a, e>`` (float64) with
    ``a = (table[s] + drift) - centre`` and ``e = G[r] - table[s] - drift``, from the same read: the row clipped with
    factor ``f`` (:func:`clip_to_references`) is at a squared distance of about ``||a||^2 + 2 f <a, e> + f^2 ||e||^2``
    from ``centre`` (:func:`~.kernels.drift_and_deviations`).
    """
    from .kernels import SELECT_BLOCK_VALUES, drift_and_deviations, selection_network

    rows = np.ascontiguousarray(rows, dtype=np.intp)
    slots = np.ascontiguousarray(slots, dtype=np.intp)
    n, d = rows.size, G.shape[1]
    sample = np.arange(n, dtype=np.intp) if median_of is None else np.ascontiguousarray(median_of, dtype=np.intp)
    if sample.size == 0:
        raise ValueError("the drift of an empty set of rows")
    groups = int(groups)
    if groups < 1 or groups % 2 == 0 or sample.size % groups:
        raise ValueError(f"the drift's sample of {sample.size} rows is not an odd number ({groups}) of equal groups")
    drift = np.empty(d, dtype=np.result_type(G.dtype, table.dtype))
    sq = np.empty(n)
    lo, hi, npad = selection_network(int(sample.size) // groups)
    if direction is None and centre is None:
        u, csq, cdots = np.empty(0, dtype=drift.dtype), np.empty(0), np.empty(0)
    elif direction is None:  # the centre's sums come with the changes' (a zero direction, the changes dropped)
        u, csq, cdots = np.zeros(d, dtype=drift.dtype), np.empty(n), np.empty(n)
    else:
        u, csq, cdots = np.ascontiguousarray(direction, dtype=drift.dtype), np.empty(n), np.empty(n)
    if centre is None:
        c, base, cross = np.empty(0, dtype=drift.dtype), np.empty(0), np.empty(0)
    else:
        c, base, cross = np.ascontiguousarray(centre, dtype=drift.dtype), np.empty(n), np.empty(n)
    drift_and_deviations(G, rows, table, slots, sample, lo, hi, npad, drift, sq, SELECT_BLOCK_VALUES, u, csq, cdots,
                         groups, c, base, cross)
    out = (drift, sq) if direction is None else (drift, sq, csq, cdots)
    return out if centre is None else out + (base, cross)


def clip_to_references(V: np.ndarray | None, G: np.ndarray, rows: np.ndarray, table: np.ndarray, slots: np.ndarray,
                       drift: np.ndarray, factors: np.ndarray, store: bool = False,
                       centre: np.ndarray | None = None) -> np.ndarray | None:
    """``V[rows] = ref + drift + (G[rows] - ref - drift) * factors`` with ``ref = table[slots]``, one compiled pass.

    The arithmetic of :meth:`~.temporal.SelfReference.apply`, bit for bit (elementwise, in the dtype
    ``result_type(G, table, drift)``; :func:`~.kernels.clip_rows`), without temporaries.  ``store``: the
    clipped rows also replace their references (``table[slots] = V[rows]``, each row written once its
    reference is read; ``table`` must have the clipped rows' dtype), in the same pass instead of a second copy.
    ``centre`` (a vector of ``V``'s dtype): the same pass also returns ``||V[rows[k]] - centre||^2`` for every
    ``k`` (float64; :func:`~.kernels.centre_sq_distances`' sums, bit for bit); else returns ``None``.
    ``V=None`` (with ``store``): the clipped rows are written only into their references (``V``'s dtype: the table's).
    """
    from .kernels import clip_rows

    dtype = np.result_type(G.dtype, table.dtype, drift.dtype)
    if V is None:
        if not store or table.dtype != dtype:
            raise ValueError("without V the clipped rows go to the references' table: store, in the rows' dtype")
        V = np.empty((0, 0), dtype=table.dtype)
    if store and table.dtype != V.dtype:
        raise ValueError("the references' table must have the clipped rows' dtype to store them")
    csq = np.empty(np.asarray(rows).size if centre is not None else 0)
    c = np.empty(0, dtype=V.dtype) if centre is None else np.ascontiguousarray(centre, dtype=V.dtype)
    clip_rows(V, G, np.ascontiguousarray(rows, dtype=np.intp), table, np.ascontiguousarray(slots, dtype=np.intp),
              np.asarray(drift).astype(dtype, copy=False), np.asarray(factors).astype(dtype, copy=False), bool(store),
              c, csq)
    return csq if centre is not None else None


def host_array(x: ArrayLike) -> np.ndarray:
    """``x`` as a host numpy array in its own floating dtype (half precision widened to float32)."""
    if is_torch(x):
        import torch

        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32 if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize < 4 else np.float64)
    return arr


def diff_stats_and_store(G: np.ndarray, table: np.ndarray, rows: np.ndarray, prev: np.ndarray,
                         slots: np.ndarray, u: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One pass: ``D = G[rows] - table[prev]``, its rows' squared norms and ``D @ u``; then ``table[slots] = G``.

    The differences in the table's dtype, the norms and projections summed in float64, in one compiled
    pass over the rows (:func:`~.kernels.diff_stats_store`, each row read and written once).
    ``u`` ``None`` skips the statistics (only the store).  A node with a previous vector keeps its
    row of the table (``slots[rows] == prev``): each tile's differences are taken before the same
    tile of ``G`` overwrites it; the other rows of ``G`` go to rows of the table not in ``prev``.
    Returns ``(sq_norms, dots)`` (float64, one per entry of ``rows``).
    """
    R, d = G.shape
    n = rows.size if u is not None else 0
    sq, dots = np.zeros(n), np.zeros(n)
    if n:
        # rows without a previous vector first: a plain store
        scored = np.zeros(R, dtype=bool)
        scored[rows] = True
        fresh = np.flatnonzero(~scored)
        if fresh.size:
            table[slots[fresh]] = G[fresh]
        assert np.array_equal(slots[rows], prev)  # a continuing node keeps its row of the table
        from .kernels import diff_stats_store

        diff_stats_store(G, np.ascontiguousarray(rows, dtype=np.intp), table, np.ascontiguousarray(prev, dtype=np.intp),
                         np.ascontiguousarray(u), sq, dots)
    else:
        table[as_index(slots)] = G
    return sq, dots


def distances_to(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``||Y[rows[k]] - centre||`` for every ``k`` (float64), one tiled pass over those rows."""
    return distances_and_projections(Y, rows, centre, None)[0]


def distances_and_projections(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray, direction: np.ndarray | None,
                              compiled: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``||Y[rows[k]] - centre||`` and (with ``direction``) ``<Y[rows[k]] - centre, direction>`` for every ``k``
    (float64), from one tiled pass over those rows: each tile's differences are read once, in cache, for both.
    ``compiled`` (float32/float64 rows and a centre of their dtype): one compiled pass row after row
    (:func:`~.kernels.centre_distances_and_projections`, sums in float64; numpy's tiles sum in the rows' dtype, so the
    values differ in their last digits), for large rounds; else numpy's tiles (the small rounds' values, bit for bit)."""
    d = Y.shape[1]
    dtype = np.result_type(Y.dtype, centre.dtype)
    if compiled and Y.dtype in (np.float32, np.float64) and centre.dtype == Y.dtype:
        from .kernels import centre_distances_and_projections

        sq = np.empty(rows.size)
        proj = None if direction is None else np.empty(rows.size)
        centre_distances_and_projections(Y, np.ascontiguousarray(rows, dtype=np.intp), np.ascontiguousarray(centre),
                                         np.empty(0, dtype=dtype) if direction is None
                                         else np.ascontiguousarray(direction, dtype=dtype),
                                         sq, np.empty(0) if proj is None else proj)
        return np.sqrt(sq), proj
    sq = np.zeros(rows.size)
    proj = None if direction is None else np.zeros(rows.size)
    u = None if direction is None else np.asarray(direction, dtype=dtype)
    buf = tile_buffer(rows.size, d, dtype)
    ri = as_index(rows)
    for r0, r1, c0, c1 in tiles(rows.size, d, dtype.itemsize):
        D = buf[: r1 - r0, : c1 - c0]
        np.subtract(Y[sub_index(ri, r0, r1), c0:c1], centre[c0:c1], out=D)
        sq[r0:r1] += row_sq_norms(D)
        if proj is not None:
            proj[r0:r1] += D @ u[c0:c1]
    return np.sqrt(sq), proj


def weighted_deviation(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray, weights: np.ndarray,
                       compiled: bool = False) -> np.ndarray:
    """``sum_k weights[k] (Y[rows[k]] - centre)`` in the rows' dtype, one tiled pass over those rows.  ``compiled``
    (large rounds): one compiled read of each row, the sum in float64 (:func:`~.kernels.weighted_deviation_rows`; the
    values agree to the rows' rounding), else numpy's tiles (the small rounds' values, bit for bit)."""
    d = Y.shape[1]
    dtype = np.result_type(Y.dtype, centre.dtype)
    if compiled and Y.dtype in (np.float32, np.float64) and centre.dtype == Y.dtype:
        from .kernels import weighted_deviation_rows

        acc = np.zeros(d)
        weighted_deviation_rows(Y, np.ascontiguousarray(rows, dtype=np.intp), np.ascontiguousarray(centre),
                                np.ascontiguousarray(weights, dtype=np.float64), acc)
        return acc.astype(dtype, copy=False)
    out = np.zeros(d, dtype=dtype)
    w8 = np.asarray(weights, dtype=dtype)
    buf = tile_buffer(rows.size, d, dtype)
    ri = as_index(rows)
    for r0, r1, c0, c1 in tiles(rows.size, d, dtype.itemsize):
        D = buf[: r1 - r0, : c1 - c0]
        np.subtract(Y[sub_index(ri, r0, r1), c0:c1], centre[c0:c1], out=D)
        out[c0:c1] += w8[r0:r1] @ D
    return out


def rows_mean(updates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The mean of ``updates[rows]`` (numpy float32/float64 rows) in their dtype, summed in float64 by one compiled read
    of those rows only (:func:`~.kernels.rows_sum`; :func:`~.._backend.subset_mean`'s product with a weight vector
    reads the other rows too): the many-row filter's survivors' mean (issue 12)."""
    from .kernels import rows_sum

    acc = np.zeros(updates.shape[1])
    rows_sum(updates, np.ascontiguousarray(rows, dtype=np.intp), acc)
    acc /= max(int(np.asarray(rows).size), 1)
    return acc.astype(updates.dtype, copy=False)


def clip_survivors(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray, clip_scale: float, trim: int = 0,
                   compiled: bool = False, raise_only: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """One step of centered clipping (Karimireddy, He, Jaggi 2021, Section 4) of ``Y[rows]`` around ``centre``.

    ``v = centre + (1/n) sum_k min(1, r / ||y_k - centre||) (y_k - centre)`` with the radius
    ``r = clip_scale * median_k ||y_k - centre||``.  ``centre`` is the mean of the rows (the
    filter's estimate), so ``sum_k (y_k - centre) = 0`` and only the clipped rows (factor < 1) are
    read a second time: ``v = centre - (1/n) sum_{clipped} (1 - factor_k) (y_k - centre)``.
    Returns ``(v, factors, r)``; ``v`` is ``centre`` itself when nothing is clipped (r = 0 or
    every row within it).

    ``trim > 0`` (with ``n > 2 trim``): the component of ``v`` along the centre's direction
    ``u = centre / ||centre||`` is then replaced by the trimmed mean of the rows' components along ``u``
    (``trim`` removed from each side; the projections come from the distances' pass):
    ``v <- v + (|centre| + trimmed_mean_k <y_k - centre, u> - <v, u>) u``.  Along the step it bounds
    what ``trim`` rows can do by the honest spread *along that direction*, not by the radius, which at
    high heterogeneity is several times the centre's norm.  ``raise_only``: the component is replaced only where
    the trimmed mean is the larger (the default defence's ``step_trim="raise"``): a bias off the step tilts ``u``
    toward itself, and lowering the component along ``u`` then scales the whole centre down, honest step
    included, instead of removing the bias.  ``compiled``: the distances and projections from
    :func:`distances_and_projections`' compiled pass, and the clipped rows' deviations from
    :func:`weighted_deviation`'s (large rounds).
    """
    n = rows.size
    u = None  # the centre's direction, only when the trim applies (no float64 copy of the centre otherwise)
    if trim > 0 and n > 2 * trim:
        c64 = np.asarray(centre, dtype=np.float64)
        cn = float(np.linalg.norm(c64))
        u = c64 / cn if cn > 0 and np.isfinite(cn) else None
    dist, proj = distances_and_projections(Y, rows, centre, u, compiled=compiled)
    radius = clip_scale * median_of(dist)
    if not radius > 0:
        return centre, np.ones(n), radius
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)
    clipped = np.flatnonzero(factors < 1.0)
    v = centre if clipped.size == 0 else centre + weighted_deviation(Y, rows[clipped], centre,
                                                                     (factors[clipped] - 1.0) / n, compiled=compiled)
    if u is not None:
        p = np.sort(proj)
        along = float(np.mean(p[trim:n - trim]))  # the trimmed mean of <y_k - centre, u>
        v64 = np.asarray(v, dtype=np.float64)
        change = along - float((v64 - c64) @ u)
        if raise_only:
            change = max(change, 0.0)
        v = (v64 + change * u).astype(np.result_type(Y.dtype, centre.dtype), copy=False)
    return v, factors, radius


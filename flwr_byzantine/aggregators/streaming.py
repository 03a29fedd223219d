"""Streaming passes over an ``(R, d)`` round in the input dtype, in cache-sized column blocks.

The default defence reads every round a few times beyond the filter itself (the evidence's
differences to the previous round, the survivors' distances to the estimate, the clipping).
Each such pass here walks the columns in blocks of about :data:`BLOCK_BYTES`, keeps its
temporaries in cache, works in the rows' dtype (float32 stays float32: no float64 copy of
the rows) and accumulates the per-row scalars (squared norms, dot products) in float64.
Row subsets are gathered block by block (a contiguous run of rows is a view).
"""

from __future__ import annotations

import numpy as np

from .._backend import ArrayLike, is_torch

#: Bytes of one block of rows x columns in a streaming pass (its temporaries stay in cache).
BLOCK_BYTES = 1 << 20


def block_width(rows: int, itemsize: int) -> int:
    """Columns per block of a pass over ``rows`` rows of ``itemsize``-byte entries (at least 64)."""
    return max(64, BLOCK_BYTES // max(rows * itemsize, 1))


def as_index(idx: np.ndarray) -> np.ndarray | slice:
    """``idx`` as a slice when it is a run of consecutive ascending integers (a view, no gather), else itself."""
    idx = np.asarray(idx, dtype=np.intp)
    if idx.size and int(idx[-1]) - int(idx[0]) == idx.size - 1 and (idx.size < 3 or bool(np.all(np.diff(idx) == 1))):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def row_sq_norms(A: np.ndarray) -> np.ndarray:
    """``||a_i||^2`` of every row of a 2-D array, as float64 (one BLAS dot product per row, no temporary)."""
    vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0
    out = vecdot(A, A) if vecdot is not None else np.einsum("ij,ij->i", A, A)
    return np.asarray(out, dtype=np.float64)


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

    ``u`` ``None`` skips the statistics (only the store).  Each block's differences are taken
    before the block of ``G`` overwrites ``table`` (a row of ``prev`` may be a row of ``slots``).
    Returns ``(sq_norms, dots)`` (float64, one per entry of ``rows``).
    """
    R, d = G.shape
    n = rows.size if u is not None else 0
    sq, dots = np.zeros(n), np.zeros(n)
    gi, li, si = as_index(rows), as_index(prev), as_index(slots)
    w = min(block_width(max(R, 1), table.itemsize), max(d, 1))
    buf = np.empty((n, w), dtype=table.dtype) if n else None
    for c0 in range(0, d, w):
        c1 = min(d, c0 + w)
        Gb = G[:, c0:c1]
        if n:
            D = buf[:, : c1 - c0]
            np.subtract(Gb[gi], table[li, c0:c1], out=D)
            sq += row_sq_norms(D)
            dots += D @ u[c0:c1]
        table[si, c0:c1] = Gb
    return sq, dots


def distances_to(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``||Y[rows[k]] - centre||`` for every ``k`` (float64), one blocked pass over those rows."""
    R, d = Y.shape
    sq = np.zeros(rows.size)
    ri = as_index(rows)
    w = min(block_width(max(rows.size, 1), Y.itemsize), max(d, 1))
    buf = np.empty((rows.size, w), dtype=np.result_type(Y.dtype, centre.dtype))
    for c0 in range(0, d, w):
        c1 = min(d, c0 + w)
        D = buf[:, : c1 - c0]
        np.subtract(Y[ri, c0:c1], centre[c0:c1], out=D)
        sq += row_sq_norms(D)
    return np.sqrt(sq)


def weighted_deviation(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_k weights[k] (Y[rows[k]] - centre)`` in the rows' dtype, one blocked pass over those rows."""
    R, d = Y.shape
    dtype = np.result_type(Y.dtype, centre.dtype)
    out = np.zeros(d, dtype=dtype)
    if rows.size == 0:
        return out
    ri = as_index(rows)
    w8 = np.asarray(weights, dtype=dtype)
    w = min(block_width(max(rows.size, 1), Y.itemsize), max(d, 1))
    buf = np.empty((rows.size, w), dtype=dtype)
    for c0 in range(0, d, w):
        c1 = min(d, c0 + w)
        D = buf[:, : c1 - c0]
        np.subtract(Y[ri, c0:c1], centre[c0:c1], out=D)
        out[c0:c1] = w8 @ D
    return out


def clip_survivors(Y: np.ndarray, rows: np.ndarray, centre: np.ndarray, clip_scale: float
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """One step of centered clipping (Karimireddy, He, Jaggi 2021, Section 4) of ``Y[rows]`` around ``centre``.

    ``v = centre + (1/n) sum_k min(1, r / ||y_k - centre||) (y_k - centre)`` with the radius
    ``r = clip_scale * median_k ||y_k - centre||``.  ``centre`` is the mean of the rows (the
    filter's estimate), so ``sum_k (y_k - centre) = 0`` and only the clipped rows (factor < 1) are
    read a second time: ``v = centre - (1/n) sum_{clipped} (1 - factor_k) (y_k - centre)``.
    Returns ``(v, factors, r)``; ``v`` is ``centre`` itself when nothing is clipped (r = 0 or
    every row within it).
    """
    n = rows.size
    dist = distances_to(Y, rows, centre)
    radius = clip_scale * float(np.median(dist))
    if not radius > 0:
        return centre, np.ones(n), radius
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)
    clipped = np.flatnonzero(factors < 1.0)
    if clipped.size == 0:
        return centre, factors, radius
    corr = weighted_deviation(Y, rows[clipped], centre, (factors[clipped] - 1.0) / n)
    return centre + corr, factors, radius


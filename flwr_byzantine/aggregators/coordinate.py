"""Coordinate-wise robust aggregators of Yin et al. (2018): median and trimmed mean.

Both rules sort every coordinate (column) of the ``(R, d)`` input independently and
average a fixed window of the sorted values: the middle one or two values (median)
or all but the ``b`` smallest and ``b`` largest (trimmed mean).  The columns are
processed in chunks so that the sort buffers hold at most ``COORD_BUDGET`` values
(no ``(R, R, d)`` or ``d x d`` intermediates), in the input's framework, dtype and
device.

numpy inputs are transposed chunk by chunk to contiguous ``(chunk, R)`` blocks and
partially sorted (``np.partition``), the fast numpy formulation of these rules.

Diagnostics (shared by both rules, and by Bulyan's coordinate stage):

* ``weights[i]`` is the *average coefficient* of row ``i`` over the ``d``
  coordinates: in a coordinate where ``k`` rows are averaged each of them has
  coefficient ``1/k``, the others 0.  The weights therefore sum to 1, and a row
  with weight 0 never influenced the estimate.
* ``kept`` are the rows used in at least half as many coordinates as a row would
  be if all rows were exchangeable, i.e. rows whose usage fraction
  ``info["usage"][i]`` is ``>= k / (2 R)``.  With ``b = 0`` every row is kept; a far
  outlier is never used and is dropped.  Ties between equal values are broken by
  row index (stable sort), deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .._backend import ArrayLike, is_torch
from .base import AggregationResult, Aggregator

from .._backend import torch  # the torch module, imported on first use (lean ClientApp processes)

#: Rows up to which the numpy windows go through the compiled network (:func:`~.kernels.window_sums`).
WINDOW_NETWORK_MAX_ROWS = 64
#: Values of one transposed block of that network (kept in L2 with the row numbers beside them).
WINDOW_BLOCK_VALUES = 1 << 14
#: Maximum number of values (rows x columns) sorted at once by the coordinate rules.
COORD_BUDGET = 1 << 22


def column_chunks(n_rows: int, d: int, budget: int | None = None) -> Iterator[slice]:
    """Slices of at most ``budget // n_rows`` columns covering ``range(d)`` (default ``COORD_BUDGET``)."""
    budget = COORD_BUDGET if budget is None else budget
    step = max(1, budget // max(n_rows, 1))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def sort_columns(block: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Sort every column of ``block`` (stable); returns ``(values, row_indices)``."""
    if is_torch(block):
        vals, idx = torch.sort(block, dim=0, stable=True)
        return vals, idx
    idx = np.argsort(block, axis=0, kind="stable")
    return np.take_along_axis(block, idx, axis=0), idx


def empty_vector(updates: ArrayLike) -> ArrayLike:
    """Uninitialised ``(d,)`` vector in the framework, dtype and device of ``updates``."""
    d = updates.shape[1]
    if is_torch(updates):
        return torch.empty(d, dtype=updates.dtype, device=updates.device)
    return np.empty(d, dtype=updates.dtype)


def count_rows(row_idx: ArrayLike, n_rows: int) -> np.ndarray:
    """How many times each row index ``0..n_rows-1`` occurs in ``row_idx`` (int64 numpy)."""
    if is_torch(row_idx):
        return torch.bincount(row_idx.reshape(-1), minlength=n_rows).cpu().numpy().astype(np.int64)
    return np.bincount(np.asarray(row_idx).ravel(), minlength=n_rows).astype(np.int64)


def usage_result(
    estimate: ArrayLike, counts: np.ndarray, per_coord: int, d: int, info: dict
) -> AggregationResult:
    """Build the result of a rule that averages ``per_coord`` rows in each coordinate.

    ``counts[i]`` is the number of coordinates in which row ``i`` was averaged.
    """
    R = counts.shape[0]
    usage = counts / float(d)
    weights = usage / float(per_coord)
    kept = np.flatnonzero(usage >= per_coord / (2.0 * R))
    info = dict(info)
    info["usage"] = usage.tolist()
    info["rows_per_coordinate"] = int(per_coord)
    return AggregationResult(estimate=estimate, kept=kept, weights=weights, info=info)


def window_usage(
    T: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int, resolve: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Row usage counts of a per-coordinate window of ``k`` values, ties broken by ``resolve``.

    ``T`` is ``(c, R)`` (a row per coordinate) and the window of row ``j`` holds ``k`` of its
    values, the smallest ``lo[j]`` and the largest ``hi[j]``.  Every value strictly inside
    ``[lo, hi]`` is in the window, so when exactly ``k`` values of a row lie in ``[lo, hi]``
    those are the window.  Rows with more (values tied with an edge of the window, rare)
    are passed to ``resolve``, which returns their exact usage counts under the rule's
    tie-breaking (a stable sort: equal values in row-index order).
    """
    from .kernels import window_counts

    T = np.ascontiguousarray(T)
    counts = np.zeros(T.shape[1], dtype=np.int64)
    tied = np.empty(T.shape[0], dtype=np.bool_)
    window_counts(T, np.ascontiguousarray(lo, dtype=T.dtype), np.ascontiguousarray(hi, dtype=T.dtype), k, counts,
                  tied)  # one compiled read (numpy's masks: 13 ms of a 100 x 1e5 Bulyan round, issue 12)
    ties = np.flatnonzero(tied)
    if ties.size:
        Tt = T[ties]
        counts -= np.count_nonzero((Tt >= lo[ties, None]) & (Tt <= hi[ties, None]), axis=0)
        counts += resolve(Tt)
    return counts


def _stable_window_counts(T: np.ndarray, start: int, k: int) -> np.ndarray:
    """Usage counts of the sorted positions ``start .. start + k - 1`` of every row of ``T`` (stable sort)."""
    order = np.argsort(T, axis=1, kind="stable")[:, start : start + k]
    return np.bincount(order.ravel(), minlength=T.shape[1])


def trimmed_window(updates: ArrayLike, b: int) -> tuple[ArrayLike, np.ndarray]:
    """Average, per coordinate, the sorted values ``b .. R-b-1``; also return row usage counts.

    With ``b = (R - 1) // 2`` this is exactly the coordinate-wise median (the middle
    value for odd R, the average of the two middle values for even R).  numpy inputs
    are processed on contiguous ``(chunk, R)`` transposed blocks with a partial sort
    (``np.partition`` at positions ``b`` and ``R - b - 1``: O(R) per coordinate, along
    contiguous memory); torch inputs are sorted on their device.
    """
    R, d = updates.shape
    k = R - 2 * b
    out = empty_vector(updates)
    counts = np.zeros(R, dtype=np.int64)
    torch_in = is_torch(updates)
    if not torch_in and b > 0 and R <= WINDOW_NETWORK_MAX_ROWS and updates.dtype in (np.float32, np.float64):
        # few rows: a compiled sorting network of (value, row) pairs across blocks of columns (issue 12: np.partition
        # of (chunk, R) blocks is a scalar introselect per coordinate)
        from .kernels import window_network, window_sums  # noqa: PLC0415

        lo, hi, npad = window_network(R, b)
        window_sums(np.ascontiguousarray(updates), b, lo, hi, npad, out, counts, max(16, WINDOW_BLOCK_VALUES // npad))
        return out, counts
    for sl in column_chunks(R, d):
        block = updates[:, sl]
        if b == 0:  # plain mean; no sort needed, every row is used in every coordinate
            out[sl] = block.sum(0) / k
            counts += sl.stop - sl.start
            continue
        if torch_in:
            vals, idx = sort_columns(block)
            out[sl] = vals[b : R - b].sum(0) / k
            counts += count_rows(idx[b : R - b], R)
            continue
        T = np.ascontiguousarray(block.T)
        P = np.partition(T, [b] if k == 1 else [b, R - b - 1], axis=1)
        out[sl] = P[:, b : R - b].sum(axis=1) / k
        counts += window_usage(T, P[:, b], P[:, R - b - 1], k, lambda X: _stable_window_counts(X, b, k))
    return out, counts


class CoordinateMedian(Aggregator):
    """Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    ``med(G)_j = median{g_{1j}, ..., g_{Rj}}`` for every coordinate ``j``
    (Yin et al. 2018, Definition 1, "coordinate-wise median"); for even R the
    average of the two middle values, as :func:`numpy.median`.

    ``weights`` / ``kept``: see the module docstring (average coefficient per row;
    rows used in at least ``k/(2R)`` of the coordinates, k = 1 or 2 rows per
    coordinate).  ``statistic`` is ``nan``.
    """

    name = "median"

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R, d = updates.shape
        b = (R - 1) // 2
        est, counts = trimmed_window(updates, b)
        return usage_result(est, counts, R - 2 * b, d, {})


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, ICML 2018).

    ``trmean_b(G)_j = 1/(R - 2b) * sum_{g in U_j} g`` where ``U_j`` is the set of
    values of coordinate ``j`` after removing the ``b`` largest and the ``b``
    smallest (Yin et al. 2018, Definition 2, with ``b = beta R``).

    Parameters
    ----------
    num_trim:
        ``b``, the number of values removed at *each* end of every coordinate.
    trim_fraction:
        ``beta``: ``b = floor(beta * R)`` for an input of R rows, ``0 <= beta < 1/2``.
        Exactly one of ``num_trim`` / ``trim_fraction`` may be given; if neither
        is, ``trim_fraction = 0.1``.

    Raises ``ValueError`` at aggregation time if ``2 b >= R`` (nothing would be left).
    ``weights`` / ``kept``: see the module docstring.
    """

    name = "trimmed-mean"

    def __init__(self, num_trim: int | None = None, trim_fraction: float | None = None) -> None:
        if num_trim is not None and trim_fraction is not None:
            raise ValueError("give either num_trim or trim_fraction, not both")
        if num_trim is not None:
            if isinstance(num_trim, bool) or int(num_trim) != num_trim or num_trim < 0:
                raise ValueError(f"num_trim must be a non-negative integer, got {num_trim!r}")
            num_trim = int(num_trim)
        else:
            if trim_fraction is None:
                trim_fraction = 0.1
            if not (np.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
                raise ValueError(f"trim_fraction must be in [0, 1/2), got {trim_fraction!r}")
            trim_fraction = float(trim_fraction)
        self.num_trim = num_trim
        self.trim_fraction = trim_fraction

    def trim_count(self, R: int) -> int:
        """The number ``b`` of values trimmed at each end for an input of ``R`` rows."""
        b = self.num_trim if self.num_trim is not None else int(np.floor(self.trim_fraction * R))
        if 2 * b >= R:
            raise ValueError(
                f"trimmed mean: cannot trim b={b} values at each end of R={R} rows (need 2b < R)"
            )
        return b

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R, d = updates.shape
        b = self.trim_count(R)
        est, counts = trimmed_window(updates, b)
        return usage_result(est, counts, R - 2 * b, d, {"num_trim": int(b)})

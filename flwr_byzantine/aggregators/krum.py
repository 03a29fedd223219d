"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018).

All pairwise squared distances come from one centred Gram product
(:func:`~flwr_byzantine._backend.centred_gram`, O(d R^2), chunked, in the input's
framework and device) and :func:`~flwr_byzantine._backend.sq_distances_from_gram`;
the scoring works on the small ``R x R`` float64 matrix.  No ``(R, R, d)`` tensor
and no ``d x d`` matrix is formed.  Ties between equal scores are broken by the
smallest row index, so every rule is deterministic.
"""

from __future__ import annotations

import numpy as np

from .._backend import (LARGE_ENERGY, ArrayLike, centred_gram, check_matrix, is_torch, sq_distances_from_gram,
                        subset_mean)
from .base import AggregationResult, Aggregator
from .coordinate import column_chunks, count_rows, empty_vector, sort_columns, usage_result, window_usage

from .._backend import torch  # the torch module, imported on first use (lean ClientApp processes)


def _check_f(num_byzantine: int) -> int:
    if isinstance(num_byzantine, bool) or int(num_byzantine) != num_byzantine or num_byzantine < 0:
        raise ValueError(f"num_byzantine must be a non-negative integer, got {num_byzantine!r}")
    return int(num_byzantine)


def krum_scores(sq_dist: np.ndarray, num_neighbours: int) -> np.ndarray:
    """Krum score of every point: sum of its ``num_neighbours`` smallest squared distances to the others.

    ``sq_dist`` is an ``(n, n)`` matrix of squared distances; a point is never its
    own neighbour.  ``num_neighbours`` must be in ``[0, n - 1]``.
    """
    n = sq_dist.shape[0]
    if not 0 <= num_neighbours <= n - 1:
        raise ValueError(f"num_neighbours must be in [0, {n - 1}], got {num_neighbours}")
    if num_neighbours == 0:
        return np.zeros(n)
    D = sq_dist.copy()
    np.fill_diagonal(D, np.inf)
    return np.sort(D, axis=1)[:, :num_neighbours].sum(axis=1)


class Krum(Aggregator):
    """Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    For every input ``g_i``, ``s(i) = sum_{i -> j} ||g_i - g_j||^2`` over the
    ``R - f - 2`` closest other inputs (``i -> j``); Krum outputs the input with the
    smallest score, ``KR(g_1..g_R) = g_{i*}``, ``i* = argmin_i s(i)`` (Blanchard et
    al. 2017, Section 4).  Requires ``R > 2 f + 2`` (ValueError otherwise).

    Diagnostics: ``kept = [i*]`` with ``weights[i*] = 1`` (0 elsewhere);
    ``statistic`` is the winning score ``s(i*)``; ``info["scores"]`` lists all scores.
    """

    name = "krum"
    #: The input is screened on the Gram matrix's trace, the rows' squared norms, instead of a pass of its own: where
    #: that is not finite (a NaN or Inf entry) or large (float32 rows near its maximum, whose centring would overflow),
    #: :func:`~flwr_byzantine._backend.check_matrix` takes the input (ValueError, or the rows widened to float64) and
    #: the Gram matrix is taken again.  The estimate is an input row, in the input's dtype.
    screens_finiteness = True

    def __init__(self, num_byzantine: int = 0) -> None:
        self.num_byzantine = _check_f(num_byzantine)

    def _scores(self, updates: ArrayLike) -> np.ndarray:
        R = updates.shape[0]
        f = self.num_byzantine
        if R <= 2 * f + 2:
            raise ValueError(f"{type(self).__name__} needs R > 2f + 2 inputs, got R={R} with f={f}")
        with np.errstate(all="ignore"):  # a NaN/Inf or huge input is screened just below, not warned about
            gram, energy = centred_gram(updates, with_scale=True)
        if not np.isfinite(energy) or energy > LARGE_ENERGY:
            gram = centred_gram(check_matrix(updates, widen_large=True))
        return krum_scores(sq_distances_from_gram(gram), R - f - 2)

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        scores = self._scores(updates)
        best = int(np.argmin(scores))
        weights = np.zeros(scores.shape[0])
        weights[best] = 1.0
        return AggregationResult(
            estimate=updates[best].clone() if is_torch(updates) else updates[best].copy(),
            kept=np.array([best]),
            weights=weights,
            statistic=float(scores[best]),
            info={"scores": scores.tolist(), "selected": [best]},
        )


class MultiKrum(Krum):
    """Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017).

    Computes the Krum scores ``s(i)`` once (sum of squared distances to the
    ``R - f - 2`` nearest other inputs) and averages the ``m`` inputs with the
    smallest scores (Blanchard et al. 2017, Section 4, "m-Krum"); ``m = 1`` is Krum.
    Requires ``R > 2 f + 2`` and ``1 <= m <= R`` (ValueError otherwise).

    Diagnostics: ``kept`` = the ``m`` selected rows, each with weight ``1/m``;
    ``statistic`` is the largest selected score; ``info["scores"]`` lists all scores.
    """

    name = "multi-krum"
    screens_finiteness = False  # the estimate is a mean: huge float32 rows are averaged in float64 (check_matrix)

    def __init__(self, num_byzantine: int = 0, num_selected: int = 1) -> None:
        super().__init__(num_byzantine)
        if isinstance(num_selected, bool) or int(num_selected) != num_selected or num_selected < 1:
            raise ValueError(f"num_selected must be a positive integer, got {num_selected!r}")
        self.num_selected = int(num_selected)

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R = updates.shape[0]
        if self.num_selected > R:
            raise ValueError(f"multi-krum: num_selected={self.num_selected} exceeds the number of inputs R={R}")
        scores = self._scores(updates)
        order = np.argsort(scores, kind="stable")
        sel = np.sort(order[: self.num_selected])
        weights = np.zeros(R)
        weights[sel] = 1.0 / sel.size
        return AggregationResult(
            estimate=subset_mean(updates, sel),
            kept=sel,
            weights=weights,
            statistic=float(scores[order[self.num_selected - 1]]),
            info={"scores": scores.tolist(), "selected": sel.tolist()},
        )


class Bulyan(Aggregator):
    """Bulyan on top of Krum (El Mhamdi, Guerraoui, Rouault, ICML 2018).

    1. *Selection* of ``theta = R - 2f`` inputs.  ``selection="iterative"`` (the
       paper's Algorithm): repeatedly apply Krum to the inputs not yet selected and
       move its choice to the selection set ``S``; on ``n'`` remaining inputs Krum
       scores use ``n' - f - 2`` neighbours, clipped to ``[1, n' - 1]`` (the last
       steps of the recursion have ``n' < 2f + 3``).  ``selection="multi-krum"``:
       the ``theta`` inputs with the smallest Krum scores computed once on all R
       inputs (Multi-Krum with ``m = theta``).
    2. *Aggregation*: for every coordinate ``j``, the average of the
       ``beta = theta - 2f`` values of ``{g_j : g in S}`` closest to their median
       (``M[j] = argmin_{|H| = beta} sum_{X in H} |X_j - median_j|``).  The chosen
       values form a contiguous window of the sorted coordinate; among equally
       close values the lower one wins.

    Requires ``R >= 4 f + 3`` (ValueError otherwise), the paper's condition.

    Diagnostics: ``info["selected"]`` is ``S`` (in selection order); ``weights[i]``
    is the average coefficient of row ``i`` over the coordinates (``1/beta`` where
    it is among the ``beta`` values, 0 outside ``S``); ``info["usage"]`` is the
    fraction of coordinates that used each row; ``kept`` are the rows of ``S``
    used in at least half as many coordinates as a row of ``S`` would be if all
    were exchangeable (usage ``>= beta / (2 theta)``), so a selected row that the
    coordinate stage (almost) never uses is not reported as kept.
    """

    name = "bulyan"

    def __init__(self, num_byzantine: int = 0, selection: str = "iterative") -> None:
        self.num_byzantine = _check_f(num_byzantine)
        if selection not in ("iterative", "multi-krum"):
            raise ValueError(f"selection must be 'iterative' or 'multi-krum', got {selection!r}")
        self.selection = selection

    def select(self, sq_dist: np.ndarray) -> np.ndarray:
        """Indices of the ``theta = R - 2f`` selected inputs, in selection order."""
        R = sq_dist.shape[0]
        f = self.num_byzantine
        theta = R - 2 * f
        if self.selection == "multi-krum":
            scores = krum_scores(sq_dist, R - f - 2)
            return np.argsort(scores, kind="stable")[:theta]
        remaining = np.arange(R)
        selected: list[int] = []
        while len(selected) < theta:
            n = remaining.size
            if n == 1:
                pick = 0
            else:
                k = min(max(n - f - 2, 1), n - 1)
                pick = int(np.argmin(krum_scores(sq_dist[np.ix_(remaining, remaining)], k)))
            selected.append(int(remaining[pick]))
            remaining = np.delete(remaining, pick)
        return np.asarray(selected, dtype=np.int64)

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R, d = updates.shape
        f = self.num_byzantine
        if R < 4 * f + 3:
            raise ValueError(f"bulyan needs R >= 4f + 3 inputs, got R={R} with f={f} (need R >= {4 * f + 3})")
        theta = R - 2 * f
        beta = theta - 2 * f
        sel = self.select(sq_distances_from_gram(centred_gram(updates)))
        sel_sorted = np.sort(sel)
        if is_torch(updates):
            sub = updates[torch.as_tensor(sel_sorted, device=updates.device)]
        else:
            sub = updates[sel_sorted]
        est, sub_counts = _closest_to_median_mean(sub, beta)
        counts = np.zeros(R, dtype=np.int64)
        counts[sel_sorted] = sub_counts
        res = usage_result(est, counts, beta, d, {"selected": sel.tolist(), "theta": theta, "beta": beta})
        usage = counts / float(d)
        res.kept = sel_sorted[usage[sel_sorted] >= beta / (2.0 * theta)]
        return res


def _closest_to_median_mean(sub: ArrayLike, beta: int) -> tuple[ArrayLike, np.ndarray]:
    """Per coordinate, the mean of the ``beta`` values closest to the median (and row usage counts).

    The values of a column are sorted, their distances to the median computed in
    float64 and the ``beta`` smallest distances taken with a stable sort, so equal
    distances go to the lower value; the chosen *values* are a contiguous window of
    the sorted column (numpy: grown from the median, :func:`_closest_window_numpy`).
    """
    theta, d = sub.shape
    out = empty_vector(sub)
    counts = np.zeros(theta, dtype=np.int64)
    lo, hi = (theta - 1) // 2, theta // 2
    for sl in column_chunks(theta, d):
        if not is_torch(sub) and beta != theta:
            out[sl], c = _closest_window_numpy(np.ascontiguousarray(sub[:, sl].T), beta)
            counts += c
            continue
        vals, idx = sort_columns(sub[:, sl])
        if beta == theta:
            out[sl] = vals.sum(0) / beta
            counts += count_rows(idx, theta)
            continue
        if is_torch(vals):
            v64 = vals.to(torch.float64)
            dev = (v64 - 0.5 * (v64[lo] + v64[hi])).abs()
            rows = torch.sort(dev, dim=0, stable=True).indices[:beta]
            out[sl] = vals.gather(0, rows).sum(0) / beta
            counts += count_rows(idx.gather(0, rows), theta)
    return out, counts


def _closest_counts_stable(T: np.ndarray, beta: int) -> np.ndarray:
    """Usage counts of the rule's definition on rows of ``T`` (stable sorts of the values, then of
    the distances to the median): the exact tie-breaking, used for the rare tied coordinates."""
    order = np.argsort(T, axis=1, kind="stable")
    vals = np.take_along_axis(T, order, axis=1).astype(np.float64, copy=False)
    lo, hi = (T.shape[1] - 1) // 2, T.shape[1] // 2
    dev = np.abs(vals - 0.5 * (vals[:, lo : lo + 1] + vals[:, hi : hi + 1]))
    pos = np.argsort(dev, axis=1, kind="stable")[:, :beta]
    return np.bincount(np.take_along_axis(order, pos, axis=1).ravel(), minlength=T.shape[1])


def _closest_window_numpy(T: np.ndarray, beta: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy path of :func:`_closest_to_median_mean` on a contiguous ``(c, theta)`` block.

    Each row is sorted along contiguous memory; the ``beta`` values closest to the median
    (as values) are a contiguous window of the sorted row, grown from the median outwards (at
    each step the closer neighbour joins, the lower one on a tie: the order of a stable sort
    of the distances), by the compiled :func:`~.kernels.closest_window`.  Row usage comes from :func:`~.coordinate.window_usage`, ties at the
    window's edges resolved by the definition itself (:func:`_closest_counts_stable`).
    """
    from .kernels import closest_window

    c, theta = T.shape
    V = np.sort(T, axis=1)
    est = np.empty(c)
    lo_val = np.empty(c, dtype=T.dtype)
    hi_val = np.empty(c, dtype=T.dtype)
    closest_window(V, beta, est, lo_val, hi_val)  # compiled: numpy's beta vectorised steps took 60 % of a round
    return est.astype(T.dtype, copy=False), window_usage(T, lo_val, hi_val, beta,
                                                         lambda X: _closest_counts_stable(X, beta))

"""Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla, Kakade, Harchaoui 2019).

The geometric median ``z* = argmin_z sum_i ||z - g_i||`` is computed in Gram space:
every Weiszfeld iterate is a convex combination ``z = G^T w`` of the inputs, so only
the weight vector ``w`` is kept and the distances

    ``||z - g_i||^2 = w^T K w - 2 (K w)_i + K_ii``

come from the centred Gram matrix ``K`` (one O(d R^2) chunked product, then O(R^2)
per iteration, in float64).  The estimate is ``G^T w`` formed once at the end, in
the input's framework, dtype and device.
"""

from __future__ import annotations

import numpy as np

from .._backend import ArrayLike, centred_gram, mean_rows, weighted_sum
from .base import AggregationResult, Aggregator


def weiszfeld_gram(
    gram: np.ndarray, max_iter: int = 500, tol: float = 1e-10, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Smoothed Weiszfeld on a (centred) Gram matrix.

    Returns ``(w, dist, iterations, converged)``: the convex weights of the
    geometric median, its distances to the inputs, the number of iterations and
    whether the relative objective change fell below ``tol``.  ``eps`` is the
    absolute smoothing ``nu`` of RFA (distances are floored at ``eps``).
    """
    R = gram.shape[0]
    diag = np.diag(gram).copy()

    def distances(w: np.ndarray) -> np.ndarray:
        Kw = gram @ w
        return np.sqrt(np.maximum(w @ Kw - 2.0 * Kw + diag, 0.0))

    w = np.full(R, 1.0 / R)
    dist = distances(w)
    obj = float(dist.sum())
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        inv = 1.0 / np.maximum(dist, eps)  # RFA: beta_i = 1 / max(nu, ||z - g_i||)
        w = inv / inv.sum()
        dist = distances(w)
        new_obj = float(dist.sum())
        if abs(obj - new_obj) <= tol * max(new_obj, 1e-300):
            obj = new_obj
            converged = True
            break
        obj = new_obj
    return w, dist, iterations, converged


class GeometricMedian(Aggregator):
    """Geometric median via smoothed Weiszfeld: RFA (Pillutla, Kakade, Harchaoui, 2019).

    Iterates ``beta_i = 1 / max(nu, ||z - g_i||)``, ``z <- sum_i beta_i g_i / sum_i
    beta_i`` (the smoothed Weiszfeld algorithm of Pillutla et al. 2019, equal client
    weights) from ``z = mean``, until the objective ``sum_i ||z - g_i||`` changes by
    at most ``tol`` (relative) or ``max_iter`` iterations.

    Parameters
    ----------
    max_iter:
        Maximum number of Weiszfeld iterations.
    tol:
        Relative change of the objective at which to stop.
    eps:
        Smoothing, *relative to the spread of the inputs*: ``nu = eps * s`` with
        ``s = sqrt(trace(K) / R)`` the root-mean-square distance of the inputs to
        their mean, which makes the rule scale equivariant.

    Diagnostics: ``weights`` are the convex weights ``w`` of the output ``G^T w``;
    ``kept`` are the rows with ``w_i >= 1/(2R)`` (at least half the uniform weight;
    far outliers get ``w_i ~ 1/distance`` and are dropped); ``statistic`` is the
    objective ``sum_i ||z - g_i||`` at the output; ``iterations`` the Weiszfeld
    iterations; ``info["converged"]`` whether ``tol`` was met.
    """

    name = "geomed"

    def __init__(self, max_iter: int = 500, tol: float = 1e-10, eps: float = 1e-8) -> None:
        if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (np.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if not (np.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.eps = float(eps)

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R = updates.shape[0]
        gram = centred_gram(updates)
        spread = float(np.sqrt(max(np.trace(gram), 0.0) / R))
        if R == 1 or spread == 0.0:  # all inputs equal: the mean is the median
            return AggregationResult(
                estimate=mean_rows(updates), kept=np.arange(R), weights=np.full(R, 1.0 / R),
                iterations=0, statistic=0.0, info={"converged": True, "nu": 0.0},
            )
        nu = self.eps * spread
        w, dist, iters, converged = weiszfeld_gram(gram, self.max_iter, self.tol, nu)
        return AggregationResult(
            estimate=weighted_sum(updates, w),
            kept=np.flatnonzero(w >= 0.5 / R),
            weights=w,
            iterations=iters,
            statistic=float(dist.sum()),
            info={"converged": bool(converged), "nu": nu},
        )

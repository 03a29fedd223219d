"""Norm trimming: the robust aggregation of COMRADE's center machine, as an ordinary aggregator.

Ghosh, Maity & Mazumdar 2020, Algorithm 1 (center machine): sort the m received vectors by
l2 norm, keep the ceil((1 - beta) m) smallest (the set U_t of Appendix B) and average them,
p_hat = (1/|U_t|) sum_{i in U_t} p_i.  With beta larger than the Byzantine fraction alpha at
least one honest vector is trimmed, so every kept Byzantine vector is no longer than some
honest one (Appendix B, bound on Term 3).  beta = 0 keeps everything (the plain mean).

Registered as ``"norm-trim"``; the Newton strategies and the in-process Newton driver use it
through :func:`flwr_byzantine.newton.trimming.trim_by_norm`.
"""

from __future__ import annotations

import math

import numpy as np

from .._backend import ArrayLike, is_torch, subset_mean, to_numpy64
from .base import AggregationResult, Aggregator


def num_kept(m: int, beta: float) -> int:
    """|U_t| = ceil((1 - beta) m), at least 1 when m >= 1 (beta in [0, 1)).

    A relative tolerance of 1e-9 absorbs floating-point noise, so that e.g. beta = 0.1,
    m = 10 keeps exactly 9 and never 10.
    """
    if m < 0:
        raise ValueError("m must be >= 0")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if m == 0:
        return 0
    x = (1.0 - beta) * m
    k = math.ceil(x - 1e-9 * max(1.0, x))
    return int(min(m, max(1, k)))


class NormTrimming(Aggregator):
    """Mean of the ceil((1 - beta) R) smallest-norm rows (COMRADE, Algorithm 1).

    ``kept`` are those rows (ties in norm broken by row index); ``weights`` are
    ``1/|kept|`` on them; ``statistic`` is the largest kept norm; ``info["norms"]``
    the row norms.
    """

    name = "norm-trim"

    def __init__(self, beta: float = 0.25) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R = updates.shape[0]
        if is_torch(updates):
            norms = to_numpy64(updates.double().norm(dim=1))
        else:
            with np.errstate(over="ignore"):
                norms = np.linalg.norm(np.asarray(updates, dtype=np.float64), axis=1)
        kept = np.sort(np.argsort(norms, kind="stable")[: num_kept(R, self.beta)])
        weights = np.zeros(R)
        weights[kept] = 1.0 / kept.size
        return AggregationResult(
            estimate=subset_mean(updates, kept),
            kept=kept,
            weights=weights,
            statistic=float(norms[kept].max()),
            info={"norms": norms.tolist()},
        )

"""Norm-based trimming, the robust aggregation of COMRADE (Algorithm 1, center machine).

The center machine receives m directions p_1..p_m, sorts them by l2 norm, keeps the
ceil((1 - beta) m) smallest (the set U_t of Appendix B) and averages them:
p_hat = (1/|U_t|) sum_{i in U_t} p_i.  With beta larger than the Byzantine fraction alpha, at
least one honest direction is trimmed, so every kept Byzantine direction is no longer than
some honest one (Appendix B, bound on Term 3).  beta = 0 keeps everything (plain mean).
"""

from __future__ import annotations

import math

import numpy as np


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


def trim_by_norm(P: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the ceil((1 - beta) m) smallest-norm rows of ``P`` and their (sorted) indices.

    Parameters
    ----------
    P:
        ``(m, d)`` array, one direction per row (finite values).
    beta:
        Trimming fraction in [0, 1).

    Returns
    -------
    (p_hat, kept):
        ``p_hat`` the ``(d,)`` mean of the kept rows; ``kept`` the indices of the kept rows in
        increasing order.  Ties in norm are broken by row index (stable sort).
    """
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"P must be a 2-D (m, d) array, got shape {P.shape}")
    m = P.shape[0]
    if m == 0:
        raise ValueError("P has no rows")
    if not np.isfinite(P).all():
        raise ValueError("P contains non-finite values")
    k = num_kept(m, beta)
    with np.errstate(over="ignore", invalid="ignore"):  # hostile rows may overflow: norm inf sorts last
        norms = np.linalg.norm(P, axis=1)
        order = np.argsort(norms, kind="stable")
        kept = np.sort(order[:k])
        return P[kept].mean(axis=0), kept

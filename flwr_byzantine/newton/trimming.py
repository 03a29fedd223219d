"""Norm-based trimming, the robust aggregation of COMRADE (Algorithm 1, center machine).

The center machine receives m directions p_1..p_m, sorts them by l2 norm, keeps the
ceil((1 - beta) m) smallest (the set U_t of Appendix B) and averages them:
p_hat = (1/|U_t|) sum_{i in U_t} p_i.  With beta larger than the Byzantine fraction alpha, at
least one honest direction is trimmed, so every kept Byzantine direction is no longer than
some honest one (Appendix B, bound on Term 3).  beta = 0 keeps everything (plain mean).
"""

from __future__ import annotations

import numpy as np

from ..aggregators.normtrim import NormTrimming, num_kept

__all__ = ["num_kept", "trim_by_norm"]


def trim_by_norm(P: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the ceil((1 - beta) m) smallest-norm rows of ``P`` and their (sorted) indices.

    The registered aggregator ``"norm-trim"`` (:class:`~flwr_byzantine.aggregators.normtrim.NormTrimming`)
    on the float64 rows.

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
    if P.shape[0] == 0:
        raise ValueError("P has no rows")
    if not np.isfinite(P).all():
        raise ValueError("P contains non-finite values")
    res = NormTrimming(beta).aggregate(P)
    return np.asarray(res.estimate, dtype=np.float64), np.asarray(res.kept)

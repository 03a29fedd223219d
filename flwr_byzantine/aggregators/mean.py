"""The plain mean (FedAvg's rule with equal weights): the non-robust reference."""

from __future__ import annotations

import numpy as np

from .._backend import ArrayLike, screened_mean
from .base import AggregationResult, Aggregator


class Mean(Aggregator):
    """Unweighted mean of the R inputs; keeps everything.

    One pass over the data: NaN/Inf inputs are detected on the mean itself
    (:func:`~flwr_byzantine._backend.screened_mean`), not by a second pass.
    """

    name = "mean"
    screens_finiteness = True

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        n = updates.shape[0]
        _, estimate = screened_mean(updates)
        return AggregationResult(estimate=estimate, kept=np.arange(n), weights=np.full(n, 1.0 / n))

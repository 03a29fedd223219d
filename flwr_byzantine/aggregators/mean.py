"""The plain mean (FedAvg's rule with equal weights): the non-robust reference."""

from __future__ import annotations

import numpy as np

from .._backend import ArrayLike, mean_rows
from .base import AggregationResult, Aggregator


class Mean(Aggregator):
    """Unweighted mean of the R inputs; keeps everything."""

    name = "mean"

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        n = updates.shape[0]
        return AggregationResult(
            estimate=mean_rows(updates),
            kept=np.arange(n),
            weights=np.full(n, 1.0 / n),
        )

"""The AGR-agnostic min-max and min-sum attacks (Shejwalkar & Houmansadr, NDSS 2021, Section IV-C).

Registry presets of :class:`~.adaptive.DefenceAware` without a target aggregator: every Byzantine
worker sends ``mu + gamma * p`` (``mu`` the mean of the honest updates it knows, ``p = -std`` by
default, or ``-mu / ||mu||`` / ``-sign(mu)``) with the largest ``gamma`` for which

* **min-max** (the paper's Eq. 5): ``max_i ||g_m - g_i|| <= max_{i,j} ||g_i - g_j||``,
* **min-sum** (Eq. 6): ``sum_i ||g_m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``,

computed in closed form (:meth:`~.adaptive.DefenceAware.find_gamma`; the paper's Algorithm 1
reaches the same ``gamma`` by a halving search, capped at ``2 gamma_init``).  Played by a client,
``honest`` is its own estimates (the paper's "partial knowledge"); by the omniscient adversary,
every honest reply of the round ("full knowledge").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .adaptive import DefenceAware


@dataclass
class MinMax(DefenceAware):
    """Min-max (Shejwalkar & Houmansadr 2021, Eq. 5): :class:`~.adaptive.DefenceAware` with
    ``aggregator=None``, ``search='min-max'``, ``direction='std'`` by default."""

    name: ClassVar[str] = "min-max"
    criterion: ClassVar[str] = "min-max"

    direction: str = "std"
    search: str = "min-max"

    def __post_init__(self) -> None:
        if self.aggregator is not None or self.aggregator_params:
            raise ValueError(f"{self.name} is aggregator-agnostic: use attack 'defence-aware' to target a rule")
        if self.search != self.criterion:
            raise ValueError(f"{self.name} uses the {self.criterion} criterion, got search={self.search!r}")
        super().__post_init__()


@dataclass
class MinSum(MinMax):
    """Min-sum (Shejwalkar & Houmansadr 2021, Eq. 6): as :class:`MinMax` with ``search='min-sum'``."""

    name: ClassVar[str] = "min-sum"
    criterion: ClassVar[str] = "min-sum"

    search: str = "min-sum"


__all__ = ["MinMax", "MinSum"]

"""A persistent bias off the honest step, inside the honest spread.

Every Byzantine worker sends ``mu + c * r * e + noise``: ``mu`` the mean of the honest updates it knows,
``r`` their median distance to ``mu``, and ``e`` a unit direction that stays the same in every round and for
every colluding worker.  ``e`` is a fixed random direction made orthogonal to ``mu``, tilted by ``against``
toward ``-mu / ||mu||``.

So each Byzantine row is as far from the honest mean as a typical honest row is (``c = 1``): no norm or
distance screen tells it apart.  The four or five rows of a quarter-Byzantine round form a cluster whose
variance along ``e`` stays under a spectral filter's threshold when the honest spread is heterogeneous.
The bias lies along ``e``, not along the step, so it does not shrink the step.

This is the setting where a defence's correction along its own estimate's direction, which the bias has
tilted, shrinks the honest step instead of the bias (issue 10's trimmed component along the step;
docs/benchmarks.md, the seventeenth landing).  It is a variant of the "a little is enough" idea
(Baruch, Baruch, Goldberg 2019): small per round, but the same direction every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .._backend import ArrayLike, to_numpy64
from .base import UpdateAttack, cast_like, finite_float, from_numpy64, require_rows


@dataclass
class OrthogonalBias(UpdateAttack):
    """A persistent bias in one fixed direction off the honest mean, at the honest rows' typical distance.

    Every Byzantine worker sends ``mu + c * r * e + n_k``, where:

    * ``mu`` is the honest mean;
    * ``r = median_i ||g_i - mu||`` over the honest rows;
    * ``e`` is the unit vector along ``v_perp - against * mu / ||mu||``, with ``v_perp`` a Gaussian direction
      drawn from ``direction_seed`` (the same for every worker and round, whatever each worker's ``seed``) and
      made orthogonal to ``mu``;
    * ``n_k ~ N(0, (noise * r)^2 / d I)`` is independent per worker and round (``default_rng([seed, round])``),
      so the rows are not exact copies.

    Attributes
    ----------
    c:
        The bias's length in units of ``r`` (>= 0; ``attack-scale``).
    against:
        Weight of ``-mu / ||mu||`` in the direction (0: orthogonal to the honest step).
    noise:
        Each row's own noise, in units of ``r`` (>= 0).
    direction_seed:
        Seed of the fixed direction, shared by the colluding workers.
    """

    name: ClassVar[str] = "orthogonal"
    scale_param: ClassVar[str | None] = "c"

    c: float = 1.0
    against: float = 0.0
    noise: float = 0.05
    direction_seed: int = 12345

    def __post_init__(self) -> None:
        super().__post_init__()
        self.c = finite_float(self.c, "c", nonneg=True)
        self.against = finite_float(self.against, "against")
        self.noise = finite_float(self.noise, "noise", nonneg=True)
        if isinstance(self.direction_seed, bool) or int(self.direction_seed) != self.direction_seed \
                or self.direction_seed < 0:
            raise ValueError(f"direction_seed must be a non-negative integer, got {self.direction_seed!r}")
        self.direction_seed = int(self.direction_seed)

    def direction(self, mu: np.ndarray) -> np.ndarray:
        """The unit direction ``e`` for the honest mean ``mu`` (float64)."""
        d = mu.shape[0]
        v = np.random.default_rng(self.direction_seed).standard_normal(d)
        norm_mu = float(np.linalg.norm(mu))
        if norm_mu > 0:
            m = mu / norm_mu
            v -= (v @ m) * m
            norm_v = float(np.linalg.norm(v))
            if self.against and norm_v > 0:
                v = v / norm_v - self.against * m  # v_perp as a unit vector, tilted by ``against`` toward -m
        norm_v = float(np.linalg.norm(v))
        return v / norm_v if norm_v > 0 else v

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, "OrthogonalBias")
        H = to_numpy64(honest)
        mu = H.mean(axis=0)
        r = float(np.median(np.linalg.norm(H - mu, axis=1)))
        d = H.shape[1]
        rows = mu + self.c * r * self.direction(mu)
        noise = self.rng(round).standard_normal((num_byzantine, d)) * (self.noise * r / math.sqrt(d))
        return cast_like(from_numpy64(rows[None, :] + noise, honest), honest)


__all__ = ["OrthogonalBias"]

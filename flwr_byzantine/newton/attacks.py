"""Byzantine worker behaviours of COMRADE's experiments (Section 6 and Appendix "Additional
Experiment"), pure numpy.

* ``gaussian``: add Gaussian noise N(mu, sigma^2 I) to the update ("Gaussian attack").
* ``random-label``: learn on uniformly random labels instead of the true ones.
* ``flipped-label``: learn on flipped labels (y -> -y for logistic; y -> -y for regression).
* ``negative``: send -scale times the honest update.
* ``none``: honest.

Label attacks poison the data once (seeded per worker); update attacks act on each reply
(seeded per worker and round).  All are deterministic given their seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from .. import seeds

ATTACKS = ("none", "gaussian", "random-label", "flipped-label", "negative")
DATA_ATTACKS = ("random-label", "flipped-label")
UPDATE_ATTACKS = ("gaussian", "negative")


@dataclass(frozen=True)
class Attack:
    """One worker's attack.

    Attributes
    ----------
    name:
        One of :data:`ATTACKS`.
    scale:
        ``gaussian``: noise standard deviation sigma; ``negative``: the factor of -p.
    mean:
        ``gaussian``: noise mean mu (0 by default).
    seed:
        Seed of the attack's randomness.
    """

    name: str = "none"
    scale: float = 1.0
    mean: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; valid: {list(ATTACKS)}")
        if not (np.isfinite(self.scale) and self.scale >= 0 and np.isfinite(self.mean)):
            raise ValueError("attack scale must be finite and >= 0, mean finite")

    @property
    def honest(self) -> bool:
        """True for ``none``."""
        return self.name == "none"

    def poison_labels(self, y: np.ndarray, objective: str = "logistic") -> np.ndarray:
        """Labels the worker trains on (unchanged unless a label attack)."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if self.name == "flipped-label":
            if objective == "logistic":
                values = set(np.unique(y).tolist())
                return 1.0 - y if values <= {0.0, 1.0} and 0.0 in values else -y
            return -y
        if self.name == "random-label":
            rng = np.random.default_rng([self.seed, seeds.NEWTON_RANDOM_LABELS])
            if objective == "logistic":
                return rng.choice([-1.0, 1.0], size=y.size)
            return rng.permutation(y) if y.size else y
        return y.copy()

    def corrupt_update(self, p: np.ndarray, server_round: int = 0) -> np.ndarray:
        """The update the worker sends instead of the honest ``p``."""
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if self.name == "gaussian":
            rng = np.random.default_rng([self.seed, int(server_round), seeds.NEWTON_ATTACK_GAUSSIAN])
            return p + rng.normal(self.mean, self.scale, size=p.size)
        if self.name == "negative":
            return -self.scale * p
        return p.copy()


def byzantine_partition_ids(num_partitions: int, num_byzantine: int, seed: int) -> list[int]:
    """A seeded random set of ``num_byzantine`` partition ids (simulation convenience).

    Clients use it to decide whether they attack; the server only uses it to *report* which
    ids were malicious next to the ids it trimmed, never to filter.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    k = int(min(max(num_byzantine, 0), num_partitions))
    rng = np.random.default_rng([int(seed), seeds.NEWTON_BYZANTINE_PARTITIONS])
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))

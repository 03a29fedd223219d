"""Mobile adversary: which nodes are corrupt in each round (Data & Diggavi 2021, Sec. 2.1).

The adversary may corrupt a different set of at most ``eps * R`` workers every
round, but must fix the round's set *before* it sees that round's gradients.
:meth:`MobileAdversary.corrupt_set` is therefore a pure function of the seed,
the round number and the list of participating node ids -- never of any update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
from .. import seeds

MODES = ("random", "rotate", "static")


@dataclass
class MobileAdversary:
    """Chooses the corrupt nodes of every round, within a fixed budget.

    Give exactly one of ``num_byzantine`` (at most that many nodes per round) or
    ``fraction`` (at most ``floor(fraction * number of nodes)``); the budget is also
    capped by the number of nodes.  The chosen set always has exactly the budget's size.

    Modes:

    * ``'random'`` (default, mobile): a fresh uniformly random set every round,
      drawn from ``default_rng([seed, round, ...])``; two rounds coincide only by
      chance (probability ``1 / C(R, f)``).
    * ``'rotate'`` (mobile, deterministic coverage): a seeded permutation of the
      nodes is cut into consecutive windows of size ``f``, round ``t`` takes the
      window starting at ``t * f`` (mod ``R``); consecutive rounds always differ when
      ``0 < f < R`` and every node is corrupted equally often.
    * ``'static'``: the same seeded set in every round (for a fixed node list).

    Node ids are sorted before drawing, so the result depends on the *set* of ids,
    not on their order.  Deterministic in ``(seed, round, node ids)``.

    Attributes
    ----------
    num_byzantine:
        Per-round budget as a count.
    fraction:
        Per-round budget as a fraction of the nodes, in ``[0, 1]``.
    seed:
        Seed of the choices.
    mode:
        ``'random'``, ``'rotate'`` or ``'static'``.
    """

    num_byzantine: int | None = None
    fraction: float | None = None
    seed: int = 0
    mode: str = "random"

    def __post_init__(self) -> None:
        if (self.num_byzantine is None) == (self.fraction is None):
            raise ValueError("give exactly one of num_byzantine and fraction")
        if self.num_byzantine is not None:
            k = self.num_byzantine
            if isinstance(k, bool) or int(k) != k or k < 0:
                raise ValueError(f"num_byzantine must be a non-negative integer, got {k!r}")
            self.num_byzantine = int(k)
        else:
            fr = float(self.fraction)
            if not (math.isfinite(fr) and 0.0 <= fr <= 1.0):
                raise ValueError(f"fraction must be in [0, 1], got {self.fraction!r}")
            self.fraction = fr
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.seed = int(self.seed)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")

    @property
    def static(self) -> bool:
        """True in ``'static'`` mode (the same set every round)."""
        return self.mode == "static"

    def budget(self, num_nodes: int) -> int:
        """Number of corrupt nodes among ``num_nodes``."""
        if self.num_byzantine is not None:
            return min(self.num_byzantine, num_nodes)
        return min(int(math.floor(self.fraction * num_nodes + 1e-9)), num_nodes)

    def corrupt_set(self, round: int, node_ids: Sequence[Hashable]) -> list[Any]:  # noqa: A002
        """Sorted list of the corrupt node ids in ``round`` (a non-negative integer)."""
        if isinstance(round, bool) or int(round) != round or round < 0:
            raise ValueError(f"round must be a non-negative integer, got {round!r}")
        ids = sorted(node_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("node_ids contains duplicates")
        n = len(ids)
        k = self.budget(n)
        if k == 0:
            return []
        if self.mode == "static":
            pick = np.random.default_rng([self.seed, seeds.MOBILE_STATIC]).choice(n, size=k, replace=False)
        elif self.mode == "random":
            pick = np.random.default_rng([self.seed, int(round), seeds.MOBILE_RANDOM]).choice(n, size=k, replace=False)
        else:
            perm = np.random.default_rng([self.seed, seeds.MOBILE_ROTATE]).permutation(n)
            start = (int(round) * k) % n
            pick = perm[(start + np.arange(k)) % n]
        return sorted(ids[int(i)] for i in pick)


__all__ = ["MODES", "MobileAdversary"]

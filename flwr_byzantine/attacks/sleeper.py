"""Sleeper attack: honest for the first rounds, then an attack (tests memory across rounds).

A defence that accumulates evidence per node (the default defence's monotonicity
evidence, reputation schemes) must not be fooled by a long honest history: the
sleeper behaves exactly like an honest client (it sends the mean of the honest
vectors it knows) until ``wake_round``, then plays ``inner`` every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._backend import ArrayLike
from .base import UpdateAttack, mean64, repeat_rows


@dataclass
class Sleeper(UpdateAttack):
    """Honest (the mean of ``honest``) before round ``wake_round``, the attack ``inner`` from then on.

    Attributes
    ----------
    inner:
        Registry name of the attack played once awake (default ``"sign-flip"``).
    wake_round:
        First attacking round (>= 1).
    inner_params:
        Keyword arguments of the inner attack.
    """

    name: ClassVar[str] = "sleeper"
    scale_param: ClassVar[str | None] = "wake_round"

    inner: str = "sign-flip"
    wake_round: int = 30
    inner_params: dict[str, Any] | None = None
    _inner: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.wake_round, bool) or int(self.wake_round) != self.wake_round or self.wake_round < 1:
            raise ValueError(f"wake_round must be a positive integer, got {self.wake_round!r}")
        self.wake_round = int(self.wake_round)
        if self.inner in ("sleeper", "memory-aware"):
            raise ValueError(f"inner must be a plain attack, got {self.inner!r}")
        from . import make_attack  # the registry (lazy: this module is part of it)

        self._inner = make_attack(self.inner, seed=self.seed, **(self.inner_params or {}))

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike | None:  # noqa: A002
        if round < self.wake_round:
            return repeat_rows(mean64(honest), num_byzantine, honest)
        return self._inner.craft(honest, num_byzantine, round)

"""A rule's private random generator, made on first use (issue 12: the small decode's construction).

``numpy.random.default_rng(None)`` reads the OS's entropy and hashes it into a ``SeedSequence``: about 35 us a
generator on the 2-core development machine, and the default defence holds five (its gross screen's and
duplicates' passes, and three filters' sketches). A stateless small decode builds the rule, uses none of them
(no sketch at R = 20, d = 650) and drops it: 0.17 ms of a 5 ms budget.  :class:`PrivateGenerator` keeps the seed
and makes the generator on the attribute's first read: the same stream under a seed as one made at construction,
fresh OS entropy without one.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PrivateGenerator:
    """Data descriptor: a :class:`numpy.random.Generator` attribute made by ``np.random.default_rng(seed)`` on its
    first read.

    Assigning a ``Generator`` sets it as it is; assigning anything else sets the *seed* (``None``, an int or a
    sequence of ints, as ``default_rng`` takes) and drops the generator made from an earlier seed.  Both live in the
    instance's ``__dict__``, so copies and pickles carry the seed, or the generator once it has been read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._generator = f"{name}__generator"
        self._seed = f"{name}__seed"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        state = obj.__dict__
        gen = state.get(self._generator)
        if gen is None:
            gen = state[self._generator] = np.random.default_rng(state.get(self._seed))
        return gen

    def __set__(self, obj: Any, value: Any) -> None:
        if isinstance(value, np.random.Generator):
            obj.__dict__[self._generator] = value
        else:
            obj.__dict__[self._seed] = value
            obj.__dict__.pop(self._generator, None)

"""Common interface of the robust aggregators (pure numpy/torch, no Flower).

An aggregator receives the R vectors sent by the clients in one round, stacked
as an ``(R, d)`` array (``numpy.ndarray`` or ``torch.Tensor``), and returns an
:class:`AggregationResult`: the estimate (same framework, dtype and device as
the input) plus diagnostics saying which inputs were kept and with what weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._backend import ArrayLike, check_matrix, restore_dtype


@dataclass
class AggregationResult:
    """Output of :meth:`Aggregator.aggregate`.

    Attributes
    ----------
    estimate:
        The aggregated vector, shape ``(d,)``, same framework/dtype/device as the input.
    kept:
        Sorted indices (rows of the input) that the rule kept / trusted.
    weights:
        Final weight of every input row, shape ``(R,)`` (0 for dropped rows).  For
        rules that are not a weighted mean (e.g. the coordinate-wise median) this
        is the rule's natural notion of trust, documented by the rule.
    iterations:
        Number of iterations of the rule's main loop (1 for one-shot rules).
    statistic:
        The rule's stopping / decision statistic (e.g. RGE's ``sum_i c_i tau_i``
        at termination); ``nan`` when the rule has none.
    info:
        Rule-specific extra diagnostics (JSON-serialisable values).
    """

    estimate: ArrayLike
    kept: np.ndarray
    weights: np.ndarray
    iterations: int = 1
    statistic: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped(self) -> np.ndarray:
        """Indices of the input rows that were not kept."""
        mask = np.ones(self.weights.shape[0], dtype=bool)
        mask[self.kept] = False
        return np.flatnonzero(mask)


class Aggregator(ABC):
    """Base class of all aggregation rules.

    Subclasses implement :meth:`_aggregate` on an already validated ``(R, d)``
    floating array; :meth:`aggregate` does the validation (2-D, floating, finite).
    """

    #: Short registry name (``"rge"``, ``"mean"``, ...).
    name: str = "base"
    #: True for rules whose :meth:`_aggregate` starts with the row mean anyway and screens the
    #: input on it (:func:`~flwr_byzantine._backend.screened_mean`): one pass over the data fewer.
    screens_finiteness: bool = False

    def aggregate(self, updates: ArrayLike, client_ids: Sequence[int] | None = None) -> AggregationResult:
        """Aggregate the rows of ``updates`` (shape ``(R, d)``).

        ``client_ids[i]`` is the (server-authenticated) node id that sent row ``i``.
        Stateless rules ignore it; rules with memory across rounds key their state by it.
        Finite inputs too large for the input dtype's arithmetic (float32 entries near
        3e38, whose sums and squares overflow) are aggregated in float64 and the
        estimate is cast back to the input dtype (:func:`check_matrix` ``widen_large``).
        """
        checked = check_matrix(updates, widen_large=True, screen=not self.screens_finiteness)
        result = self._aggregate(checked)
        if checked is not updates or self.screens_finiteness:
            result.estimate = restore_dtype(result.estimate, updates)
        return result

    __call__ = aggregate

    @abstractmethod
    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        """Rule-specific aggregation of a validated ``(R, d)`` array."""

    # ------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The rule's mutable state as ``(JSON-serialisable part, arrays by name)``.

        The names are part of the checkpoint format, chosen explicitly by each stateful
        rule (never derived from attribute names).  Stateless rules (the default) return
        two empty dicts.
        """
        return {}, {}

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        *, dim: int | None = None) -> None:
        """Restore :meth:`state_dict`'s output; ``dim`` is the input dimension d the state must fit.

        Raises ``ValueError`` on state that does not belong to this rule or does not fit.
        """
        if state or arrays:
            raise ValueError(f"{type(self).__name__} is stateless, but the checkpoint holds state "
                             f"{sorted(state)} / arrays {sorted(arrays)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

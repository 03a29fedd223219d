"""``Giant``: GIANT (Wang et al., NeurIPS 2018), the two-round distributed Newton baseline of
COMRADE (Ghosh, Maity & Mazumdar 2020, Appendix A), as a Flower Message-API strategy.

Per Newton iteration t GIANT needs **two communication rounds**:

* round A (``newton-phase = "gradient"``): clients reply with their local gradients g_i; the
  server averages them into the exact global gradient g_t;
* round B (``newton-phase = "direction"``): the server broadcasts w_t and g_t; clients reply
  with Q(H_i^{-1} g_t); the server averages them (norm-trimmed if ``beta > 0``; GIANT proper
  is ``beta = 0``) and steps w_{t+1} = w_t - step * p_hat.

Design choice: the project's shared loop (:class:`~flwr_byzantine.strategies.loop.RoundLoop`)
calls :meth:`Giant.train_round` once per *iteration*, which runs both rounds: ``num_rounds``
counts Newton iterations, ``Result`` is indexed by iteration, and every iteration's train
metrics report ``communication-rounds`` (the running total, 2 per completed iteration) and
the bytes of both rounds.  The message-level server round numbers are 2t - 1 (round A) and
2t (round B), so a reply can never be replayed into the other phase.  ``configure_train`` /
``aggregate_train`` keep working on their own too: they alternate the two phases.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from ..newton.server import average_gradients
from ..newton.trimming import num_kept
from ..newton.worker import PHASE_DIRECTION, PHASE_GRADIENT
from .comrade import NewtonRoundReport, NewtonStrategyBase


class Giant(NewtonStrategyBase):
    """GIANT: exact gradient (round A), then averaged H_i^{-1} g_t (round B), per iteration.

    Parameters are those of :class:`~flwr_byzantine.strategies.comrade.NewtonStrategyBase`
    (``beta`` defaults to 0: GIANT is not Byzantine-robust) plus

    gradient_beta:
        Norm-trimming fraction of round A's gradient average (default: ``beta``).
    """

    def __init__(self, beta: float = 0.0, *, gradient_beta: float | None = None, **kwargs: Any) -> None:
        super().__init__(beta, **kwargs)
        gb = self.beta if gradient_beta is None else float(gradient_beta)
        if not 0.0 <= gb < 1.0:
            raise ValueError("gradient_beta must be in [0, 1)")
        self.gradient_beta = gb

    @property
    def phase(self) -> str:
        """The phase the next ``configure_train`` will run (``"gradient"`` or ``"direction"``)."""
        return self._phase if self._gradient is not None else PHASE_GRADIENT

    def _iteration(self, server_round: int) -> int:
        return (server_round + 1) // 2

    # ------------------------------------------------------------------ one phase
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Round A (no g_t yet): ask for gradients; round B: send w_t and g_t, ask for directions."""
        phase = self.phase
        if phase == PHASE_GRADIENT:
            self._gradient = None
        msgs = self._train_messages(server_round, arrays, config, grid, phase)
        self._phase = phase
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Round A: average the gradients into g_t (no model change); round B: step."""
        if self._layout is None or self._w is None:
            log(WARNING, "aggregate_train called before configure_train; skipping round %d", server_round)
            return None, None
        if self._phase == PHASE_GRADIENT:
            report = self._gradient_round(server_round, replies)
            self.history.append(report)
            return None, report.metric_record({"communication-rounds": self.communication_rounds})
        arrays, report = self._direction_round(server_round, replies)
        self._gradient = None
        self._phase = PHASE_GRADIENT
        self.history.append(report)
        return arrays, report.metric_record({"communication-rounds": self.communication_rounds})

    def _gradient_round(self, server_round: int, replies: Iterable[Message]) -> NewtonRoundReport:
        assert self._layout is not None
        screened = self._screen(replies, server_round, PHASE_GRADIENT)
        nodes, vecs, mets = screened.node_ids, screened.vectors, screened.metrics
        rejected, bytes_up = dict(screened.rejected), screened.bytes_up
        report = NewtonRoundReport(
            server_round=server_round, iteration=self._iteration(server_round), phase=PHASE_GRADIENT,
            sampled=list(self._sampled), valid=list(nodes), kept=[], trimmed=[], rejected=rejected,
            bytes_up=bytes_up, bytes_down=self._bytes_down, rho=1.0, rho_empirical_min=float("nan"),
            step=0.0, applied=False, num_kept_expected=num_kept(len(nodes), self.gradient_beta) if nodes else 0,
            partition_ids={n: int(m["partition-id"]) for n, m in zip(nodes, mets)
                           if isinstance(m.get("partition-id"), int)},
        )
        if len(vecs) < self.min_valid_replies:
            report.reason = f"only {len(vecs)} valid gradients (< min_valid={self.min_valid_replies})"
            log(WARNING, "round %d: %s; no direction round this iteration, model left unchanged",
                server_round, report.reason)
            self._gradient = None
            return report
        g, kept, trimmed = self._average(np.stack(vecs))
        report.kept = [int(nodes[i]) for i in kept]  # node ids may exceed int64: no numpy here
        report.trimmed = [int(nodes[i]) for i in trimmed]
        report.direction_norm = float(np.linalg.norm(g))
        if not np.isfinite(g).all():
            report.reason = "non-finite gradient average"
            self._gradient = None
            return report
        self._gradient = g
        self._phase = PHASE_DIRECTION
        report.applied = True
        return report

    def _average(self, G: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return average_gradients(G, self.gradient_beta)

    # ------------------------------------------------------------------ one iteration
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Newton iteration ``server_round``: communication rounds 2t - 1 (gradients) and 2t (directions).

        The shared loop (:class:`~flwr_byzantine.strategies.loop.RoundLoop`) calls this once per
        iteration, so ``num_rounds`` counts iterations and ``Result`` is indexed by iteration.  The
        metrics merge both rounds (gradient round's keys prefixed ``gradient-``; ``bytes-up`` /
        ``bytes-down`` summed; ``communication-rounds`` the running total).  Round B is skipped
        (and the model kept) when round A yields fewer than ``min_valid_replies`` valid gradients.
        """
        it = server_round
        self._gradient = None
        merged: dict[str, Any] = {}
        new_model: ArrayRecord | None = None
        for message_round in (2 * it - 1, 2 * it):
            if message_round == 2 * it and self._gradient is None:
                break  # round A failed: no direction round
            replies = grid.send_and_receive(
                messages=self.configure_train(message_round, arrays, config, grid), timeout=timeout)
            new_arrays, metrics = self.aggregate_train(message_round, replies)
            if new_arrays is not None:
                new_model = new_arrays
            if metrics is not None:
                prefix = "gradient-" if message_round % 2 == 1 else ""
                merged.update({f"{prefix}{k}": v for k, v in metrics.items()})
        if not merged:
            return new_model, None
        merged["bytes-up"] = int(merged.get("bytes-up", 0)) + int(merged.get("gradient-bytes-up", 0))
        merged["bytes-down"] = int(merged.get("bytes-down", 0)) + int(merged.get("gradient-bytes-down", 0))
        merged["communication-rounds"] = self.communication_rounds
        merged["iteration"] = it
        merged.setdefault("applied", 0)
        for key in ("gradient-communication-rounds", "gradient-iteration"):
            merged.pop(key, None)
        return new_model, MetricRecord(merged)

"""The one strategy loop of the project (instead of copies of Flower's ``Strategy.start``).

:class:`RoundLoop` is a mixin for Flower Message-API strategies.  Its :meth:`~RoundLoop.start`
has the signature and the steps of :meth:`flwr.serverapp.strategy.Strategy.start` (central
evaluation of the initial model, then per round: train, federated evaluation, central
evaluation) plus, for strategies that support it, a checkpoint after every round and
resumption from one.  What differs is the console: **one line per round** (the strategy's
:meth:`~RoundLoop.round_summary` plus the central metrics) and a short final summary, instead
of Flower's "Aggregated MetricRecord" lines and its final dump of every per-round metric; the
per-round detail lives in ``Result`` and the strategy's history (the ServerApps write both to
the results JSON).  Warnings (rejected replies, skipped rounds) are logged as they happen.

A strategy whose round needs more than one send/receive (GIANT: gradient round, then direction
round) overrides :meth:`~RoundLoop.train_round`; everything else is shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from ..checkpoint import Checkpointer, TrainingState
from .validation import one_line


def format_metrics(metrics: Mapping[str, Any] | None, keys: tuple[str, ...] | None = None) -> str:
    """``"accuracy 0.912, loss 0.301"``: scalar metrics with 3 significant digits (lists left out)."""
    if not metrics:
        return ""
    items = [(k, v) for k, v in metrics.items() if keys is None or k in keys]
    return ", ".join(f"{one_line(k, 64)} {v:.3g}" if isinstance(v, float) else f"{one_line(k, 64)} {v}"
                     for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool))


class RoundLoop:
    """Mixin: Flower's strategy loop with one console line per round and optional checkpoints."""

    #: Round the last :meth:`start` resumed from (None: started fresh).
    resumed_from: int | None = None
    #: Central metrics of :meth:`undefended_arrays` per round (filled by :meth:`start`).
    undefended_metrics: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ hooks
    def round_summary(self, server_round: int) -> str:
        """One-line description of ``server_round`` (valid replies, who was filtered, ...)."""
        return ""

    def final_summary(self) -> str:
        """One-line description of the whole run (logged after the last round)."""
        return ""

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training round: configure, send and receive, aggregate (Flower's steps)."""
        replies = grid.send_and_receive(messages=self.configure_train(server_round, arrays, config, grid),
                                        timeout=timeout)
        return self.aggregate_train(server_round, replies)

    def undefended_arrays(self, server_round: int) -> ArrayRecord | None:
        """The model this round's step would have produced with the plain mean (None: not tracked)."""
        return None

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(JSON part, arrays)`` of the strategy for a checkpoint (strategies that support resuming)."""
        raise NotImplementedError(f"{type(self).__name__} does not support checkpoints")

    def restore(self, state: TrainingState, initial_arrays: ArrayRecord, num_rounds: int) -> None:
        """Load a checkpoint's strategy state (raises ``CheckpointMismatch`` / ``CheckpointError``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support checkpoints")

    # ------------------------------------------------------------------ the loop
    # pylint: disable=too-many-arguments, too-many-locals
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        checkpoint: Checkpointer | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds (same signature and ``Result`` as Flower's ``Strategy.start``).

        With ``checkpoint`` the full state (model, completed round, strategy state,
        all metrics so far) is written atomically after every completed round; if the
        checkpoint already holds a state (same configuration, checked by the
        :class:`Checkpointer`), the loop continues after its last completed round.
        ``result.arrays`` is the final global model (the initial one if no round was applied).
        """
        name = type(self).__name__
        log(INFO, "%s: %d rounds", name, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        arrays = initial_arrays
        first_round = 1
        self.resumed_from = None
        self.undefended_metrics = {}

        state = checkpoint.load() if checkpoint is not None else None
        if state is not None:
            self.restore(state, initial_arrays, num_rounds)
            result, arrays = state.result, state.arrays
            first_round = state.server_round + 1
            self.resumed_from = state.server_round
            log(INFO, "Resuming from checkpoint %s: %d of %d rounds already completed",
                checkpoint.json_path, state.server_round, num_rounds)
        elif evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
                log(INFO, "[0/%d] initial model: %s", num_rounds, format_metrics(res))

        for current_round in range(first_round, num_rounds + 1):
            new_arrays, train_metrics = self.train_round(grid, current_round, arrays, train_config, timeout)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[current_round] = train_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout)
            federated = self.aggregate_evaluate(current_round, evaluate_replies)
            if federated is not None:
                result.evaluate_metrics_clientapp[current_round] = federated
            central = evaluate_fn(current_round, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[current_round] = central
                counterfactual = self.undefended_arrays(current_round)
                undefended = evaluate_fn(current_round, counterfactual) if counterfactual is not None else None
                if undefended is not None:
                    self.undefended_metrics[current_round] = dict(undefended)
            parts = [self.round_summary(current_round)]
            if central is not None:
                parts.append(f"central: {format_metrics(central)}")
            if federated is not None:
                parts.append(f"federated: {format_metrics(federated)}")
            log(INFO, "[%d/%d] %s", current_round, num_rounds, "; ".join(p for p in parts if p))
            if checkpoint is not None:
                strategy_state, strategy_arrays = self.checkpoint_state()
                checkpoint.save(TrainingState(server_round=current_round, arrays=arrays, strategy=strategy_state,
                                              strategy_arrays=strategy_arrays, result=result))

        result.arrays = arrays
        last = result.evaluate_metrics_serverapp.get(num_rounds)
        log(INFO, "%s finished %d rounds in %.1f s%s%s%s", name, num_rounds - first_round + 1, time.time() - t_start,
            f"; final central {format_metrics(last)}" if last else "",
            f"; {self.final_summary()}" if self.final_summary() else "",
            f"; checkpoint {checkpoint.json_path}" if checkpoint is not None else "")
        return result

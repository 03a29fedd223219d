"""``RobustFedAvg``: FedAvg's protocol (clients train locally, reply with weights) with a robust decoder.

A drop-in for :class:`flwr.serverapp.strategy.FedAvg`: same constructor keywords,
same messages (``"arrays"`` + ``"config"`` with ``server-round`` out; ``"arrays"``
+ a ``MetricRecord`` back), so an unmodified FedAvg / quickstart ClientApp works.
Per round, with x_t the global model and w_i client i's locally trained weights:

1. the model update u_i = x_t - w_i of every valid reply is formed (screened
   like any reply, :mod:`~flwr_byzantine.strategies.validation`; the magnitude
   checks apply to u_i);
2. the R updates are decoded robustly, ``u_hat = aggregator(u_1, ..., u_R)``
   (Data & Diggavi's RGE, Algorithm 3, by default: the pseudo-gradients of local
   training are just other vectors for the decoder);
3. ``m_{t+1} = beta m_t + u_hat`` and ``x_{t+1} = x_t - eta_s m_{t+1}`` (server
   learning rate eta_s, server momentum beta as in FedAvgM, Hsu et al. 2019).
   With eta_s = 1, beta = 0 and the plain mean this is FedAvg with equal weights.

Why ``num-examples`` is never a weight: FedAvg's weighted mean gives a client
influence in proportion to the count it reports itself.  A Byzantine client
reports 10^9 and owns the average; a robust rule that accepted such weights
would hand back exactly what it removes (the outlier's influence).  So every
valid reply counts once, and client metrics (train and evaluate) are combined
by their median.  ``weighted_by_key`` is still accepted (and passed to your own
``*_metrics_aggr_fn``) so FedAvg code constructs unchanged.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Mapping

import numpy as np
from flwr.supercore import log

from ..aggregators.base import Aggregator
from ..checkpoint import CheckpointMismatch
from .robust_base import MetricsAggrFn, RobustStrategy, default_aggregator
from .validation import ReplyPolicy

__all__ = ["RobustFedAvg"]


class RobustFedAvg(RobustStrategy):
    """FedAvg with a Byzantine-robust decoder of the clients' model updates.

    Drop-in for ``FedAvg`` in a ServerApp (the ClientApp stays as it is)::

        strategy = RobustFedAvg(fraction_train=1.0, fraction_evaluate=1.0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=10, evaluate_fn=central_eval)

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes:
        Node sampling, exactly as in FedAvg (defaults 1.0, 1.0, 2, 2, 2); the
        sample is drawn from the strategy's own seeded RNG.
    weighted_by_key:
        Accepted for FedAvg compatibility and passed to your metric functions;
        never used to weight the model (see the module docstring).
    arrayrecord_key, configrecord_key:
        Record names of the model (sent, and expected back) and of the config.
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn:
        FedAvg's hooks ``fn(list[RecordDict], weighted_by_key) -> MetricRecord``,
        called with the valid replies' screened metrics; default: the median of
        each metric (a metric is reported if at least half the replies carry it).
    aggregator:
        Robust rule decoding the updates (default: the project's default defence,
        :func:`~flwr_byzantine.strategies.robust_base.default_aggregator` for model updates: the
        default defence without its monotonicity evidence, which assumes replies are gradients).
    server_learning_rate:
        eta_s > 0 (default 1.0: the decoded update is applied as it is).
    server_momentum:
        beta in [0, 1) (default 0.0: no momentum).
    min_valid_replies, max_invalid_rounds, max_update_norm, max_norm_ratio, seed:
        As in :class:`~flwr_byzantine.strategies.RobustSGD` (``max_update_norm``
        bounds the norm of a model update).  Replies that carry a ``"gradient"``
        record instead of the model are rejected with "replies carry 'gradient':
        use RobustSGD"; ``max_invalid_rounds`` such rounds in a row fail the run.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        *,
        aggregator: Aggregator | None = None,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        min_valid_replies: int = 2,
        max_invalid_rounds: int = 3,
        max_update_norm: float | None = None,
        max_norm_ratio: float | None = 1e6,
        seed: int = 0,
    ) -> None:
        if not server_learning_rate > 0 or not np.isfinite(server_learning_rate):
            raise ValueError("server_learning_rate must be a positive finite number")
        if not 0 <= server_momentum < 1:
            raise ValueError("server_momentum must be in [0, 1)")
        if fraction_evaluate == 0.0:
            min_evaluate_nodes = 0
            log(WARNING, "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        if fraction_train == 0.0:
            min_train_nodes = 0
            log(WARNING, "fraction_train is set to 0.0. Federated training will be skipped.")
        if aggregator is None:
            aggregator = default_aggregator(replies_are_gradients=False)
        super().__init__(
            aggregator, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, min_valid_replies=min_valid_replies,
            max_invalid_rounds=max_invalid_rounds, max_update_norm=max_update_norm, max_norm_ratio=max_norm_ratio,
            arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key, reply_key=arrayrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            weighted_by_key=weighted_by_key, seed=seed,
        )
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        self._velocity: np.ndarray | None = None
        self._pending_velocity: np.ndarray | None = None

    # ------------------------------------------------------------------ info
    def summary(self) -> None:
        """Log the strategy's configuration (FedAvg's sampling/keys block plus the robust decoder)."""
        log(INFO, "\t├──> Aggregator: %r (decodes the model updates x_t - w_i)", self.aggregator)
        log(INFO, "\t├──> Server step: lr=%s, momentum=%s", self.server_learning_rate, self.server_momentum)
        log(INFO, "\t├──> Sampling:")
        log(INFO, "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)", self.fraction_train, self.fraction_evaluate)
        log(INFO, "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)", self.min_train_nodes, self.min_evaluate_nodes)
        log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)
        log(INFO, "\t└──> Keys in records:")
        log(INFO, "\t\t├── Weighted by: '%s' (metric functions only; never weights the model)", self.weighted_by_key)
        log(INFO, "\t\t├── ArrayRecord key: '%s'", self.arrayrecord_key)
        log(INFO, "\t\t└── ConfigRecord key: '%s'", self.configrecord_key)

    # -------------------------------------------------------------- protocol
    def _format_hints(self) -> dict[str, str]:
        return {"gradient": "replies carry 'gradient': use RobustSGD (RobustFedAvg needs the locally "
                            f"trained model under '{self.arrayrecord_key}')"}

    def _reply_policy(self) -> ReplyPolicy:
        """Replies carry the model w_i; the screened vector is the update x_t - w_i."""
        policy = super()._reply_policy()
        policy.origin = self._x
        return policy

    def _learning_rate(self, server_round: int) -> float:
        return self.server_learning_rate

    def _step(self, x: np.ndarray, g_hat: np.ndarray, lr: float) -> np.ndarray:
        """``m_{t+1} = beta m_t + u_hat``, ``x_{t+1} = x_t - eta_s m_{t+1}`` (momentum kept by :meth:`_commit`)."""
        velocity = g_hat if self._velocity is None or self.server_momentum == 0.0 else \
            self.server_momentum * self._velocity + g_hat
        self._pending_velocity = velocity
        return x - lr * velocity

    def _commit(self) -> None:
        if self.server_momentum > 0.0:
            self._velocity = self._pending_velocity

    # ------------------------------------------------------------ state
    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Server step settings and the momentum buffer m_t."""
        arrays = {} if self._velocity is None else {"velocity": self._velocity}
        return {"server_step": [self.server_learning_rate, self.server_momentum]}, arrays

    def _load_extra_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        step = [self.server_learning_rate, self.server_momentum]
        if list(state.get("server_step", step)) != step:
            raise CheckpointMismatch(f"checkpoint server step {state.get('server_step')} != {step}")
        self._velocity = np.array(arrays["velocity"], dtype=np.float64) if "velocity" in arrays else None

"""``RobustSGD``: Byzantine-resilient mini-batch SGD as a Flower Message-API strategy.

Data & Diggavi, Algorithm 1 (and Algorithm 2 with ``compression=RandK(...)``):
the server keeps ``x_t``; every round it broadcasts ``x_t`` (and ``K_t``), each
client replies with one mini-batch gradient of its own data, the server decodes
the R replies with a robust aggregator (the project's default defence unless
given) and takes ``x_{t+1} = Proj_C(x_t - eta * g_hat)``.  Client-reported
``num-examples`` is never used as a weight: a Byzantine client could inflate it.
Clients that train locally and reply with their weights need
:class:`~flwr_byzantine.strategies.RobustFedAvg` instead.  The round machinery
(screening, decode, metrics, checkpointed loop) is shared:
:mod:`~flwr_byzantine.strategies.robust_base`.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore import log

from ..aggregators.base import Aggregator
from ..checkpoint import CheckpointMismatch
from ..compression.randk import RANDK_PROCEDURE, RandK, coordinate_digest
from ..optim import project_l2_ball
from ..protocol import GRADIENT_PROTOCOL
from .records import ArrayLayout
from .robust_base import RobustStrategy, RoundReport, RunFailed
from .validation import ScreenedReplies

#: Protocol tag sent in every train config; clients check it.
PROTOCOL = GRADIENT_PROTOCOL

__all__ = ["PROTOCOL", "RobustSGD", "RoundReport", "RunFailed"]


class RobustSGD(RobustStrategy):
    """Byzantine-resilient SGD (Data & Diggavi, Algorithm 1 / Algorithm 2) on Flower's Message API.

    In place of :class:`flwr.serverapp.strategy.FedAvg` in a ServerApp whose clients send gradients::

        strategy = RobustSGD(learning_rate=0.1)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                                num_rounds=50, evaluate_fn=central_eval)

    Clients receive ``"arrays"`` (the model x_t) and ``"config"`` (``server-round``,
    ``batch-size``, ``full-batch``, ``protocol``; with compression the randk fields)
    and reply with an ``ArrayRecord`` under ``reply_key`` holding the gradient
    (same keys and shapes as the model; with compression one array ``"values"``
    of length k) and a ``MetricRecord`` echoing ``server-round``.

    Parameters
    ----------
    aggregator:
        Robust aggregation rule (default: the project's default defence,
        :func:`~flwr_byzantine.strategies.robust_base.default_aggregator`).
    learning_rate:
        Step size eta; ``lr_schedule(server_round) -> eta`` overrides it if given.
    batch_size, full_batch:
        Mini-batch size b sent to clients; ``full_batch=True`` asks for b = n_r
        (full-batch gradient descent, Theorem 2).
    projection_radius:
        Radius of the l2 ball C of ``Proj_C`` (0: C = R^d).
    compression:
        ``RandK(...)`` for Algorithm 2, or ``None``.
    fraction_train, min_train_nodes, min_available_nodes:
        Node sampling, as in FedAvg.
    min_valid_replies:
        Fewer valid replies than this: the model is left unchanged for the round.
    max_invalid_rounds:
        That many consecutive rounds without ``min_valid_replies`` valid replies
        raise :class:`~flwr_byzantine.strategies.robust_base.RunFailed` (the run
        fails with the most common rejection reason; 0: never).  Replies that
        carry the model (``"arrays"``, i.e. clients that train locally) are
        rejected with "replies carry 'arrays': use RobustFedAvg".
    max_update_norm:
        Replies whose vector norm exceeds this are rejected (0/None: no limit).
    max_norm_ratio:
        Replies whose norm exceeds this multiple of the round's median reply norm
        are rejected as absurd (0/None: off; see :class:`ReplyPolicy`).
    fraction_evaluate, min_evaluate_nodes:
        Federated evaluation (off by default; client metrics are combined by the
        median, never weighted by client-reported counts).
    seed:
        Seed of the node sampler (deterministic runs).

    Every reply is screened (:mod:`~flwr_byzantine.strategies.validation`): bad
    replies are erasures, logged with their reason and counted per kind in the
    round's metrics (``rejected-<kind>``).  :meth:`start` is Flower's loop plus
    optional checkpoint/resume (``checkpoint=Checkpointer(...)``).
    """

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        learning_rate: float = 0.1,
        *,
        batch_size: int = 32,
        full_batch: bool = False,
        projection_radius: float = 0.0,
        compression: RandK | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int = 2,
        max_invalid_rounds: int = 3,
        max_update_norm: float | None = None,
        max_norm_ratio: float | None = 1e6,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        lr_schedule: Callable[[int], float] | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        reply_key: str = "gradient",
        seed: int = 0,
    ) -> None:
        if learning_rate <= 0 or not np.isfinite(learning_rate):
            raise ValueError("learning_rate must be a positive finite number")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if reply_key == arrayrecord_key:
            raise ValueError(f"reply_key={reply_key!r} is the model's record: replies under it are model weights, "
                             "not gradients; for clients that train locally use RobustFedAvg")
        super().__init__(
            aggregator, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, min_valid_replies=min_valid_replies,
            max_invalid_rounds=max_invalid_rounds, max_update_norm=max_update_norm, max_norm_ratio=max_norm_ratio,
            arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key, reply_key=reply_key, seed=seed,
        )
        self.learning_rate = float(learning_rate)
        self.batch_size = int(batch_size)
        self.full_batch = bool(full_batch)
        self.projection_radius = float(projection_radius)
        self.compression = compression
        self.lr_schedule = lr_schedule
        self._coords: np.ndarray | None = None

    # ------------------------------------------------------------------ info
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> Aggregator: %r", self.aggregator)
        log(INFO, "\t├──> Step: lr=%s, batch-size=%s, full-batch=%s, projection-radius=%s",
            self.learning_rate, self.batch_size, self.full_batch, self.projection_radius)
        log(INFO, "\t├──> Compression: %s", self.compression or "none")
        log(INFO, "\t└──> Sampling: fraction-train=%.2f, min-valid-replies=%d",
            self.fraction_train, self.min_valid_replies)

    # -------------------------------------------------------------- protocol
    def _format_hints(self) -> dict[str, str]:
        return {self.arrayrecord_key: f"replies carry '{self.arrayrecord_key}': use RobustFedAvg (clients that "
                                      "train locally reply with model weights, RobustSGD needs gradients)"}

    def _round_config(self, cfg: ConfigRecord, server_round: int) -> None:
        cfg["batch-size"] = self.batch_size
        cfg["full-batch"] = self.full_batch
        cfg["protocol"] = PROTOCOL

    def _round_records(self, server_round: int, layout: ArrayLayout, cfg: ConfigRecord) -> dict[str, ArrayRecord]:
        """K_t for Algorithm 2: config fields (seed form) or an ``"coordinates"`` record (index form)."""
        self._coords = None
        if self.compression is None:
            return {}
        d = layout.size
        self._coords = self.compression.coordinates(d, server_round)
        cfg["randk-procedure"] = RANDK_PROCEDURE
        cfg["randk-d"] = d
        cfg["randk-k"] = int(self._coords.size)
        cfg["randk-digest"] = coordinate_digest(self._coords)
        if self.compression.form == "seed":
            cfg["randk-seed"] = self.compression.seed
            return {}
        return {"coordinates": ArrayRecord({"indices": Array(self._coords)})}

    def _expected_layout(self) -> ArrayLayout:
        assert self._layout is not None
        if self._coords is None:
            return self._layout
        return ArrayLayout(("values",), ((int(self._coords.size),),), ("float32",))

    def _screen_more(self, screened: ScreenedReplies) -> None:
        """With randk, a reply must echo the digest of this round's K_t."""
        if self._coords is None:
            return
        digest = coordinate_digest(self._coords)
        for node, metrics in list(zip(screened.node_ids, screened.metrics)):
            echoed = metrics.get("randk-digest")
            if echoed is None:
                screened.reject(node, "format", "compressed reply without the 'randk-digest' echo of K_t")
            elif echoed != digest:
                screened.reject(node, "stale", "reply computed for another coordinate set K_t")

    def _learning_rate(self, server_round: int) -> float:
        return self.lr_schedule(server_round) if self.lr_schedule else self.learning_rate

    def _step(self, x: np.ndarray, g_hat: np.ndarray, lr: float) -> np.ndarray:
        """``x_{t+1} = Proj_C(x_t - eta g_hat)`` (Algorithm 1; with randk only the coordinates K_t move)."""
        x_new = x.copy()
        if self._coords is None:
            x_new -= lr * g_hat
        else:
            x_new[self._coords] -= lr * g_hat
        return project_l2_ball(x_new, self.projection_radius)

    # ------------------------------------------------------------ state
    def _compression_state(self) -> dict | None:
        if self.compression is None:
            return None
        return {"k": self.compression.k, "fraction": self.compression.fraction,
                "seed": self.compression.seed, "form": self.compression.form}

    def _extra_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The randk settings (K_t is a function of the seed and the round, so that is all randk needs)."""
        return {"compression": self._compression_state()}, {}

    def _aggregator_dim(self, model_dim: int) -> int:
        """With randk the aggregator decodes k values per client."""
        return model_dim if self.compression is None else int(self.compression.k_for(model_dim))

    def _load_extra_state(self, state, arrays) -> None:
        comp = self._compression_state()
        if state.get("compression") != comp:
            raise CheckpointMismatch(f"checkpoint compression {state.get('compression')} != {comp}")

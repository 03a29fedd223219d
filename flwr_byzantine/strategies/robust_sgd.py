"""``RobustSGD``: Byzantine-resilient mini-batch SGD as a Flower Message-API strategy.

Data & Diggavi, Algorithm 1 (and Algorithm 2 with ``compression=RandK(...)``):
the server keeps ``x_t``; every round it broadcasts ``x_t`` (and ``K_t``), each
client replies with one mini-batch gradient of its own data, the server decodes
the R replies with a robust aggregator (RGE, Algorithm 3, by default) and takes
``x_{t+1} = Proj_C(x_t - eta * g_hat)``.  Client-reported ``num-examples`` is
never used as a weight: a Byzantine client could inflate it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..aggregators.base import Aggregator
from ..aggregators.rge import RGE
from ..compression.randk import RANDK_PROCEDURE, RandK, coordinate_digest
from ..optim import project_l2_ball
from .records import ArrayLayout, record_nbytes
from .validation import ReplyPolicy, screen_replies

logger = logging.getLogger(__name__)

#: Protocol tag sent in every train config; clients check it.
PROTOCOL = "flwr-byzantine/gradient-v1"


@dataclass
class RoundReport:
    """Everything the strategy learned in one training round (kept in ``RobustSGD.history``)."""

    server_round: int
    sampled: list[int]
    accepted: list[int]
    kept: list[int]
    filtered: list[int]
    rejected: dict[int, str]
    decode_seconds: float
    statistic: float
    threshold: float
    update_norm: float
    learning_rate: float
    bytes_up: int
    bytes_down: int
    applied: bool
    partition_ids: dict[int, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (node ids as strings in the rejection map)."""
        out = dict(vars(self))
        out["rejected"] = {str(k): v for k, v in self.rejected.items()}
        out["partition_ids"] = {str(k): v for k, v in self.partition_ids.items()}
        return out


class RobustSGD(Strategy):
    """Byzantine-resilient SGD (Data & Diggavi, Algorithm 1 / Algorithm 2) on Flower's Message API.

    Drop-in for :class:`flwr.serverapp.strategy.FedAvg` in a ServerApp::

        strategy = RobustSGD(aggregator=RGE(eps_tilde=0.2), learning_rate=0.1)
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
        Robust aggregation rule (default ``RGE()``).
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
    max_update_norm:
        Replies whose vector norm exceeds this are rejected (0/None: no limit).
    fraction_evaluate, min_evaluate_nodes:
        Federated evaluation (off by default; client metrics are combined by the
        median, never weighted by client-reported counts).
    seed:
        Seed of the node sampler (deterministic runs).
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
        max_update_norm: float | None = None,
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
        if not 0 < fraction_train <= 1 or not 0 <= fraction_evaluate <= 1:
            raise ValueError("fraction_train must be in (0, 1] and fraction_evaluate in [0, 1]")
        if min_valid_replies < 1:
            raise ValueError("min_valid_replies must be >= 1")
        self.aggregator = aggregator if aggregator is not None else RGE()
        self.learning_rate = float(learning_rate)
        self.batch_size = int(batch_size)
        self.full_batch = bool(full_batch)
        self.projection_radius = float(projection_radius)
        self.compression = compression
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.min_valid_replies = min_valid_replies
        self.max_update_norm = max_update_norm or None
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.lr_schedule = lr_schedule
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.reply_key = reply_key
        self.history: list[RoundReport] = []
        self._rng = random.Random(seed)
        self._layout: ArrayLayout | None = None
        self._x: np.ndarray | None = None
        self._sampled: list[int] = []
        self._coords: np.ndarray | None = None
        self._bytes_down = 0

    # ------------------------------------------------------------------ info
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> Aggregator: %r", self.aggregator)
        log(INFO, "\t├──> Step: lr=%s, batch-size=%s, full-batch=%s, projection-radius=%s",
            self.learning_rate, self.batch_size, self.full_batch, self.projection_radius)
        log(INFO, "\t├──> Compression: %s", self.compression or "none")
        log(INFO, "\t└──> Sampling: fraction-train=%.2f, min-valid-replies=%d",
            self.fraction_train, self.min_valid_replies)

    # -------------------------------------------------------------- sampling
    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Seeded version of Flower's ``sample_nodes`` (waits for enough nodes)."""
        all_nodes = sorted(grid.get_node_ids())
        wanted = max(int(len(all_nodes) * fraction), min_nodes)
        waited = 0.0
        while len(all_nodes) < max(self.min_available_nodes, wanted):
            if waited == 0.0 or waited % 10 == 0:
                log(INFO, "Waiting for nodes: %d connected, %d needed", len(all_nodes),
                    max(self.min_available_nodes, wanted))
            time.sleep(1.0)
            waited += 1.0
            all_nodes = sorted(grid.get_node_ids())
        return sorted(self._rng.sample(all_nodes, min(wanted, len(all_nodes))))

    # -------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast x_t (and K_t with compression) with the round's config to the sampled nodes."""
        layout = self._layout = ArrayLayout.of(arrays)
        self._x = layout.flatten(arrays, np.float64)
        self._sampled = self._sample(grid, self.fraction_train, self.min_train_nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        cfg["batch-size"] = self.batch_size
        cfg["full-batch"] = self.full_batch
        cfg["protocol"] = PROTOCOL
        content = {self.arrayrecord_key: arrays, self.configrecord_key: cfg}
        extra_down = 0
        self._coords = None
        if self.compression is not None:
            d = layout.size
            self._coords = self.compression.coordinates(d, server_round)
            cfg["randk-procedure"] = RANDK_PROCEDURE
            cfg["randk-d"] = d
            cfg["randk-k"] = int(self._coords.size)
            cfg["randk-digest"] = coordinate_digest(self._coords)
            if self.compression.form == "seed":
                cfg["randk-seed"] = self.compression.seed
            else:
                content["coordinates"] = ArrayRecord({"indices": Array(self._coords)})
                extra_down = int(self._coords.nbytes)
        record = RecordDict(content)
        self._bytes_down = (record_nbytes(arrays) + extra_down) * len(self._sampled)
        log(INFO, "configure_train: round %d, sampled %d nodes", server_round, len(self._sampled))
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in self._sampled]

    def _expected_layout(self) -> ArrayLayout:
        assert self._layout is not None
        if self._coords is None:
            return self._layout
        return ArrayLayout(("values",), ((int(self._coords.size),),), ("float32",))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, decode with the aggregator, take the projected SGD step."""
        if self._layout is None or self._x is None:
            log(WARNING, "aggregate_train called before configure_train; skipping round %d", server_round)
            return None, None
        policy = ReplyPolicy(reply_key=self.reply_key, max_norm=self.max_update_norm)
        screened = screen_replies(replies, self._sampled, self._expected_layout(), server_round, policy)
        if self._coords is not None:
            digest = coordinate_digest(self._coords)
            for node, metrics in list(zip(screened.node_ids, screened.metrics)):
                if metrics.get("randk-digest", digest) != digest:
                    i = screened.node_ids.index(node)
                    for lst in (screened.node_ids, screened.vectors, screened.metrics):
                        lst.pop(i)
                    screened.rejected[node] = "reply computed for another coordinate set K_t"
        for node, reason in sorted(screened.rejected.items()):
            log(WARNING, "round %d: rejected reply from node %s: %s", server_round, node, reason)
        lr = self.lr_schedule(server_round) if self.lr_schedule else self.learning_rate
        partitions = {
            n: int(m["partition-id"]) for n, m in zip(screened.node_ids, screened.metrics)
            if isinstance(m.get("partition-id"), int)
        }
        report = RoundReport(
            server_round=server_round, sampled=list(self._sampled), accepted=list(screened.node_ids),
            kept=[], filtered=[], rejected=dict(screened.rejected), decode_seconds=0.0,
            statistic=float("nan"), threshold=float("nan"), update_norm=0.0, learning_rate=lr,
            bytes_up=screened.bytes_up, bytes_down=self._bytes_down, applied=False, partition_ids=partitions,
        )
        if len(screened.vectors) < self.min_valid_replies:
            log(WARNING, "round %d: only %d valid replies (< min-valid-replies=%d); model left unchanged",
                server_round, len(screened.vectors), self.min_valid_replies)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)

        G = screened.matrix(np.float32)
        t0 = time.perf_counter()
        try:
            res = self.aggregator.aggregate(G)
            g_hat = np.asarray(res.estimate, dtype=np.float64)
        except Exception as exc:  # pylint: disable=broad-except
            log(WARNING, "round %d: aggregator failed (%s: %s); model left unchanged",
                server_round, type(exc).__name__, exc)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)
        report.decode_seconds = time.perf_counter() - t0
        ids = screened.node_ids  # uint64 node ids: never through a float array
        report.kept = [ids[int(i)] for i in res.kept]
        report.filtered = [ids[int(i)] for i in res.dropped]
        report.statistic = float(res.statistic)
        report.threshold = float(res.info.get("threshold", float("nan")))
        report.info = {k: v for k, v in res.info.items() if k in ("sigma0_sq", "solver_iterations", "max_relative_gap")}

        x_new = self._x.copy()
        if self._coords is None:
            x_new -= lr * g_hat
        else:
            x_new[self._coords] -= lr * g_hat
        x_new = project_l2_ball(x_new, self.projection_radius)
        if not np.isfinite(x_new).all():
            log(WARNING, "round %d: update is not finite; model left unchanged", server_round)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)
        report.update_norm = float(np.linalg.norm(x_new - self._x))
        report.applied = True
        self._x = x_new
        self.history.append(report)
        self._log_round(report)
        return self._layout.unflatten(x_new), self._metrics(report, screened.metrics)

    def _log_round(self, r: RoundReport) -> None:
        filtered_parts = [r.partition_ids.get(n) for n in r.filtered]
        log(INFO, "round %d: %d/%d valid, kept %d, filtered %d %s (partitions %s), decode %.1f ms, "
            "stat/threshold %.3g/%.3g, |step| %.3g, bytes up %d down %d",
            r.server_round, len(r.accepted), len(r.sampled), len(r.kept), len(r.filtered), r.filtered,
            filtered_parts, 1e3 * r.decode_seconds, r.statistic, r.threshold, r.update_norm,
            r.bytes_up, r.bytes_down)

    @staticmethod
    def _metrics(r: RoundReport, client_metrics: list[dict[str, Any]]) -> MetricRecord:
        losses = [m["train-loss"] for m in client_metrics
                  if isinstance(m.get("train-loss"), (int, float)) and np.isfinite(m["train-loss"])]
        rec = MetricRecord({
            "num-sampled": len(r.sampled),
            "num-valid": len(r.accepted),
            "num-rejected": len(r.rejected),
            "num-kept": len(r.kept),
            "num-filtered": len(r.filtered),
            "decode-seconds": float(r.decode_seconds),
            "update-norm": float(r.update_norm),
            "bytes-up": int(r.bytes_up),
            "bytes-down": int(r.bytes_down),
            "applied": int(r.applied),
        })
        if np.isfinite(r.statistic):
            rec["statistic"] = float(r.statistic)
        if np.isfinite(r.threshold):
            rec["threshold"] = float(r.threshold)
        if losses:
            rec["train-loss-median"] = float(np.median(losses))
        if r.filtered:
            rec["filtered-node-ids"] = [int(n) for n in r.filtered]
        return rec

    # ------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (only if ``fraction_evaluate > 0``)."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Coordinate-wise median of the numeric metrics of valid replies (robust to liars)."""
        values: dict[str, list[float]] = {}
        for msg in replies:
            try:
                if msg.has_error():
                    continue
                for rec in msg.content.metric_records.values():
                    for key, val in rec.items():
                        if isinstance(val, (int, float)) and not isinstance(val, bool) and np.isfinite(val):
                            values.setdefault(key, []).append(float(val))
            except Exception:  # pylint: disable=broad-except
                continue
        if not values:
            return None
        return MetricRecord({k: float(np.median(v)) for k, v in values.items()})

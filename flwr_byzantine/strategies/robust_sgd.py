"""``RobustSGD``: Byzantine-resilient mini-batch SGD as a Flower Message-API strategy.

Data & Diggavi, Algorithm 1 (and Algorithm 2 with ``compression=RandK(...)``):
the server keeps ``x_t``; every round it broadcasts ``x_t`` (and ``K_t``), each
client replies with one mini-batch gradient of its own data, the server decodes
the R replies with a robust aggregator (RGE, Algorithm 3, by default) and takes
``x_{t+1} = Proj_C(x_t - eta * g_hat)``.  Client-reported ``num-examples`` is
never used as a weight: a Byzantine client could inflate it.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from ..aggregators.base import Aggregator
from ..aggregators.rge import RGE
from ..checkpoint import CheckpointError, CheckpointMismatch, Checkpointer, TrainingState
from ..compression.randk import RANDK_PROCEDURE, RandK, coordinate_digest
from ..optim import project_l2_ball
from .records import ArrayLayout, record_nbytes
from .validation import REJECTION_KINDS, ReplyPolicy, clean_metrics, finite_number, screen_replies

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
    rejection_counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (node ids as strings in the rejection map)."""
        out = dict(vars(self))
        out["rejected"] = {str(k): v for k, v in self.rejected.items()}
        out["partition_ids"] = {str(k): v for k, v in self.partition_ids.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RoundReport":
        """Inverse of :meth:`as_dict` (as read back from JSON)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        kw["rejected"] = {int(k): str(v) for k, v in dict(data.get("rejected", {})).items()}
        kw["partition_ids"] = {int(k): int(v) for k, v in dict(data.get("partition_ids", {})).items()}
        for key in ("sampled", "accepted", "kept", "filtered"):
            kw[key] = [int(n) for n in data.get(key, [])]
        return cls(**kw)


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
        self.max_norm_ratio = max_norm_ratio or None
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
        self._sent: dict[int, Message] = {}
        self._eval_sampled: list[int] = []
        #: Round the last :meth:`start` resumed from (None: started fresh).
        self.resumed_from: int | None = None

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
        msgs = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(server_round))
                for n in self._sampled]
        # The Grid sets each message's id when it sends it; replies must answer exactly these.
        self._sent = {int(m.metadata.dst_node_id): m for m in msgs}
        return msgs

    def _expected_layout(self) -> ArrayLayout:
        assert self._layout is not None
        if self._coords is None:
            return self._layout
        return ArrayLayout(("values",), ((int(self._coords.size),),), ("float32",))

    def _sent_message_ids(self) -> dict[int, str]:
        out = {}
        for node, msg in self._sent.items():
            try:
                out[node] = str(msg.metadata.message_id or "")
            except Exception:  # pylint: disable=broad-except
                out[node] = ""
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, decode with the aggregator, take the projected SGD step.

        Never raises on client input: every bad reply is an erasure (logged with
        its reason), and with fewer than ``min_valid_replies`` valid replies, a
        failing aggregator or a non-finite / malformed result the model is left
        unchanged for the round (``applied = 0`` in the metrics).
        """
        if self._layout is None or self._x is None:
            log(WARNING, "aggregate_train called before configure_train; skipping round %d", server_round)
            return None, None
        policy = ReplyPolicy(reply_key=self.reply_key, max_norm=self.max_update_norm,
                             max_norm_ratio=self.max_norm_ratio)
        try:
            replies = list(replies)
        except Exception as exc:  # pylint: disable=broad-except
            log(WARNING, "round %d: replies could not be read (%s: %s)", server_round, type(exc).__name__, exc)
            replies = []
        screened = screen_replies(replies, self._sampled, self._expected_layout(), server_round, policy,
                                  sent_message_ids=self._sent_message_ids())
        if self._coords is not None:
            digest = coordinate_digest(self._coords)
            for node, metrics in list(zip(screened.node_ids, screened.metrics)):
                echoed = metrics.get("randk-digest")
                if echoed is None:
                    screened.reject(node, "format", "compressed reply without the 'randk-digest' echo of K_t")
                elif echoed != digest:
                    screened.reject(node, "stale", "reply computed for another coordinate set K_t")
        for node, reason in sorted(screened.rejected.items()):
            log(WARNING, "round %d: rejected reply from node %s (%s): %s", server_round, node,
                screened.kinds.get(node, "?"), reason)
        # Deterministic row order (by reported partition id, then node id): node ids are random per
        # deployment, so this keeps the aggregator's floating-point sums identical across runs/resumes.
        partitions = {
            n: int(m["partition-id"]) for n, m in zip(screened.node_ids, screened.metrics)
            if isinstance(m.get("partition-id"), int) and 0 <= m["partition-id"] < 2**63
        }
        order = sorted(range(len(screened.node_ids)),
                       key=lambda i: (partitions.get(screened.node_ids[i], 2**63), screened.node_ids[i]))
        for name in ("node_ids", "vectors", "metrics"):
            lst = getattr(screened, name)
            setattr(screened, name, [lst[i] for i in order])
        lr = self.lr_schedule(server_round) if self.lr_schedule else self.learning_rate
        report = RoundReport(
            server_round=server_round, sampled=list(self._sampled), accepted=list(screened.node_ids),
            kept=[], filtered=[], rejected=dict(screened.rejected), decode_seconds=0.0,
            statistic=float("nan"), threshold=float("nan"), update_norm=0.0, learning_rate=lr,
            bytes_up=screened.bytes_up, bytes_down=self._bytes_down, applied=False, partition_ids=partitions,
            rejection_counts=screened.counts(),
        )
        if len(screened.vectors) < self.min_valid_replies:
            log(WARNING, "round %d: only %d valid replies (< min-valid-replies=%d); model left unchanged",
                server_round, len(screened.vectors), self.min_valid_replies)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)

        G = screened.matrix(np.float32)
        R = G.shape[0]
        expected_dim = self._x.size if self._coords is None else int(self._coords.size)
        t0 = time.perf_counter()
        try:
            res = self.aggregator.aggregate(G)
            g_hat = np.asarray(res.estimate, dtype=np.float64).reshape(-1)
            if g_hat.shape != (expected_dim,):
                raise ValueError(f"estimate has shape {g_hat.shape}, expected ({expected_dim},)")
            if not np.isfinite(g_hat).all():
                raise ValueError("estimate is not finite")
            kept = [int(i) for i in np.asarray(res.kept).reshape(-1)]
            dropped = [int(i) for i in np.asarray(res.dropped).reshape(-1)]
            if any(not 0 <= i < R for i in kept + dropped):
                raise ValueError("kept/dropped indices out of range")
        except Exception as exc:  # pylint: disable=broad-except
            log(WARNING, "round %d: aggregator failed (%s: %s); model left unchanged",
                server_round, type(exc).__name__, exc)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)
        report.decode_seconds = time.perf_counter() - t0
        ids = screened.node_ids  # uint64 node ids: never through a float array
        report.kept = [ids[i] for i in kept]
        report.filtered = [ids[i] for i in dropped]
        report.statistic = _float_or_nan(res.statistic)
        report.threshold = _float_or_nan(res.info.get("threshold", float("nan")))
        report.info = {k: v for k, v in res.info.items()
                       if k in ("sigma0_sq", "solver_iterations", "max_relative_gap")}

        x_new = self._x.copy()
        if self._coords is None:
            x_new -= lr * g_hat
        else:
            x_new[self._coords] -= lr * g_hat
        x_new = project_l2_ball(x_new, self.projection_radius)
        new_arrays = None
        if np.isfinite(x_new).all():
            with np.errstate(over="ignore", invalid="ignore"):
                new_arrays = self._layout.unflatten(x_new)
                # The model's own dtypes (e.g. float32) must hold the new values too.
                x_cast = self._layout.flatten(new_arrays, np.float64)
            if not np.isfinite(x_cast).all():
                new_arrays = None
        if new_arrays is None:
            log(WARNING, "round %d: update is not finite; model left unchanged", server_round)
            self.history.append(report)
            return None, self._metrics(report, screened.metrics)
        report.update_norm = float(np.linalg.norm(x_new - self._x))
        report.applied = True
        self._x = x_new
        self.history.append(report)
        self._log_round(report)
        return new_arrays, self._metrics(report, screened.metrics)

    def _log_round(self, r: RoundReport) -> None:
        filtered_parts = [r.partition_ids.get(n) for n in r.filtered]
        log(INFO, "round %d: %d/%d valid, kept %d, filtered %d %s (partitions %s), decode %.1f ms, "
            "stat/threshold %.3g/%.3g, |step| %.3g, bytes up %d down %d",
            r.server_round, len(r.accepted), len(r.sampled), len(r.kept), len(r.filtered), r.filtered,
            filtered_parts, 1e3 * r.decode_seconds, r.statistic, r.threshold, r.update_norm,
            r.bytes_up, r.bytes_down)

    @staticmethod
    def _metrics(r: RoundReport, client_metrics: list[dict[str, Any]]) -> MetricRecord:
        losses = [v for v in (finite_number(m.get("train-loss")) for m in client_metrics) if v is not None]
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
        for kind in REJECTION_KINDS:
            if r.rejection_counts.get(kind):
                rec[f"rejected-{kind}"] = int(r.rejection_counts[kind])
        if math.isfinite(r.statistic):
            rec["statistic"] = float(r.statistic)
        if math.isfinite(r.threshold):
            rec["threshold"] = float(r.threshold)
        if losses:
            rec["train-loss-median"] = _median(losses)
        if r.filtered:
            rec["filtered-node-ids"] = [int(n) for n in r.filtered]
        return rec

    # ------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (only if ``fraction_evaluate > 0``)."""
        self._eval_sampled = []
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self._eval_sampled = list(nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n, group_id=str(server_round))
                for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Median of each numeric metric over the valid replies (robust to liars and garbage).

        One vote per sampled node (replies from other nodes, second replies and
        error replies are ignored); a value counts only if it is a finite real
        scalar; a metric is reported only if at least half of the valid replies
        carry it, so a few liars cannot invent metric names.  Never raises.
        """
        expected = set(self._eval_sampled)
        values: dict[str, list[float]] = {}
        voters: set[int] = set()
        try:
            replies = list(replies)
        except Exception:  # pylint: disable=broad-except
            replies = []
        for msg in replies:
            try:
                if msg.has_error():
                    continue
                node = int(msg.metadata.src_node_id)
                if (expected and node not in expected) or node in voters:
                    continue
                if msg.metadata.group_id and msg.metadata.group_id != str(server_round):
                    continue
                recs = list(msg.content.metric_records.values())
                if len(recs) != 1:
                    continue
                voters.add(node)
                for key, val in clean_metrics(recs[0]).items():
                    num = finite_number(val)
                    if num is not None:
                        values.setdefault(key, []).append(num)
            except Exception:  # pylint: disable=broad-except
                continue
        quorum = max(1, (len(voters) + 1) // 2)
        out = {k: _median(v) for k, v in values.items() if len(v) >= quorum}
        if not out:
            return None
        return MetricRecord(out)

    # ------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Strategy state for a checkpoint: ``(JSON part, array part)``.

        The JSON part holds the node sampler's RNG state, the history of round
        reports, the compression settings (randk seed: K_t is a function of the
        seed and the round, so that is all randk needs) and the aggregator's
        scalar private state; the array part its array-valued private state
        (e.g. a centred-clipping momentum).  RGE is stateless.
        """
        version, internal, gauss = self._rng.getstate()
        agg_scalars: dict[str, Any] = {}
        agg_arrays: dict[str, np.ndarray] = {}
        _capture_state(self.aggregator, "aggregator", agg_scalars, agg_arrays)
        comp = None
        if self.compression is not None:
            comp = {"k": self.compression.k, "fraction": self.compression.fraction,
                    "seed": self.compression.seed, "form": self.compression.form}
        state = {
            "rng_state": [version, list(internal), gauss],
            "history": [r.as_dict() for r in self.history],
            "compression": comp,
            "aggregator": type(self.aggregator).__name__,
            "aggregator_state": agg_scalars,
        }
        return state, agg_arrays

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Restore what :meth:`state_dict` returned (raises :class:`CheckpointMismatch` if incompatible)."""
        arrays = dict(arrays or {})
        if state.get("aggregator") != type(self.aggregator).__name__:
            raise CheckpointMismatch(f"checkpoint was written with aggregator {state.get('aggregator')!r}, "
                                     f"this strategy uses {type(self.aggregator).__name__!r}")
        comp = None
        if self.compression is not None:
            comp = {"k": self.compression.k, "fraction": self.compression.fraction,
                    "seed": self.compression.seed, "form": self.compression.form}
        if state.get("compression") != comp:
            raise CheckpointMismatch(f"checkpoint compression {state.get('compression')} != {comp}")
        try:
            version, internal, gauss = state["rng_state"]
            self._rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
            history = [RoundReport.from_dict(r) for r in state.get("history", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint strategy state is malformed: {exc}") from exc
        self.history = history
        _restore_state(self.aggregator, "aggregator", dict(state.get("aggregator_state", {})), arrays)

    # ------------------------------------------------------------ main loop
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
        """Flower's strategy loop (same signature and steps as ``Strategy.start``) with crash-resume.

        Without ``checkpoint`` this is Flower's loop: central evaluation of the
        initial model, then per round train (configure, send/receive, aggregate),
        federated evaluation and central evaluation.  ``result.arrays`` is the
        final global model (the initial one if no round was applied).

        With ``checkpoint`` the full state (model, completed round, strategy
        state incl. sampler RNG, history, all metrics so far) is written
        atomically after every completed round; if the checkpoint already holds
        a state (same configuration, checked by the :class:`Checkpointer`), the
        loop continues after its last completed round instead of starting over.
        With deterministic clients (mini-batches drawn from seed, partition id
        and round) the resumed run ends with the same model as an uninterrupted one.
        """
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        arrays = initial_arrays
        first_round = 1
        self.resumed_from = None

        state = checkpoint.load() if checkpoint is not None else None
        if state is not None:
            if ArrayLayout.of(state.arrays) != ArrayLayout.of(initial_arrays):
                raise CheckpointMismatch(
                    f"checkpoint model layout {ArrayLayout.of(state.arrays)} differs from the initial "
                    f"model's {ArrayLayout.of(initial_arrays)}")
            if state.server_round > num_rounds:
                raise CheckpointMismatch(f"checkpoint is at round {state.server_round}, beyond num_rounds={num_rounds}")
            self.load_state_dict(state.strategy, state.strategy_arrays)
            result = state.result
            arrays = state.arrays
            first_round = state.server_round + 1
            self.resumed_from = state.server_round
            log(INFO, "Resuming from checkpoint %s: %d of %d rounds already completed",
                checkpoint.json_path, state.server_round, num_rounds)
        elif evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        for current_round in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            train_replies = grid.send_and_receive(
                messages=self.configure_train(current_round, arrays, train_config, grid), timeout=timeout,
            )
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, train_replies)
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics

            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout,
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics

            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res

            if checkpoint is not None:
                strategy_state, strategy_arrays = self.state_dict()
                path = checkpoint.save(TrainingState(
                    server_round=current_round, arrays=arrays, strategy=strategy_state,
                    strategy_arrays=strategy_arrays, result=result,
                ))
                log(INFO, "Checkpoint written: %s (round %d)", path, current_round)

        result.arrays = arrays
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result


def _capture_state(obj: Any, prefix: str, scalars: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Collect the mutable private state of an aggregator (and of aggregators it wraps).

    Private attributes (``_name``) that are JSON scalars go to ``scalars``, numpy
    arrays / torch tensors to ``arrays``, numpy Generators and ``random.Random``
    as their (JSON) RNG state; public attributes that are aggregators are visited
    recursively (e.g. the inner rule of bucketing).  Keys are ``prefix.attr``.
    """
    for key, val in getattr(obj, "__dict__", {}).items():
        name = f"{prefix}.{key}"
        if isinstance(val, Aggregator):
            _capture_state(val, name, scalars, arrays)
        elif not key.startswith("_"):
            continue
        elif val is None or isinstance(val, (bool, int, float, str)):
            scalars[name] = val
        elif isinstance(val, np.ndarray):
            arrays[name] = val
        elif isinstance(val, np.random.Generator):
            scalars[name] = {"numpy-bit-generator-state": val.bit_generator.state}
        elif isinstance(val, random.Random):
            version, internal, gauss = val.getstate()
            scalars[name] = {"python-random-state": [version, list(internal), gauss]}
        elif hasattr(val, "detach") and hasattr(val, "cpu"):  # torch tensor
            arrays[name] = val.detach().cpu().numpy()
        else:
            raise CheckpointError(f"cannot checkpoint aggregator state {name} of type {type(val).__name__}")


def _restore_state(obj: Any, prefix: str, scalars: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Inverse of :func:`_capture_state` (only keys below ``prefix`` are used)."""
    for key, val in list(getattr(obj, "__dict__", {}).items()):
        name = f"{prefix}.{key}"
        if isinstance(val, Aggregator):
            _restore_state(val, name, scalars, arrays)
        elif name in arrays:
            setattr(obj, key, np.array(arrays[name]))
        elif name in scalars:
            saved = scalars[name]
            if isinstance(saved, dict) and "numpy-bit-generator-state" in saved and isinstance(val, np.random.Generator):
                val.bit_generator.state = saved["numpy-bit-generator-state"]
            elif isinstance(saved, dict) and "python-random-state" in saved and isinstance(val, random.Random):
                version, internal, gauss = saved["python-random-state"]
                val.setstate((int(version), tuple(int(v) for v in internal), gauss))
            else:
                setattr(obj, key, saved)


def _median(values: list[float]) -> float:
    """Median of finite floats without overflow (``np.median`` averages two huge values to inf)."""
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else float(v[mid - 1] / 2 + v[mid] / 2)


def _float_or_nan(val: Any) -> float:
    out = finite_number(val)
    return float("nan") if out is None else out

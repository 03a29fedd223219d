"""The round machinery shared by ``RobustSGD`` and ``RobustFedAvg`` (one training loop, one decode path).

Every round: sample nodes (seeded), broadcast the model x_t, screen the replies
(:mod:`~flwr_byzantine.strategies.validation`: a bad reply is an erasure with a
logged reason), stack the valid replies' vectors v_i as an ``(R, d)`` matrix,
decode it with the robust aggregator (the default defence, RGE with memory, unless given)
into ``g_hat`` and let the subclass turn ``g_hat`` into x_{t+1}:

* :class:`~flwr_byzantine.strategies.RobustSGD`: v_i is client i's mini-batch
  gradient at x_t and ``x_{t+1} = Proj_C(x_t - eta g_hat)`` (Algorithm 1);
* :class:`~flwr_byzantine.strategies.RobustFedAvg`: client i trains locally and
  replies with its weights w_i; v_i = x_t - w_i is its model update and
  ``x_{t+1} = x_t - eta_s m_{t+1}``, ``m_{t+1} = beta m_t + g_hat`` (FedAvg with
  server learning rate and momentum, the mean replaced by the robust decoder).

Client-reported ``num-examples`` is never a weight: a Byzantine client would
report a huge count and buy the influence the robust rule is there to deny it.
Client metrics (train and evaluate) are combined by the median over the valid
replies, never by a count-weighted mean.

A run that cannot make progress fails loudly: after ``max_invalid_rounds``
consecutive rounds with fewer than ``min_valid_replies`` valid replies
``aggregate_train`` raises :class:`RunFailed` with the round's most common
rejection reason (e.g. "replies carry 'arrays': use RobustFedAvg"); raised in a
ServerApp, Flower ends the run as ``finished:failed`` with that message in its
status details.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..aggregators import make_aggregator
from ..aggregators.base import Aggregator
from ..checkpoint import CheckpointError, CheckpointMismatch, TrainingState
from .loop import RoundLoop
from .records import ArrayLayout, record_nbytes
from .sampling import sample_nodes
from .validation import (
    REJECTION_KINDS,
    ReplyPolicy,
    ScreenedReplies,
    evaluate_votes,
    finite_number,
    log_rejections,
    median_metrics,
    screen_replies,
)

#: Registry name of the project's default defence (``make_aggregator`` with its default parameters).
DEFAULT_AGGREGATOR = "rge"

#: Client metrics that identify a reply rather than measure anything (never aggregated).
ID_METRICS = ("server-round", "partition-id")

#: ``fn(list[RecordDict], weighted_by_key) -> MetricRecord | None`` (FedAvg's metric hook signature).
MetricsAggrFn = Callable[[list[RecordDict], str], "MetricRecord | None"]


def default_aggregator(replies_are_gradients: bool = True) -> Aggregator:
    """The project's default defence: the rule registered as :data:`DEFAULT_AGGREGATOR`, default parameters.

    Its monotonicity evidence assumes every reply is a stochastic gradient of the client's loss;
    for model updates after several local steps (``RobustFedAvg``) it is switched off
    (``replies_are_gradients=False``), with the self-reference clipping, the jump rule and the
    mixing (``MODEL_UPDATE_OPTIONS``): on a non-convex model such updates need be neither monotone nor
    smooth from round to round.
    """
    from ..aggregators.defence import MODEL_UPDATE_OPTIONS

    return make_aggregator(DEFAULT_AGGREGATOR, **({} if replies_are_gradients else MODEL_UPDATE_OPTIONS))


class RunFailed(RuntimeError):
    """The run cannot make progress (too many consecutive rounds without enough valid replies)."""


@dataclass
class RoundReport:
    """Everything the strategy learned in one training round (kept in ``strategy.history``)."""

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
    #: Seconds from configuring the round to having screened its replies (waiting for the
    #: nodes included, the decode not: see ``decode_seconds``).
    reply_seconds: float = 0.0

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


class RobustStrategy(RoundLoop, Strategy):
    """Base of the robust strategies: sampling, screening, robust decode, metrics, checkpointed loop.

    Subclasses define what a reply carries and how the decoded vector moves the
    model (:meth:`_step`), and may add round config (:meth:`_round_config`,
    :meth:`_round_records`), screening (:meth:`_screen_more`) and state
    (:meth:`_extra_state`).  See the module docstring.

    Parameters (shared)
    -------------------
    aggregator:
        Robust rule decoding the ``(R, d)`` reply matrix (default: :func:`default_aggregator`).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes:
        Node sampling, as in FedAvg (seeded by ``seed``).
    min_valid_replies:
        Fewer valid replies than this: the model is left unchanged for the round.
    max_invalid_rounds:
        That many consecutive such rounds raise :class:`RunFailed` (0: never).
    max_update_norm, max_norm_ratio:
        Reply screening limits (see :class:`~flwr_byzantine.strategies.validation.ReplyPolicy`).
    arrayrecord_key, configrecord_key, reply_key:
        Record names of the model / config sent and of the client's vector in a reply.
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn, weighted_by_key:
        FedAvg's metric hooks: if given, called with the valid replies' (cleaned)
        ``RecordDict`` s and ``weighted_by_key``; otherwise client metrics are
        combined by the median (:func:`median_metrics`).
    """

    def __init__(
        self,
        aggregator: Aggregator | None = None,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int = 2,
        max_invalid_rounds: int = 3,
        max_update_norm: float | None = None,
        max_norm_ratio: float | None = 1e6,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        reply_key: str = "gradient",
        train_metrics_aggr_fn: MetricsAggrFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggrFn | None = None,
        weighted_by_key: str = "num-examples",
        seed: int = 0,
    ) -> None:
        if not 0 <= fraction_train <= 1 or not 0 <= fraction_evaluate <= 1:
            raise ValueError("fraction_train and fraction_evaluate must be in [0, 1]")
        if min_valid_replies < 1:
            raise ValueError("min_valid_replies must be >= 1")
        if max_invalid_rounds < 0 or int(max_invalid_rounds) != max_invalid_rounds:
            raise ValueError("max_invalid_rounds must be an integer >= 0 (0: never fail)")
        self.aggregator = aggregator if aggregator is not None else default_aggregator()
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.min_valid_replies = min_valid_replies
        self.max_invalid_rounds = int(max_invalid_rounds)
        self.max_update_norm = max_update_norm or None
        self.max_norm_ratio = max_norm_ratio or None
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.reply_key = reply_key
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn
        self.weighted_by_key = weighted_by_key
        self.history: list[RoundReport] = []
        #: Consecutive rounds (up to the last one) without enough valid replies.
        self.invalid_streak = 0
        self._rng = random.Random(seed)
        self._layout: ArrayLayout | None = None
        self._x: np.ndarray | None = None
        self._sampled: list[int] = []
        self._bytes_down = 0
        self._sent: dict[int, Message] = {}
        self._eval_sampled: list[int] = []
        self._round_t0 = time.perf_counter()
        #: Round the last :meth:`start` resumed from (None: started fresh).
        self.resumed_from: int | None = None
        #: Also compute the plain mean's step each round (:meth:`undefended_arrays`, for the run plot).
        self.track_undefended = False
        self._undefended: tuple[int, ArrayRecord] | None = None

    # ------------------------------------------------------------ subclass hooks
    #: Hints appended to the rejection reason when a reply carries this record instead of ``reply_key``.
    def _format_hints(self) -> dict[str, str]:
        return {}

    def _round_config(self, cfg: ConfigRecord, server_round: int) -> None:
        """Add protocol keys to the round's train config (in place)."""

    def _round_records(self, server_round: int, layout: ArrayLayout, cfg: ConfigRecord) -> dict[str, ArrayRecord]:
        """Extra records of the train message (e.g. randk coordinates)."""
        return {}

    def _expected_layout(self) -> ArrayLayout:
        assert self._layout is not None
        return self._layout

    def _reply_policy(self) -> ReplyPolicy:
        return ReplyPolicy(reply_key=self.reply_key, max_norm=self.max_update_norm,
                           max_norm_ratio=self.max_norm_ratio, format_hints=self._format_hints())

    def _screen_more(self, screened: ScreenedReplies) -> None:
        """Protocol-specific checks after the generic screening (reject in place)."""

    def _learning_rate(self, server_round: int) -> float:
        """The server step size of ``server_round`` (each concrete strategy defines it)."""
        raise NotImplementedError

    def _step(self, x: np.ndarray, g_hat: np.ndarray, lr: float) -> np.ndarray:
        """x_{t+1} from x_t and the decoded vector (no side effects: see :meth:`_commit`)."""
        raise NotImplementedError

    def _commit(self) -> None:
        """Called once the step of :meth:`_step` was applied (e.g. keep the new momentum)."""

    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def _aggregator_dim(self, model_dim: int) -> int:
        """Dimension of the vectors the aggregator receives for a model of ``model_dim`` scalars."""
        return model_dim

    def _load_extra_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`_extra_state` returned."""

    # -------------------------------------------------------------- sampling
    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Seeded version of Flower's ``sample_nodes`` (waits for enough nodes; :func:`sample_nodes`)."""
        return sample_nodes(grid, self._rng, fraction, min_nodes, self.min_available_nodes)

    # -------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Broadcast x_t with the round's config (and the subclass's records) to the sampled nodes."""
        self._round_t0 = time.perf_counter()
        layout = self._layout = ArrayLayout.of(arrays)
        self._x = layout.flatten(arrays, np.float64)
        if self.fraction_train == 0.0:  # as FedAvg: federated training skipped (evaluation only)
            self._sampled, self._sent = [], {}
            return []
        self._sampled = self._sample(grid, self.fraction_train, self.min_train_nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = server_round
        self._round_config(cfg, server_round)
        extra = self._round_records(server_round, layout, cfg)
        content: dict[str, Any] = {self.arrayrecord_key: arrays, self.configrecord_key: cfg, **extra}
        record = RecordDict(content)
        per_node = record_nbytes(arrays) + sum(record_nbytes(r) for r in extra.values())
        self._bytes_down = per_node * len(self._sampled)
        msgs = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(server_round))
                for n in self._sampled]
        # The Grid sets each message's id when it sends it; replies must answer exactly these.
        self._sent = {int(m.metadata.dst_node_id): m for m in msgs}
        return msgs

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
        """Screen the replies, decode with the aggregator, take the subclass's step.

        Never raises on client input: every bad reply is an erasure (logged with
        its reason), and with fewer than ``min_valid_replies`` valid replies, a
        failing aggregator or a non-finite / malformed result the model is left
        unchanged for the round (``applied = 0`` in the metrics).  The one
        exception is deliberate: the ``max_invalid_rounds``-th consecutive round
        without enough valid replies raises :class:`RunFailed`.
        """
        if self._layout is None or self._x is None:
            log(WARNING, "aggregate_train called before configure_train; skipping round %d", server_round)
            return None, None
        if self.fraction_train == 0.0:
            return None, None
        screened = screen_replies(replies, self._sampled, self._expected_layout(), server_round,
                                  self._reply_policy(), sent_message_ids=self._sent_message_ids())
        self._screen_more(screened)
        log_rejections(screened, server_round)
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
        lr = self._learning_rate(server_round)
        report = RoundReport(
            server_round=server_round, sampled=list(self._sampled), accepted=list(screened.node_ids),
            kept=[], filtered=[], rejected=dict(screened.rejected), decode_seconds=0.0,
            statistic=float("nan"), threshold=float("nan"), update_norm=0.0, learning_rate=lr,
            bytes_up=screened.bytes_up, bytes_down=self._bytes_down, applied=False, partition_ids=partitions,
            rejection_counts=screened.counts(), reply_seconds=time.perf_counter() - self._round_t0,
        )
        if len(screened.vectors) < self.min_valid_replies:
            log(WARNING, "round %d: only %d valid replies (< min-valid-replies=%d); model left unchanged",
                server_round, len(screened.vectors), self.min_valid_replies)
            self.history.append(report)
            self.invalid_streak += 1
            self._fail_if_stuck(server_round, screened)
            return None, self._metrics(report, screened.metrics)
        self.invalid_streak = 0

        G = screened.matrix(np.float32)
        R = G.shape[0]
        expected_dim = self._expected_layout().size
        t0 = time.perf_counter()
        try:
            # Node ids (attached by the SuperLink, never claimed by the client) key rules with memory
            # across rounds; compressed rounds change coordinates every round, so they get none.
            memory_ok = expected_dim == self._x.size and _takes_client_ids(self.aggregator)
            res = (self.aggregator.aggregate(G, client_ids=[int(n) for n in screened.node_ids]) if memory_ok
                   else self.aggregator.aggregate(G))
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
                       if k in ("sigma0_sq", "solver_iterations", "max_relative_gap", "clip_radius", "clipped",
                                "input_clipped")}
        if res.info.get("suspected"):  # excluded by the defence's memory, by node id
            report.info["suspected"] = [int(ids[i]) for i in res.info["suspected"] if 0 <= int(i) < R]

        self._undefended = None
        if self.track_undefended:  # the same step with the plain mean (before the real one: _step may stage state)
            with np.errstate(over="ignore", invalid="ignore"):
                x_mean = self._step(self._x, G.astype(np.float64).mean(axis=0), lr)
                undefended = self._layout.unflatten(x_mean) if np.isfinite(x_mean).all() else None
                if undefended is not None and np.isfinite(self._layout.flatten(undefended, np.float64)).all():
                    self._undefended = (server_round, undefended)
        with np.errstate(over="ignore", invalid="ignore"):
            x_new = self._step(self._x, g_hat, lr)
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
        self._commit()
        if memory_ok and hasattr(self.aggregator, "observe_step"):
            self.aggregator.observe_step(x_new - self._x)  # the step actually taken (projection, momentum)
        report.update_norm = float(np.linalg.norm(x_new - self._x))
        report.applied = True
        self._x = x_new
        self.history.append(report)
        return new_arrays, self._metrics(report, screened.metrics)

    def _fail_if_stuck(self, server_round: int, screened: ScreenedReplies) -> None:
        """Raise :class:`RunFailed` once ``max_invalid_rounds`` consecutive rounds lacked valid replies."""
        if not self.max_invalid_rounds or self.invalid_streak < self.max_invalid_rounds:
            return
        reasons = Counter(screened.rejected.values())
        why = (f"most common rejection ({reasons.most_common(1)[0][1]} of {len(screened.rejected)} replies): "
               f"{reasons.most_common(1)[0][0]}") if reasons else "no reply was rejected"
        raise RunFailed(
            f"{type(self).__name__}: no valid update in {self.invalid_streak} consecutive rounds "
            f"(rounds {server_round - self.invalid_streak + 1}-{server_round}: fewer than "
            f"min-valid-replies={self.min_valid_replies} valid replies); {why}")

    def round_summary(self, server_round: int) -> str:
        """The round's report in one line: valid replies, filtered node ids (claimed partitions), decode, step."""
        r = next((rep for rep in reversed(self.history) if rep.server_round == server_round), None)
        if r is None:
            return "no training report"
        line = f"{len(r.accepted)}/{len(r.sampled)} valid"
        if r.rejected:
            counts = ", ".join(f"{n} {k}" for k, n in r.rejection_counts.items() if n)
            line += f" ({counts})"
        if not r.applied:
            return line + ", model unchanged"
        claimed = [r.partition_ids.get(n) for n in r.filtered]
        line += f", filtered {len(r.filtered)}"
        if r.filtered:
            line += f" nodes {r.filtered}"
            if any(c is not None for c in claimed):
                line += f" (claimed partitions {claimed})"
        return (line + f", decode {1e3 * r.decode_seconds:.1f} ms, stat/threshold {r.statistic:.3g}/{r.threshold:.3g}"
                f", |step| {r.update_norm:.3g}, bytes up {r.bytes_up} down {r.bytes_down}")

    def final_summary(self) -> str:
        """Rounds applied, nodes filtered at least once, rejections by kind, traffic."""
        applied = sum(r.applied for r in self.history)
        filtered = sorted({n for r in self.history for n in r.filtered})
        rejected = Counter()
        for r in self.history:
            rejected.update({k: v for k, v in r.rejection_counts.items() if v})
        return (f"{applied}/{len(self.history)} rounds applied, nodes filtered at least once: {filtered}, "
                f"rejected replies: {dict(rejected) or 'none'}, bytes up {sum(r.bytes_up for r in self.history)} "
                f"down {sum(r.bytes_down for r in self.history)}")

    def _metrics(self, r: RoundReport, client_metrics: list[dict[str, Any]]) -> MetricRecord:
        """Round diagnostics plus the client metrics (median, or ``train_metrics_aggr_fn``)."""
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
        if r.filtered:
            rec["filtered-node-ids"] = [int(n) for n in r.filtered]
        client = self._client_metrics(self.train_metrics_aggr_fn, client_metrics, len(client_metrics))
        for key, val in client.items():
            if key not in rec:
                rec[key] = val
        return rec

    def _client_metrics(self, fn: MetricsAggrFn | None, metrics: list[dict[str, Any]],
                        voters: int) -> dict[str, Any]:
        """Client metrics of one round, combined by ``fn`` (FedAvg's hook) or by the median. Never raises."""
        metrics = [{k: v for k, v in m.items() if k not in ID_METRICS} for m in metrics]
        if fn is None:
            return median_metrics(metrics, voters)
        try:
            out = fn([RecordDict({"metrics": MetricRecord(m)}) for m in metrics], self.weighted_by_key)
            return dict(out) if out is not None else {}
        except Exception as exc:  # pylint: disable=broad-except
            log(WARNING, "metrics aggregation function failed (%s: %s); client metrics left out",
                type(exc).__name__, exc)
            return {}

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

        One vote per sampled node (:func:`evaluate_votes`: replies from other nodes,
        second replies, error replies, other rounds are ignored); a value counts only
        if it is a finite real scalar; a metric is reported only if at least half of
        the sampled nodes carry it, a quorum (:func:`median_metrics`).
        With ``evaluate_metrics_aggr_fn`` the valid replies' cleaned metrics go to
        that function instead.  Never raises.
        """
        metrics = evaluate_votes(replies, self._eval_sampled, server_round)
        out = self._client_metrics(self.evaluate_metrics_aggr_fn, metrics, len(self._eval_sampled))
        return MetricRecord(out) if out else None

    # ------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Strategy state for a checkpoint: ``(JSON part, array part)``.

        The JSON part holds the node sampler's RNG state, the history of round
        reports, the subclass's settings (e.g. randk's seed: K_t is a function of
        the seed and the round) and the aggregator's :meth:`~Aggregator.state_dict`;
        the array part the aggregator's arrays (``aggregator/<name>``, e.g. a
        centred-clipping centre) and the subclass's arrays (``strategy.<name>``,
        e.g. the server momentum).  Every name is chosen explicitly by the part
        that owns the state: the file format does not depend on attribute names.
        """
        version, internal, gauss = self._rng.getstate()
        agg_scalars, agg_state_arrays = self.aggregator.state_dict()
        agg_arrays = {f"aggregator/{k}": np.asarray(v) for k, v in agg_state_arrays.items()}
        extra, extra_arrays = self._extra_state()
        state = {
            "rng_state": [version, list(internal), gauss],
            "history": [r.as_dict() for r in self.history],
            "aggregator": type(self.aggregator).__name__,
            "aggregator_state": agg_scalars,
            "invalid_streak": self.invalid_streak,
            **extra,
        }
        return state, {**agg_arrays, **{f"strategy.{k}": v for k, v in extra_arrays.items()}}

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
                        *, dim: int | None = None) -> None:
        """Restore what :meth:`state_dict` returned.

        ``dim``: the aggregator's input dimension (model size, or k with randk), which
        array state such as a clipping centre must match.  Raises :class:`CheckpointMismatch`
        if the state belongs to another configuration and :class:`CheckpointError` if it
        is malformed.
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint strategy state must be a mapping, got {type(state).__name__}")
        arrays = dict(arrays or {})
        if state.get("aggregator") != type(self.aggregator).__name__:
            raise CheckpointMismatch(f"checkpoint was written with aggregator {state.get('aggregator')!r}, "
                                     f"this strategy uses {type(self.aggregator).__name__!r}")
        extra_arrays = {k[len("strategy."):]: v for k, v in arrays.items() if k.startswith("strategy.")}
        self._load_extra_state(state, extra_arrays)
        try:
            version, internal, gauss = state["rng_state"]
            self._rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
            history = [RoundReport.from_dict(r) for r in state.get("history", [])]
            streak = int(state.get("invalid_streak", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint strategy state is malformed: {exc}") from exc
        agg_state = state.get("aggregator_state", {})
        agg_arrays = {k[len("aggregator/"):]: v for k, v in arrays.items() if k.startswith("aggregator/")}
        stray = sorted(k for k in arrays if not k.startswith(("aggregator/", "strategy.")))
        try:
            if stray:
                raise ValueError(f"unknown state arrays {stray}")
            if not isinstance(agg_state, Mapping):
                raise ValueError(f"aggregator_state must be a mapping, got {type(agg_state).__name__}")
            self.aggregator.load_state_dict(agg_state, agg_arrays, dim=dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint aggregator state is unusable: {exc}") from exc
        self.history = history
        self.invalid_streak = streak

    # ------------------------------------------------------------ loop hooks
    def undefended_arrays(self, server_round: int) -> ArrayRecord | None:
        """With ``track_undefended``: x_t moved by the plain mean of the same valid replies.

        A one-step counterfactual (the step taken from the *defended* x_t), for the
        plot's "what the undefended mean would do" curve; None when not tracked,
        not finite, or the round was skipped.
        """
        if self._undefended is None or self._undefended[0] != server_round:
            return None
        return self._undefended[1]

    # ------------------------------------------------------------ loop hooks (checkpoints)
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """:meth:`state_dict` (what :class:`~flwr_byzantine.strategies.loop.RoundLoop` saves per round)."""
        return self.state_dict()

    def restore(self, state: TrainingState, initial_arrays: ArrayRecord, num_rounds: int) -> None:
        """Check that the checkpoint fits this run, then :meth:`load_state_dict` it."""
        if ArrayLayout.of(state.arrays) != ArrayLayout.of(initial_arrays):
            raise CheckpointMismatch(
                f"checkpoint model layout {ArrayLayout.of(state.arrays)} differs from the initial "
                f"model's {ArrayLayout.of(initial_arrays)}")
        if state.server_round > num_rounds:
            raise CheckpointMismatch(f"checkpoint is at round {state.server_round}, beyond num_rounds={num_rounds}")
        self.load_state_dict(state.strategy, state.strategy_arrays,
                             dim=self._aggregator_dim(ArrayLayout.of(state.arrays).size))


def _takes_client_ids(aggregator: Any) -> bool:
    """Whether ``aggregator.aggregate`` accepts the ``client_ids`` keyword (every :class:`Aggregator` does)."""
    import inspect

    try:
        return "client_ids" in inspect.signature(aggregator.aggregate).parameters
    except (TypeError, ValueError):
        return False


def _float_or_nan(val: Any) -> float:
    out = finite_number(val)
    return float("nan") if out is None else out

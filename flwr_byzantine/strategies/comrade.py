"""``Comrade``: Byzantine-robust distributed Newton (COMRADE) as a Flower Message-API strategy.

Ghosh, Maity & Mazumdar, "Distributed Newton Can Communicate Less and Resist Byzantine
Workers" (NeurIPS 2020), Algorithm 1.  Per iteration t (= one Flower server round):

1. the server broadcasts w_t (one message per client);
2. each client replies with Q(p_i), p_i = H_i^{-1} g_i computed on its own data (Q a
   rho-approximate compressor, Section 5; the identity by default);
3. the server drops invalid replies (erasures), keeps the ceil((1 - beta) m) smallest-norm
   directions, averages them into p_hat and sets w_{t+1} = w_t - step * p_hat.

step = 1 (the paper's analysis) unless the server holds data of its own, in which case an
Armijo line search on that server-side objective can be enabled (``server_objective``).
beta = 0 gives the non-robust one-round variant.  The norm trimming only protects when
beta exceeds the Byzantine fraction alpha; a WARNING is logged when ``beta <=
assumed_byzantine_fraction``.

Wire format.  Server -> client: ``"arrays"`` (the model, one float64 array ``"w"`` of shape
``(d,)`` for a GLM; any ArrayRecord of floating arrays is flattened in key order) and
``"config"`` (``server-round``, ``newton-phase``, ``protocol``, ``compression``,
``compression-k``; GIANT's second round adds an ArrayRecord ``"gradient"`` with ``"g"``).
Client -> server: an ArrayRecord under ``reply_key`` (default ``"update"``) holding the
compressor's payload (``{"p"}``, ``{"indices", "values"}`` or ``{"signs", "scale"}``; GIANT's
gradients ``{"g"}``) and a MetricRecord echoing ``server-round`` and ``phase-id`` (0: direction,
1: gradient).

Every reply goes through the shared screening of :mod:`~flwr_byzantine.strategies.validation`
(the one RobustSGD uses: error replies, unknown / duplicate senders, group id, round echo,
message type, reply-to id, missing or extra records, payload size, wrong shape or dtype,
NaN/Inf, absurd magnitudes, optional norm cap) plus the compressor's own payload checks
(out-of-range indices, ...) and the phase echo: a rejected reply is logged on one line with
its reason and treated as an erasure.  Nothing a client sends can raise in the server or put
a NaN in the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..newton.compression import Compressor, Identity, make_compressor
from ..newton.server import newton_step
from ..newton.trimming import num_kept
from ..protocol import NEWTON_PROTOCOL, PHASE_DIRECTION, PHASE_GRADIENT, PHASE_IDS
from .loop import RoundLoop
from .records import ArrayLayout, record_nbytes
from .sampling import sample_nodes
from .validation import (
    FLOAT32_MAX,
    ReplyPolicy,
    ScreenedReplies,
    log_rejections,
    evaluate_votes,
    median_metrics,
    one_line,
    screen_replies,
)

#: Protocol tag sent in every train config; the Newton ClientApp checks it.
PROTOCOL = NEWTON_PROTOCOL


def model_layout(record: ArrayRecord) -> ArrayLayout:
    """Layout of a Newton model: a non-empty ArrayRecord of floating arrays (raises ValueError)."""
    layout = ArrayLayout.of(record)
    if not layout.keys:
        raise ValueError("the model ArrayRecord is empty")
    for key, dt in zip(layout.keys, layout.dtypes):
        if not np.issubdtype(np.dtype(dt), np.floating):
            raise ValueError(f"model array '{key}' has dtype {dt}; Newton strategies need floating arrays")
    return layout


# --------------------------------------------------------------------------- reports
@dataclass
class NewtonRoundReport:
    """What the server learned in one communication round (kept in ``strategy.history``).

    ``kept`` / ``trimmed`` / ``rejected`` are Flower node ids (the identity of a client);
    ``partition_ids`` maps node id to the partition id the client *claimed* (an unverified
    label for diagnostics, never an identity: two clients may claim the same one).
    """

    server_round: int
    iteration: int
    phase: str
    sampled: list[int]
    valid: list[int]
    kept: list[int]
    trimmed: list[int]
    rejected: dict[int, str]
    bytes_up: int
    bytes_down: int
    rho: float
    rho_empirical_min: float
    step: float
    applied: bool
    reason: str = ""
    direction_norm: float = float("nan")
    num_kept_expected: int = 0
    partition_ids: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (node ids as strings in the maps)."""
        out = dict(vars(self))
        out["rejected"] = {str(k): v for k, v in self.rejected.items()}
        out["partition_ids"] = {str(k): v for k, v in self.partition_ids.items()}
        return out

    def metric_record(self, extra: dict[str, Any] | None = None) -> MetricRecord:
        """Per-round metrics returned to Flower (and logged)."""
        rec: dict[str, Any] = {
            "iteration": self.iteration,
            "num-sampled": len(self.sampled),
            "num-valid": len(self.valid),
            "num-rejected": len(self.rejected),
            "num-kept": len(self.kept),
            "num-trimmed": len(self.trimmed),
            "kept-node-ids": [int(n) for n in self.kept],
            "trimmed-node-ids": [int(n) for n in self.trimmed],
            "rejected-node-ids": [int(n) for n in sorted(self.rejected)],
            "bytes-up": int(self.bytes_up),
            "bytes-down": int(self.bytes_down),
            "rho": float(self.rho),
            "step-size": float(self.step),
            "applied": int(self.applied),
        }
        if np.isfinite(self.rho_empirical_min):
            rec["rho-empirical-min"] = float(self.rho_empirical_min)
        if np.isfinite(self.direction_norm):
            rec["direction-norm"] = float(self.direction_norm)
        rec.update(extra or {})
        return MetricRecord(rec)


# --------------------------------------------------------------------------- base strategy
class NewtonStrategyBase(RoundLoop, Strategy):
    """Shared machinery of :class:`Comrade` and :class:`~flwr_byzantine.strategies.giant.Giant`.

    Parameters
    ----------
    beta:
        Trimming fraction in [0, 1): the ceil((1 - beta) m) smallest-norm directions are kept.
    assumed_byzantine_fraction:
        The Byzantine fraction alpha the deployment expects; ``beta <= alpha`` logs a WARNING
        (the paper's guarantee needs beta > alpha).
    step_size:
        Fixed step (1 = the paper's analysis), or the initial step of the line search.
    server_objective:
        Optional objective with ``value(w)`` / ``gradient(w)`` on data the server holds; if
        given, the step is chosen by Armijo backtracking on it.  Never built from client data.
    compression:
        ``Compressor`` instance or name (``"none"``, ``"topk"``, ``"sign"``) for the uplink.
    topk_fraction:
        k/d for ``compression="topk"`` given by name.
    fraction_train, min_train_nodes, min_available_nodes:
        Node sampling (all nodes by default, as in the paper).
    min_valid_replies:
        Fewer valid replies than this: the model is left unchanged for the round (WARNING).
    max_direction_norm:
        Replies whose vector norm exceeds this are rejected (``None``/0: no cap).
    fraction_evaluate, min_evaluate_nodes:
        Federated evaluation (off by default; metrics combined by the median).
    seed:
        Seed of the node sampler.
    node_wait_timeout:
        Seconds to wait for ``min_available_nodes`` before sampling what is there.
    """

    def __init__(
        self,
        beta: float = 0.25,
        *,
        assumed_byzantine_fraction: float = 0.0,
        step_size: float = 1.0,
        server_objective: Any = None,
        compression: Compressor | str | None = None,
        topk_fraction: float = 0.1,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int = 2,
        max_direction_norm: float | None = None,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 2,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        reply_key: str = "update",
        seed: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not 0.0 <= assumed_byzantine_fraction < 1.0:
            raise ValueError("assumed_byzantine_fraction must be in [0, 1)")
        if not (np.isfinite(step_size) and step_size > 0):
            raise ValueError("step_size must be a positive finite number")
        if not 0 < fraction_train <= 1 or not 0 <= fraction_evaluate <= 1:
            raise ValueError("fraction_train must be in (0, 1] and fraction_evaluate in [0, 1]")
        if min_valid_replies < 1:
            raise ValueError("min_valid_replies must be >= 1")
        if server_objective is not None and not (hasattr(server_objective, "value")
                                                 and hasattr(server_objective, "gradient")):
            raise TypeError("server_objective needs value(w) and gradient(w) methods")
        self.beta = float(beta)
        self.assumed_byzantine_fraction = float(assumed_byzantine_fraction)
        self.step_size = float(step_size)
        self.server_objective = server_objective
        if compression is None:
            compression = Identity()
        elif isinstance(compression, str):
            compression = make_compressor(compression, topk_fraction=topk_fraction)
        self.compressor: Compressor = compression
        self.fraction_train = float(fraction_train)
        self.min_train_nodes = int(min_train_nodes)
        self.min_available_nodes = int(min_available_nodes)
        self.min_valid_replies = int(min_valid_replies)
        self.max_direction_norm = float(max_direction_norm) if max_direction_norm else None
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_evaluate_nodes = int(min_evaluate_nodes)
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.reply_key = reply_key
        self.node_wait_timeout = float(node_wait_timeout)
        self._rng = random.Random(seed)
        #: One report per communication round.
        self.history: list[NewtonRoundReport] = []
        #: Communication rounds used (a round = one broadcast + replies; GIANT uses 2 per iteration).
        self.communication_rounds = 0
        #: Training messages sent in total.
        self.messages_sent = 0
        self._layout: ArrayLayout | None = None
        self._w: np.ndarray | None = None
        self._sampled: list[int] = []
        self._bytes_down = 0
        self._phase = PHASE_DIRECTION
        self._gradient: np.ndarray | None = None
        self._sent: dict[int, Message] = {}
        self._eval_sampled: list[int] = []
        self.warn_if_unprotected()

    # ------------------------------------------------------------------ checks / info
    def warn_if_unprotected(self) -> bool:
        """Log a WARNING (and return True) when beta <= the assumed Byzantine fraction."""
        if self.assumed_byzantine_fraction > 0.0 and self.beta <= self.assumed_byzantine_fraction:
            log(WARNING, "%s: beta=%.3g <= assumed Byzantine fraction %.3g: norm trimming cannot "
                "remove all Byzantine directions (COMRADE needs beta > alpha); the run is NOT "
                "Byzantine-robust", type(self).__name__, self.beta, self.assumed_byzantine_fraction)
            return True
        return False

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> beta=%.3g (assumed Byzantine fraction %.3g), step=%s (%s)",
            self.beta, self.assumed_byzantine_fraction, self.step_size,
            "Armijo on the server objective" if self.server_objective is not None else "fixed")
        log(INFO, "\t├──> compression: %r", self.compressor)
        log(INFO, "\t└──> fraction-train=%.2f, min-valid-replies=%d, max-direction-norm=%s",
            self.fraction_train, self.min_valid_replies, self.max_direction_norm)

    # ------------------------------------------------------------------ sampling
    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Seeded sampling (:func:`sample_nodes`), waiting at most ``node_wait_timeout`` s."""
        return sample_nodes(grid, self._rng, fraction, min_nodes, self.min_available_nodes, self.node_wait_timeout)

    # ------------------------------------------------------------------ messages
    def _iteration(self, server_round: int) -> int:
        return server_round

    def _train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid, phase: str) -> list[Message]:
        layout = self._layout = model_layout(arrays)
        self._w = layout.flatten(arrays, np.float64)
        if not np.isfinite(self._w).all():
            raise ValueError("the model contains non-finite values")
        self._sampled = self._sample(grid, self.fraction_train, self.min_train_nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = int(server_round)
        cfg["newton-phase"] = phase
        cfg["protocol"] = PROTOCOL
        cfg["compression"] = self.compressor.name if phase == PHASE_DIRECTION else "none"
        if phase == PHASE_DIRECTION and hasattr(self.compressor, "k_for"):
            cfg["compression-k"] = int(self.compressor.k_for(layout.size))
        content: dict[str, Any] = {self.arrayrecord_key: arrays, self.configrecord_key: cfg}
        down = record_nbytes(arrays)
        if phase == PHASE_DIRECTION and self._gradient is not None:
            grad = ArrayRecord({"g": Array(self._gradient.astype(np.float64))})
            content["gradient"] = grad
            down += record_nbytes(grad)
        self._bytes_down = down * len(self._sampled)
        if self._sampled:
            self.communication_rounds += 1
        self.messages_sent += len(self._sampled)
        record = RecordDict(content)
        msgs = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(server_round))
                for n in self._sampled]
        self._sent = {int(m.metadata.dst_node_id): m for m in msgs}
        return msgs

    # ------------------------------------------------------------------ validation
    def _decoder(self, phase: str):
        """The payload decoder of ``phase``: the compressor's (directions) or plain ``{"g"}`` (gradients)."""
        assert self._layout is not None
        d = self._layout.size
        codec: Compressor = self.compressor if phase == PHASE_DIRECTION else Identity()

        def decode(record: ArrayRecord) -> np.ndarray:
            payload = {k: a.numpy() for k, a in record.items()}
            if phase == PHASE_GRADIENT:
                if set(payload) != {"g"}:
                    raise ValueError(f"gradient reply must hold exactly array 'g', got {sorted(payload)}")
                payload = {"p": payload["g"]}
            for key, arr in payload.items():
                if np.iscomplexobj(arr):
                    raise ValueError(f"array '{key}' is complex")
            return codec.decode(payload, d)

        return decode

    def _screen(self, replies: Iterable[Message], server_round: int, phase: str) -> ScreenedReplies:
        """Shared reply screening (:func:`screen_replies`) with this phase's decoder and echo check."""
        assert self._layout is not None
        codec: Compressor = self.compressor if phase == PHASE_DIRECTION else Identity()
        policy = ReplyPolicy(reply_key=self.reply_key, max_norm=self.max_direction_norm, max_norm_ratio=None,
                             max_bytes=2 * codec.expected_nbytes(self._layout.size) + 4096,
                             max_abs_value=FLOAT32_MAX)
        sent_ids = {}
        for node, msg in self._sent.items():
            try:
                sent_ids[node] = str(msg.metadata.message_id or "")
            except Exception:  # pylint: disable=broad-except
                sent_ids[node] = ""
        screened = screen_replies(replies, self._sampled, self._layout, server_round, policy,
                                  sent_message_ids=sent_ids, decode=self._decoder(phase))
        for node, metrics in list(zip(screened.node_ids, screened.metrics)):
            echoed = metrics.get("phase-id")
            if echoed is not None and echoed != PHASE_IDS[phase]:
                screened.reject(node, "stale", f"reply for phase id {echoed!r}, current phase is {phase!r} "
                                               f"({PHASE_IDS[phase]})")
        log_rejections(screened, server_round, phase)
        return screened

    # ------------------------------------------------------------------ aggregation
    def _direction_round(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, NewtonRoundReport]:
        """Screen directions, trim, step (Algorithm 1, center machine)."""
        assert self._layout is not None and self._w is not None
        screened = self._screen(replies, server_round, PHASE_DIRECTION)
        nodes, vecs, mets = screened.node_ids, screened.vectors, screened.metrics
        rejected, bytes_up = dict(screened.rejected), screened.bytes_up
        rhos = [float(m["rho-empirical"]) for m in mets if _is_rho(m.get("rho-empirical"))]
        report = NewtonRoundReport(
            server_round=server_round, iteration=self._iteration(server_round), phase=PHASE_DIRECTION,
            sampled=list(self._sampled), valid=list(nodes), kept=[], trimmed=[], rejected=rejected,
            bytes_up=bytes_up, bytes_down=self._bytes_down, rho=float(self.compressor.rho(self._layout.size)),
            rho_empirical_min=min(rhos) if rhos else float("nan"), step=0.0, applied=False,
            num_kept_expected=num_kept(len(nodes), self.beta) if nodes else 0,
            partition_ids={n: int(m["partition-id"]) for n, m in zip(nodes, mets)
                           if isinstance(m.get("partition-id"), int)},
        )
        P = np.stack(vecs) if vecs else np.zeros((0, self._layout.size))
        try:
            res = newton_step(self._w, P, self.beta, step_size=self.step_size,
                              server_objective=self.server_objective, min_valid=self.min_valid_replies)
        except Exception as exc:  # pylint: disable=broad-except
            report.reason = f"aggregation failed: {type(exc).__name__}: {one_line(exc)}"
            log(WARNING, "round %d: %s; model left unchanged", server_round, report.reason)
            return None, report
        report.kept = [int(nodes[i]) for i in res.kept]  # node ids may exceed int64: no numpy here
        report.trimmed = [int(nodes[i]) for i in res.trimmed]
        report.step = float(res.step)
        report.applied = bool(res.applied)
        report.reason = res.reason
        report.direction_norm = float(np.linalg.norm(res.p_hat))
        if not res.applied:
            log(WARNING, "round %d: %s; model left unchanged", server_round, res.reason)
            return None, report
        self._w = res.w
        return self._layout.unflatten(res.w), report

    def round_summary(self, server_round: int) -> str:
        """The iteration's communication round(s) in one line (valid, kept, trimmed node ids, step, traffic)."""
        parts = []
        for r in (rep for rep in self.history if rep.iteration == server_round):
            line = f"{r.phase}: {len(r.valid)}/{len(r.sampled)} valid"
            if r.rejected:
                line += f" ({len(r.rejected)} rejected)"
            if r.trimmed:
                line += f", trimmed nodes {r.trimmed} (claimed partitions {[r.partition_ids.get(n) for n in r.trimmed]})"
            if r.phase == PHASE_DIRECTION:
                line += (f", step {r.step:.3g}, |p_hat| {r.direction_norm:.3g}, rho {r.rho:.3g}"
                         if r.applied else f", model unchanged ({r.reason})")
            parts.append(line + f", bytes up {r.bytes_up} down {r.bytes_down}")
        return "; ".join(parts) or "no training report"

    def final_summary(self) -> str:
        """Communication rounds, messages, nodes trimmed at least once, traffic."""
        trimmed = sorted({n for r in self.history for n in r.trimmed})
        return (f"{self.communication_rounds} communication rounds, {self.messages_sent} messages, nodes trimmed "
                f"at least once: {trimmed}, bytes up {sum(r.bytes_up for r in self.history)} "
                f"down {sum(r.bytes_down for r in self.history)}")

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation (only if ``fraction_evaluate > 0``)."""
        self._eval_sampled = []
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self._eval_sampled = list(nodes)
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = int(server_round)
        cfg["protocol"] = PROTOCOL
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n, group_id=str(server_round))
                for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Median of each numeric metric over the valid replies, with a quorum (:func:`median_metrics`)."""
        votes = evaluate_votes(replies, self._eval_sampled, server_round)
        out = median_metrics(votes, voters=len(self._eval_sampled))
        return MetricRecord(out) if out else None

    # ------------------------------------------------------------------ state
    @property
    def current_model(self) -> np.ndarray | None:
        """The server's current flattened model w_t (float64), or None before the first round."""
        return None if self._w is None else self._w.copy()


class Comrade(NewtonStrategyBase):
    """COMRADE (Ghosh, Maity & Mazumdar 2020, Algorithm 1): one round per Newton iteration.

    Drop-in for ``FedAvg`` in a ServerApp (the model is one float64 array ``"w"``)::

        strategy = Comrade(beta=0.25, assumed_byzantine_fraction=0.2)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(d))}),
                                num_rounds=10, evaluate_fn=central_eval)

    See :class:`NewtonStrategyBase` for the parameters.  ``beta=0`` is the non-robust one-round
    variant (plain average of the local Newton directions).
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Broadcast w_t: exactly one message per sampled client."""
        self._gradient = None
        return self._train_messages(server_round, arrays, config, grid, PHASE_DIRECTION)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, trim to the ceil((1 - beta) m) smallest-norm directions, step."""
        if self._layout is None or self._w is None:
            log(WARNING, "aggregate_train called before configure_train; skipping round %d", server_round)
            return None, None
        arrays, report = self._direction_round(server_round, replies)
        self.history.append(report)
        return arrays, report.metric_record({"communication-rounds": self.communication_rounds})


def _is_rho(val: Any) -> bool:
    """A plausible empirical rho: a finite real in [0, 1] (anything else a client reports is ignored)."""
    return isinstance(val, (int, float)) and not isinstance(val, bool) and 0.0 <= float(val) <= 1.0


def make_evaluate_fn(objective: Any, test_objective: Any = None, w_star: np.ndarray | None = None,
                     key: str = "w") -> Callable[[int, ArrayRecord], MetricRecord]:
    """Central ``evaluate_fn`` for ``strategy.start``: training loss, test loss/accuracy, ||w - w*||."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        w = arrays[key].numpy().astype(np.float64).ravel()
        out: dict[str, Any] = {"train-loss": float(objective.value(w))}
        if test_objective is not None:
            out["loss"] = float(test_objective.value(w))
            if hasattr(test_objective, "accuracy"):
                out["accuracy"] = float(test_objective.accuracy(w))
        if w_star is not None:
            out["dist-to-opt"] = float(np.linalg.norm(w - w_star))
        return MetricRecord(out)

    return evaluate

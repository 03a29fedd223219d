"""``OmniscientAdversary``: a server-side, colluding, omniscient (and possibly mobile) attacker.

The threat model of Data & Diggavi (Section 2.1): the Byzantine workers collude,
know the algorithm, *see every honest gradient of the round* and may send
anything or nothing; a mobile adversary picks a different corrupt set every
round, but must fix it before it sees that round's gradients.  A client-side
attacker (``clients/client_app.py``) can only estimate the honest statistics from
its own data; this wrapper gives the attack the real ones.

It wraps any Message-API :class:`~flwr.serverapp.strategy.Strategy` (normally
:class:`~flwr_byzantine.strategies.RobustSGD`) and every client stays honest:

1. ``configure_train``: the wrapped strategy builds the round's messages; the
   corrupt set ``adversary.corrupt_set(server_round, sampled_node_ids)`` is fixed
   now, before any gradient of the round exists, and the messages are kept.
2. ``aggregate_train``: the replies of the honest (non-corrupt) nodes are decoded
   (the ``reply_key`` ``ArrayRecord`` flattened in key order: the full gradient,
   or with randk the ``"values"`` array of length k), stacked as ``honest``
   ``(n_h, d)``, and ``attack.craft(honest, f, server_round)`` crafts the ``f``
   corrupt rows.  Every reply of a corrupt node is discarded and replaced by
   ``Message(RecordDict({reply_key: crafted row, <metric records>}), reply_to=<the
   train message sent to that node>)`` with the honest replies' keys, shapes and
   dtypes (so it also stands in for a corrupt node that did not answer).  The
   metric records are the corrupt node's own (if it answered) or an honest
   template's without ``partition-id``.  If the attack erases (``craft`` returns
   ``None``) the corrupt nodes' replies are dropped: the wrapped strategy sees
   them as missing.  The wrapped strategy then aggregates as usual.

The per-round record (:class:`AdversaryRound`) is appended to :attr:`history`;
the wrapped strategy's own history stays at ``wrapper.strategy.history``.
Evaluation messages pass through untouched.  Unknown attributes are looked up on
the wrapped strategy.

Example::

    from flwr_byzantine.attacks import MobileAdversary, make_attack
    from flwr_byzantine.strategies import RobustSGD
    from flwr_byzantine.strategies.omniscient import OmniscientAdversary

    strategy = OmniscientAdversary(
        RobustSGD(learning_rate=0.1),
        attack=make_attack("alie"),
        adversary=MobileAdversary(num_byzantine=4, seed=0, mode="random"),
    )
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=50)
    strategy.history[-1].corrupt, strategy.strategy.history[-1].filtered
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..attacks import MobileAdversary, UpdateAttack, make_attack
from .loop import RoundLoop
from .records import ArrayLayout

_Layout = tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]


@dataclass
class AdversaryRound:
    """What the omniscient adversary did in one training round (kept in ``OmniscientAdversary.history``).

    Attributes
    ----------
    server_round:
        The round.
    sampled:
        Node ids the wrapped strategy sent a train message to.
    corrupt:
        The corrupt set, fixed in ``configure_train`` (sorted).
    honest:
        Honest nodes whose decoded reply the attack saw (rows of ``honest``, in this order).
    crafted:
        Corrupt nodes that sent a crafted reply.
    erased:
        Corrupt nodes whose reply was dropped (erasure attack, or nothing to craft from).
    replaced:
        Corrupt nodes whose genuine reply was discarded.
    info:
        Attack diagnostics (e.g. ``gamma`` of defence-aware, ``target`` of mimic, or why it erased).
    """

    server_round: int
    sampled: list[int]
    corrupt: list[int]
    honest: list[int] = field(default_factory=list)
    crafted: list[int] = field(default_factory=list)
    erased: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return dict(vars(self))


class OmniscientAdversary(RoundLoop, Strategy):
    """Strategy wrapper that replaces the corrupt nodes' replies with an omniscient attack.

    Parameters
    ----------
    strategy:
        The wrapped strategy (every method is delegated to it).
    attack:
        A model-update attack (:class:`~flwr_byzantine.attacks.UpdateAttack`, or a
        registry name for ``make_attack``).  Data-poisoning attacks are client-side only.
    adversary:
        Who is corrupt in each round: a :class:`~flwr_byzantine.attacks.MobileAdversary`
        (``mode='static'`` for a fixed set, ``'random'``/``'rotate'`` for a mobile one).
    reply_key:
        Key of the ``ArrayRecord`` holding a client's vector in a train reply.
    """

    def __init__(
        self,
        strategy: Strategy,
        attack: UpdateAttack | str,
        adversary: MobileAdversary,
        reply_key: str = "gradient",
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr Strategy, got {type(strategy).__name__}")
        if isinstance(attack, str):
            attack = make_attack(attack)
        if not isinstance(attack, UpdateAttack):
            raise TypeError(f"attack must be a model-update attack (UpdateAttack), got {type(attack).__name__}; "
                            "data-poisoning attacks run on the clients")
        if not callable(getattr(adversary, "corrupt_set", None)):
            raise TypeError(f"adversary must have a corrupt_set(round, node_ids) method, got {adversary!r}")
        self.strategy = strategy
        self.attack = attack
        self.adversary = adversary
        self.reply_key = reply_key
        self.history: list[AdversaryRound] = []
        self._round: int | None = None
        self._sent: dict[int, Message] = {}
        self._corrupt: list[int] = []

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper itself
        if name.startswith("__") or "strategy" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["strategy"], name)

    # ------------------------------------------------------------------ info
    def summary(self) -> None:
        """Log the adversary, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Omniscient adversary: attack=%r, adversary=%r", self.attack, self.adversary)
        self.strategy.summary()

    def round_summary(self, server_round: int) -> str:
        """The wrapped strategy's round line, prefixed with what the adversary did this round."""
        inner = self.strategy.round_summary(server_round) if isinstance(self.strategy, RoundLoop) else ""
        rec = next((r for r in reversed(self.history) if r.server_round == server_round), None)
        did = ""
        if rec is not None and (rec.crafted or rec.erased):
            did = f" ({self.attack.name}: crafted {rec.crafted})" if rec.crafted else f" (erased {rec.erased})"
        return f"corrupt nodes {self.corrupt_nodes(server_round)}{did}; {inner}"

    def undefended_arrays(self, server_round: int) -> ArrayRecord | None:
        """The wrapped strategy's plain-mean counterfactual (it saw the tampered replies)."""
        return self.strategy.undefended_arrays(server_round) if isinstance(self.strategy, RoundLoop) else None

    def final_summary(self) -> str:
        """The wrapped strategy's final summary."""
        return self.strategy.final_summary() if isinstance(self.strategy, RoundLoop) else ""

    def corrupt_nodes(self, server_round: int) -> list[int]:
        """The corrupt set recorded for ``server_round`` (empty if that round was not configured)."""
        for rec in reversed(self.history):
            if rec.server_round == server_round:
                return list(rec.corrupt)
        if self._round == server_round:
            return list(self._corrupt)
        return []

    # -------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, keep the messages, and fix this round's corrupt set before any gradient exists."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {int(m.metadata.dst_node_id): m for m in messages}
        self._round = server_round
        self._corrupt = sorted(int(n) for n in self.adversary.corrupt_set(server_round, sorted(self._sent)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replace the corrupt nodes' replies by crafted ones, then delegate."""
        replies = list(replies)
        if self._round != server_round:
            log(WARNING, "omniscient adversary: round %d was not configured through the wrapper; "
                "replies passed through untouched", server_round)
            return self.strategy.aggregate_train(server_round, replies)
        replies = self.tamper(server_round, replies)
        return self.strategy.aggregate_train(server_round, replies)

    def tamper(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies the wrapped strategy sees in ``server_round`` (records an :class:`AdversaryRound`)."""
        corrupt = set(self._corrupt)
        rec = AdversaryRound(server_round=server_round, sampled=sorted(self._sent), corrupt=list(self._corrupt))
        passed: list[Message] = []
        own: dict[int, Message] = {}
        candidates: list[tuple[int, Message]] = []
        for msg in replies:
            node = _sender(msg)
            if node is not None and node in corrupt:
                own.setdefault(node, msg)
                if node not in rec.replaced:
                    rec.replaced.append(node)
                continue
            passed.append(msg)
            if node is not None and node in self._sent:
                candidates.append((node, msg))
        rec.replaced.sort()
        if not corrupt:
            self.history.append(rec)
            return passed

        decoded = [(node, msg, rc) for node, msg in candidates if (rc := self._record(msg, server_round)) is not None]
        layout_key = _majority_layout([rc for _, _, rc in decoded])
        if layout_key is None:  # no usable honest reply: fall back to the corrupt nodes' own gradients
            decoded = [(node, msg, rc) for node, msg in sorted(own.items())
                       if (rc := self._record(msg, server_round)) is not None]
            layout_key = _majority_layout([rc for _, _, rc in decoded])
            if layout_key is not None:
                rec.info["knowledge"] = "corrupt nodes' own gradients (no usable honest reply)"
        if layout_key is None:
            rec.erased = sorted(corrupt)
            rec.info["reason"] = "no decodable reply to craft from"
            log(WARNING, "omniscient adversary: round %d, nothing to craft from; corrupt replies dropped",
                server_round)
            self.history.append(rec)
            return passed

        decoded = [(node, msg, rc) for node, msg, rc in decoded if _layout_key(rc) == layout_key]
        layout = ArrayLayout.of(decoded[0][2])
        dtype = np.result_type(*[np.dtype(dt) for dt in layout.dtypes])
        rows, nodes, templates = [], [], []
        for node, msg, rc in decoded:
            vec = layout.flatten(rc, dtype)
            if np.isfinite(vec).all():
                rows.append(vec)
                nodes.append(node)
                templates.append(msg)
        if "knowledge" not in rec.info:
            rec.honest = nodes
        targets = sorted(corrupt)
        crafted = self.attack.craft(np.stack(rows), len(targets), server_round) if rows else None
        self._diagnostics(rec)
        if crafted is None:
            rec.erased = targets
            if not rows:
                rec.info["reason"] = "no finite reply to craft from"
            self.history.append(rec)
            return passed
        crafted = np.asarray(crafted)
        template = templates[0]
        for i, node in enumerate(targets):
            payload = layout.unflatten(np.asarray(crafted[i], dtype=np.float64))
            content = RecordDict({self.reply_key: payload})
            for key, mrec in _metric_records(own.get(node), template).items():
                content[key] = mrec
            passed.append(Message(content, reply_to=self._sent[node]))
            rec.crafted.append(node)
        self.history.append(rec)
        return passed

    def _record(self, msg: Message, server_round: int) -> ArrayRecord | None:
        """The vector record of a usable reply, else ``None`` (errors, missing key, other round)."""
        try:
            if msg.has_error():
                return None
            content = msg.content
            if self.reply_key not in content.array_records:
                return None
            for mrec in content.metric_records.values():
                echoed = mrec.get("server-round")
                if echoed is not None and echoed != server_round:
                    return None
            rc = content.array_records[self.reply_key]
            if len(rc) == 0:
                return None
            for arr in rc.values():
                if not np.issubdtype(arr.numpy().dtype, np.floating):
                    return None
            return rc
        except Exception:  # pylint: disable=broad-except  # a malformed reply is simply not used
            return None

    def _diagnostics(self, rec: AdversaryRound) -> None:
        for attr, key in (("last_gamma", "gamma"), ("last_target", "target")):
            val = getattr(self.attack, attr, None)
            if isinstance(val, (int, float)) and not isinstance(val, bool) and np.isfinite(val):
                rec.info[key] = float(val) if key == "gamma" else int(val)

    # ------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated unchanged."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegated unchanged."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def _sender(msg: Message) -> int | None:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:  # pylint: disable=broad-except
        return None


def _layout_key(rc: ArrayRecord) -> _Layout:
    keys = tuple(rc.keys())
    return keys, tuple(tuple(int(s) for s in rc[k].shape) for k in keys)


def _majority_layout(records: list[ArrayRecord]) -> _Layout | None:
    """The most common (keys, shapes) among the records (first seen wins ties), or None."""
    if not records:
        return None
    counts = Counter(_layout_key(rc) for rc in records)
    best = max(counts.values())
    return next(k for k in (_layout_key(rc) for rc in records) if counts[k] == best)


def _metric_records(own: Message | None, template: Message) -> dict[str, MetricRecord]:
    """The metric records of a crafted reply: the corrupt node's own, else the template's without partition-id."""
    if own is not None:
        try:
            if not own.has_error() and own.content.metric_records:
                return {k: MetricRecord(dict(v)) for k, v in own.content.metric_records.items()}
        except Exception:  # pylint: disable=broad-except
            pass
    out = {}
    for key, mrec in template.content.metric_records.items():
        out[key] = MetricRecord({k: v for k, v in mrec.items() if k != "partition-id"})
    return out


__all__ = ["AdversaryRound", "OmniscientAdversary"]

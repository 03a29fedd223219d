"""Screening of client replies before aggregation: hostile input never reaches the model.

Every reply is checked and either decoded into a vector or rejected with a reason
and a *kind* (counted per kind in the round's metrics):

============  ==================================================================
kind          cases
============  ==================================================================
no-reply      a sampled node did not answer (timeout, crash, churn)
error         the reply is an error message
sender        reply without a sender id, from a node that was not sampled this
              round, or a second reply from the same node (both are dropped)
stale         reply to another message / another round (message id, group id or
              echoed ``server-round``), or of the wrong message type
format        missing or extra records, wrong array keys (count), shapes, dtypes
              (anything but real floating point: int, bool, complex, strings...),
              undecodable arrays, oversized payloads, garbage metric records
non-finite    NaN or +-Inf entries
magnitude     entries not representable in the aggregation dtype (float32),
              norm above ``max-update-norm``, or norm more than
              ``max_norm_ratio`` times the round's median reply norm
============  ==================================================================

A rejected or missing reply is an *erasure* in the sense of Data & Diggavi,
Section 2.1: the server knows it and leaves it out.  Nothing here raises on
client input.  Client metrics are passed on only after :func:`clean_metrics`:
finite int/float scalars and short numeric lists; anything else is dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType
from flwr.supercore import log

from .records import ArrayLayout

#: Slack allowed over the expected payload size (npy headers, small arrays).
_HEADER_SLACK = 64 * 1024

#: Largest magnitude the aggregators' float32 matrix can hold.
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Rejection kinds, in reporting order.
REJECTION_KINDS = ("no-reply", "error", "sender", "stale", "format", "non-finite", "magnitude")

#: Client metric lists longer than this are dropped (nobody needs them, attackers could bloat logs).
MAX_METRIC_LIST = 64

#: Largest integer metric passed on (uint64 node ids fit; bigger ints are garbage).
MAX_METRIC_INT = 2**64

#: Longest client-provided text (error reason, key, id) that reaches a log line or a results file.
MAX_TEXT = 200

#: Longest client metric name passed on (longer names, or names with control characters, are dropped).
MAX_KEY = 64

#: A decoder turns the reply's ``ArrayRecord`` into the flat float64 vector (raises ValueError).
Decoder = Callable[[ArrayRecord], np.ndarray]


def one_line(text: Any, limit: int = MAX_TEXT) -> str:
    """``str(text)`` made safe for one log line: control characters escaped, at most ``limit`` chars.

    Newlines, carriage returns, ANSI escapes and every other non-printable character become
    their ``\\x..`` / ``\\u....`` escapes, so a client cannot forge a line of the server's log;
    longer text is cut and ends with ``...(+N chars)``.  Never raises.
    """
    try:
        raw = text if isinstance(text, str) else str(text)
    except Exception:  # pylint: disable=broad-except
        raw = f"<unprintable {type(text).__name__}>"
    head = raw[: limit + 1]
    safe = "".join(c if c.isprintable() and c not in "\u2028\u2029" else ascii(c)[1:-1] for c in head)
    if len(raw) > limit or len(safe) > limit:
        return safe[:limit] + f"...(+{max(len(raw) - limit, 1)} chars)"
    return safe


@dataclass
class ReplyPolicy:
    """What a valid training reply looks like.

    Attributes
    ----------
    reply_key:
        Key of the ``ArrayRecord`` holding the client's vector.
    max_norm:
        Reject vectors whose l2 norm exceeds this (``None``/0: no limit).
    max_bytes:
        Reject replies whose arrays exceed this many bytes (default: twice the
        float64 size of the expected payload plus a small header slack).
    max_abs_value:
        Reject vectors with an entry larger than this in magnitude (default: the
        float32 maximum, since the aggregators work on a float32 matrix).
    max_norm_ratio:
        Reject vectors whose norm exceeds this multiple of the lower median of the
        non-zero norms of the round's otherwise valid replies (needs at least 3 of
        them; zero replies do not count, so they cannot switch the guard off;
        ``None``/0: off).  A scale-free guard against absurd magnitudes
        that would wreck the aggregator's float32 arithmetic; honest mini-batch
        gradients differ in norm by far less than the default factor 1e6.
    message_type:
        Required message type of a reply (``None``: not checked).
    origin:
        If set, replies carry a *model* w (FedAvg's protocol) and the screened
        vector is the model update ``origin - w`` (origin = the round's x_t);
        the magnitude checks apply to that update.  ``None``: the reply is the vector.
    format_hints:
        ``{record name: hint}``: a reply that lacks ``reply_key`` but carries this
        record is rejected with the hint appended (it names the right strategy).
    """

    reply_key: str = "gradient"
    max_norm: float | None = None
    max_bytes: int | None = None
    max_abs_value: float = FLOAT32_MAX
    max_norm_ratio: float | None = 1e6
    message_type: str | None = MessageType.TRAIN
    origin: np.ndarray | None = None
    format_hints: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ScreenedReplies:
    """Outcome of :func:`screen_replies` for one round."""

    node_ids: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    #: Why the replies could not all be read ("" if they could).
    read_error: str = ""

    def matrix(self, dtype: type = np.float32) -> np.ndarray:
        """The accepted vectors stacked as an ``(R, d)`` array."""
        return np.stack(self.vectors).astype(dtype, copy=False)

    def reject(self, node: int, kind: str, reason: str) -> None:
        """Record (or overwrite) the rejection of ``node``; drops its accepted reply if any."""
        if node in self.node_ids:
            i = self.node_ids.index(node)
            for lst in (self.node_ids, self.vectors, self.metrics):
                lst.pop(i)
        self.rejected[node] = one_line(reason, 2 * MAX_TEXT)
        self.kinds[node] = kind

    def counts(self) -> dict[str, int]:
        """Number of rejections per kind (every kind present, zeros included)."""
        c = Counter(self.kinds.values())
        return {kind: int(c.get(kind, 0)) for kind in REJECTION_KINDS}


class Rejected(Exception):
    """A reply failed screening: ``kind`` (see the module table) and a readable reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(one_line(reason, 2 * MAX_TEXT))
        self.kind = kind


def finite_number(val: Any) -> float | None:
    """``float(val)`` if ``val`` is a finite real int/float scalar (not bool), else None."""
    if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)):
        return None
    if isinstance(val, (int, np.integer)) and abs(int(val)) > MAX_METRIC_INT:
        return None
    try:
        out = float(val)
    except (OverflowError, ValueError, TypeError):
        return None
    return out if math.isfinite(out) else None


def clean_metrics(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Client metrics reduced to what the server may use: finite numbers and short numeric lists.

    Integers stay integers (node/partition ids, round echoes), non-finite floats
    become NaN (so "present but garbage" stays visible), anything else is dropped,
    and so is every metric whose name has control characters or more than
    :data:`MAX_KEY` characters (names reach log lines and results files).
    Never raises.
    """
    out: dict[str, Any] = {}
    try:
        items = list(raw.items())
    except Exception:  # pylint: disable=broad-except
        return out
    for key, val in items:
        if not isinstance(key, str) or one_line(key, MAX_KEY) != key:
            continue  # control characters or an absurd length: a log-forging attempt, not a metric
        if isinstance(val, (int, np.integer)) and not isinstance(val, bool):
            if abs(int(val)) <= MAX_METRIC_INT:
                out[key] = int(val)
        elif isinstance(val, (float, np.floating)):
            out[key] = float(val) if math.isfinite(float(val)) else float("nan")
        elif isinstance(val, (list, tuple)) and len(val) <= MAX_METRIC_LIST:
            nums = [finite_number(v) for v in val]
            if all(v is not None for v in nums):
                out[key] = nums
    return out


def _metric_dict(msg: Message) -> dict[str, Any]:
    records = list(msg.content.metric_records.values())
    if len(records) > 1:
        raise Rejected("format", f"expected at most one MetricRecord, got {len(records)}")
    return clean_metrics(records[0]) if records else {}


def decode_reply(
    msg: Message,
    layout: ArrayLayout,
    server_round: int,
    policy: ReplyPolicy,
    sent_message_id: str = "",
    decode: Decoder | None = None,
) -> tuple[np.ndarray, dict[str, Any], int]:
    """Decode one reply into ``(vector float64, metrics, payload bytes)`` or raise :class:`Rejected`.

    ``decode`` turns the reply's ArrayRecord into the vector (default: the arrays of
    ``layout``, flattened); it raises ``ValueError`` on a malformed payload.  The payload
    bytes are those actually received (``len`` of every array's data), never a declared shape.
    """
    if msg.has_error():
        try:
            code, reason = msg.error.code, msg.error.reason
        except Exception:  # pylint: disable=broad-except
            code, reason = "?", "?"
        raise Rejected("error", f"error reply (code {one_line(code, 20)}): {one_line(reason)}")
    meta = msg.metadata
    if sent_message_id and meta.reply_to_message_id and meta.reply_to_message_id != sent_message_id:
        raise Rejected("stale", f"reply to message {one_line(meta.reply_to_message_id, 80)!r}, "
                                "not to this round's message")
    if meta.group_id != str(server_round):
        raise Rejected("stale", f"reply for round (group) {one_line(meta.group_id, 40)!r}, "
                                f"current round is {server_round}")
    if policy.message_type is not None and meta.message_type != policy.message_type:
        raise Rejected("stale", f"reply of type {one_line(meta.message_type, 40)!r}, expected {policy.message_type!r}")
    content = msg.content
    arecs = content.array_records
    if policy.reply_key not in arecs:
        hints = [hint for key, hint in policy.format_hints.items() if key in arecs]
        raise Rejected("format", f"missing ArrayRecord '{policy.reply_key}' (got {sorted(arecs)})"
                                 + "".join(f": {hint}" for hint in hints[:1]))
    if len(arecs) != 1:
        raise Rejected("format", f"expected exactly one ArrayRecord, got {sorted(arecs)}")
    crecs = content.config_records
    if len(crecs) != 0:
        raise Rejected("format", f"unexpected ConfigRecord(s) {sorted(crecs)} in a training reply")
    record = arecs[policy.reply_key]
    nbytes = int(sum(len(a.data) for a in record.values()))
    limit = policy.max_bytes if policy.max_bytes else 2 * 8 * layout.size + _HEADER_SLACK
    if nbytes > limit:
        raise Rejected("format", f"oversized payload: {nbytes} bytes > limit {limit}")
    for key, arr in record.items():
        if not _declared_size_matches(arr):
            raise Rejected("format", f"array {one_line(key, 40)!r}: declared shape/dtype do not match its "
                                     f"{len(arr.data)} data bytes")
    if decode is None and set(record.keys()) != set(layout.keys):
        raise Rejected("format", f"array keys {sorted(record.keys())} != expected {sorted(layout.keys)} "
                                 f"({len(record.keys())} arrays, expected {len(layout.keys)})")
    metrics = _metric_dict(msg)
    if "server-round" in metrics:
        echoed = metrics["server-round"]
        if isinstance(echoed, bool) or not isinstance(echoed, (int, float)) or echoed != server_round:
            raise Rejected("stale", f"reply for round {echoed}, current round is {server_round}")
    try:
        vec = layout.flatten(record, np.float64) if decode is None else np.asarray(decode(record), dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise Rejected("format", str(exc)) from None
    if vec.shape != (layout.size,):
        raise Rejected("format", f"decoded vector has shape {vec.shape}, expected ({layout.size},)")
    finite = np.isfinite(vec)
    if not finite.all():
        raise Rejected("non-finite", f"non-finite values ({int((~finite).sum())} of {vec.size})")
    if policy.origin is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            vec = np.asarray(policy.origin, dtype=np.float64) - vec  # model w -> update x_t - w
        if not np.isfinite(vec).all():
            raise Rejected("magnitude", "absurd magnitude: the model update overflows")
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    if peak > policy.max_abs_value:
        raise Rejected("magnitude", f"absurd magnitude: entry {peak:.3g} exceeds {policy.max_abs_value:.3g}")
    if policy.max_norm:
        norm = float(np.linalg.norm(vec))
        if not norm <= policy.max_norm:
            raise Rejected("magnitude", f"norm {norm:.3g} exceeds max-update-norm {policy.max_norm:.3g}")
    return vec, metrics, nbytes


def _declared_size_matches(arr: Any) -> bool:
    """Whether an Array's declared shape x dtype fits the bytes it carries (npy header aside)."""
    try:
        declared = math.prod(int(n) for n in arr.shape) * np.dtype(arr.dtype).itemsize
        return declared <= len(arr.data) <= declared + _HEADER_SLACK
    except Exception:  # pylint: disable=broad-except
        return False


def norm_ratio_outliers(vectors: list[np.ndarray], max_norm_ratio: float) -> tuple[np.ndarray, float, list[int]]:
    """``(norms, reference, indices)`` of the round's vectors whose norm exceeds ``max_norm_ratio x reference``.

    The reference is the lower median of the *non-zero* norms (0 and no outliers with fewer than
    3 vectors or 3 non-zero norms): all-zero replies (cheap to send, and honest at a stationary
    point) must not drag it to 0 and switch the guard off for everybody else, and two absurd
    replies among four non-zero ones must not set it.
    """
    norms = np.array([_stable_norm(v) for v in vectors])
    if len(vectors) < 3:
        return norms, 0.0, []
    positive = np.sort(norms[norms > 0.0])
    median = float(positive[(positive.size - 1) // 2]) if positive.size >= 3 else 0.0
    if median <= 0.0:
        return norms, median, []
    return norms, median, [i for i, v in enumerate(norms) if v > max_norm_ratio * median]


def _stable_norm(vec: np.ndarray) -> float:
    """l2 norm without overflow (entries are finite float64, possibly ~1e38)."""
    scale = float(np.max(np.abs(vec))) if vec.size else 0.0
    if scale == 0.0:
        return 0.0
    return scale * float(np.linalg.norm(vec / scale))


def _errored_node(msg: Message, node_of_message: Mapping[str, int], default: int) -> int:
    """The sampled node an *error* reply stands for, found by the message it answers.

    The SuperLink answers for a node that is unavailable (code ``NODE_UNAVAILABLE``)
    or a message that expired with an error message whose sender is the SuperLink
    itself (node id 1), not the node: such a reply is that node's erasure, not a
    foreign sender.  Only error replies are mapped; content from another sender is not.
    """
    try:
        if msg.has_error():
            return int(node_of_message.get(str(msg.metadata.reply_to_message_id), default))
    except Exception:  # pylint: disable=broad-except
        pass
    return default


def screen_replies(
    replies: Iterable[Message],
    expected_nodes: Iterable[int],
    layout: ArrayLayout,
    server_round: int,
    policy: ReplyPolicy,
    sent_message_ids: Mapping[int, str] | None = None,
    decode: Decoder | None = None,
) -> ScreenedReplies:
    """Validate all replies of a round; sampled nodes that did not answer are erasures.

    ``sent_message_ids`` maps each sampled node to the id of the message it was
    sent (when the Grid assigned one): a reply to any other message is stale.
    ``decode``: see :func:`decode_reply`.  A ``replies`` iterable that raises part
    way is read up to the failure (``out.read_error`` says why); nothing escapes.
    """
    expected = set(int(n) for n in expected_nodes)
    sent_ids = dict(sent_message_ids or {})
    node_of_message = {mid: n for n, mid in sent_ids.items() if mid}
    out = ScreenedReplies()
    seen: set[int] = set()
    anonymous = 0
    for msg in _read_all(replies, out):
        try:
            node = int(msg.metadata.src_node_id)
        except Exception as exc:  # pylint: disable=broad-except
            anonymous += 1
            out.reject(-anonymous, "sender", f"reply without a sender id ({type(exc).__name__})")
            continue
        if node not in expected:
            node = _errored_node(msg, node_of_message, node)
        try:
            if node not in expected:
                raise Rejected("sender", "reply from a node that was not sampled this round")
            if node in seen:
                # A second reply poisons the first too: the sender is misbehaving.
                raise Rejected("sender", "duplicate reply from the same node")
            seen.add(node)
            vec, metrics, nbytes = decode_reply(msg, layout, server_round, policy, sent_ids.get(node, ""), decode)
            out.bytes_up += nbytes
            out.node_ids.append(node)
            out.vectors.append(vec)
            out.metrics.append(metrics)
        except Rejected as rej:
            out.reject(node, rej.kind, str(rej))
        except Exception as exc:  # pylint: disable=broad-except
            out.reject(node, "format", f"malformed reply: {type(exc).__name__}: {one_line(exc)}")
    if policy.max_norm_ratio:
        norms, median, absurd = norm_ratio_outliers(out.vectors, policy.max_norm_ratio)
        for node, norm in [(out.node_ids[i], norms[i]) for i in absurd]:
            out.reject(node, "magnitude", f"absurd magnitude: norm {norm:.3g} is more than "
                                          f"{policy.max_norm_ratio:.3g} x the round's median norm {median:.3g}")
    for node in sorted(expected - seen):
        out.reject(node, "no-reply", "no reply (erasure)")
    return out


def _read_all(replies: Iterable[Message], out: "ScreenedReplies") -> list[Message]:
    """The replies as a list; an iterable that raises is read up to the failure (noted in ``out``)."""
    got: list[Message] = []
    try:
        for msg in replies:
            got.append(msg)
    except Exception as exc:  # pylint: disable=broad-except
        out.read_error = f"replies could not be read completely ({type(exc).__name__}: {one_line(exc)})"
    return got


def log_rejections(screened: ScreenedReplies, server_round: int, label: str = "") -> None:
    """One WARNING per distinct (kind, reason), listing the nodes (not one line per node).

    Reasons are already single-line and truncated (:func:`one_line`), so a client cannot
    forge log lines through them.
    """
    where = f"round {server_round}{f' ({label})' if label else ''}"
    if screened.read_error:
        log(WARNING, "%s: %s", where, screened.read_error)
    groups: dict[tuple[str, str], list[int]] = {}
    for node, reason in sorted(screened.rejected.items()):
        groups.setdefault((screened.kinds.get(node, "?"), reason), []).append(node)
    for (kind, reason), nodes in groups.items():
        shown = nodes if len(nodes) <= 5 else [*nodes[:5], f"... {len(nodes) - 5} more"]
        log(WARNING, "%s: rejected %d %s from node%s %s (%s): %s", where, len(nodes),
            "reply" if len(nodes) == 1 else "replies", "" if len(nodes) == 1 else "s", shown, kind, reason)


def evaluate_votes(replies: Iterable[Message], expected_nodes: Iterable[int], server_round: int,
                   ) -> list[dict[str, Any]]:
    """The cleaned metrics of the valid evaluate replies: one vote per sampled node.

    Replies from nodes that were not sampled, second replies, error replies, replies
    for another round (group id) or of another message type, and replies without
    exactly one MetricRecord do not vote.  A raising ``replies`` is read up to the
    failure.  Never raises.
    """
    expected = set(int(n) for n in expected_nodes)
    voters: set[int] = set()
    votes: list[dict[str, Any]] = []
    for msg in _read_all(replies, ScreenedReplies()):
        try:
            if msg.has_error():
                continue
            node = int(msg.metadata.src_node_id)
            if node not in expected or node in voters:
                continue
            if msg.metadata.group_id != str(server_round) or msg.metadata.message_type != MessageType.EVALUATE:
                continue
            recs = list(msg.content.metric_records.values())
            if len(recs) != 1:
                continue
            voters.add(node)
            votes.append(clean_metrics(recs[0]))
        except Exception:  # pylint: disable=broad-except
            continue
    return votes


def median_metrics(metrics: list[Mapping[str, Any]], voters: int | None = None) -> dict[str, float]:
    """Median of each finite numeric metric over ``metrics`` (one dict per valid reply).

    A metric is reported only if at least half of the ``voters`` (default: the
    number of dicts; the strategies pass the number of *sampled* nodes, a quorum)
    carry it, so a few liars cannot invent metric names and two replies out of
    twenty are not the federation's metric; a minority of liars cannot move a
    median outside the honest values' range.
    """
    values: dict[str, list[float]] = {}
    for m in metrics:
        for key, val in m.items():
            num = finite_number(val)
            if num is not None:
                values.setdefault(key, []).append(num)
    n = len(metrics) if voters is None else voters
    quorum = max(1, (n + 1) // 2)
    return {k: median_of(v) for k, v in values.items() if len(v) >= quorum}


def median_of(values: list[float]) -> float:
    """Median of finite floats without overflow (``np.median`` averages two huge values to inf)."""
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else float(v[mid - 1] / 2 + v[mid] / 2)

"""Screening of client replies before aggregation: hostile input never reaches the model.

Every reply is checked (error replies, unknown or duplicated senders, missing or
extra records, wrong keys, shapes or dtypes, oversized payloads, non-finite
values, absurd norms, replies echoing another round) and either decoded into a
vector or rejected with a reason.  A rejected or missing reply is an *erasure*
in the sense of Data & Diggavi, Section 2.1: the server knows it and leaves it
out.  Nothing here raises on client input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from .records import ArrayLayout

#: Slack allowed over the expected payload size (npy headers, small arrays).
_HEADER_SLACK = 64 * 1024


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
    """

    reply_key: str = "gradient"
    max_norm: float | None = None
    max_bytes: int | None = None


@dataclass
class ScreenedReplies:
    """Outcome of :func:`screen_replies` for one round."""

    node_ids: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0

    def matrix(self, dtype: type = np.float32) -> np.ndarray:
        """The accepted vectors stacked as an ``(R, d)`` array."""
        return np.stack(self.vectors).astype(dtype, copy=False)


class _Reject(Exception):
    pass


def _metric_dict(msg: Message) -> dict[str, Any]:
    records = list(msg.content.metric_records.values())
    if len(records) > 1:
        raise _Reject(f"expected at most one MetricRecord, got {len(records)}")
    return dict(records[0]) if records else {}


def decode_reply(
    msg: Message, layout: ArrayLayout, server_round: int, policy: ReplyPolicy
) -> tuple[np.ndarray, dict[str, Any], int]:
    """Decode one reply into ``(vector float64, metrics, payload bytes)`` or raise ``_Reject``."""
    if msg.has_error():
        raise _Reject(f"error reply (code {msg.error.code}): {msg.error.reason}")
    content = msg.content
    arecs = content.array_records
    if policy.reply_key not in arecs:
        raise _Reject(f"missing ArrayRecord '{policy.reply_key}' (got {sorted(arecs)})")
    if len(arecs) != 1:
        raise _Reject(f"expected exactly one ArrayRecord, got {sorted(arecs)}")
    record = arecs[policy.reply_key]
    nbytes = int(sum(len(a.data) for a in record.values()))
    limit = policy.max_bytes if policy.max_bytes else 2 * 8 * layout.size + _HEADER_SLACK
    if nbytes > limit:
        raise _Reject(f"oversized payload: {nbytes} bytes > limit {limit}")
    if set(record.keys()) != set(layout.keys):
        raise _Reject(f"array keys {sorted(record.keys())} != expected {sorted(layout.keys)}")
    metrics = _metric_dict(msg)
    echoed = metrics.get("server-round")
    if echoed is not None and echoed != server_round:
        raise _Reject(f"reply for round {echoed}, current round is {server_round}")
    try:
        vec = layout.flatten(record, np.float64)
    except ValueError as exc:
        raise _Reject(str(exc)) from None
    if not np.isfinite(vec).all():
        raise _Reject(f"non-finite values ({int((~np.isfinite(vec)).sum())} of {vec.size})")
    if policy.max_norm:
        norm = float(np.linalg.norm(vec))
        if norm > policy.max_norm:
            raise _Reject(f"norm {norm:.3g} exceeds max-update-norm {policy.max_norm:.3g}")
    for key, val in metrics.items():
        if isinstance(val, float) and not math.isfinite(val):
            metrics[key] = float("nan")
    return vec, metrics, nbytes


def screen_replies(
    replies: Iterable[Message],
    expected_nodes: Iterable[int],
    layout: ArrayLayout,
    server_round: int,
    policy: ReplyPolicy,
) -> ScreenedReplies:
    """Validate all replies of a round; sampled nodes that did not answer are erasures."""
    expected = set(int(n) for n in expected_nodes)
    out = ScreenedReplies()
    seen: set[int] = set()
    for msg in replies:
        try:
            node = int(msg.metadata.src_node_id)
        except Exception as exc:  # pylint: disable=broad-except
            out.rejected[-1 - len(out.rejected)] = f"reply without a sender id ({exc})"
            continue
        try:
            if node not in expected:
                raise _Reject("reply from a node that was not sampled this round")
            if node in seen:
                # A second reply poisons the first too: the sender is misbehaving.
                if node in out.node_ids:
                    i = out.node_ids.index(node)
                    for lst in (out.node_ids, out.vectors, out.metrics):
                        lst.pop(i)
                raise _Reject("duplicate reply from the same node")
            seen.add(node)
            vec, metrics, nbytes = decode_reply(msg, layout, server_round, policy)
            out.bytes_up += nbytes
            out.node_ids.append(node)
            out.vectors.append(vec)
            out.metrics.append(metrics)
        except _Reject as rej:
            out.rejected[node] = str(rej)
        except Exception as exc:  # pylint: disable=broad-except
            out.rejected[node] = f"malformed reply: {type(exc).__name__}: {exc}"
    for node in sorted(expected - seen):
        out.rejected.setdefault(node, "no reply (erasure)")
    return out

"""In-process fakes of Flower infrastructure for fast strategy tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message


class FakeGrid:
    """A Grid that answers each message with ``handler(message) -> reply | None`` in-process.

    ``latency(message) -> seconds`` (optional) simulates slow nodes without sleeping: a
    reply whose latency exceeds the ``timeout`` of :meth:`send_and_receive` is dropped,
    as Flower's Grid stops pulling at the timeout.  Every timeout passed is recorded in
    ``timeouts``.  With ``assign_ids=True`` each sent message gets a message id, as the
    real Grid's push does (replies then carry it as ``reply_to_message_id``).
    """

    def __init__(self, node_ids: Iterable[int], handler: Callable[[Message], Message | None],
                 latency: Callable[[Message], float] | None = None, assign_ids: bool = False):
        self.node_ids = list(node_ids)
        self.handler = handler
        self.latency = latency
        self.assign_ids = assign_ids
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            if self.assign_ids:
                msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's push does
            self.sent.append(msg)
            reply = self.handler(msg)
            late = self.latency is not None and timeout is not None and self.latency(msg) > timeout
            if reply is not None and not late:
                replies.append(reply)
        return replies

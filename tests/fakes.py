"""In-process fakes of Flower infrastructure for fast strategy tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message


class FakeGrid:
    """A Grid that answers each message with ``handler(message) -> reply | None`` in-process."""

    def __init__(self, node_ids: Iterable[int], handler: Callable[[Message], Message | None]):
        self.node_ids = list(node_ids)
        self.handler = handler
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.handler(msg)
            if reply is not None:
                replies.append(reply)
        return replies

"""PromptGrid: Flower's send_and_receive semantics with a shorter pull interval, on a timed fake Grid."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.superlink.grid import HttpGrid

from server_app.prompt_grid import PromptGrid


class TimedGrid:
    """push_messages / pull_messages only; the reply to message ``i`` is available ``delays[i]`` s after the push."""

    def __init__(self, delays: list[float]):
        self.delays = delays
        self.pushes = self.pulls = 0
        self.t_push = 0.0
        self.delivered: set[str] = set()

    def push_messages(self, messages):
        self.pushes += 1
        self.t_push = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t_push
        out = []
        for mid in sorted(ids):
            if mid not in self.delivered and now >= self.delays[int(mid[1:])]:
                self.delivered.add(mid)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out


def _ids(replies):
    return sorted(r.metadata.reply_to_message_id for r in replies)


def test_returns_within_one_pull_interval_of_the_last_reply():
    inner = TimedGrid([0.0, 0.1, 0.3])
    t0 = time.monotonic()
    replies = PromptGrid(inner, pull_interval=0.05).send_and_receive(["a", "b", "c"], timeout=5.0)
    elapsed = time.monotonic() - t0
    assert _ids(replies) == ["m0", "m1", "m2"]
    assert 0.3 <= elapsed < 0.3 + 0.05 + 0.2  # not the 3 s of Flower's HttpGrid, not the timeout
    assert inner.pushes == 1 and inner.pulls >= 3


def test_timeout_returns_the_replies_so_far_and_pulls_once_more_at_the_deadline():
    inner = TimedGrid([0.0, 0.25, 10.0])
    t0 = time.monotonic()
    # the interval (1 s) is longer than the timeout: the second reply is only seen by the pull at the deadline
    replies = PromptGrid(inner, pull_interval=1.0).send_and_receive(["a", "b", "c"], timeout=0.3)
    elapsed = time.monotonic() - t0
    assert _ids(replies) == ["m0", "m1"]
    assert 0.3 <= elapsed < 0.6
    assert inner.pulls == 2


def test_no_messages_pushes_and_pulls_nothing():
    inner = TimedGrid([])
    assert PromptGrid(inner).send_and_receive(iter([]), timeout=3.0) == []
    assert inner.pushes == inner.pulls == 0


def test_everything_else_is_the_wrapped_grid_and_the_interval_must_be_positive():
    inner = SimpleNamespace(get_node_ids=lambda: [4, 2], run="the run", set_run=lambda run: None,
                            create_message=lambda *a: ("msg", a))
    grid = PromptGrid(inner)
    assert list(grid.get_node_ids()) == [4, 2] and grid.run == "the run"
    assert grid.create_message("content", "train", 4, "1", None) == ("msg", ("content", "train", 4, "1", None))
    with pytest.raises(ValueError):
        PromptGrid(inner, pull_interval=0.0)


def test_the_server_app_wraps_only_the_deployment_grid(monkeypatch):
    """``serve`` hands the federation a PromptGrid around Flower's HttpGrid, any other Grid as it is."""
    import server_app.server_app as sa

    seen = []
    monkeypatch.setattr(sa, "run_federation", lambda grid, context, cfg: seen.append(grid) or {})
    context = SimpleNamespace(run_config={})
    http = HttpGrid.__new__(HttpGrid)  # no connection is made: the federation is replaced above
    sa.serve(http, context)
    other = object()
    sa.serve(other, context)
    assert isinstance(seen[0], PromptGrid) and seen[0].grid is http
    assert seen[1] is other

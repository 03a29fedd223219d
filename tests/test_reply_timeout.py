"""Per-round reply timeout (run config ``reply-timeout``) and the SuperLink's own error replies.

Late replies never reach the strategy (Flower's Grid stops pulling at the timeout):
the node is a ``no-reply`` erasure and the round goes on without it.  When a node
is unavailable the SuperLink itself answers with an error message whose sender is
the SuperLink (node id 1), not the node: that is the node's ``error`` erasure,
never a foreign sender.
"""

from __future__ import annotations

from flwr.app import ConfigRecord
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from flwr_byzantine.aggregators import RGE
from flwr_byzantine.config import DEFAULTS, RunConfig
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid
from test_robust_sgd import honest_handler, model_record

NODES = list(range(2, 12))  # node id 1 is the SuperLink's own (SUPERLINK_NODE_ID)
SLOW, GONE = 5, 7


def test_reply_timeout_is_a_run_config_key_well_under_the_heartbeat():
    assert 0 < DEFAULTS["reply-timeout"] <= 30.0  # Flower decides a node is gone after a 60 s heartbeat
    assert RunConfig.from_mapping({"reply-timeout": 4.5}).reply_timeout == 4.5
    for bad in (0, -1.0, "soon", float("inf")):
        try:
            RunConfig.from_mapping({"reply-timeout": bad})
        except ValueError:
            continue
        raise AssertionError(f"reply-timeout={bad!r} accepted")


def test_late_reply_is_an_erasure_and_the_round_completes():
    grid = FakeGrid(NODES, honest_handler(), latency=lambda m: 100.0 if m.metadata.dst_node_id == SLOW else 0.5)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, seed=0)
    strategy.start(grid, model_record(), num_rounds=3, timeout=4.0)
    assert grid.timeouts == [4.0] * 6  # train + (empty) evaluate, every round
    for rep in strategy.history:
        assert rep.applied and SLOW not in rep.accepted
        assert rep.rejected == {SLOW: "no reply (erasure)"}
        assert rep.rejection_counts["no-reply"] == 1 and rep.rejection_counts["sender"] == 0


def test_server_app_passes_the_reply_timeout_to_the_grid(tmp_path):
    from server_app.server_app import run_federation

    grid = FakeGrid(NODES, honest_handler())
    grid.get_node_ids = lambda: list(NODES)
    cfg = RunConfig.from_mapping({"reply-timeout": 7.5, "num-server-rounds": 1, "num-malicious": 0,
                                  "output-dir": str(tmp_path), "dataset": "synthetic-logreg:d=3,n=20"})
    try:
        run_federation(grid, object(), cfg)
    except Exception:  # noqa: BLE001 - the fake nodes answer a toy model; only the timeout matters here
        pass
    assert grid.timeouts and set(grid.timeouts) == {7.5}


def _superlink_unavailable(handler):
    """Node GONE is unavailable: the SuperLink answers for it (src node 1, NODE_UNAVAILABLE)."""

    def answer(msg):
        if msg.metadata.dst_node_id == GONE:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        return handler(msg)

    return answer


def test_superlink_node_unavailable_reply_is_that_nodes_erasure():
    grid = FakeGrid(NODES, _superlink_unavailable(honest_handler()), assign_ids=True)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, seed=0)
    arrays = model_record()
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid), timeout=5.0)
    error = next(r for r in replies if r.has_error())
    assert int(error.metadata.src_node_id) == 1 and int(error.error.code) == 5  # the SuperLink's, as in flwr
    strategy.aggregate_train(1, replies)
    rep = strategy.history[-1]
    assert rep.applied and GONE not in rep.accepted and len(rep.accepted) == len(NODES) - 1
    assert set(rep.rejected) == {GONE}  # not node 1, not a "sender" rejection
    assert rep.rejection_counts["error"] == 1 and rep.rejection_counts["sender"] == 0
    assert "node" in rep.rejected[GONE].lower() and "unavailable" in rep.rejected[GONE].lower()


def test_error_reply_to_an_unknown_message_stays_a_foreign_sender():
    grid = FakeGrid(NODES, honest_handler(), assign_ids=True)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, seed=0)
    replies = grid.send_and_receive(strategy.configure_train(1, model_record(), ConfigRecord(), grid))
    stranger = create_message_error_unavailable_res_message(replies[0].metadata, "node_unavail")  # answers a reply id
    strategy.aggregate_train(1, [*replies, stranger])
    rep = strategy.history[-1]
    assert rep.rejection_counts["sender"] == 1 and 1 in rep.rejected
    assert len(rep.accepted) == len(NODES)


def test_round_report_records_the_seconds_spent_waiting_for_replies():
    import time

    def slow(msg):
        time.sleep(0.05)
        return honest_handler()(msg)

    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, seed=0)
    strategy.start(FakeGrid(NODES, slow), model_record(), num_rounds=1, timeout=5.0)
    rep = strategy.history[0]
    assert rep.reply_seconds >= 0.05 * len(NODES)
    assert rep.as_dict()["reply_seconds"] == rep.reply_seconds

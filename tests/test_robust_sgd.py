"""RobustSGD strategy: protocol, decoding, projection and hostile replies (no Ray, fake Grid)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_base import RunFailed
from flwr_byzantine.strategies.robust_sgd import PROTOCOL, RobustSGD

from fakes import FakeGrid

D_W, D_B = (3, 4), (3,)


def model_record(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(D_W, value, np.float32)), "b": Array(np.full(D_B, value, np.float32))})


def grad_reply(msg: Message, w: np.ndarray, b: np.ndarray, **metrics) -> Message:
    rnd = int(msg.content["config"]["server-round"])
    m = {"num-examples": 10, "train-loss": 1.0, "server-round": rnd, **metrics}
    rec = RecordDict({"gradient": ArrayRecord({"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float32))}),
                      "metrics": MetricRecord(m)})
    return Message(rec, reply_to=msg)


def honest_handler(target: float = 1.0, noise: float = 0.01, seed: int = 0):
    """Clients of f(x) = 0.5 ||x - target||^2 with small gradient noise."""
    rng = np.random.default_rng(seed)

    def handler(msg: Message) -> Message:
        arrays = msg.content["arrays"]
        w, b = arrays["w"].numpy(), arrays["b"].numpy()
        return grad_reply(msg, w - target + noise * rng.normal(size=D_W), b - target + noise * rng.normal(size=D_B))

    return handler


def run_round(strategy: RobustSGD, grid: FakeGrid, rnd: int = 1, arrays: ArrayRecord | None = None):
    arrays = arrays if arrays is not None else model_record()
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    return msgs, strategy.aggregate_train(rnd, replies)


def test_configure_train_sends_model_and_protocol():
    grid = FakeGrid(range(1, 6), honest_handler())
    strategy = RobustSGD(batch_size=7, full_batch=False)
    msgs = list(strategy.configure_train(3, model_record(0.5), ConfigRecord({"extra": 1}), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3, 4, 5]
    cfg = msgs[0].content["config"]
    assert cfg["server-round"] == 3 and cfg["batch-size"] == 7 and cfg["full-batch"] is False
    assert cfg["protocol"] == PROTOCOL and cfg["extra"] == 1
    np.testing.assert_array_equal(msgs[0].content["arrays"]["w"].numpy(), np.full(D_W, 0.5, np.float32))


def test_sgd_step_uses_decoded_gradient():
    grid = FakeGrid(range(1, 9), honest_handler(target=1.0, noise=0.0))
    strategy = RobustSGD(aggregator=Mean(), learning_rate=0.25)
    _, (arrays, metrics) = run_round(strategy, grid)
    # x0 = 0, gradient = x0 - 1 = -1 everywhere -> x1 = 0.25
    np.testing.assert_allclose(arrays["w"].numpy(), 0.25, rtol=1e-6)
    assert metrics["num-valid"] == 8 and metrics["num-kept"] == 8 and metrics["applied"] == 1


def test_full_batch_switch_in_config():
    grid = FakeGrid(range(1, 4), honest_handler())
    msgs = list(RobustSGD(full_batch=True).configure_train(1, model_record(), ConfigRecord(), grid))
    assert msgs[0].content["config"]["full-batch"] is True


def test_never_weights_by_num_examples():
    """A liar claiming a huge num-examples gets no more weight than anyone else."""
    honest = honest_handler(target=1.0, noise=0.0)

    def handler(msg):
        if msg.metadata.dst_node_id == 1:
            return grad_reply(msg, np.full(D_W, 9.0), np.full(D_B, 9.0), **{"num-examples": 10**9})
        return honest(msg)

    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0)
    _, (arrays, _) = run_round(strategy, FakeGrid(range(1, 5), handler))
    # plain mean of (9, -1, -1, -1) = 1.5 -> x1 = -1.5 ; a num-examples weighting would give ~ -9
    np.testing.assert_allclose(arrays["b"].numpy(), -1.5, rtol=1e-5)


def test_rge_filters_attackers_and_reports_ids():
    honest = honest_handler(target=1.0, noise=0.05, seed=1)
    bad = {2, 5, 7}

    def handler(msg):
        if msg.metadata.dst_node_id in bad:
            return grad_reply(msg, np.full(D_W, -50.0), np.full(D_B, 50.0))
        return honest(msg)

    strategy = RobustSGD(aggregator=RGE(eps_tilde=0.25), learning_rate=1.0)
    _, (arrays, metrics) = run_round(strategy, FakeGrid(range(1, 13), handler))
    assert set(strategy.history[-1].filtered) == bad
    assert metrics["num-filtered"] == 3 and sorted(metrics["filtered-node-ids"]) == sorted(bad)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0, atol=0.1)


@pytest.mark.parametrize(
    "make_bad, reason",
    [
        (lambda m: grad_reply(m, np.full(D_W, np.nan), np.zeros(D_B)), "non-finite"),
        (lambda m: grad_reply(m, np.full(D_W, np.inf), np.zeros(D_B)), "non-finite"),
        (lambda m: grad_reply(m, np.zeros((4, 3)), np.zeros(D_B)), "shape"),
        (lambda m: Message(RecordDict({"gradient": ArrayRecord({"w": Array(np.zeros(D_W, np.int64)),
                                                              "b": Array(np.zeros(D_B, np.float32))}),
                                       "metrics": MetricRecord({"server-round": 1})}), reply_to=m), "dtype"),
        (lambda m: Message(RecordDict({"gradient": ArrayRecord({"w": Array(np.zeros(D_W, np.float32))}),
                                       "metrics": MetricRecord({"server-round": 1})}), reply_to=m), "keys"),
        (lambda m: Message(RecordDict({"metrics": MetricRecord({"server-round": 1})}), reply_to=m), "missing"),
        (lambda m: Message(Error(code=1, reason="client crashed"), reply_to=m), "error reply"),
        (lambda m: grad_reply(m, np.zeros(D_W), np.zeros(D_B), **{"server-round": 99}), "round 99"),
        (lambda m: Message(RecordDict({"gradient": ArrayRecord({"w": Array(np.zeros((3, 40000), np.float32)),
                                                              "b": Array(np.zeros(D_B, np.float32))}),
                                       "metrics": MetricRecord({"server-round": 1})}), reply_to=m), "oversized"),
        (lambda m: None, "no reply"),
    ],
)
def test_bad_replies_are_erasures(make_bad, reason):
    honest = honest_handler(target=1.0, noise=0.0)
    grid = FakeGrid(range(1, 6), lambda m: make_bad(m) if m.metadata.dst_node_id == 3 else honest(m))
    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0)
    _, (arrays, metrics) = run_round(strategy, grid)
    assert reason in strategy.history[-1].rejected[3]
    assert metrics["num-rejected"] == 1 and metrics["num-valid"] == 4
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0, rtol=1e-6)  # the honest step, untouched


def test_duplicate_and_unknown_senders_rejected():
    honest = honest_handler(target=1.0, noise=0.0)

    class DupGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages)
            return replies + [replies[0]]  # node 1 answers twice

    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0, fraction_train=0.5, min_train_nodes=2)
    grid = DupGrid(range(1, 7), honest)
    msgs = list(strategy.configure_train(1, model_record(), ConfigRecord(), grid))
    sampled = {m.metadata.dst_node_id for m in msgs}
    unsampled = sorted(set(range(1, 7)) - sampled)[0]
    replies = grid.send_and_receive(msgs)
    stranger = Message(RecordDict(), dst_node_id=unsampled, message_type="train")
    replies.append(grad_reply(Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                                      dst_node_id=unsampled, message_type="train"), np.zeros(D_W), np.zeros(D_B)))
    del stranger
    _, metrics = strategy.aggregate_train(1, replies)
    rej = strategy.history[-1].rejected
    first = replies[0].metadata.src_node_id
    assert "duplicate" in rej[first]
    assert "not sampled" in rej[unsampled]


def test_too_few_valid_replies_leaves_model_unchanged():
    grid = FakeGrid(range(1, 5), lambda m: grad_reply(m, np.full(D_W, np.nan), np.zeros(D_B)))
    strategy = RobustSGD(aggregator=RGE(), min_valid_replies=2)
    _, (arrays, metrics) = run_round(strategy, grid)
    assert arrays is None and metrics["applied"] == 0 and metrics["num-rejected"] == 4


def test_projection_onto_l2_ball():
    grid = FakeGrid(range(1, 5), honest_handler(target=100.0, noise=0.0))
    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0, projection_radius=2.0)
    _, (arrays, _) = run_round(strategy, grid)
    x = ArrayLayout.of(arrays).flatten(arrays)
    assert np.linalg.norm(x) == pytest.approx(2.0, rel=1e-5)


def test_max_update_norm_rejects_absurd_magnitudes():
    honest = honest_handler(target=1.0, noise=0.0)
    grid = FakeGrid(range(1, 6), lambda m: grad_reply(m, np.full(D_W, 1e30), np.zeros(D_B))
                    if m.metadata.dst_node_id == 2 else honest(m))
    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0, max_update_norm=1e6)
    run_round(strategy, grid)
    assert "max-update-norm" in strategy.history[-1].rejected[2]


def test_start_drop_in_converges_under_attack():
    """Strategy.start (FedAvg's entry point) with RGE converges while 3/12 clients attack."""
    honest = honest_handler(target=1.0, noise=0.1, seed=3)

    def handler(msg):
        if msg.metadata.dst_node_id in (1, 2, 3):
            arrays = msg.content["arrays"]
            w, b = arrays["w"].numpy(), arrays["b"].numpy()
            return grad_reply(msg, -10 * (w - 1.0), -10 * (b - 1.0))  # scaled negative gradient
        return honest(msg)

    for agg, should_converge in ((RGE(), True), (Mean(), False)):
        strategy = RobustSGD(aggregator=agg, learning_rate=0.3)
        result = strategy.start(grid=FakeGrid(range(1, 13), handler), initial_arrays=model_record(),
                                num_rounds=15)
        err = np.abs(ArrayLayout.of(result.arrays).flatten(result.arrays) - 1.0).max()
        assert (err < 0.1) == should_converge, (agg, err)


def test_evaluate_metrics_use_median():
    strategy = RobustSGD(fraction_evaluate=1.0)
    grid = FakeGrid(range(1, 6), None)
    msgs = list(strategy.configure_evaluate(1, model_record(), ConfigRecord(), grid))
    accs = [0.9, 0.91, 0.92, 0.0, 1e9]
    replies = [Message(RecordDict({"metrics": MetricRecord({"eval-accuracy": a})}), reply_to=m)
               for m, a in zip(msgs, accs)]
    agg = strategy.aggregate_evaluate(1, replies)
    assert agg["eval-accuracy"] == pytest.approx(0.91)


def test_large_node_ids_are_reported_exactly():
    """Flower node ids are uint64; they must never pass through a float array."""
    base = 2**63 + 12345
    nodes = [base + 1000 * i + 1 for i in range(10)]
    honest = honest_handler(target=1.0, noise=0.05, seed=2)

    def handler(msg):
        if msg.metadata.dst_node_id == nodes[4]:
            return grad_reply(msg, np.full(D_W, -50.0), np.full(D_B, 50.0))
        return honest(msg)

    strategy = RobustSGD(aggregator=RGE(), learning_rate=1.0)
    run_round(strategy, FakeGrid(nodes, handler))
    assert strategy.history[-1].filtered == [nodes[4]]
    assert sorted(strategy.history[-1].kept) == sorted(set(nodes) - {nodes[4]})


def weights_reply(msg: Message) -> Message:
    """What a FedAvg (quickstart) client sends: its locally trained model under "arrays" + num-examples."""
    arrays = msg.content["arrays"]
    rec = RecordDict({"arrays": ArrayRecord({k: Array(a.numpy() + 0.1) for k, a in arrays.items()}),
                      "metrics": MetricRecord({"train_loss": 0.5, "num-examples": 100})})
    return Message(rec, reply_to=msg)


def test_weights_sent_to_robust_sgd_fail_the_run_with_the_fix():
    """Clients that train locally (replies "arrays") make RobustSGD fail after max_invalid_rounds, naming the fix."""
    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0, max_invalid_rounds=3)
    with pytest.raises(RunFailed, match=r"replies carry 'arrays': use RobustFedAvg") as err:
        strategy.start(grid=FakeGrid(range(1, 6), weights_reply), initial_arrays=model_record(), num_rounds=10)
    assert "3 consecutive rounds" in str(err.value) and len(strategy.history) == 3
    assert "replies carry 'arrays': use RobustFedAvg" in strategy.history[0].rejected[1]


def test_invalid_streak_resets_and_can_be_disabled():
    """Only *consecutive* invalid rounds count; max_invalid_rounds=0 never fails."""
    honest = honest_handler(target=1.0, noise=0.0)

    def handler(msg):  # rounds 1, 2, 4, 5 broken, round 3 fine: never 3 in a row
        rnd = int(msg.content["config"]["server-round"])
        return honest(msg) if rnd == 3 else weights_reply(msg)

    strategy = RobustSGD(aggregator=Mean(), learning_rate=0.5, max_invalid_rounds=3)
    strategy.start(grid=FakeGrid(range(1, 6), handler), initial_arrays=model_record(), num_rounds=5)
    assert [r.applied for r in strategy.history] == [False, False, True, False, False]
    assert strategy.invalid_streak == 2
    never = RobustSGD(aggregator=Mean(), max_invalid_rounds=0)
    never.start(grid=FakeGrid(range(1, 6), weights_reply), initial_arrays=model_record(), num_rounds=4)
    assert not any(r.applied for r in never.history)


def test_reply_key_equal_to_model_key_is_refused():
    with pytest.raises(ValueError, match="RobustFedAvg"):
        RobustSGD(reply_key="arrays")


def test_client_text_cannot_forge_log_lines(caplog):
    """Error reasons (and any client string) reach the log as one line, truncated."""
    import logging

    forged = "boom\nround 1: 10/10 valid, kept 10, filtered 0 []\r\x1b[2K" + "x" * 10**6
    honest = honest_handler()

    def handler(msg: Message) -> Message:
        if msg.metadata.dst_node_id == 2:
            return Message(Error(code=3, reason=forged), reply_to=msg)
        if msg.metadata.dst_node_id == 3:
            reply = honest(msg)
            reply.metadata.group_id = "1\nround 1: all good"
            return reply
        return honest(msg)

    strategy = RobustSGD(aggregator=Mean())
    with caplog.at_level(logging.WARNING):
        _, (arrays, metrics) = run_round(strategy, FakeGrid(range(1, 7), handler))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "rejected 1 reply" in w]) == 2
    assert all("\n" not in w and "\r" not in w and "\x1b" not in w and len(w) < 1000 for w in warnings)
    assert arrays is not None and metrics["num-valid"] == 4
    assert all(len(reason) < 1000 for reason in strategy.history[-1].rejected.values())


def test_size_guard_holds_when_half_the_replies_are_zero():
    """Zero replies must not drag the guard's reference norm to 0 (that switched it off)."""
    honest = honest_handler(noise=0.0)

    def handler(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if node <= 6:
            return grad_reply(msg, np.zeros(D_W), np.zeros(D_B))
        if node >= 9:
            return grad_reply(msg, np.full(D_W, 3e37), np.full(D_B, 3e37))
        return honest(msg)

    strategy = RobustSGD(aggregator=Mean())
    _, (arrays, metrics) = run_round(strategy, FakeGrid(range(1, 11), handler))
    report = strategy.history[-1]
    assert sorted(report.rejected) == [9, 10] and set(report.rejection_counts) >= {"magnitude"}
    assert arrays is not None and metrics["applied"] == 1
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def test_client_metric_names_with_control_characters_are_dropped():
    from flwr_byzantine.strategies.validation import clean_metrics

    out = clean_metrics({"loss": 1.5, "x\nround 3: forged": 2.0, "y" * 65: 1, "\x1b[2K": 3, "ok-name": 4})
    assert out == {"loss": 1.5, "ok-name": 4}

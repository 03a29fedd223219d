"""COMRADE / GIANT Flower strategies: message counts, trimming, reply validation, attacks, and
an end-to-end ``run_simulation`` with the real Ray backend.

Most tests drive the strategies with an in-process Grid whose nodes run the project's one
ClientApp with run config ``method = "comrade"`` (no Ray); hostile replies are crafted by a
handler Grid.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from clients.client_app import build_client_app
from clients.newton import load_newton_partition, node_attack
from flwr_byzantine.config import NewtonConfig
from flwr_byzantine.data.libsvm import federated_split, load_glm_dataset
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine.newton import TopK, federated_objective, minimise
from flwr_byzantine.newton.objectives import make_objective
from flwr_byzantine.strategies.comrade import PROTOCOL, Comrade, make_evaluate_fn
from flwr_byzantine.strategies.giant import Giant

NODE_BASE = 2**63 + 11  # Flower node ids are uint64: make sure nothing squeezes them into int64


class AppGrid:
    """In-process Grid: node ``NODE_BASE + i`` runs ``app`` as partition i of n (no Ray)."""

    def __init__(self, n: int, app, node_configs: dict[int, dict] | None = None) -> None:
        self.ids = [NODE_BASE + i for i in range(n)]
        self.app = app
        self.sent: list[Message] = []
        self.rounds = 0
        self.ctx = {}
        for i, nid in enumerate(self.ids):
            cfg = {"partition-id": i, "num-partitions": n, **(node_configs or {}).get(i, {})}
            self.ctx[nid] = Context(run_id=1, node_id=nid, node_config=cfg, state=RecordDict(), run_config={})

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            self.rounds += 1
        out = []
        for msg in messages:
            self.sent.append(msg)
            out.append(self.app(msg, self.ctx[msg.metadata.dst_node_id]))
        return out


class HandlerGrid(AppGrid):
    """Like AppGrid, but ``hostile(node_index, msg, honest_reply) -> reply | None`` may replace replies."""

    def __init__(self, n, app, hostile: Callable[[int, Message, Message], Message | None]) -> None:
        super().__init__(n, app)
        self.hostile = hostile

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg, reply in zip(list(messages), super().send_and_receive(messages)):
            r = self.hostile(self.ids.index(msg.metadata.dst_node_id), msg, reply)
            if r is not None:
                out.extend(r if isinstance(r, list) else [r])
        return out


OVERRIDES = {"method": "comrade", "newton-dataset": "synthetic", "newton-synthetic-n": 6000, "newton-synthetic-d": 8, "newton-lambda": 1e-2}


def setup(n: int, **extra):
    """ClientApp, reference objective, test objective and w* for an n-client synthetic federation."""
    ov = {**OVERRIDES, **extra}
    cfg = NewtonConfig.from_mapping(ov)
    data = load_glm_dataset("synthetic", 0, synthetic_n=cfg.synthetic_n, synthetic_d=cfg.synthetic_d)
    parts, _ = federated_split(data, n, seed=0)
    fed = federated_objective("logistic", data.X_train, data.y_train, parts, cfg.lam)
    test = make_objective("logistic", data.X_test, data.y_test, cfg.lam)
    return build_client_app(ov), fed, test, minimise(fed)


def w0(d: int = 8) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(d))})


def flat(arrays: ArrayRecord) -> np.ndarray:
    return arrays["w"].numpy()


# ----------------------------------------------------------------------------- protocol
def test_comrade_sends_one_message_per_client_per_iteration():
    app, fed, test, w_star = setup(6)
    grid = AppGrid(6, app)
    strategy = Comrade(beta=0.0)
    result = strategy.start(grid, w0(), num_rounds=5, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    assert len(grid.sent) == 5 * 6 and grid.rounds == 5
    assert strategy.communication_rounds == 5 and strategy.messages_sent == 30
    for t in range(5):
        batch = grid.sent[6 * t: 6 * t + 6]
        assert sorted(m.metadata.dst_node_id for m in batch) == grid.ids
        assert all(m.content["config"]["server-round"] == t + 1 for m in batch)
        assert all("gradient" not in m.content.array_records for m in batch)
    assert result.train_metrics_clientapp[5]["communication-rounds"] == 5
    final = result.evaluate_metrics_serverapp[5]
    assert final["dist-to-opt"] < 0.1 * np.linalg.norm(w_star)
    assert final["accuracy"] >= test.accuracy(w_star) - 0.01


def test_giant_uses_two_rounds_per_iteration_and_reaches_w_star():
    app, fed, test, w_star = setup(5)
    grid = AppGrid(5, app)
    strategy = Giant()
    result = strategy.start(grid, w0(), num_rounds=8, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    assert grid.rounds == 16 and len(grid.sent) == 16 * 5 and strategy.communication_rounds == 16
    phases = [m.content["config"]["newton-phase"] for m in grid.sent[::5]]
    assert phases == ["gradient", "direction"] * 8
    assert all("gradient" in m.content.array_records for m in grid.sent[5:10])
    assert [h.server_round for h in strategy.history] == list(range(1, 17))
    metrics = result.train_metrics_clientapp[8]
    assert metrics["communication-rounds"] == 16 and metrics["bytes-up"] == metrics["gradient-bytes-up"] * 2
    assert result.evaluate_metrics_serverapp[8]["dist-to-opt"] < 1e-8
    assert set(result.evaluate_metrics_serverapp) == set(range(9))


def test_comrade_beats_giant_in_communication_rounds_to_moderate_tolerance():
    app, fed, test, w_star = setup(5)
    tol = 0.1 * np.linalg.norm(w_star)
    rounds = {}
    for strategy in (Comrade(beta=0.0), Giant()):
        grid = AppGrid(5, app)
        res = strategy.start(grid, w0(), num_rounds=6, evaluate_fn=make_evaluate_fn(fed, test, w_star))
        per_iter = 1 if isinstance(strategy, Comrade) else 2
        it = min(t for t, m in res.evaluate_metrics_serverapp.items() if m["dist-to-opt"] <= tol)
        rounds[type(strategy).__name__] = it * per_iter
    assert rounds["Comrade"] < rounds["Giant"]


@pytest.mark.parametrize("beta, m", [(0.0, 10), (0.1, 10), (0.25, 10), (0.2, 10), (0.3, 7), (0.5, 5)])
def test_trimming_keeps_exactly_ceil_one_minus_beta_m(beta, m):
    app, *_ = setup(m)
    strategy = Comrade(beta=beta)
    strategy.start(AppGrid(m, app), w0(), num_rounds=1)
    rep = strategy.history[0]
    assert len(rep.kept) == math.ceil((1 - beta) * m - 1e-9) == rep.num_kept_expected
    assert len(rep.trimmed) == m - len(rep.kept) and set(rep.kept) | set(rep.trimmed) == set(rep.valid)


def test_beta_not_above_assumed_fraction_logs_warning(caplog):
    with caplog.at_level(logging.WARNING):
        Comrade(beta=0.1, assumed_byzantine_fraction=0.2)
    assert any("NOT" in r.getMessage() and "beta" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Comrade(beta=0.3, assumed_byzantine_fraction=0.2)
    assert not any("beta" in r.getMessage() for r in caplog.records)
    assert Giant(beta=0.0, assumed_byzantine_fraction=0.1).warn_if_unprotected()
    with pytest.raises(ValueError):
        Comrade(beta=1.0)


# ----------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("attack, scale", [("gaussian", 2.0), ("random-labels", 1.0), ("label-flip", 1.0),
                                           ("scaled-negative", 3.0)])
def test_comrade_survives_byzantine_clients(attack, scale):
    n, bad = 10, 2  # 20 % Byzantine
    app, fed, test, w_star = setup(n, **{"newton-num-malicious": bad, "newton-attack": attack,
                                         "newton-attack-scale": scale})
    strategy = Comrade(beta=0.3, assumed_byzantine_fraction=0.2)
    res = strategy.start(AppGrid(n, app), w0(), num_rounds=6, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    final = res.evaluate_metrics_serverapp[6]
    assert final["accuracy"] >= test.accuracy(w_star) - 0.02
    assert final["dist-to-opt"] < 0.3 * np.linalg.norm(w_star)
    if attack in ("gaussian", "scaled-negative"):  # large-norm attackers are the ones trimmed
        malicious = set(malicious_partition_ids(n, bad, 0))
        trimmed = {rep.partition_ids[nid] for rep in strategy.history[2:] for nid in rep.trimmed}
        assert malicious <= trimmed


def test_node_config_makes_a_client_malicious():
    cfg = NewtonConfig.from_mapping(OVERRIDES)
    assert node_attack(cfg, {"malicious": "true", "newton-attack": "scaled-negative"}, 0, 4).name == "scaled-negative"
    assert node_attack(cfg, {"malicious": False}, 0, 4) is None
    cfg_bad = NewtonConfig.from_mapping({**OVERRIDES, "newton-num-malicious": 4, "newton-attack": "random-labels"})
    assert node_attack(cfg_bad, {}, 2, 4).name == "random-labels"
    app, fed, test, w_star = setup(4)
    grid = AppGrid(4, app, node_configs={1: {"malicious": True, "newton-attack": "scaled-negative",
                                             "newton-attack-scale": 50.0}})
    strategy = Comrade(beta=0.25)
    strategy.start(grid, w0(), num_rounds=2)
    assert all(rep.trimmed == [grid.ids[1]] for rep in strategy.history)


def test_non_robust_comrade_is_hurt_by_the_same_attack():
    n = 10
    app, fed, test, w_star = setup(n, **{"newton-num-malicious": 2, "newton-attack": "gaussian",
                                         "newton-attack-scale": 2.0})
    dists = {}
    for beta in (0.0, 0.3):
        res = Comrade(beta=beta).start(AppGrid(n, app), w0(), num_rounds=6,
                                       evaluate_fn=make_evaluate_fn(fed, test, w_star))
        dists[beta] = res.evaluate_metrics_serverapp[6]["dist-to-opt"]
    assert dists[0.0] > 3 * dists[0.3]


# ----------------------------------------------------------------------------- validation
def _reply(msg: Message, arrays: dict, **metrics) -> Message:
    m = {"server-round": int(msg.content["config"]["server-round"]), **metrics}
    return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord(m)}), reply_to=msg)


HOSTILE = {
    "nan": (lambda m, r: _reply(m, {"p": np.full(8, np.nan)}), "non-finite"),
    "inf": (lambda m, r: _reply(m, {"p": np.full(8, np.inf)}), "non-finite"),
    "wrong-shape": (lambda m, r: _reply(m, {"p": np.zeros(5)}), "shape"),
    "wrong-dtype": (lambda m, r: _reply(m, {"p": np.zeros(8, np.int64)}), "dtype"),
    "missing": (lambda m, r: Message(RecordDict({"metrics": MetricRecord({"server-round": 1})}), reply_to=m),
                "missing"),
    "extra-array": (lambda m, r: _reply(m, {"p": np.zeros(8), "q": np.zeros(8)}), "expected arrays"),
    "error": (lambda m, r: Message(Error(code=7, reason="client crashed"), reply_to=m), "error reply"),
    "stale-round": (lambda m, r: _reply(m, {"p": np.zeros(8)}, **{"server-round": 99}), "round 99"),
    "wrong-phase": (lambda m, r: _reply(m, {"p": np.zeros(8)}, **{"phase-id": 1}), "phase"),
    "oversized": (lambda m, r: _reply(m, {"p": np.zeros(10**5)}), "oversized"),
    "duplicate": (lambda m, r: [r, r], "duplicate"),
    "silent": (lambda m, r: None, "erasure"),
    "declared-shape": (lambda m, r: _declared_shape_reply(m), "declared shape"),
    "wrong-group": (lambda m, r: _with_meta(r, group_id="99"), "group"),
    "no-group": (lambda m, r: _with_meta(r, group_id=""), "group"),
    "wrong-type": (lambda m, r: _with_meta(r, message_type=MessageType.EVALUATE), "type"),
    "complex": (lambda m, r: _reply(m, {"p": np.zeros(8, np.complex128)}), "complex"),
    "huge-error": (lambda m, r: Message(Error(code=7, reason="boom\nround 3: forged summary" + "x" * 10**6),
                                        reply_to=m), "error reply"),
}


def _with_meta(reply: Message, **fields) -> Message:
    for key, val in fields.items():
        setattr(reply.metadata, key, val)
    return reply


def _declared_shape_reply(msg: Message) -> Message:
    """A reply whose Array claims 10**12 entries but carries 8 (8.8e12 bytes were once reported)."""
    real = Array(np.zeros(8))
    fake = Array(dtype="float64", shape=(10**12,), stype=real.stype, data=real.data)
    m = {"server-round": int(msg.content["config"]["server-round"])}
    return Message(RecordDict({"update": ArrayRecord({"p": fake}), "metrics": MetricRecord(m)}), reply_to=msg)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_reply_is_rejected_and_the_run_goes_on(kind, caplog):
    make_bad, reason = HOSTILE[kind]
    app, fed, test, w_star = setup(5)

    def hostile(i, msg, reply):
        return make_bad(msg, reply) if i == 2 else reply

    grid = HandlerGrid(5, app, hostile)
    strategy = Comrade(beta=0.0)
    with caplog.at_level(logging.WARNING):
        res = strategy.start(grid, w0(), num_rounds=3, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    for rep in strategy.history:
        assert set(rep.rejected) == {grid.ids[2]} and reason in rep.rejected[grid.ids[2]]
        assert rep.applied and len(rep.valid) == 4 and grid.ids[2] not in rep.kept
    assert np.isfinite(flat(res.arrays)).all()
    assert res.evaluate_metrics_serverapp[3]["dist-to-opt"] < 0.1 * np.linalg.norm(w_star)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    rejected_lines = [line for line in lines if reason in line]
    assert len(rejected_lines) == 3  # one single-line entry per round
    assert all("\n" not in line and len(line) < 1000 for line in lines)
    for rep in strategy.history:
        assert rep.bytes_up < 4 * 1000  # only what was actually received from the 4 valid replies


@pytest.mark.parametrize("kind", sorted(set(HOSTILE) - {"wrong-phase"}))  # phases: see the test below
def test_giant_rejects_every_hostile_reply_class_in_both_phases(kind, caplog):
    """The same hostile classes against GIANT: nothing raises, the model stays finite, one line each."""
    make_bad, _ = HOSTILE[kind]
    app, *_ = setup(5)

    def hostile(i, msg, reply):
        if i != 2:
            return reply
        bad = make_bad(msg, reply)
        if msg.content["config"]["newton-phase"] == "gradient" and isinstance(bad, Message) \
                and not bad.has_error() and "update" in bad.content.array_records:
            arrays = {("g" if k == "p" else k): a for k, a in bad.content["update"].items()}
            bad.content["update"] = ArrayRecord(arrays)  # the gradient phase's array name
        return bad

    grid = HandlerGrid(5, app, hostile)
    strategy = Giant()
    with caplog.at_level(logging.WARNING):
        res = strategy.start(grid, w0(), num_rounds=2)
    assert len(strategy.history) == 4
    for rep in strategy.history:
        assert set(rep.rejected) == {grid.ids[2]}, (rep.phase, rep.rejected)
        assert rep.applied and len(rep.valid) == 4
    assert np.isfinite(flat(res.arrays)).all()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([line for line in lines if "rejected 1 reply" in line]) == 4
    assert all("\n" not in line and len(line) < 1000 for line in lines)


def test_giant_direction_reply_replayed_as_a_gradient_reply_is_rejected():
    app, fed, test, w_star = setup(4)
    kept: dict[str, Message] = {}

    def hostile(i, msg, reply):
        phase = msg.content["config"]["newton-phase"]
        if i == 1 and phase == "direction":
            kept["instruction"], kept["reply"] = msg, reply
        if i == 1 and phase == "gradient" and kept:
            # The previous iteration's direction answer, relabelled so that only the group id (the
            # round it answers) gives it away: payload named 'g', no phase echo, current round echoed.
            p = kept["reply"].content["update"]["p"].numpy()
            echo = {"server-round": int(msg.content["config"]["server-round"])}
            return Message(RecordDict({"update": ArrayRecord({"g": Array(p)}), "metrics": MetricRecord(echo)}),
                           reply_to=kept["instruction"])
        return reply

    grid = HandlerGrid(4, app, hostile)
    strategy = Giant()
    res = strategy.start(grid, w0(), num_rounds=3, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    gradient_rounds = [rep for rep in strategy.history if rep.phase == "gradient"][1:]
    assert gradient_rounds and all("group" in rep.rejected.get(grid.ids[1], "") for rep in gradient_rounds)
    assert np.isfinite(flat(res.arrays)).all()


@pytest.mark.parametrize("strategy_cls", [Comrade, Giant])
def test_absurd_metrics_are_ignored_not_raised_or_published(strategy_cls):
    app, *_ = setup(4)

    def hostile(i, msg, reply):
        if i == 0:
            rec = reply.content["metrics"]
            rec["rho-empirical"] = -1e300
            rec["huge"] = 2**70
        if i == 1:
            reply.content["metrics"]["rho-empirical"] = 2**70
        return reply

    strategy = strategy_cls(beta=0.0, compression="topk", topk_fraction=0.25)
    res = strategy.start(HandlerGrid(4, app, hostile), w0(), num_rounds=2)
    directions = [rep for rep in strategy.history if rep.phase == "direction"]
    assert directions and all(rep.applied and not rep.rejected for rep in directions)
    assert all(0.0 <= rep.rho_empirical_min <= 1.0 for rep in directions)
    for metrics in res.train_metrics_clientapp.values():
        assert "huge" not in metrics and 0.0 <= metrics.get("rho-empirical-min", 0.5) <= 1.0


@pytest.mark.parametrize("strategy_cls", [Comrade, Giant])
def test_a_raising_replies_iterator_does_not_escape(strategy_cls):
    app, *_ = setup(4)
    strategy = strategy_cls(beta=0.0)
    grid = AppGrid(4, app)
    msgs = list(strategy.configure_train(1, w0(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)

    def broken():
        yield from replies[:3]
        raise RuntimeError("connection reset\nround 1: forged")

    arrays, metrics = strategy.aggregate_train(1, broken())
    assert metrics["num-valid"] == 3 and metrics["num-rejected"] == 1


def test_federated_evaluation_needs_a_quorum():
    app, *_ = setup(6)
    strategy = Comrade(beta=0.0, fraction_evaluate=1.0)
    grid = AppGrid(6, app)
    msgs = list(strategy.configure_evaluate(1, w0(), ConfigRecord(), grid))
    assert len(msgs) == 6 and all(m.metadata.group_id == "1" for m in msgs)
    replies = grid.send_and_receive(msgs)
    assert strategy.aggregate_evaluate(1, replies[:2]) is None  # 2 of 6 sampled: no quorum
    full = strategy.aggregate_evaluate(1, replies[:3])
    assert full is not None and 0.0 <= full["eval-accuracy"] <= 1.0
    assert strategy.aggregate_evaluate(2, replies) is None  # replies of another round do not vote


def test_reply_from_unknown_node_is_rejected():
    app, *_ = setup(3)
    strategy = Comrade(beta=0.0)
    grid = AppGrid(3, app)
    msgs = list(strategy.configure_train(1, w0(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    stranger = Message(RecordDict(), dst_node_id=12345, message_type=MessageType.TRAIN)
    forged = Message(RecordDict({"update": ArrayRecord({"p": Array(np.ones(8))})}), reply_to=stranger)
    assert forged.metadata.src_node_id == 12345
    arrays, metrics = strategy.aggregate_train(1, replies + [forged])
    assert arrays is not None and metrics["num-valid"] == 3 and metrics["num-rejected"] == 1


def test_too_few_valid_replies_keep_the_model(caplog):
    app, *_ = setup(4)
    grid = HandlerGrid(4, app, lambda i, m, r: r if i == 0 else _reply(m, {"p": np.full(8, np.nan)}))
    strategy = Comrade(beta=0.0, min_valid_replies=2)
    start = ArrayRecord({"w": Array(np.full(8, 0.5))})
    with caplog.at_level(logging.WARNING):
        res = strategy.start(grid, start, num_rounds=2)
    assert not any(rep.applied for rep in strategy.history)
    assert "min_valid" in strategy.history[0].reason
    assert res.train_metrics_clientapp[1]["applied"] == 0
    assert any("model left unchanged" in r.getMessage() for r in caplog.records)
    assert np.array_equal(strategy.current_model, np.full(8, 0.5))


def test_giant_skips_direction_round_when_gradients_are_invalid():
    app, *_ = setup(4)

    def hostile(i, msg, reply):
        phase = msg.content["config"]["newton-phase"]
        return Message(Error(code=1, reason="down"), reply_to=msg) if phase == "gradient" and i > 0 else reply

    grid = HandlerGrid(4, app, hostile)
    strategy = Giant(min_valid_replies=2)
    res = strategy.start(grid, w0(), num_rounds=3)
    assert grid.rounds == 3 and strategy.communication_rounds == 3  # only the gradient rounds happened
    assert all(rep.phase == "gradient" and not rep.applied for rep in strategy.history)
    assert np.array_equal(flat(res.arrays) if len(res.arrays) else np.zeros(8), np.zeros(8))


def test_giant_rejects_nan_gradients_and_direction_replies_for_the_wrong_phase():
    app, fed, test, w_star = setup(5)

    def hostile(i, msg, reply):
        if i != 1:
            return reply
        if msg.content["config"]["newton-phase"] == "gradient":
            return Message(RecordDict({"update": ArrayRecord({"g": Array(np.full(8, np.nan))}),
                                       "metrics": MetricRecord({"server-round": 1})}), reply_to=msg)
        return _reply(msg, {"g": np.zeros(8)})

    grid = HandlerGrid(5, app, hostile)
    strategy = Giant()
    res = strategy.start(grid, w0(), num_rounds=6, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    for rep in strategy.history:
        assert set(rep.rejected) == {grid.ids[1]}
    assert res.evaluate_metrics_serverapp[6]["dist-to-opt"] < 0.05 * np.linalg.norm(w_star)


# ----------------------------------------------------------------------------- compression / step
@pytest.mark.parametrize("compression", ["topk", "sign"])
def test_compressed_replies_are_decoded_and_counted(compression):
    app, fed, test, w_star = setup(5)
    plain = Comrade(beta=0.0)
    plain.start(AppGrid(5, app), w0(), num_rounds=1)
    comp = Comrade(beta=0.0, compression=compression, topk_fraction=0.25)
    res = comp.start(AppGrid(5, app), w0(), num_rounds=8, evaluate_fn=make_evaluate_fn(fed, test, w_star))
    rep = comp.history[0]
    assert not rep.rejected
    # bytes-up is what was received (array data incl. npy headers), here 5 compressed payloads
    wire = sum(len(Array(a).data) for a in comp.compressor.encode(np.ones(8)).values())
    assert rep.bytes_up == 5 * wire
    assert plain.history[0].bytes_up == 5 * len(Array(np.ones(8)).data)
    expected_rho = 2 / 8 if compression == "topk" else 1 / 8
    assert res.train_metrics_clientapp[1]["rho"] == pytest.approx(expected_rho)
    assert rep.rho_empirical_min >= expected_rho - 1e-12
    assert res.evaluate_metrics_serverapp[8]["accuracy"] >= test.accuracy(w_star) - 0.03


def test_topk_reply_with_out_of_range_indices_is_rejected():
    app, *_ = setup(4)

    def hostile(i, msg, reply):
        return _reply(msg, {"indices": np.array([0, 99], np.int32), "values": np.ones(2)}) if i == 3 else reply

    strategy = Comrade(beta=0.0, compression=TopK(k=2))
    strategy.start(HandlerGrid(4, app, hostile), w0(), num_rounds=1)
    assert "out of range" in next(iter(strategy.history[0].rejected.values()))


def test_server_line_search_uses_only_server_data():
    """Armijo on a server-held objective: it never increases; step 0 (model kept) when no step helps."""
    app, fed, test, w_star = setup(4)
    server_obj = test  # stands in for data only the server holds
    strategy = Comrade(beta=0.0, step_size=1.0, server_objective=server_obj)
    res = strategy.start(AppGrid(4, app), w0(), num_rounds=4,
                         evaluate_fn=lambda r, a: MetricRecord({"server-loss": server_obj.value(flat(a))}))
    losses = [res.evaluate_metrics_serverapp[t]["server-loss"] for t in range(5)]
    assert all(b <= a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    assert strategy.history[0].step > 0 and all(0 <= rep.step <= 1.0 for rep in strategy.history)
    assert all(rep.applied == (rep.step > 0) for rep in strategy.history)
    with pytest.raises(TypeError):
        Comrade(server_objective=object())


def test_client_partition_matches_server_split():
    cfg = NewtonConfig.from_mapping(OVERRIDES)
    X, y = load_newton_partition(cfg, 1, 4)
    data = load_glm_dataset("synthetic", 0, synthetic_n=6000, synthetic_d=8)
    parts, _ = federated_split(data, 4, seed=0)
    np.testing.assert_array_equal(X, data.X_train[parts[1]])
    with pytest.raises(ValueError):
        load_newton_partition(cfg, 4, 4)


def test_client_rejects_unknown_protocol_and_wrong_dimension():
    app, *_ = setup(2)
    grid = AppGrid(2, app)
    msgs = list(Comrade(beta=0.0).configure_train(1, w0(), ConfigRecord(), grid))
    assert msgs[1].content["config"]["protocol"] == PROTOCOL
    msgs[0].content["config"]["protocol"] = "other"
    with pytest.raises(ValueError, match="protocol"):
        app(msgs[0], grid.ctx[grid.ids[0]])
    bad = list(Comrade(beta=0.0).configure_train(1, w0(3), ConfigRecord(), grid))
    with pytest.raises(ValueError, match="d = 8"):
        app(bad[0], grid.ctx[grid.ids[0]])


# ----------------------------------------------------------------------------- end to end (Ray)
@pytest.mark.slow
@pytest.mark.parametrize("method, rounds, per_iter", [("comrade", 3, 1), ("giant", 2, 2)])
def test_run_simulation_end_to_end(tmp_path, method, rounds, per_iter):
    """Real ``flwr.simulation.run_simulation`` (Ray backend), 4 clients, one of them Byzantine."""
    from flwr.simulation import run_simulation

    from server_app.server_app import build_server_app

    ov = {**OVERRIDES, "num-server-rounds": rounds, "output-dir": str(tmp_path), "method": method,
          "newton-beta": 0.3 if method == "comrade" else 0.0, "newton-assumed-byzantine-fraction": 0.25,
          "newton-num-malicious": 1 if method == "comrade" else 0, "newton-attack": "scaled-negative",
          "newton-attack-scale": 20.0, "newton-min-nodes": 4}
    run_simulation(build_server_app(ov), build_client_app(ov), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    files = list(tmp_path.glob(f"newton-{method}-*.json"))
    assert len(files) == 1
    out = json.loads(files[0].read_text())
    assert out["communication_rounds"] == rounds * per_iter and out["messages_sent"] == 4 * rounds * per_iter
    assert all(not rep["rejected"] for rep in out["rounds"])
    assert out["final_accuracy"] > 0.6 and np.isfinite(out["final_w"]).all()
    if method == "comrade":
        assert out["malicious_partitions"] and set(out["malicious_partitions"]) <= set(out["trimmed_partitions"])

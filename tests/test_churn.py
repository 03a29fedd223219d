"""Churn (nodes joining / leaving, lost replies) and a mobile adversary (a new corrupt set every round).

Fast tests: :class:`RobustSGD.start` on fake Grids whose node set changes every
round and which lose replies; the corrupt nodes of each round are chosen by
:class:`~flwr_byzantine.attacks.MobileAdversary` (``mode='rotate'``) among the
round's sampled nodes.  RGE still converges and filters exactly the corrupt
nodes that answered, round by round; the plain mean is driven off.

Real-Ray test (~40 s on 2 cores): a real Flower simulation (Ray backend) whose ClientApp wraps the
project's ClientApp: a seeded fraction of the nodes "leaves" every round (the
ClientApp raises, Flower returns an error reply) and a rotating set of partitions
answers with a scaled negative gradient.  Run directly as a script
(``python tests/test_churn.py OUTDIR``) it performs that simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.attacks import MobileAdversary
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid
from test_robust_sgd import D_B, D_W, grad_reply, model_record

ROOT = Path(__file__).resolve().parents[1]
POOL = list(range(1, 17))


class ChurnGrid(FakeGrid):
    """Fake Grid with churn and a mobile adversary.

    * ``online(round)``: the nodes connected while the round is configured
      (nodes join and leave between rounds);
    * ``drops(round, node)``: the node disappears after receiving its message
      (its reply never arrives: fewer replies than sampled);
    * ``adversary``: picks the round's corrupt nodes among the nodes taking part
      in it (sampled and not gone; with ``fraction=0.25`` at most the quarter the
      model allows); they answer with ``attack(message)`` instead of the honest gradient.
    """

    def __init__(self, online, drops, adversary: MobileAdversary | None, honest, attack):
        super().__init__(POOL, honest)
        self.online, self.drops, self.adversary, self.attack = online, drops, adversary, attack
        self.round = 1
        self.corrupt: dict[int, set[int]] = {}
        self.dropped: dict[int, set[int]] = {}
        self.connected: dict[int, set[int]] = {}

    def get_node_ids(self) -> list[int]:
        nodes = list(self.online(self.round))
        self.connected[self.round] = set(nodes)
        return nodes

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        rnd = int(messages[0].content["config"]["server-round"])
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        gone = {n for n in sampled if self.drops(rnd, n)}
        participating = [n for n in sampled if n not in gone]
        corrupt = set(self.adversary.corrupt_set(rnd, participating)) if self.adversary else set()
        self.corrupt[rnd], self.dropped[rnd] = corrupt, gone
        replies = []
        for msg, node in zip(messages, sampled):
            self.sent.append(msg)
            if node in gone:
                continue
            replies.append(self.attack(msg) if node in corrupt else self.handler(msg))
        self.round = rnd + 1
        return replies


def honest(msg: Message) -> Message:
    """Gradient of 0.5 ||x - 1||^2 plus noise, deterministic in (node, round)."""
    rnd, node = int(msg.content["config"]["server-round"]), int(msg.metadata.dst_node_id)
    rng = np.random.default_rng([node, rnd])
    arrays = msg.content["arrays"]
    w, b = arrays["w"].numpy(), arrays["b"].numpy()
    return grad_reply(msg, w - 1.0 + 0.1 * rng.normal(size=D_W), b - 1.0 + 0.1 * rng.normal(size=D_B))


def shifted(msg: Message) -> Message:
    """Attack: the honest gradient pushed by a constant vector of norm 6 (never vanishes)."""
    rep = honest(msg)
    g = rep.content["gradient"]
    shift = 6.0 / np.sqrt(np.prod(D_W) + np.prod(D_B))
    return grad_reply(msg, g["w"].numpy() + shift, g["b"].numpy() + shift)


def online(seed: int):
    def fn(rnd: int) -> list[int]:
        rng = np.random.default_rng([seed, rnd, 1])
        size = int(rng.integers(10, 15))
        return sorted(int(n) for n in rng.choice(POOL, size=size, replace=False))
    return fn


def drops(seed: int, p: float):
    def fn(rnd: int, node: int) -> bool:
        return bool(np.random.default_rng([seed, rnd, node, 2]).random() < p)
    return fn


def error(arrays: ArrayRecord) -> float:
    return float(np.abs(ArrayLayout.of(arrays).flatten(arrays) - 1.0).max())


def run(aggregator, rounds: int = 30, seed: int = 0, drop_p: float = 0.1):
    adversary = MobileAdversary(fraction=0.25, seed=seed, mode="rotate")
    grid = ChurnGrid(online(seed), drops(seed, drop_p), adversary, honest, shifted)
    strategy = RobustSGD(aggregator=aggregator, learning_rate=0.3, fraction_train=0.9, min_train_nodes=2,
                         min_valid_replies=3, seed=seed)
    result = strategy.start(grid=grid, initial_arrays=model_record(), num_rounds=rounds)
    return grid, strategy, result


@pytest.mark.parametrize("seed", [0, 1])
def test_rge_converges_under_churn_and_mobile_adversary(seed):
    grid, strategy, result = run(RGE(), seed=seed)
    assert error(result.arrays) < 0.1, error(result.arrays)  # SGD noise floor; the mean is off by ~0.3
    assert len(strategy.history) == 30
    corrupt_sets = set()
    lost = 0
    for rep in strategy.history:
        rnd = rep.server_round
        # nodes join and leave: the round samples only from the nodes connected then
        assert set(rep.sampled) <= grid.connected[rnd]
        # replies lost to churn are erasures, counted as such
        assert set(rep.accepted) == set(rep.sampled) - grid.dropped[rnd]
        assert rep.rejection_counts["no-reply"] == len(grid.dropped[rnd])
        lost += len(grid.dropped[rnd])
        # the filtered set follows the mobile adversary's corrupt set of the round
        assert grid.corrupt[rnd] and set(rep.filtered) == grid.corrupt[rnd], (rnd, rep.filtered, grid.corrupt[rnd])
        assert rep.applied
        corrupt_sets.add(frozenset(grid.corrupt[rnd]))
    assert len({frozenset(s) for s in grid.connected.values()}) > 20  # the node set really changed
    assert len(corrupt_sets) > 10  # and so did the corrupt set
    assert lost > 0


def test_mean_is_driven_off_by_the_same_adversary():
    _, _, result = run(Mean())
    assert error(result.arrays) > 0.2


def test_round_with_too_few_replies_keeps_model_and_training_continues():
    """In round 4 almost every node leaves: the model is kept, later rounds continue."""
    def drop(rnd, node):
        return rnd == 4 and node != 3

    grid = ChurnGrid(lambda r: POOL, drop, None, honest, shifted)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.3, min_valid_replies=3, seed=1)
    snapshots = {}

    def evaluate(rnd, arrays):
        snapshots[rnd] = ArrayLayout.of(arrays).flatten(arrays)

    result = strategy.start(grid=grid, initial_arrays=model_record(), num_rounds=20, evaluate_fn=evaluate)
    r4 = strategy.history[3]
    assert not r4.applied and r4.accepted == [3] and r4.rejection_counts["no-reply"] == len(POOL) - 1
    np.testing.assert_array_equal(snapshots[4], snapshots[3])
    assert all(r.applied for r in strategy.history if r.server_round != 4)
    assert error(result.arrays) < 0.1


def test_late_reply_from_previous_round_is_rejected_as_stale():
    """Node 5's reply is delayed by one round: the old reply arrives instead of the fresh one."""
    class LateGrid(ChurnGrid):
        late: Message | None = None

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages)
            if not replies:  # (federated evaluation is off: no messages)
                return replies
            fresh = next(r for r in replies if r.metadata.src_node_id == 5)
            replies = [r for r in replies if r is not fresh] + ([self.late] if self.late is not None else [])
            self.late = fresh
            return replies

    grid = LateGrid(lambda r: POOL, lambda r, n: False, None, honest, shifted)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.3, seed=2)
    result = strategy.start(grid=grid, initial_arrays=model_record(), num_rounds=10)
    assert strategy.history[0].rejection_counts["no-reply"] == 1
    for rep in strategy.history[1:]:
        assert rep.rejection_counts["stale"] == 1 and 5 not in rep.accepted
        assert "round" in rep.rejected[5], rep.rejected[5]
    assert error(result.arrays) < 0.1


# ----------------------------------------------------------------------------- real Ray simulation

SIM_NODES = 8
SIM_ROUNDS = 20
SIM_SEED = 4
SIM_DROP = 0.15


def sim_dropped(rnd: int, pid: int) -> bool:
    return bool(np.random.default_rng([SIM_SEED, rnd, pid, 3]).random() < SIM_DROP)


def sim_corrupt(rnd: int) -> set[int]:
    """The round's attackers: a quarter of the partitions that take part (rotating)."""
    adv = MobileAdversary(fraction=0.25, seed=SIM_SEED, mode="rotate")
    return set(adv.corrupt_set(rnd, [p for p in range(SIM_NODES) if not sim_dropped(rnd, p)]))


def build_churn_client_app(overrides):
    """The project's ClientApp, plus churn (raise = node gone) and a rotating set of attackers."""
    from flwr.clientapp import ClientApp

    from clients.client_app import build_client_app

    inner = build_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        pid = int(context.node_config["partition-id"])
        if sim_dropped(rnd, pid):
            raise RuntimeError(f"partition {pid} left the federation in round {rnd}")
        reply = inner(msg, context)
        if pid in sim_corrupt(rnd):
            grad = reply.content["gradient"]
            crafted = ArrayRecord({k: Array(np.ascontiguousarray(-10.0 * a.numpy())) for k, a in grad.items()})
            reply = Message(RecordDict({"gradient": crafted, "metrics": reply.content["metrics"]}), reply_to=msg)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return inner(msg, context)

    return app


def simulate_churn(out_dir: str) -> None:
    from flwr.simulation import run_simulation

    from server_app.server_app import build_server_app

    overrides = {"num-server-rounds": SIM_ROUNDS, "seed": SIM_SEED, "num-malicious": 0, "aggregator": "rge",
                 "output-dir": out_dir, "min-valid-replies": 3}
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_churn_client_app(overrides),
        num_supernodes=SIM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "ERROR",
                                      "log_to_driver": False}},
    )


@pytest.mark.slow
def test_ray_simulation_with_churn_and_mobile_adversary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    assert res["final_accuracy"] > 0.75, res["final_accuracy"]
    lost = 0
    for rep in res["rounds"]:
        rnd = rep["server_round"]
        gone = {p for p in range(SIM_NODES) if sim_dropped(rnd, p)}
        lost += len(gone)
        assert rep["rejection_counts"]["error"] == len(gone), rnd
        replied = set(rep["partition_ids"].values())
        assert replied == set(range(SIM_NODES)) - gone, rnd
        filtered = {rep["partition_ids"][str(n)] for n in rep["filtered"]}
        assert sim_corrupt(rnd) and filtered == sim_corrupt(rnd), (rnd, filtered, sim_corrupt(rnd), gone)
    assert lost > 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    simulate_churn(sys.argv[1])

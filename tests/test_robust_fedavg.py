"""RobustFedAvg: FedAvg's protocol with a robust decoder of the model updates.

Fast tests drive the strategy with fake Grids; the end-to-end tests run a quickstart-style
ClientApp that is *not* adapted to this project (``tests/quickstart_app.py``: local SGD
epochs, replies ``"arrays"`` + ``num-examples``) on the in-process Grid, against Flower's own
FedAvg.  The slow test runs the same comparison in a real Ray simulation.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from benchmarks.inprocess import InProcessGrid, seed_flower_sampling
from flwr_byzantine.aggregators import RGE, Mean, make_aggregator
from flwr_byzantine.checkpoint import Checkpointer
from flwr_byzantine.strategies import RobustFedAvg, RobustSGD, RunFailed
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_base import DEFAULT_AGGREGATOR

import quickstart_app as qa
from fakes import FakeGrid
from test_robust_sgd import D_B, D_W, grad_reply, model_record

ROOT = Path(__file__).resolve().parents[1]


def flat(arrays: ArrayRecord) -> np.ndarray:
    return ArrayLayout.of(arrays).flatten(arrays)


def weights_reply(msg: Message, w: np.ndarray, b: np.ndarray, **metrics) -> Message:
    """A FedAvg client's reply: its weights under "arrays" and a MetricRecord (no round echo)."""
    m = {"num-examples": 50, "train_loss": 0.5, **metrics}
    rec = RecordDict({"arrays": ArrayRecord({"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float32))}),
                      "metrics": MetricRecord(m)})
    return Message(rec, reply_to=msg)


def local_handler(target: float = 1.0, step: float = 0.5, noise: float = 0.0, seed: int = 0, bad=(), scale=10.0):
    """Clients of f(x) = 0.5 ||x - target||^2 doing one local step w = x - step (x - target);
    nodes in ``bad`` reply x + scale (x - w) (their update reversed and scaled)."""
    rng = np.random.default_rng(seed)

    def handler(msg: Message) -> Message:
        arrays = msg.content["arrays"]
        x_w, x_b = arrays["w"].numpy().astype(np.float64), arrays["b"].numpy().astype(np.float64)
        w = x_w - step * (x_w - target) + noise * rng.normal(size=D_W)
        b = x_b - step * (x_b - target) + noise * rng.normal(size=D_B)
        if msg.metadata.dst_node_id in bad:
            w, b = x_w + scale * (x_w - w), x_b + scale * (x_b - b)
        return weights_reply(msg, w, b)

    return handler


def one_round(strategy, grid, rnd=1, arrays=None):
    arrays = arrays if arrays is not None else model_record()
    msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.1}), grid))
    return msgs, strategy.aggregate_train(rnd, grid.send_and_receive(msgs))


# ----------------------------------------------------------------------------- constructor


def test_constructor_takes_fedavg_keywords_with_fedavg_defaults():
    ours = inspect.signature(RobustFedAvg.__init__).parameters
    for name, param in inspect.signature(FedAvg.__init__).parameters.items():
        if name == "self":
            continue
        assert name in ours, name
        assert ours[name].default == param.default, (name, ours[name].default, param.default)
    # positional order too: FedAvg(0.5, 0.5) and RobustFedAvg(0.5, 0.5) mean the same
    fed = [n for n in inspect.signature(FedAvg.__init__).parameters if n != "self"]
    assert [n for n in ours if n != "self"][: len(fed)] == fed


def test_default_aggregator_is_the_projects_default_defence():
    assert type(RobustFedAvg().aggregator) is type(make_aggregator(DEFAULT_AGGREGATOR))
    assert type(RobustSGD().aggregator) is type(RobustFedAvg().aggregator)


@pytest.mark.parametrize("kw", [{"server_learning_rate": 0.0}, {"server_learning_rate": float("nan")},
                                {"server_momentum": 1.0}, {"server_momentum": -0.1}])
def test_bad_server_step_is_refused(kw):
    with pytest.raises(ValueError):
        RobustFedAvg(**kw)


# ----------------------------------------------------------------------------- protocol and step


def test_configure_train_is_fedavgs_message():
    grid = FakeGrid(range(1, 6), local_handler())
    msgs, _ = one_round(RobustFedAvg(aggregator=Mean()), grid)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3, 4, 5]
    assert set(msgs[0].content.keys()) == {"arrays", "config"}
    cfg = msgs[0].content["config"]
    assert cfg["server-round"] == 1 and cfg["lr"] == 0.1  # the user's train config passes through


def test_mean_with_unit_server_step_is_unweighted_fedavg():
    """eta_s = 1, no momentum, Mean: x_{t+1} = mean of the clients' weights."""
    replies_w = {n: np.full(D_W, float(n)) for n in range(1, 6)}

    def handler(msg):
        n = msg.metadata.dst_node_id
        return weights_reply(msg, replies_w[n], np.full(D_B, -float(n)), **{"num-examples": 10 * n})

    _, (arrays, metrics) = one_round(RobustFedAvg(aggregator=Mean()), FakeGrid(range(1, 6), handler))
    np.testing.assert_allclose(arrays["w"].numpy(), 3.0, rtol=1e-6)  # unweighted: (1+...+5)/5
    np.testing.assert_allclose(arrays["b"].numpy(), -3.0, rtol=1e-6)
    assert metrics["applied"] == 1 and metrics["num-valid"] == 5


def test_num_examples_buys_no_influence():
    """A liar reporting 10^9 examples counts once (FedAvg would hand it the model)."""
    def handler(msg):
        if msg.metadata.dst_node_id == 1:
            return weights_reply(msg, np.full(D_W, 100.0), np.full(D_B, 100.0), **{"num-examples": 10**9})
        return weights_reply(msg, np.full(D_W, 1.0), np.full(D_B, 1.0))

    _, (arrays, _) = one_round(RobustFedAvg(aggregator=Mean()), FakeGrid(range(1, 5), handler))
    np.testing.assert_allclose(arrays["w"].numpy(), (100.0 + 3.0) / 4, rtol=1e-6)


def test_server_learning_rate_and_momentum():
    """x_{t+1} = x_t - eta_s m_{t+1}, m_{t+1} = beta m_t + u_hat (FedAvgM), u_hat = x_t - mean(w)."""
    handler = local_handler(target=1.0, step=0.5)  # u_i = 0.5 (x_t - 1) for every client
    s = RobustFedAvg(aggregator=Mean(), server_learning_rate=0.5, server_momentum=0.9)
    grid = FakeGrid(range(1, 5), handler)
    x, m = 0.0, 0.0
    arrays = model_record(0.0)
    for rnd in (1, 2, 3):
        _, (arrays, _) = one_round(s, grid, rnd, arrays)
        m = 0.9 * m + 0.5 * (x - 1.0)
        x = x - 0.5 * m
        np.testing.assert_allclose(flat(arrays), x, rtol=1e-5)


def test_rge_filters_reversed_updates_and_converges():
    bad = {2, 7}
    handler = local_handler(target=1.0, step=0.5, noise=0.01, seed=1, bad=bad)
    s = RobustFedAvg(aggregator=RGE(eps_tilde=0.25))
    result = s.start(grid=FakeGrid(range(1, 11), handler), initial_arrays=model_record(), num_rounds=8)
    assert all(set(r.filtered) == bad for r in s.history)
    assert np.abs(flat(result.arrays) - 1.0).max() < 0.05
    mean = RobustFedAvg(aggregator=Mean())
    res_mean = mean.start(grid=FakeGrid(range(1, 11), handler), initial_arrays=model_record(), num_rounds=8)
    assert np.abs(flat(res_mean.arrays) - 1.0).max() > 10  # the plain mean is driven away


def test_magnitude_checks_apply_to_the_update():
    """max_update_norm bounds ||x_t - w_i||, not ||w_i|| (weights far from 0 are fine)."""
    def handler(msg):
        if msg.metadata.dst_node_id == 3:
            return weights_reply(msg, np.full(D_W, 1e4), np.zeros(D_B))
        return weights_reply(msg, np.full(D_W, 50.0), np.full(D_B, 50.0))

    s = RobustFedAvg(aggregator=Mean(), max_update_norm=1000.0)
    _, (arrays, metrics) = one_round(s, FakeGrid(range(1, 6), handler), arrays=model_record(50.0))
    assert "max-update-norm" in s.history[-1].rejected[3] and metrics["num-valid"] == 4
    np.testing.assert_allclose(arrays["w"].numpy(), 50.0)


def test_gradient_replies_fail_the_run_naming_robust_sgd():
    s = RobustFedAvg(aggregator=Mean(), max_invalid_rounds=2)
    grid = FakeGrid(range(1, 5), lambda m: grad_reply(m, np.zeros(D_W), np.zeros(D_B)))
    with pytest.raises(RunFailed, match=r"replies carry 'gradient': use RobustSGD"):
        s.start(grid=grid, initial_arrays=model_record(), num_rounds=5)
    assert len(s.history) == 2


def test_train_metrics_are_medians_and_user_hook_is_honoured():
    def handler(msg):
        n = msg.metadata.dst_node_id
        loss = 1e9 if n == 1 else 0.1 * n
        return weights_reply(msg, np.ones(D_W), np.ones(D_B), train_loss=loss, **{"num-examples": 10**9 if n == 1 else 5})

    _, (_, metrics) = one_round(RobustFedAvg(aggregator=Mean()), FakeGrid(range(1, 6), handler))
    assert metrics["train_loss"] == pytest.approx(0.4)  # median of (1e9, .2, .3, .4, .5)
    assert metrics["num-valid"] == 5

    seen = {}

    def hook(records, key):
        seen["n"], seen["key"] = len(records), key
        return MetricRecord({"custom": float(len(records))})

    s = RobustFedAvg(aggregator=Mean(), train_metrics_aggr_fn=hook, weighted_by_key="n-ex")
    _, (_, metrics) = one_round(s, FakeGrid(range(1, 6), handler))
    assert seen == {"n": 5, "key": "n-ex"} and metrics["custom"] == 5.0 and "train_loss" not in metrics


def test_evaluate_rounds_on_by_default_with_robust_median():
    s = RobustFedAvg(aggregator=Mean())
    msgs = list(s.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid(range(1, 6), None)))
    assert len(msgs) == 5 and msgs[0].metadata.message_type == "evaluate"
    accs = [0.9, 0.91, 0.92, 0.0, 1e9]
    replies = [Message(RecordDict({"metrics": MetricRecord({"eval_acc": a, "num-examples": 10**9 if a > 1 else 3})}),
                       reply_to=m) for m, a in zip(msgs, accs)]
    assert s.aggregate_evaluate(1, replies)["eval_acc"] == pytest.approx(0.91)
    calls = []
    hooked = RobustFedAvg(evaluate_metrics_aggr_fn=lambda recs, key: calls.append(len(recs)) or MetricRecord({"x": 1.0}))
    msgs = list(hooked.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid(range(1, 6), None)))
    replies = [Message(RecordDict({"metrics": MetricRecord({"eval_acc": 0.5})}), reply_to=m) for m in msgs]
    assert hooked.aggregate_evaluate(1, replies)["x"] == 1.0 and calls == [5]
    assert list(RobustFedAvg(fraction_evaluate=0.0).configure_evaluate(
        1, model_record(), ConfigRecord(), FakeGrid(range(1, 6), None))) == []


def test_fraction_train_zero_is_evaluation_only_as_in_fedavg():
    def handler(msg):
        assert msg.metadata.message_type == "evaluate", "no train message expected"
        return Message(RecordDict({"metrics": MetricRecord({"eval_acc": 0.5})}), reply_to=msg)

    s = RobustFedAvg(fraction_train=0.0, max_invalid_rounds=1)
    result = s.start(grid=FakeGrid(range(1, 4), handler), initial_arrays=model_record(0.5), num_rounds=3)
    np.testing.assert_array_equal(flat(result.arrays), 0.5)
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3] and s.history == []


def test_checkpoint_resume_keeps_the_momentum(tmp_path):
    handler = local_handler(target=1.0, step=0.5, noise=0.01, seed=4, bad={3})

    def make():
        return RobustFedAvg(aggregator=RGE(), server_momentum=0.5, fraction_train=0.8, seed=3)

    ref = make().start(grid=FakeGrid(range(1, 11), handler), initial_arrays=model_record(), num_rounds=6)

    class Crash(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train" and \
                    int(messages[0].content["config"]["server-round"]) == 4:
                raise KeyboardInterrupt("server killed")
            return super().send_and_receive(messages, timeout=timeout)

    handler = local_handler(target=1.0, step=0.5, noise=0.01, seed=4, bad={3})
    with pytest.raises(KeyboardInterrupt):
        make().start(grid=Crash(range(1, 11), handler), initial_arrays=model_record(), num_rounds=6,
                     checkpoint=Checkpointer(tmp_path, {"k": 1}))
    resumed = make()
    res = resumed.start(grid=FakeGrid(range(1, 11), handler), initial_arrays=model_record(), num_rounds=6,
                        checkpoint=Checkpointer(tmp_path, {"k": 1}))
    assert resumed.resumed_from == 3
    np.testing.assert_allclose(flat(res.arrays), flat(ref.arrays), rtol=1e-6)


# ----------------------------------------------------------------------------- end to end (quickstart app)

NUM_NODES, ROUNDS, ATTACKERS = 10, 20, {3, 7}


def run_quickstart(strategy, attackers=frozenset()):
    """Flower's strategy loop over an in-process Grid of the unmodified quickstart-style ClientApp."""
    seed_flower_sampling(0)
    app = qa.build_client_app(local_epochs=2, lr=0.1)
    client = qa.reversed_updates(app, set(attackers)) if attackers else app
    grid = InProcessGrid(client, NUM_NODES, {}, seed=0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(qa.new_model().state_dict()),
                            num_rounds=ROUNDS, evaluate_fn=qa.central_evaluate)
    return qa.final_accuracy(result), result


@pytest.fixture(scope="module")
def clean_fedavg():
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return run_quickstart(FedAvg())


def test_quickstart_clean_robust_fedavg_matches_fedavg(clean_fedavg):
    fed_acc, _ = clean_fedavg
    strategy = RobustFedAvg()
    acc, result = run_quickstart(strategy)
    assert fed_acc > 0.85, fed_acc
    assert abs(acc - fed_acc) <= 0.01, (acc, fed_acc)
    assert all(r.applied for r in strategy.history)
    assert len(result.evaluate_metrics_clientapp) == ROUNDS  # federated evaluation ran (fraction_evaluate=1.0)
    assert 0.5 < result.evaluate_metrics_clientapp[ROUNDS]["eval_acc"] <= 1.0
    assert "train_loss" in result.train_metrics_clientapp[ROUNDS]


def test_quickstart_reversed_updates_robust_holds_fedavg_falls_to_chance(clean_fedavg):
    fed_acc, _ = clean_fedavg
    strategy = RobustFedAvg()
    acc, _ = run_quickstart(strategy, ATTACKERS)
    attacked_fedavg, _ = run_quickstart(FedAvg(), ATTACKERS)
    assert acc >= fed_acc - 0.02, (acc, fed_acc)
    assert attacked_fedavg < 0.2, attacked_fedavg  # 10 classes: chance is 0.1
    partition_of = InProcessGrid(lambda m, c: None, NUM_NODES, {}, seed=0).partition_of  # same seeded node ids
    attackers = sorted(n for n, p in partition_of.items() if p in ATTACKERS)
    assert all(sorted(r.filtered) == attackers for r in strategy.history)


def test_quickstart_client_with_robust_sgd_fails_the_run_with_the_fix():
    """The reply-format mismatch (weights to the gradient strategy) ends the run with one clear error."""
    with pytest.raises(RunFailed, match=r"replies carry 'arrays': use RobustFedAvg"):
        run_quickstart(RobustSGD(learning_rate=0.5, max_invalid_rounds=2))


# ----------------------------------------------------------------------------- real Ray simulation


@pytest.mark.slow
def test_quickstart_ray_simulation(tmp_path):
    """Same comparison in a real Flower simulation (Ray backend, ``run_simulation``), 10 supernodes."""
    accs = {}
    for name in ("fedavg", "robust", "robust-attacked", "fedavg-attacked"):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "quickstart_sim.py"), name, str(out)],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        acc = json.loads((out / "result.json").read_text())
        accs[name] = acc[str(max(int(r) for r in acc))]
    print(accs)
    assert abs(accs["robust"] - accs["fedavg"]) <= 0.01, accs
    assert accs["robust-attacked"] >= accs["fedavg"] - 0.02, accs
    assert accs["fedavg-attacked"] < 0.2, accs


# ----------------------------------------------------------------------------- the App's local-training mode


def test_app_local_mode_serves_robust_fedavg_and_filters_the_attackers(tmp_path):
    """client-mode='local': the App's clients train locally, 2 of 10 send -10x their model update."""
    from benchmarks.inprocess import run_app

    common = {"client-mode": "local", "local-epochs": 2, "num-server-rounds": 10, "num-malicious": 2,
              "attack": "scaled-negative", "attack-scale": 10.0, "seed": 0}
    rge = run_app({**common, "aggregator": "rge", "output-dir": str(tmp_path / "rge")}, 10)
    mean = run_app({**common, "aggregator": "mean", "output-dir": str(tmp_path / "mean")}, 10)
    assert rge["final_accuracy"] > 0.85, rge["final_accuracy"]
    assert mean["final_accuracy"] < 0.2, mean["final_accuracy"]
    assert rge["filtered_partitions"] == rge["malicious_partitions"] and len(rge["malicious_partitions"]) == 2
    assert all(r["applied"] and not r["rejected"] for r in rge["rounds"])
    assert rge["config"]["client-mode"] == "local" and list((tmp_path / "rge").glob("*.json"))


def test_app_server_and_clients_in_different_modes_fail_the_run():
    """The App's server in gradient mode, its clients training locally: the run fails naming RobustFedAvg."""
    from flwr.app import Context

    from clients.client_app import build_client_app
    from flwr_byzantine.config import RunConfig
    from server_app.server_app import run_federation

    cfg = RunConfig.from_mapping({"num-server-rounds": 5, "num-malicious": 0, "max-invalid-rounds": 2,
                                  "output-dir": "/nonexistent/never-written"})
    grid = InProcessGrid(build_client_app({"client-mode": "local", "num-malicious": 0}), 4, {}, seed=0)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RunFailed, match=r"2 consecutive rounds.*replies carry 'arrays': use RobustFedAvg"):
        run_federation(grid, context, cfg)


# ----------------------------------------------------------------------------- `flwr run`: the failed status

MISMATCH_APP = '''
import sys
sys.path.insert(0, {tests!r})
from flwr.app import ArrayRecord
from flwr.serverapp import ServerApp
from flwr_byzantine.strategies import RobustSGD
import quickstart_app as qa

client = qa.build_client_app(local_epochs=1)
server = ServerApp()


@server.main()
def main(grid, context):
    RobustSGD(learning_rate=0.5, max_invalid_rounds=2).start(
        grid=grid, initial_arrays=ArrayRecord(qa.new_model().state_dict()), num_rounds=5)
'''

MISMATCH_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "mismatch-app"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flwr-byzantine-tests"

[tool.flwr.app.components]
serverapp = "mismatch:server"
clientapp = "mismatch:client"

[tool.flwr.app.config]
num-server-rounds = 5
'''


@pytest.mark.slow
def test_flwr_run_with_wrong_reply_format_ends_as_failed_with_the_fix(tmp_path):
    """`flwr run` of a ServerApp with RobustSGD and a quickstart (weights) ClientApp: finished:failed + message."""
    import time

    from flwr_byzantine.deploy.local import free_port

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "mismatch.py").write_text(MISMATCH_APP.format(tests=str(ROOT / "tests")))
    (app_dir / "pyproject.toml").write_text(MISMATCH_PYPROJECT)
    home = tmp_path / "flwr-home"
    flwr = str(Path(sys.executable).parent / "flwr")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    try:
        started = subprocess.run([flwr, "run", ".", "--format", "json", "--federation-config", "num-supernodes=4"],
                                 cwd=app_dir, env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = json.loads(started.stdout[started.stdout.index("{"):])["run-id"]
        status, deadline = "timeout", time.monotonic() + 420
        while time.monotonic() < deadline:
            ls = subprocess.run([flwr, "ls", "--run-id", str(run_id), "--format", "json"],
                                cwd=app_dir, env=env, capture_output=True, text=True, timeout=60)
            if ls.returncode == 0:
                run = json.loads(ls.stdout[ls.stdout.index("{"):])["runs"][0]
                if run["status"].startswith("finished"):
                    status = f"{run['status']}:{run['status-details']}"
                    break
            time.sleep(3)
        assert status.startswith("finished:failed"), status
        assert "replies carry 'arrays': use RobustFedAvg" in status, status
    finally:  # stop the local SuperLink this test started (its command line names our FLWR_HOME)
        pids = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", pid], check=False)

"""End-to-end: Algorithm 2 (randk, server-broadcast K_t) in a real Flower simulation with attackers.

``flwr.simulation.run_simulation`` with the project's ServerApp and ClientApp
(``build_server_app`` / ``build_client_app`` with run-config overrides), 8
SuperNodes of which 2 send a scaled negative gradient, RGE decoding in R^k.
Checks the results file the ServerApp writes: the model learns, the attackers are
filtered, nothing honest is rejected, and the uplink per round is about k/d of
the uncompressed payload.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

NUM_NODES = 8
NUM_ROUNDS = 20
DIM = 64 * 10 + 10  # digits (64 features, 10 classes), multinomial logistic regression
K_FRACTION = 0.5

# A Ray simulation (~1 min on 2 cores): the default suite keeps one, tests/test_e2e_simulation.py.
pytestmark = pytest.mark.slow


def _simulate(tmp_path: Path, **extra) -> dict:
    from flwr.simulation import run_simulation

    from clients.client_app import build_client_app
    from server_app.server_app import build_server_app

    overrides = {
        "dataset": "digits", "model": "logreg", "num-server-rounds": NUM_ROUNDS, "seed": 0,
        "compression": "randk", "k-fraction": K_FRACTION, "num-malicious": 2, "attack": "scaled-negative",
        "attack-scale": 10.0, "aggregator": "rge", "output-dir": str(tmp_path),
        "reply-timeout": 300.0,  # round 1 includes Ray's worker start-up (> 30 s on a loaded machine)
        **extra,
    }
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    return _simulate(tmp_path_factory.mktemp("randk-e2e"))


def test_randk_simulation_converges_under_attack(result):
    res = result
    k = math.ceil(K_FRACTION * DIM)
    assert res["config"]["compression"] == "randk" and res["config"]["k-fraction"] == K_FRACTION
    assert res["num_nodes"] == NUM_NODES and len(res["malicious_partitions"]) == 2
    assert len(res["rounds"]) == NUM_ROUNDS
    # learns: digits has 10 balanced classes, chance is ~0.1
    assert res["final_accuracy"] > 0.7, res["final_accuracy"]
    for rnd in res["rounds"]:
        assert rnd["applied"] and rnd["rejected"] == {}, rnd["rejected"]  # honest randk replies all valid
        assert len(rnd["accepted"]) == NUM_NODES
        # uplink: k float32 values per client (+ a small npy header) instead of d
        uncompressed = len(rnd["accepted"]) * 4 * DIM
        assert rnd["bytes_up"] / uncompressed == pytest.approx(k / DIM, rel=0.25), rnd["bytes_up"]
        assert rnd["decode_seconds"] > 0
    early = [len(r["filtered"]) for r in res["rounds"][:5]]
    assert min(early) == 2, early  # while the attack matters, two replies are filtered every round


def test_randk_simulation_filters_exactly_the_malicious_partitions(result):
    res = result
    assert res["filtered_partitions"] == res["malicious_partitions"]
    for rnd in res["rounds"]:
        assert set(rnd["filtered"]) <= set(int(n) for n in rnd["accepted"])
        filtered = sorted(rnd["partition_ids"][str(n)] for n in rnd["filtered"])
        assert set(filtered) <= set(res["malicious_partitions"]), rnd["server_round"]

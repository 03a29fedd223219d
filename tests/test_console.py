"""Console output of the shared strategy loop: one line per round and a short final summary."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from flwr.app import MetricRecord

from flwr_byzantine.aggregators import RGE
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid
from test_robust_sgd import D_B, D_W, grad_reply, honest_handler, model_record

ROUNDS = 6


def attacked(msg):
    if msg.metadata.dst_node_id in (3, 7):
        return grad_reply(msg, -50.0 * np.ones(D_W), -50.0 * np.ones(D_B))
    return honest_handler()(msg)


@pytest.fixture(autouse=True)
def _listen_to_flwr(caplog):
    """Capture Flower's logger directly (other tests may stop it propagating to the root logger)."""
    flwr_logger = logging.getLogger("flwr")
    direct = not flwr_logger.propagate
    if direct:
        flwr_logger.addHandler(caplog.handler)
    yield
    if direct:
        flwr_logger.removeHandler(caplog.handler)


def _info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def _central(rnd, arrays):
    return MetricRecord({"accuracy": 0.5 + 0.01 * rnd, "loss": 1.0 / (rnd + 1)})


def test_robust_sgd_logs_one_line_per_round_and_a_summary(caplog):
    strategy = RobustSGD(aggregator=RGE(eps_tilde=0.25), learning_rate=0.3)
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.start(FakeGrid(range(1, 11), attacked), model_record(), num_rounds=ROUNDS, evaluate_fn=_central)
    lines = _info_lines(caplog)
    per_round = [line for line in lines if re.match(r"\[\d+/\d+\] ", line)]
    assert [line.split("]")[0] for line in per_round] == [f"[{r}/{ROUNDS}" for r in range(ROUNDS + 1)]
    assert len(lines) <= ROUNDS + 10  # start banner + configuration, per-round lines, final summary
    assert not any("Aggregated MetricRecord" in line or "Final results" in line for line in lines)
    for line in per_round[1:]:
        assert line.count("[3, 7]") == 1 and "central: accuracy" in line  # node ids once per round
    assert "finished 6 rounds" in lines[-1] and "nodes filtered at least once: [3, 7]" in lines[-1]


@pytest.mark.parametrize("method", ["comrade", "giant"])
def test_newton_strategies_use_the_same_loop(caplog, method):
    from flwr_byzantine.strategies.comrade import Comrade
    from flwr_byzantine.strategies.giant import Giant
    from test_newton_strategy import AppGrid, setup, w0

    app, *_ = setup(4)
    strategy = Comrade(beta=0.25) if method == "comrade" else Giant()
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = strategy.start(AppGrid(4, app), w0(), num_rounds=3)
    lines = _info_lines(caplog)
    per_round = [line for line in lines if re.match(r"\[\d+/3\] ", line)]
    assert len(per_round) == 3 and len(lines) <= 3 + 8
    assert not any("Aggregated MetricRecord" in line or "Final results" in line for line in lines)
    if method == "giant":
        assert all("gradient:" in line and "direction:" in line for line in per_round)
        assert result.train_metrics_clientapp[3]["communication-rounds"] == 6
    assert "communication rounds" in lines[-1]

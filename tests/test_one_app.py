"""One ServerApp and one ClientApp (``[tool.flwr.app.components]``) for every ``method``.

In-process (:class:`benchmarks.inprocess.InProcessGrid`, no Ray): the ClientApp pyproject
points at answers both SGD and Newton messages, each by its run config's ``method``; the
ServerApp pyproject points at runs a COMRADE / GIANT federation end to end; a bad ``method``
fails before round 1 with one message.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from benchmarks.inprocess import InProcessGrid
from clients.client_app import app as client_app
from flwr_byzantine.config import ConfigError, RunConfig, all_defaults, parse_run_config
from flwr_byzantine.data import dataset_info
from flwr_byzantine.models import build_model
from flwr_byzantine.strategies.comrade import Comrade
from server_app.server_app import app as server_app
from server_app.server_app import build_strategy

ROOT = Path(__file__).resolve().parents[1]
NEWTON = {"method": "comrade", "newton-dataset": "synthetic", "newton-synthetic-n": 2000, "newton-synthetic-d": 6}


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


def test_pyproject_points_at_the_one_server_and_client_app():
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server_app.server_app:app", "clientapp": "clients.client_app:app"}
    assert not (ROOT / "server_app" / "newton_server_app.py").exists()
    assert not (ROOT / "clients" / "newton_client_app.py").exists()
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table["method"] == "sgd" and parse_run_config(table) == RunConfig.from_mapping(table)  # flwr run . default


def _sgd_messages(grid: InProcessGrid, run_config: dict):
    cfg = RunConfig.from_mapping(run_config)
    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, info["num_features"], info["num_classes"], cfg.seed)
    return list(build_strategy(cfg, len(grid.get_node_ids())).configure_train(
        1, ArrayRecord(model.state_dict()), ConfigRecord(), grid))


def _newton_messages(grid: InProcessGrid):
    return list(Comrade(beta=0.0).configure_train(1, ArrayRecord({"w": Array(np.zeros(6))}), ConfigRecord(), grid))


def test_one_client_app_serves_sgd_and_newton_messages():
    sgd_config = {"num-malicious": 0}
    sgd_grid, newton_grid = InProcessGrid(client_app, 3, sgd_config), InProcessGrid(client_app, 3, NEWTON)
    sgd = sgd_grid.send_and_receive(_sgd_messages(sgd_grid, sgd_config))
    newton = newton_grid.send_and_receive(_newton_messages(newton_grid))
    assert len(sgd) == len(newton) == 3
    assert all(not r.has_error() and "gradient" in r.content.array_records for r in sgd)
    assert all(not r.has_error() and list(r.content["update"].keys()) == ["p"] for r in newton)
    # a message of the other method is answered with an error naming the protocol, never misread
    crossed = newton_grid.send_and_receive(_sgd_messages(newton_grid, sgd_config))
    crossed += sgd_grid.send_and_receive(_newton_messages(sgd_grid))
    assert len(crossed) == 6 and all(r.has_error() and "protocol" in r.error.reason for r in crossed)


@pytest.mark.parametrize("method, rounds, per_iter", [("comrade", 3, 1), ("giant", 2, 2)])
def test_newton_methods_run_through_the_one_server_app(tmp_path, method, rounds, per_iter):
    run_config = {**NEWTON, "method": method, "num-server-rounds": rounds, "output-dir": str(tmp_path),
                  "newton-beta": 0.3 if method == "comrade" else 0.0, "newton-assumed-byzantine-fraction": 0.25,
                  "newton-num-malicious": 1 if method == "comrade" else 0, "newton-attack": "scaled-negative",
                  "newton-attack-scale": 20.0, "newton-min-nodes": 4}
    grid = InProcessGrid(client_app, 4, run_config)
    server_app(grid, _context(run_config))
    (path,) = tmp_path.glob(f"newton-{method}-*.json")
    out = json.loads(path.read_text())
    assert out["method"] == method and out["config"]["method"] == method
    assert out["communication_rounds"] == rounds * per_iter and out["messages_sent"] == 4 * rounds * per_iter
    assert all(not rep["rejected"] for rep in out["rounds"])
    assert out["final_accuracy"] > 0.6 and np.isfinite(out["final_w"]).all()
    if method == "comrade":
        assert len(out["malicious_partitions"]) == 1
        assert set(out["malicious_partitions"]) <= set(out["trimmed_partitions"])


@pytest.mark.parametrize("bad", [{"method": "newton"}, {"method": "SGD"}, {"method": 1},
                                 {"method": "comrade", "newton-attack": "alie"},
                                 {"method": "sgd", "newton-bta": 0.3}])
def test_bad_method_config_fails_before_round_1(tmp_path, bad):
    run_config = {**bad, "output-dir": str(tmp_path)}
    grid = InProcessGrid(client_app, 2, run_config)
    with pytest.raises(ConfigError) as info:
        server_app(grid, _context(run_config))
    assert "\n" not in str(info.value) and grid.delivered == {} and not list(tmp_path.iterdir())
    if "newton" in str(bad.get("method")) or bad.get("method") in ("SGD", 1):
        assert str(info.value).startswith("run config 'method' must be one of ['sgd', 'comrade', 'giant']")


def test_pyproject_table_is_every_method_s_keys():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == all_defaults()


def test_docs_document_every_newton_key():
    from flwr_byzantine.config import NEWTON_DEFAULTS

    doc = (ROOT / "docs" / "comrade.md").read_text()
    missing = [k for k in ("method", *NEWTON_DEFAULTS) if f"`{k}`" not in doc]
    assert not missing, missing


@pytest.mark.parametrize("overrides, method", [("", "sgd"), ("method='comrade' newton-beta=0.3", "comrade"),
                                               ("method='giant'", "giant")])
def test_flwr_run_config_selects_the_method(overrides, method):
    """What ``flwr run . --run-config "..."`` hands the apps (Flower's own fusing of pyproject and overrides)."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    cfg = parse_run_config(get_fused_config_from_dir(ROOT, parse_config_args([overrides] if overrides else None)))
    assert cfg.method == method
    if method == "comrade":
        assert cfg.beta == 0.3


def test_a_new_attack_is_one_class_and_one_registry_line(monkeypatch):
    """Both methods' run configs take their allowed attacks (and the scale parameter) from the registry."""
    from dataclasses import dataclass
    from typing import ClassVar

    from flwr_byzantine import attacks
    from flwr_byzantine.attacks.update import ScaledNegative

    @dataclass
    class Halved(ScaledNegative):
        name: ClassVar[str] = "halved"

    for method in ("sgd", "comrade", "giant"):
        key = "attack" if method == "sgd" else "newton-attack"
        with pytest.raises(ConfigError, match="must be one of"):
            parse_run_config({"method": method, key: "halved"})
    monkeypatch.setitem(attacks.ATTACKS, "halved", Halved)
    assert parse_run_config({"attack": "halved"}).attack == "halved"
    assert parse_run_config({"method": "giant", "newton-attack": "halved"}).attack == "halved"
    assert attacks.run_attack_params("halved", 0.5, "comrade") == {"scale": 0.5}

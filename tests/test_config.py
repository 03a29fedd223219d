"""Run config: pyproject and DEFAULTS agree; garbage values are refused with a clear error."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flwr_byzantine.config import DEFAULTS, ConfigError, RunConfig, all_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_defaults():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == all_defaults() and set(DEFAULTS) <= set(cfg)


def test_defaults_validate_and_roundtrip():
    cfg = RunConfig.from_mapping({})
    assert cfg.sigma0 is None and cfg.aggregator == "rge"
    assert RunConfig.from_mapping(cfg.as_dict()) == cfg


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("learning-rate", -1.0, "learning-rate"),
        ("learning-rate", float("nan"), "finite"),
        ("batch-size", 2.5, "integer"),
        ("batch-size", "32", "number"),
        ("aggregator", "magic", "one of"),
        ("eps-tilde", 0.4, "<= 0.25"),
        ("sigma0", "big", "auto"),
        ("full-batch", "yes", "true or false"),
        ("no-such-key", 1, "unknown run config key"),
    ],
)
def test_garbage_config_is_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({key: value})


def test_explicit_sigma0():
    assert RunConfig.from_mapping({"sigma0": 0.5}).sigma0 == 0.5


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in DEFAULTS if f"| `{k}` |" not in readme]
    assert not missing, missing


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("attack", "sign_flip", "'attack' must be one of"),
        ("attack", "/../../../escaped", "'attack' must be one of"),
        ("aggregator", "bucketing:magic", "'aggregator' must be one of"),
        ("aggregator", "rge:cclip", "'aggregator' must be one of"),
        ("aggregator", "../x", "'aggregator' must be one of"),
        ("dataset", "no-such-data", "'dataset'"),
    ],
)
def test_names_come_from_the_registries(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({key: value})


def test_registry_names_and_wrappers_are_accepted():
    from flwr_byzantine.attacks import ATTACKS

    for name, cls in ATTACKS.items():
        if getattr(cls, "needs_model_history", False):  # stateful attackers run in the simulator only
            with pytest.raises(ConfigError, match="needs every round's model"):
                RunConfig.from_mapping({"attack": name})
        else:
            assert RunConfig.from_mapping({"attack": name}).attack == name
    assert RunConfig.from_mapping({"aggregator": "bucketing:cclip"}).aggregator == "bucketing:cclip"
    assert RunConfig.from_mapping({"dataset": "synthetic-logreg:d=5"}).dataset == "synthetic-logreg:d=5"


def test_num_malicious_beyond_the_federation_is_refused():
    from flwr_byzantine.config import check_federation

    check_federation(RunConfig.from_mapping({"num-malicious": 20}), 20)
    with pytest.raises(ConfigError, match="num-malicious"):
        check_federation(RunConfig.from_mapping({"num-malicious": 25}), 20)
    with pytest.raises(ConfigError, match="min-valid-replies"):
        check_federation(RunConfig.from_mapping({"num-malicious": 0, "min-valid-replies": 5}), 4)


def test_server_fails_before_round_one_when_num_malicious_exceeds_the_nodes(tmp_path):
    """The ServerApp refuses the run before it sends any message (and writes no file)."""
    from fakes import FakeGrid
    from server_app.server_app import run_federation

    grid = FakeGrid([11, 12, 13], lambda msg: None)
    cfg = RunConfig.from_mapping({"num-malicious": 5, "output-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="num-malicious"):
        run_federation(grid, object(), cfg)
    assert grid.sent == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hostile", ["/../../../escaped", "../..", "a/b\\c", "x\ny", "." * 300])
def test_file_stems_never_leave_the_output_dir(tmp_path, hostile):
    from flwr_byzantine.results import safe_stem

    stem = safe_stem("rge", hostile, "run1")
    path = (tmp_path / f"{stem}.json").resolve()
    assert path.parent == tmp_path.resolve() and "/" not in stem and "\\" not in stem and "\n" not in stem
    assert not stem.startswith(".") and ".." not in stem and len(stem) <= 120


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"client-mode": "weights"}, "'client-mode' must be one of"),
        ({"local-epochs": -1}, "'local-epochs' must be >= 0"),
        ({"local-steps": 1.5}, "'local-steps' must be an integer"),
        ({"client-lr": 0.0}, "'client-lr' must be > 0"),
        ({"server-lr": -1.0}, "'server-lr' must be > 0"),
        ({"server-momentum": 1.0}, "'server-momentum' must be < 1"),
        ({"max-invalid-rounds": -1}, "'max-invalid-rounds' must be >= 0"),
        ({"client-mode": "local", "local-epochs": 0, "local-steps": 0}, "local-epochs >= 1 or local-steps >= 1"),
        ({"client-mode": "local", "compression": "randk"}, "needs client-mode='gradient'"),
        ({"client-mode": "local", "adversary": "omniscient"}, "adversary='client'"),
    ],
)
def test_local_training_mode_keys_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(overrides)


def test_local_training_mode_config():
    cfg = RunConfig.from_mapping({"client-mode": "local", "local-steps": 5, "client-lr": 0.05, "server-momentum": 0.9})
    assert (cfg.client_mode, cfg.local_steps, cfg.client_lr, cfg.server_momentum) == ("local", 5, 0.05, 0.9)
    assert RunConfig.from_mapping(cfg.as_dict()) == cfg


def test_client_side_validation_does_not_import_the_aggregators():
    """The lean ClientApp validates its run config without scipy; the server checks the rule name."""
    import subprocess
    import sys

    script = ("import sys; from flwr_byzantine.config import RunConfig; "
              "c = RunConfig.from_mapping({'attack': 'alie', 'aggregator': 'krum'}, check_aggregator=False); "
              "print(c.attack, 'flwr_byzantine.aggregators' in sys.modules, 'scipy.linalg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["alie", "False", "False"], out.stderr[-2000:]
    with pytest.raises(ConfigError, match="'attack' must be one of"):
        RunConfig.from_mapping({"attack": "sign_flip"}, check_aggregator=False)

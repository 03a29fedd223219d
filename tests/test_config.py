"""Run config: pyproject and DEFAULTS agree; garbage values are refused with a clear error."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flwr_byzantine.config import DEFAULTS, ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_defaults():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert cfg == DEFAULTS


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

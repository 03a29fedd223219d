"""Run configuration of the COMRADE / GIANT Flower apps (pure Python, no Flower).

The ServerApp ``server_app/newton_server_app.py`` and the ClientApp
``clients/newton_client_app.py`` read the keys below from ``context.run_config`` (``flwr run
--run-config``) merged with programmatic overrides (``build_newton_*_app(overrides)``, used by
``run_simulation``).  Keys specific to Newton methods carry a ``newton-`` prefix so they cannot
clash with the gradient app's keys in the same ``pyproject.toml``; the gradient app's keys
(:data:`flwr_byzantine.config.DEFAULTS`) are accepted and ignored for the same reason, any other
key (a typo such as ``newton-bta``) is refused.  Bad values raise :class:`NewtonConfigError`
naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .attacks import ATTACKS

#: Defaults of every key read by the Newton apps.
NEWTON_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 10,
    "seed": 0,
    "output-dir": "outputs",
    "newton-method": "comrade",
    "newton-dataset": "digits",
    "newton-data-path": "",
    "newton-test-path": "",
    "newton-synthetic-n": 4000,
    "newton-synthetic-d": 20,
    "newton-partitioner": "uniform",
    "newton-dirichlet-alpha": 1.0,
    "newton-objective": "logistic",
    "newton-lambda": 1e-2,
    "newton-beta": 0.25,
    "newton-assumed-byzantine-fraction": 0.2,
    "newton-step-size": 1.0,
    "newton-server-data-fraction": 0.0,
    "newton-compression": "none",
    "newton-topk-fraction": 0.1,
    "newton-cg-threshold": 500,
    "newton-num-malicious": 0,
    "newton-attack": "gaussian",
    "newton-attack-scale": 1.0,
    "newton-min-valid-replies": 2,
    "newton-min-nodes": 2,
    "newton-max-direction-norm": 0.0,
}

METHODS = ("comrade", "giant")
DATASETS = ("breast-cancer", "digits", "synthetic", "libsvm")
PARTITIONERS = ("uniform", "dirichlet")
OBJECTIVES = ("logistic", "least-squares")
COMPRESSIONS = ("none", "topk", "sign")


class NewtonConfigError(ValueError):
    """A Newton run-config value is of the wrong type or out of range."""


def _num(cfg: Mapping[str, Any], key: str, lo: float | None = None, hi: float | None = None, *,
         integer: bool = False, lo_open: bool = False, hi_open: bool = False) -> float:
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise NewtonConfigError(f"run config '{key}' must be a number, got {val!r}")
    if not math.isfinite(val):
        raise NewtonConfigError(f"run config '{key}' must be finite, got {val!r}")
    if integer and int(val) != val:
        raise NewtonConfigError(f"run config '{key}' must be an integer, got {val!r}")
    if lo is not None and (val < lo or (lo_open and val == lo)):
        raise NewtonConfigError(f"run config '{key}' must be {'>' if lo_open else '>='} {lo}, got {val!r}")
    if hi is not None and (val > hi or (hi_open and val == hi)):
        raise NewtonConfigError(f"run config '{key}' must be {'<' if hi_open else '<='} {hi}, got {val!r}")
    return int(val) if integer else float(val)


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...] | None = None) -> str:
    val = cfg[key]
    if not isinstance(val, str):
        raise NewtonConfigError(f"run config '{key}' must be a string, got {val!r}")
    if choices is not None and val not in choices:
        raise NewtonConfigError(f"run config '{key}' must be one of {list(choices)}, got {val!r}")
    return val


@dataclass(frozen=True)
class NewtonConfig:
    """Validated Newton run configuration (attribute = key without ``newton-``, snake case)."""

    num_server_rounds: int
    seed: int
    output_dir: str
    method: str
    dataset: str
    data_path: str
    test_path: str
    synthetic_n: int
    synthetic_d: int
    partitioner: str
    dirichlet_alpha: float
    objective: str
    lam: float
    beta: float
    assumed_byzantine_fraction: float
    step_size: float
    server_data_fraction: float
    compression: str
    topk_fraction: float
    cg_threshold: int
    num_malicious: int
    attack: str
    attack_scale: float
    min_valid_replies: int
    max_direction_norm: float
    min_nodes: int

    @classmethod
    def from_mapping(cls, *mappings: Mapping[str, Any] | None) -> "NewtonConfig":
        """Merge ``mappings`` (later wins) over :data:`NEWTON_DEFAULTS`.

        The gradient app's keys are ignored (same ``pyproject.toml`` table); any other
        unknown key raises :class:`NewtonConfigError`.
        """
        from ..config import DEFAULTS as GRADIENT_DEFAULTS  # pure Python, no cycle at import time

        cfg = dict(NEWTON_DEFAULTS)
        for mapping in mappings:
            for key, val in (mapping or {}).items():
                if key in cfg:
                    cfg[key] = val
                elif key not in GRADIENT_DEFAULTS:
                    raise NewtonConfigError(f"unknown run config key '{key}'; Newton keys: {sorted(NEWTON_DEFAULTS)}")
        return cls(
            num_server_rounds=int(_num(cfg, "num-server-rounds", lo=1, integer=True)),
            seed=int(_num(cfg, "seed", lo=0, integer=True)),
            output_dir=_choice(cfg, "output-dir"),
            method=_choice(cfg, "newton-method", METHODS),
            dataset=_choice(cfg, "newton-dataset", DATASETS),
            data_path=_choice(cfg, "newton-data-path"),
            test_path=_choice(cfg, "newton-test-path"),
            synthetic_n=int(_num(cfg, "newton-synthetic-n", lo=2, integer=True)),
            synthetic_d=int(_num(cfg, "newton-synthetic-d", lo=1, integer=True)),
            partitioner=_choice(cfg, "newton-partitioner", PARTITIONERS),
            dirichlet_alpha=_num(cfg, "newton-dirichlet-alpha", lo=0.0, lo_open=True),
            objective=_choice(cfg, "newton-objective", OBJECTIVES),
            lam=_num(cfg, "newton-lambda", lo=0.0),
            beta=_num(cfg, "newton-beta", lo=0.0, hi=1.0, hi_open=True),
            assumed_byzantine_fraction=_num(cfg, "newton-assumed-byzantine-fraction", lo=0.0, hi=1.0, hi_open=True),
            step_size=_num(cfg, "newton-step-size", lo=0.0, lo_open=True),
            server_data_fraction=_num(cfg, "newton-server-data-fraction", lo=0.0, hi=1.0, hi_open=True),
            compression=_choice(cfg, "newton-compression", COMPRESSIONS),
            topk_fraction=_num(cfg, "newton-topk-fraction", lo=0.0, hi=1.0, lo_open=True),
            cg_threshold=int(_num(cfg, "newton-cg-threshold", lo=0, integer=True)),
            num_malicious=int(_num(cfg, "newton-num-malicious", lo=0, integer=True)),
            attack=_choice(cfg, "newton-attack", ATTACKS),
            attack_scale=_num(cfg, "newton-attack-scale", lo=0.0),
            min_valid_replies=int(_num(cfg, "newton-min-valid-replies", lo=1, integer=True)),
            max_direction_norm=_num(cfg, "newton-max-direction-norm", lo=0.0),
            min_nodes=int(_num(cfg, "newton-min-nodes", lo=1, integer=True)),
        )

    def as_dict(self) -> dict[str, Any]:
        """The configuration with its run-config keys."""
        shared = {"num_server_rounds", "seed", "output_dir"}
        out = {}
        for f in fields(self):
            key = f.name.replace("_", "-")
            if f.name == "lam":
                key = "lambda"
            out[key if f.name in shared else f"newton-{key}"] = getattr(self, f.name)
        return out

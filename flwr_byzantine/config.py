"""Run configuration of the flwr-byzantine Flower App, parsed and validated in one place.

The keys are the ``[tool.flwr.app.config]`` keys of ``pyproject.toml`` (kebab
case, Flower's convention); :func:`all_defaults` (:data:`DEFAULTS` plus the Newton
keys :data:`NEWTON_DEFAULTS`) must stay identical to that table (a test checks it).
``flwr run . --run-config "key=value ..."`` overrides them.

Run config ``method`` selects the training method: ``sgd`` (default; RobustSGD or
RobustFedAvg, :class:`RunConfig`) or the distributed Newton methods ``comrade`` / ``giant``
(:class:`NewtonConfig`; their own keys carry a ``newton-`` prefix).  :func:`parse_run_config`
checks ``method`` first and then parses the keys of that method; the other method's keys are
accepted and ignored (they share one table), any other key is refused.  Garbage values raise
:class:`ConfigError` with the key, the value and what is accepted, before any round starts.
Allowed ``aggregator`` and ``attack`` values come from the registries
(:data:`flwr_byzantine.aggregators.REGISTRY`, :func:`flwr_byzantine.attacks.attack_names`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

#: Default run config (mirror of ``[tool.flwr.app.config]`` in pyproject.toml).
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 60,
    "seed": 0,
    "method": "sgd",
    "dataset": "digits",
    "dirichlet-alpha": 1.0,
    "model": "logreg",
    "batch-size": 32,
    "full-batch": False,
    "learning-rate": 0.5,
    "projection-radius": 0.0,
    "aggregator": "rge",
    "eps-tilde": 0.25,
    "sigma0": "auto",
    "num-malicious": 4,
    "attack": "scaled-negative",
    "attack-scale": 10.0,
    "adversary": "client",
    "adversary-mode": "static",
    "fraction-train": 1.0,
    "min-valid-replies": 2,
    "max-update-norm": 0.0,
    "compression": "none",
    "k-fraction": 0.1,
    "k": 0,
    "coordinate-form": "seed",
    "output-dir": "outputs",
    "checkpoint": False,
    "reply-timeout": 30.0,
    "max-invalid-rounds": 3,
    "client-mode": "gradient",
    "local-epochs": 1,
    "local-steps": 0,
    "client-lr": 0.1,
    "server-lr": 1.0,
    "server-momentum": 0.0,
}

#: Training methods (run config ``method``): ``sgd`` and the distributed Newton methods.
METHODS = ("sgd", "comrade", "giant")
#: The Newton methods (served by :class:`NewtonConfig`, the Comrade / Giant strategies).
NEWTON_METHODS = ("comrade", "giant")

#: Defaults of the keys only the Newton methods read (``num-server-rounds``, ``seed``,
#: ``output-dir`` and ``method`` are shared with :data:`DEFAULTS`).
NEWTON_DEFAULTS: dict[str, Any] = {
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
NEWTON_DATASETS = ("breast-cancer", "digits", "synthetic", "libsvm")
NEWTON_PARTITIONERS = ("uniform", "dirichlet")
NEWTON_OBJECTIVES = ("logistic", "least-squares")
NEWTON_COMPRESSIONS = ("none", "topk", "sign")
#: Keys both methods read.
SHARED_KEYS = ("num-server-rounds", "seed", "method", "output-dir")


def all_defaults() -> dict[str, Any]:
    """Every run-config key with its default: the ``[tool.flwr.app.config]`` table."""
    return {**DEFAULTS, **NEWTON_DEFAULTS}


#: Pre-aggregation wrappers, written ``"<wrapper>:<inner rule>"`` (e.g. ``"bucketing:cclip"``).
PRE_AGGREGATORS = ("bucketing", "nnm")
COMPRESSIONS = ("none", "randk")
#: ``gradient``: clients send one mini-batch gradient (RobustSGD); ``local``: clients train locally and send
#: their weights (RobustFedAvg).
CLIENT_MODES = ("gradient", "local")
COORDINATE_FORMS = ("seed", "indices")
ADVERSARIES = ("client", "omniscient")
ADVERSARY_MODES = ("static", "random", "rotate")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def _num(cfg: Mapping[str, Any], key: str, lo: float | None = None, hi: float | None = None,
         integer: bool = False, lo_open: bool = False, hi_open: bool = False) -> float:
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise ConfigError(f"run config '{key}' must be a number, got {val!r}")
    if not math.isfinite(val):
        raise ConfigError(f"run config '{key}' must be finite, got {val!r}")
    if integer and int(val) != val:
        raise ConfigError(f"run config '{key}' must be an integer, got {val!r}")
    if lo is not None and (val < lo or (lo_open and val == lo)):
        raise ConfigError(f"run config '{key}' must be {'>' if lo_open else '>='} {lo}, got {val!r}")
    if hi is not None and (val > hi or (hi_open and val == hi)):
        raise ConfigError(f"run config '{key}' must be {'<' if hi_open else '<='} {hi}, got {val!r}")
    return int(val) if integer else float(val)


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...] | None = None) -> str:
    val = cfg[key]
    if not isinstance(val, str):
        raise ConfigError(f"run config '{key}' must be a string, got {val!r}")
    if choices is not None and val not in choices:
        raise ConfigError(f"run config '{key}' must be one of {list(choices)}, got {val!r}")
    return val


def aggregator_names() -> tuple[str, ...]:
    """Rules a run config may name: the aggregator registry minus the pre-aggregation wrappers."""
    from .aggregators import REGISTRY  # lazy: keep this module importable without numpy work

    return tuple(n for n in REGISTRY if n not in PRE_AGGREGATORS)


def _aggregator(cfg: Mapping[str, Any]) -> str:
    """``aggregator``: a registered rule, or ``"<wrapper>:<rule>"`` with a registered wrapper and rule."""
    val = _choice(cfg, "aggregator")
    rules = aggregator_names()
    base, sep, inner = val.partition(":")
    if (not sep and base in rules) or (sep and base in PRE_AGGREGATORS and inner in rules):
        return val
    raise ConfigError(f"run config 'aggregator' must be one of {list(rules)} or '<wrapper>:<rule>' with a "
                      f"wrapper in {list(PRE_AGGREGATORS)}, got {val!r}")


def _attack(cfg: Mapping[str, Any]) -> str:
    """``attack``: a name of the attack registry (:data:`flwr_byzantine.attacks.ATTACKS`) that SGD clients play."""
    from .attacks import ATTACKS, attack_names

    val = _choice(cfg, "attack", attack_names("sgd"))
    if getattr(ATTACKS[val], "needs_model_history", False):
        raise ConfigError(f"attack {val!r} needs every round's model and its own past replies, which the "
                          f"stateless ClientApp does not keep; use it through the library or "
                          f"python -m benchmarks.robustness")
    return val


def _dataset(cfg: Mapping[str, Any]) -> str:
    """``dataset``: a name the data layer knows (``flwr_byzantine.data.dataset_info`` accepts it)."""
    from .data.partition import dataset_info

    val = _choice(cfg, "dataset")
    try:
        dataset_info(val)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"run config 'dataset': {exc}") from None
    return val


def _method(cfg: Mapping[str, Any], allowed: tuple[str, ...] = METHODS) -> str:
    """``method``: one of :data:`METHODS` (and of ``allowed``)."""
    val = cfg.get("method", DEFAULTS["method"])
    if not isinstance(val, str) or val not in METHODS:
        raise ConfigError(f"run config 'method' must be one of {list(METHODS)}, got {val!r}")
    if val not in allowed:
        raise ConfigError(f"run config 'method'={val!r} is not served here; expected one of {list(allowed)}")
    return val


def _merge(mappings: tuple[Mapping[str, Any] | None, ...], own: Mapping[str, Any],
           other: Mapping[str, Any]) -> dict[str, Any]:
    """``own`` updated with ``mappings`` (later wins); keys of ``other`` ignored, unknown keys refused."""
    cfg = dict(own)
    for mapping in mappings:
        for key, val in (mapping or {}).items():
            if key in own:
                cfg[key] = val
            elif key not in other:
                raise ConfigError(f"unknown run config key '{key}'; valid keys: {sorted(all_defaults())}")
    return cfg


def parse_run_config(*mappings: Mapping[str, Any] | None, check_aggregator: bool = True) -> "RunConfig | NewtonConfig":
    """The validated run config of ``mappings`` merged in order (e.g. ``context.run_config``, overrides).

    ``method`` is checked first (one :class:`ConfigError` for an unknown method); ``sgd`` gives a
    :class:`RunConfig`, ``comrade`` / ``giant`` a :class:`NewtonConfig`.
    """
    merged: dict[str, Any] = {}
    for mapping in mappings:
        merged.update(mapping or {})
    if _method(merged) in NEWTON_METHODS:
        return NewtonConfig.from_mapping(merged)
    return RunConfig.from_mapping(merged, check_aggregator=check_aggregator)


def check_federation(cfg: "RunConfig", num_nodes: int) -> None:
    """What can only be checked once the federation's size is known (raises :class:`ConfigError`).

    ``num-malicious`` must not exceed the number of nodes (it would silently make every
    client malicious) and ``min-valid-replies`` must be reachable.
    """
    if cfg.num_malicious > num_nodes:
        raise ConfigError(f"run config 'num-malicious'={cfg.num_malicious} exceeds the {num_nodes} connected nodes")
    if cfg.min_valid_replies > num_nodes:
        raise ConfigError(f"run config 'min-valid-replies'={cfg.min_valid_replies} exceeds the {num_nodes} "
                          f"connected nodes: no round could ever be applied")


def _bool(cfg: Mapping[str, Any], key: str) -> bool:
    val = cfg[key]
    if not isinstance(val, bool):
        raise ConfigError(f"run config '{key}' must be true or false, got {val!r}")
    return val


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration (attribute names are the keys in snake case)."""

    num_server_rounds: int
    seed: int
    dataset: str
    dirichlet_alpha: float
    model: str
    batch_size: int
    full_batch: bool
    learning_rate: float
    projection_radius: float
    aggregator: str
    eps_tilde: float
    sigma0: float | None
    num_malicious: int
    attack: str
    attack_scale: float
    adversary: str
    adversary_mode: str
    fraction_train: float
    min_valid_replies: int
    max_update_norm: float
    compression: str
    k_fraction: float
    k: int
    coordinate_form: str
    output_dir: str
    checkpoint: bool
    reply_timeout: float
    max_invalid_rounds: int
    client_mode: str
    local_epochs: int
    local_steps: int
    client_lr: float
    server_lr: float
    server_momentum: float

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None = None, *,
                     check_aggregator: bool = True) -> "RunConfig":
        """Merge ``overrides`` (e.g. ``context.run_config``) over :data:`DEFAULTS` and validate.

        ``method`` must be ``sgd``; the Newton keys (:data:`NEWTON_DEFAULTS`) are ignored.

        ``check_aggregator=False`` only checks that ``aggregator`` is a string: the ClientApp
        passes it because checking the name against the aggregator registry imports the
        aggregators (scipy, ~0.6 s in every fresh ClientApp process), and the ServerApp has
        already refused a bad name before round 1.
        """
        cfg = _merge((overrides,), DEFAULTS, NEWTON_DEFAULTS)
        _method(cfg, ("sgd",))
        sigma_raw = cfg["sigma0"]
        if isinstance(sigma_raw, str):
            if sigma_raw != "auto":
                raise ConfigError(f"run config 'sigma0' must be 'auto' or a number >= 0, got {sigma_raw!r}")
            sigma0 = None
        else:
            sigma0 = _num(cfg, "sigma0", lo=0.0)
        if cfg["adversary"] == "omniscient":
            from .attacks import DATA_ATTACKS  # the registry's data attacks: only clients can poison data

            if cfg["attack"] in DATA_ATTACKS:
                raise ConfigError(f"attack {cfg['attack']!r} poisons client data: use adversary='client'")
            if cfg["checkpoint"] is True:
                raise ConfigError("checkpoint=true is not supported with adversary='omniscient'")
        if cfg["client-mode"] == "local":
            if cfg["compression"] != "none":
                raise ConfigError("compression='randk' compresses gradients: it needs client-mode='gradient'")
            if cfg["adversary"] == "omniscient":
                raise ConfigError("adversary='omniscient' attacks gradient replies: use adversary='client' "
                                  "with client-mode='local'")
            if cfg["local-epochs"] == 0 and cfg["local-steps"] == 0:
                raise ConfigError("client-mode='local' needs local-epochs >= 1 or local-steps >= 1")
        momentum = _num(cfg, "server-momentum", lo=0.0)
        if momentum >= 1.0:
            raise ConfigError(f"run config 'server-momentum' must be < 1, got {momentum!r}")
        return cls(
            num_server_rounds=int(_num(cfg, "num-server-rounds", lo=1, integer=True)),
            seed=int(_num(cfg, "seed", lo=0, integer=True)),
            dataset=_dataset(cfg),
            dirichlet_alpha=_num(cfg, "dirichlet-alpha", lo=0.0, lo_open=True),
            model=_choice(cfg, "model", ("logreg", "mlp", "linear")),
            batch_size=int(_num(cfg, "batch-size", lo=1, integer=True)),
            full_batch=_bool(cfg, "full-batch"),
            learning_rate=_num(cfg, "learning-rate", lo=0.0, lo_open=True),
            projection_radius=_num(cfg, "projection-radius", lo=0.0),
            aggregator=_aggregator(cfg) if check_aggregator else _choice(cfg, "aggregator"),
            eps_tilde=_num(cfg, "eps-tilde", lo=0.0, hi=0.25),
            sigma0=sigma0,
            num_malicious=int(_num(cfg, "num-malicious", lo=0, integer=True)),
            attack=_attack(cfg),
            attack_scale=_num(cfg, "attack-scale", lo=0.0),
            adversary=_choice(cfg, "adversary", ADVERSARIES),
            adversary_mode=_choice(cfg, "adversary-mode", ADVERSARY_MODES),
            fraction_train=_num(cfg, "fraction-train", lo=0.0, hi=1.0, lo_open=True),
            min_valid_replies=int(_num(cfg, "min-valid-replies", lo=1, integer=True)),
            max_update_norm=_num(cfg, "max-update-norm", lo=0.0),
            compression=_choice(cfg, "compression", COMPRESSIONS),
            k_fraction=_num(cfg, "k-fraction", lo=0.0, hi=1.0, lo_open=True),
            k=int(_num(cfg, "k", lo=0, integer=True)),
            coordinate_form=_choice(cfg, "coordinate-form", COORDINATE_FORMS),
            output_dir=_choice(cfg, "output-dir"),
            checkpoint=_bool(cfg, "checkpoint"),
            reply_timeout=_num(cfg, "reply-timeout", lo=0.0, lo_open=True),
            max_invalid_rounds=int(_num(cfg, "max-invalid-rounds", lo=0, integer=True)),
            client_mode=_choice(cfg, "client-mode", CLIENT_MODES),
            local_epochs=int(_num(cfg, "local-epochs", lo=0, integer=True)),
            local_steps=int(_num(cfg, "local-steps", lo=0, integer=True)),
            client_lr=_num(cfg, "client-lr", lo=0.0, lo_open=True),
            server_lr=_num(cfg, "server-lr", lo=0.0, lo_open=True),
            server_momentum=momentum,
        )

    @property
    def method(self) -> str:
        """Run config ``method`` of this configuration: always ``"sgd"``."""
        return "sgd"

    def as_dict(self) -> dict[str, Any]:
        """The configuration with the original kebab-case keys (``sigma0=None`` -> ``'auto'``)."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        out["sigma0"] = "auto" if self.sigma0 is None else self.sigma0
        return out


@dataclass(frozen=True)
class NewtonConfig:
    """Validated run configuration of ``method`` ``comrade`` / ``giant`` (attribute = key without
    ``newton-``, snake case; ``lam`` is ``newton-lambda``)."""

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
        """Merge ``mappings`` (later wins) over the shared keys of :data:`DEFAULTS` and :data:`NEWTON_DEFAULTS`.

        ``method`` must be ``comrade`` or ``giant`` (default ``comrade`` here); the SGD keys are
        ignored; ``newton-attack`` must be an attack of the registry that Newton clients play
        (:func:`flwr_byzantine.attacks.attack_names`).
        """
        from .attacks import attack_names  # numpy only; the run config stays cheap to import

        own = {**{k: DEFAULTS[k] for k in SHARED_KEYS}, "method": "comrade", **NEWTON_DEFAULTS}
        cfg = _merge(mappings, own, DEFAULTS)
        method = _method(cfg, NEWTON_METHODS)
        return cls(
            num_server_rounds=int(_num(cfg, "num-server-rounds", lo=1, integer=True)),
            seed=int(_num(cfg, "seed", lo=0, integer=True)),
            output_dir=_choice(cfg, "output-dir"),
            method=method,
            dataset=_choice(cfg, "newton-dataset", NEWTON_DATASETS),
            data_path=_choice(cfg, "newton-data-path"),
            test_path=_choice(cfg, "newton-test-path"),
            synthetic_n=int(_num(cfg, "newton-synthetic-n", lo=2, integer=True)),
            synthetic_d=int(_num(cfg, "newton-synthetic-d", lo=1, integer=True)),
            partitioner=_choice(cfg, "newton-partitioner", NEWTON_PARTITIONERS),
            dirichlet_alpha=_num(cfg, "newton-dirichlet-alpha", lo=0.0, lo_open=True),
            objective=_choice(cfg, "newton-objective", NEWTON_OBJECTIVES),
            lam=_num(cfg, "newton-lambda", lo=0.0),
            beta=_num(cfg, "newton-beta", lo=0.0, hi=1.0, hi_open=True),
            assumed_byzantine_fraction=_num(cfg, "newton-assumed-byzantine-fraction", lo=0.0, hi=1.0, hi_open=True),
            step_size=_num(cfg, "newton-step-size", lo=0.0, lo_open=True),
            server_data_fraction=_num(cfg, "newton-server-data-fraction", lo=0.0, hi=1.0, hi_open=True),
            compression=_choice(cfg, "newton-compression", NEWTON_COMPRESSIONS),
            topk_fraction=_num(cfg, "newton-topk-fraction", lo=0.0, hi=1.0, lo_open=True),
            cg_threshold=int(_num(cfg, "newton-cg-threshold", lo=0, integer=True)),
            num_malicious=int(_num(cfg, "newton-num-malicious", lo=0, integer=True)),
            attack=_choice(cfg, "newton-attack", attack_names(method)),
            attack_scale=_num(cfg, "newton-attack-scale", lo=0.0),
            min_valid_replies=int(_num(cfg, "newton-min-valid-replies", lo=1, integer=True)),
            max_direction_norm=_num(cfg, "newton-max-direction-norm", lo=0.0),
            min_nodes=int(_num(cfg, "newton-min-nodes", lo=1, integer=True)),
        )

    def as_dict(self) -> dict[str, Any]:
        """The configuration with its run-config keys."""
        out = {}
        for f in fields(self):
            key = "lambda" if f.name == "lam" else f.name.replace("_", "-")
            out[key if key in SHARED_KEYS else f"newton-{key}"] = getattr(self, f.name)
        return out

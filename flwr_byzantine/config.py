"""Run configuration of the flwr-byzantine Flower App, parsed and validated in one place.

The keys are the ``[tool.flwr.app.config]`` keys of ``pyproject.toml`` (kebab
case, Flower's convention); :data:`DEFAULTS` must stay identical to that table
(a test checks it).  ``flwr run . --run-config "key=value ..."`` overrides them.
Garbage values raise :class:`ConfigError` with the key, the value and what is
accepted, before any round starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

#: Default run config (mirror of ``[tool.flwr.app.config]`` in pyproject.toml).
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 60,
    "seed": 0,
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

#: Pre-aggregation wrappers, written ``"<wrapper>:<inner rule>"`` (e.g. ``"bucketing:cclip"``).
PRE_AGGREGATORS = ("bucketing", "nnm")
COMPRESSIONS = ("none", "randk")
#: ``gradient``: clients send one mini-batch gradient (RobustSGD); ``local``: clients train locally and send
#: their weights (RobustFedAvg).
CLIENT_MODES = ("gradient", "local")
COORDINATE_FORMS = ("seed", "indices")
ADVERSARIES = ("client", "omniscient")
ADVERSARY_MODES = ("static", "random", "rotate")
#: The attack parameter that run config ``attack-scale`` sets, per attack (0 keeps the attack's default).
SCALE_PARAM = {"sleeper": "wake_round", "gaussian": "std", "scaled-negative": "scale", "ipm": "epsilon", "alie": "z", "arbitrary": "scale"}
#: Attacks that poison data: only malicious clients can play them, not the server-side adversary.
DATA_ATTACKS = ("label-flip", "random-labels")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


def _num(cfg: Mapping[str, Any], key: str, lo: float | None = None, hi: float | None = None,
         integer: bool = False, lo_open: bool = False) -> float:
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise ConfigError(f"run config '{key}' must be a number, got {val!r}")
    if not math.isfinite(val):
        raise ConfigError(f"run config '{key}' must be finite, got {val!r}")
    if integer and int(val) != val:
        raise ConfigError(f"run config '{key}' must be an integer, got {val!r}")
    if lo is not None and (val < lo or (lo_open and val == lo)):
        raise ConfigError(f"run config '{key}' must be {'>' if lo_open else '>='} {lo}, got {val!r}")
    if hi is not None and val > hi:
        raise ConfigError(f"run config '{key}' must be <= {hi}, got {val!r}")
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
    """``attack``: a name of the attack registry (:data:`flwr_byzantine.attacks.ATTACKS`)."""
    from .attacks import ATTACKS

    val = _choice(cfg, "attack")
    if val not in ATTACKS:
        raise ConfigError(f"run config 'attack' must be one of {sorted(ATTACKS)}, got {val!r}")
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

        ``check_aggregator=False`` only checks that ``aggregator`` is a string: the ClientApp
        passes it because checking the name against the aggregator registry imports the
        aggregators (scipy, ~0.6 s in every fresh ClientApp process), and the ServerApp has
        already refused a bad name before round 1.
        """
        cfg = dict(DEFAULTS)
        for key, val in (overrides or {}).items():
            if key not in DEFAULTS:
                raise ConfigError(f"unknown run config key '{key}'; valid keys: {sorted(DEFAULTS)}")
            cfg[key] = val
        sigma_raw = cfg["sigma0"]
        if isinstance(sigma_raw, str):
            if sigma_raw != "auto":
                raise ConfigError(f"run config 'sigma0' must be 'auto' or a number >= 0, got {sigma_raw!r}")
            sigma0 = None
        else:
            sigma0 = _num(cfg, "sigma0", lo=0.0)
        if cfg["adversary"] == "omniscient":
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

    def as_dict(self) -> dict[str, Any]:
        """The configuration with the original kebab-case keys (``sigma0=None`` -> ``'auto'``)."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        out["sigma0"] = "auto" if self.sigma0 is None else self.sigma0
        return out

"""Byzantine attacks for evaluating robust aggregation (pure numpy/torch, no Flower).

* Model-update attacks (:class:`UpdateAttack`): ``attack.craft(honest, num_byzantine, round)``
  returns the ``(num_byzantine, d)`` Byzantine rows (same framework, dtype and device
  as ``honest``) or ``None`` for an erasure.
* Data-poisoning attacks (:class:`DataAttack`): ``attack.poison(X, y, num_classes)``.
* :class:`MobileAdversary`: which nodes are corrupt in each round.

``make_attack(name, **params)`` builds an attack by its registry name (:data:`ATTACKS`);
``attack_names(method)`` lists the names a run config of that ``method`` may use and
``run_attack_params(name, scale, method)`` the parameters its run config gives the attack.
Adding an attack: one module with the class (its ``name``, ``methods``, ``scale_param``) and
one line in :data:`ATTACKS`.
"""

from __future__ import annotations

from typing import Any

from .adaptive import DefenceAware
from .base import DataAttack, UpdateAttack, param_names
from .data import LabelFlip, RandomLabels
from .memory_aware import MemoryAware
from .minmax import MinMax, MinSum
from .mobile import MobileAdversary
from .orthogonal import OrthogonalBias
from .sleeper import Sleeper
from .update import (
    ALIE,
    ArbitraryVector,
    Erasure,
    GaussianNoise,
    InnerProductManipulation,
    Mimic,
    ScaledNegative,
    SignFlip,
    alie_z_max,
    top_principal_scores,
)

#: registry name -> attack class.
ATTACKS: dict[str, type] = {
    cls.name: cls
    for cls in (
        GaussianNoise, SignFlip, ScaledNegative, ALIE, InnerProductManipulation, Mimic, Erasure,
        ArbitraryVector, DefenceAware, LabelFlip, RandomLabels, Sleeper, MemoryAware, MinMax, MinSum, OrthogonalBias,
    )
}
#: names of the model-update attacks.
UPDATE_ATTACKS = tuple(n for n, c in ATTACKS.items() if issubclass(c, UpdateAttack))
#: names of the data-poisoning attacks.
DATA_ATTACKS = tuple(n for n, c in ATTACKS.items() if issubclass(c, DataAttack))


def attack_names(method: str = "sgd") -> tuple[str, ...]:
    """Registry names whose clients of ``method`` (run config ``method``) can play them, sorted.

    Every attack names the methods it supports in its class attribute ``methods``.
    """
    return tuple(sorted(n for n, c in ATTACKS.items() if method in c.methods))


def run_attack_params(name: str, scale: float, method: str = "sgd") -> dict[str, Any]:
    """The parameters a run config gives attack ``name``: ``attack-scale`` sets the class's
    ``scale_param`` (``scale = 0`` keeps the attack's default), plus its ``method_params[method]``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid: {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    params: dict[str, Any] = dict(cls.method_params.get(method, {}))
    if cls.scale_param is not None and scale > 0:
        params[cls.scale_param] = scale
    return params


def make_attack(name: str, **params: Any) -> UpdateAttack | DataAttack:
    """Instantiate the attack registered as ``name`` with ``params``.

    Raises ``ValueError`` (listing the valid names, or the attack's valid
    parameters) for an unknown name, an unknown parameter or an invalid value.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid: {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    valid = param_names(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for attack {name!r}; valid parameters: {valid}; "
            f"valid attacks: {sorted(ATTACKS)}"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad parameters for attack {name!r} ({exc}); valid parameters: {valid}; "
                         f"valid attacks: {sorted(ATTACKS)}") from exc


__all__ = [
    "ALIE", "ATTACKS", "ArbitraryVector", "DATA_ATTACKS", "DataAttack", "DefenceAware", "Erasure",
    "GaussianNoise", "InnerProductManipulation", "LabelFlip", "MemoryAware", "Mimic", "MinMax", "MinSum", "MobileAdversary",
    "OrthogonalBias",
    "RandomLabels",
    "Sleeper", "attack_names", "run_attack_params",
    "ScaledNegative", "SignFlip", "UPDATE_ATTACKS", "UpdateAttack", "alie_z_max", "make_attack",
    "top_principal_scores",
]

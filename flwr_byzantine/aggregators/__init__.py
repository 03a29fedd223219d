"""Robust aggregators (pure numpy/torch, no Flower) behind one interface.

``make_aggregator(name, **params)`` builds one by its registry name.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

from .base import AggregationResult, Aggregator
from .defence import RobustDefence
from .mean import Mean
from .rge import RGE
from .sigma import estimate_sigma0_sq, sigma0_from_theory

logger = logging.getLogger(__name__)

#: registry name -> "module:Class" (modules imported lazily).
REGISTRY: dict[str, str] = {
    "rge": "defence:RobustDefence",
    "rge-paper": "rge:RGE",
    "mean": "mean:Mean",
    "median": "coordinate:CoordinateMedian",
    "trimmed-mean": "coordinate:TrimmedMean",
    "krum": "krum:Krum",
    "multi-krum": "krum:MultiKrum",
    "bulyan": "krum:Bulyan",
    "geomed": "geomed:GeometricMedian",
    "cclip": "clipping:CenteredClipping",
    "bucketing": "preagg:Bucketing",
    "nnm": "preagg:NearestNeighborMixing",
    "norm-trim": "normtrim:NormTrimming",
}


#: Largest admissible number of Byzantine inputs f for R inputs, per rule that needs f.
_MAX_F = {
    "trimmed-mean": lambda R: (R - 1) // 2,  # 2f < R
    "krum": lambda R: (R - 3) // 2,  # R > 2f + 2
    "multi-krum": lambda R: (R - 3) // 2,
    "bulyan": lambda R: (R - 3) // 4,  # R >= 4f + 3
    "nnm": lambda R: (R - 1) // 2,  # R > 2f
}


def build_for_federation(
    name: str, num_nodes: int, eps_tilde: float, sigma0: float | None = None, **rge_params: Any
) -> Aggregator:
    """The aggregator ``name`` configured for ``num_nodes`` inputs with an assumed Byzantine fraction.

    Peers get ``f = floor(eps_tilde * num_nodes)``, capped at what each rule admits (a warning
    says when the cap bites); RGE gets ``eps_tilde`` (at most 1/4), ``sigma0`` and ``rge_params``.
    Pre-aggregation wrappers are written ``"bucketing:<inner>"`` / ``"nnm:<inner>"``.
    This is the one place where the ServerApp and the benchmarks turn a rule name into a rule.
    """
    base, _, inner = name.partition(":")
    f = int(math.floor(eps_tilde * num_nodes))
    if base in _MAX_F and f > max(_MAX_F[base](num_nodes), 0):
        capped = max(_MAX_F[base](num_nodes), 0)
        logger.warning("%s admits at most f=%d Byzantine inputs out of %d; using f=%d instead of %d",
                       base, capped, num_nodes, capped, f)
        f = capped
    if base in ("bucketing", "nnm"):
        inner_rule = build_for_federation(inner or "cclip", num_nodes, eps_tilde, sigma0, **rge_params)
        extra = {"num_byzantine": f} if base == "nnm" else {}
        return make_aggregator(base, inner=inner_rule, **extra)
    params: dict[str, Any] = {
        "rge": {"eps_tilde": min(eps_tilde, 0.25), "sigma0": sigma0, **rge_params},
        "rge-paper": {"eps_tilde": min(eps_tilde, 0.25), "sigma0": sigma0, **rge_params},
        "trimmed-mean": {"num_trim": f},
        "krum": {"num_byzantine": f},
        "multi-krum": {"num_byzantine": f, "num_selected": max(num_nodes - f, 1)},
        "bulyan": {"num_byzantine": f},
    }.get(base, {})
    return make_aggregator(base, **params)


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """Instantiate the aggregator registered as ``name`` with ``params``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**params)


__all__ = [
    "AggregationResult", "Aggregator", "Mean", "REGISTRY", "RGE", "RobustDefence", "build_for_federation",
    "estimate_sigma0_sq", "make_aggregator", "sigma0_from_theory",
]

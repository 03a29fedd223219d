"""Robust aggregators (pure numpy/torch, no Flower) behind one interface.

``make_aggregator(name, **params)`` builds one by its registry name.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import AggregationResult, Aggregator
from .mean import Mean
from .rge import RGE
from .sigma import estimate_sigma0_sq, sigma0_from_theory

#: registry name -> "module:Class" (modules imported lazily).
REGISTRY: dict[str, str] = {
    "rge": "rge:RGE",
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
}


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """Instantiate the aggregator registered as ``name`` with ``params``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; valid: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**params)


__all__ = [
    "AggregationResult", "Aggregator", "Mean", "REGISTRY", "RGE",
    "estimate_sigma0_sq", "make_aggregator", "sigma0_from_theory",
]

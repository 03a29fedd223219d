"""Flower Message-API strategies (the thin Flower layer over the pure aggregators)."""

from .robust_sgd import PROTOCOL, RobustSGD, RoundReport

__all__ = ["PROTOCOL", "RobustSGD", "RoundReport"]

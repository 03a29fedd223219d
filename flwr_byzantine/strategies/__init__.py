"""Flower Message-API strategies (the thin Flower layer over the pure aggregators)."""

from .comrade import Comrade, NewtonRoundReport, NewtonStrategyBase, make_evaluate_fn
from .giant import Giant
from .omniscient import AdversaryRound, OmniscientAdversary
from .robust_base import RobustStrategy, RoundReport, RunFailed, default_aggregator
from .robust_fedavg import RobustFedAvg
from .robust_sgd import PROTOCOL, RobustSGD

__all__ = [
    "PROTOCOL", "AdversaryRound", "Comrade", "Giant", "NewtonRoundReport", "NewtonStrategyBase", "OmniscientAdversary",
    "RobustFedAvg", "RobustSGD", "RobustStrategy", "RoundReport", "RunFailed", "default_aggregator", "make_evaluate_fn",
]

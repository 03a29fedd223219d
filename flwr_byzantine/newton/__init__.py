"""Distributed Newton methods robust to Byzantine workers: COMRADE and GIANT (pure numpy).

Ghosh, Maity & Mazumdar, "Distributed Newton Can Communicate Less and Resist Byzantine
Workers" (NeurIPS 2020), Algorithm 1; GIANT (Wang et al., NeurIPS 2018) as the two-round
baseline.  No Flower imports here: the Flower strategies live in
``flwr_byzantine.strategies.comrade`` / ``giant``, the run config (``method`` comrade / giant)
in :mod:`flwr_byzantine.config`, the attacks in the one attack registry
(:mod:`flwr_byzantine.attacks`), who is Byzantine in a simulation in
:func:`flwr_byzantine.federation.malicious_partition_ids`.
"""

from .compression import Compressed, Compressor, Identity, ScaledSign, TopK, empirical_rho, make_compressor
from .line_search import LineSearchResult, backtracking_line_search, choose_step
from .objectives import (
    GLMObjective, LeastSquaresObjective, LogisticObjective, federated_objective, make_objective, minimise,
)
from .server import StepResult, average_gradients, newton_step, robust_average
from .simulate import rounds_to_tolerance, run_comrade, run_giant
from .solvers import DEFAULT_CG_THRESHOLD, DirectionResult, conjugate_gradient, newton_direction
from .trimming import num_kept, trim_by_norm
from .worker import NEWTON_METHODS, PHASE_DIRECTION, PHASE_GRADIENT, NewtonWorker, WorkerReply, poison_glm_labels

__all__ = [
    "Compressed", "Compressor", "DEFAULT_CG_THRESHOLD", "DirectionResult",
    "GLMObjective", "Identity", "LeastSquaresObjective", "LineSearchResult", "LogisticObjective",
    "NEWTON_METHODS", "NewtonWorker", "PHASE_DIRECTION",
    "PHASE_GRADIENT", "ScaledSign", "StepResult", "TopK", "WorkerReply", "average_gradients",
    "backtracking_line_search", "choose_step", "conjugate_gradient",
    "empirical_rho", "federated_objective", "make_compressor", "make_objective", "minimise", "newton_direction",
    "newton_step", "num_kept", "poison_glm_labels", "robust_average", "rounds_to_tolerance", "run_comrade", "run_giant",
    "trim_by_norm",
]

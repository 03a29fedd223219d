"""Small torch models for the flwr-byzantine clients and server, and their losses.

The model ``x`` of Data & Diggavi (arXiv 2005.07866) is the whole flattened parameter
vector of one of these modules.  All take flattened float32 features of shape
``(batch, num_features)``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flwr_byzantine import npmodels

MODELS = ("logreg", "mlp", "linear")
TASKS = ("classification", "regression")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer producing ``num_classes`` logits."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(int(num_features), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class MLP(nn.Module):
    """One hidden ReLU layer of width ``hidden``, then ``num_classes`` logits."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(int(num_features), int(hidden))
        self.fc2 = nn.Linear(int(hidden), int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class LinearRegression(nn.Module):
    """``<w, x> (+ b)``: output shape ``(batch,)``, the paper's Section 6 example model."""

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(int(num_features), 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def build_model(name: str, num_features: int, num_classes: int, seed: int) -> nn.Module:
    """Model ``name`` in {"logreg", "mlp", "linear"}, initialised deterministically from ``seed``.

    The parameters are :func:`flwr_byzantine.npmodels.init_params` (torch's default
    initialisation after ``torch.manual_seed(seed)``, computed in numpy, so the ServerApp
    draws the same ``x_0`` without torch); the caller's global RNG state is left untouched.
    ``"logreg"`` and ``"mlp"`` are classifiers (``num_classes >= 2``); ``"linear"`` is a
    regression model (``num_classes`` must be 1).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {list(MODELS)}")
    if int(num_features) != num_features or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    if name == "linear" and num_classes != 1:
        raise ValueError(f"model 'linear' is for regression (num_classes=1), got num_classes={num_classes}")
    if name != "linear" and num_classes < 2:
        raise ValueError(f"model {name!r} is a classifier and needs num_classes >= 2, got {num_classes}")
    with torch.random.fork_rng(devices=[]):  # the module's own initialisation is overwritten below
        if name == "logreg":
            model: nn.Module = LogisticRegression(num_features, num_classes)
        elif name == "mlp":
            model = MLP(num_features, num_classes)
        else:
            model = LinearRegression(num_features)
    params = npmodels.init_params(name, num_features, num_classes, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return model


def cross_entropy_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of logits ``output`` against integer labels ``target``."""
    return F.cross_entropy(output, target.long())


def half_mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1/2 (prediction - y)^2``: the paper's ``f(z, x) = 1/2 (<w, x> - y)^2`` (Section 6)."""
    pred = output.reshape(-1)
    return 0.5 * torch.mean((pred - target.reshape(-1).to(pred.dtype)) ** 2)


def loss_fn_for(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean loss over a batch: cross-entropy for ``"classification"``, half MSE for ``"regression"``."""
    if task == "classification":
        return cross_entropy_loss
    if task == "regression":
        return half_mse_loss
    raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")

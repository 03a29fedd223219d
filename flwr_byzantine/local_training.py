"""Local training of one client (FedAvg's client step), pure numpy, no Flower, no torch.

:func:`train_locally` is what a FedAvg client does between receiving x_t and
replying with its weights w_i: plain mini-batch SGD on its own data for
``local_epochs`` passes (or exactly ``local_steps`` steps), the batches of each
epoch cut from a seeded permutation (without replacement).  Gradients come from
:mod:`flwr_byzantine.npmodels` (float32, checked against torch autograd), so the
lean ClientApp (``client-mode = "local"``) and the benchmarks share this code.
The model update the robust server decodes is ``x_t - w_i`` (:func:`model_update`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import npmodels

#: Seed material: an int or a sequence of ints (e.g. ``[run seed, partition id, round]``).
SeedLike = int | Sequence[int]


@dataclass
class LocalResult:
    """Outcome of :func:`train_locally`.

    Attributes
    ----------
    weights:
        The trained parameters (same keys and shapes as the input, float32).
    loss:
        Mean training loss over the steps taken (each at the weights before its step).
    num_examples:
        Number of local examples (what a FedAvg client reports as ``num-examples``).
    steps:
        Number of SGD steps taken.
    """

    weights: dict[str, np.ndarray]
    loss: float
    num_examples: int
    steps: int


def _seed_list(seed: SeedLike) -> list[int]:
    return [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


def batch_schedule(n: int, batch_size: int, local_epochs: int, local_steps: int, seed: SeedLike) -> list[np.ndarray]:
    """Index sets of the local SGD steps.

    Epoch ``e`` is a permutation of ``range(n)`` from ``default_rng([*seed, e])`` cut
    into consecutive batches of ``min(batch_size, n)`` (the last one may be
    smaller).  ``local_steps > 0``: exactly that many steps, running through as
    many epochs as needed; otherwise ``local_epochs`` full epochs.
    """
    if n < 1:
        raise ValueError("a client needs at least one example")
    if batch_size < 1 or local_epochs < 0 or local_steps < 0 or (local_epochs == 0 and local_steps == 0):
        raise ValueError(f"need batch_size >= 1 and local_epochs or local_steps >= 1, got batch_size={batch_size}, "
                         f"local_epochs={local_epochs}, local_steps={local_steps}")
    b = min(int(batch_size), n)
    base = _seed_list(seed)
    batches: list[np.ndarray] = []
    epoch = 0
    while True:
        perm = np.random.default_rng([*base, epoch]).permutation(n)
        for start in range(0, n, b):
            batches.append(perm[start : start + b])
            if local_steps and len(batches) == local_steps:
                return batches
        epoch += 1
        if not local_steps and epoch == local_epochs:
            return batches


def train_locally(
    model: str,
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    local_epochs: int = 1,
    local_steps: int = 0,
    client_lr: float = 0.1,
    batch_size: int = 32,
    seed: SeedLike = 0,
) -> LocalResult:
    """Train model ``model`` (an :mod:`~flwr_byzantine.npmodels` name) from ``params`` on ``(X, y)`` with SGD.

    Every step is ``w <- w - client_lr * (1/|B|) sum_{i in B} grad f(z_i, w)`` on the
    batches of :func:`batch_schedule`; deterministic in its arguments.  ``params``
    (the received global model x_t) is not modified.
    """
    if not client_lr > 0 or not np.isfinite(client_lr):
        raise ValueError(f"client_lr must be a positive finite number, got {client_lr!r}")
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    w = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
    lr = np.float32(client_lr)
    losses = []
    schedule = batch_schedule(len(y), batch_size, local_epochs, local_steps, seed)
    for idx in schedule:
        grads, value = npmodels.loss_and_gradient(model, w, X[idx], y[idx])
        for k in w:
            w[k] -= lr * grads[k]
        losses.append(value)
    return LocalResult(weights=w, loss=float(np.mean(losses)), num_examples=int(len(y)), steps=len(schedule))


def model_update(x: Mapping[str, np.ndarray], w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``x_t - w_i`` per array (float64): the model update a FedAvg client's reply amounts to."""
    return {k: np.asarray(x[k], np.float64) - np.asarray(w[k], np.float64) for k in x}


def apply_update(x: Mapping[str, np.ndarray], u: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``x_t - u`` per array in ``x``'s dtypes: the weights that carry update ``u`` (inverse of :func:`model_update`)."""
    out = {}
    for k, xv in x.items():
        xv = np.asarray(xv)
        out[k] = (xv.astype(np.float64) - np.asarray(u[k], np.float64).reshape(xv.shape)).astype(xv.dtype)
    return out

"""Data-poisoning attacks: a malicious client rewrites its own labels, then trains honestly.

Data & Diggavi 2021 (Sec. 7, experiments) and Ghosh et al. 2020 (COMRADE, Sec. 6)
evaluate "random labels" and "flipped labels" workers.  Labels are class indices
``0 .. num_classes - 1``, or real-valued targets when ``num_classes = 0`` (regression, e.g.
COMRADE's least-squares workers: flipped means negated, random means a seeded permutation of
the worker's own targets); ``X`` is returned unchanged (the same object), ``y`` as a
new array of the same framework, dtype, shape (and device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._backend import is_torch, torch
from .base import DataAttack
from .. import seeds


def _labels(y: Any, num_classes: int) -> np.ndarray:
    """``y`` as an int64 numpy vector of class indices in ``[0, num_classes)``, or (``num_classes = 0``)
    a float64 vector of finite real targets."""
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0 or num_classes == 1:
        raise ValueError(f"num_classes must be an integer >= 2 (or 0 for real-valued targets), got {num_classes!r}")
    arr = y.detach().cpu().numpy() if is_torch(y) else np.asarray(y)
    flat = arr.reshape(-1)
    if num_classes == 0:
        real = flat.astype(np.float64)
        if not np.isfinite(real).all():
            raise ValueError("real-valued targets must be finite")
        return real
    if flat.size and (not np.isfinite(flat.astype(np.float64)).all() or np.any(flat != np.round(flat))):
        raise ValueError("labels must be integer class indices")
    lab = flat.astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{lab.min()}, {lab.max()}]")
    return lab


def _like(lab: np.ndarray, y: Any) -> Any:
    """int64 labels back to ``y``'s framework, dtype, shape and device."""
    if is_torch(y):
        return torch.as_tensor(lab.reshape(tuple(y.shape)), device=y.device).to(y.dtype)
    arr = np.asarray(y)
    return lab.reshape(arr.shape).astype(arr.dtype)


def _check_fraction(fraction: Any) -> float:
    try:
        v = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return v


@dataclass
class _LabelAttack(DataAttack):
    methods: ClassVar[tuple[str, ...]] = ("sgd", "comrade", "giant")
    fraction: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fraction = _check_fraction(self.fraction)

    def poisoned_indices(self, n: int) -> np.ndarray:
        """Sorted indices of the ``round(fraction * n)`` poisoned samples (all when fraction is 1)."""
        m = int(round(self.fraction * n))
        if m >= n:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, seeds.LABEL_FLIP])
        return np.sort(rng.choice(n, size=m, replace=False))


@dataclass
class LabelFlip(_LabelAttack):
    """Label flipping: ``y -> num_classes - 1 - y`` (Data & Diggavi 2021; Ghosh et al. 2020 "flipped labels");
    real-valued targets (``num_classes = 0``): ``y -> -y``.

    Attributes
    ----------
    fraction:
        Fraction of the samples flipped (seeded choice when < 1; all by default).
    """

    name: ClassVar[str] = "label-flip"

    def poison(self, X: Any, y: Any, num_classes: int) -> tuple[Any, Any]:
        lab = _labels(y, num_classes)
        idx = self.poisoned_indices(lab.size)
        lab[idx] = -lab[idx] if num_classes == 0 else int(num_classes) - 1 - lab[idx]
        return X, _like(lab, y)

    __call__ = poison


@dataclass
class RandomLabels(_LabelAttack):
    """Random labels: each label replaced by one drawn uniformly from ``0 .. num_classes - 1``
    (Data & Diggavi 2021; Ghosh et al. 2020 "random labels"), from ``default_rng([seed, ...])``;
    real-valued targets (``num_classes = 0``): ``y[i] -> y[pi(i)]`` for a seeded permutation pi.

    Attributes
    ----------
    fraction:
        Fraction of the samples relabelled (seeded choice when < 1; all by default).
    """

    name: ClassVar[str] = "random-labels"

    def poison(self, X: Any, y: Any, num_classes: int) -> tuple[Any, Any]:
        lab = _labels(y, num_classes)
        idx = self.poisoned_indices(lab.size)
        rng = np.random.default_rng([self.seed, seeds.RANDOM_LABELS])
        if num_classes == 0:
            lab[idx] = lab[rng.permutation(lab.size)][idx]
        else:
            lab[idx] = rng.integers(0, int(num_classes), size=idx.size)
        return X, _like(lab, y)

    __call__ = poison


__all__ = ["LabelFlip", "RandomLabels"]

"""Base classes of the attacks and the array helpers they share (pure numpy/torch, no Flower).

Two kinds of attack:

* :class:`UpdateAttack` -- a *model-update* attack: from the honest updates the
  adversary knows (an ``(n_h, d)`` array: every honest reply of the round for an
  omniscient adversary, or estimates computed from the attackers' own data for a
  client-side one) it crafts the ``(num_byzantine, d)`` rows the Byzantine workers
  send, or ``None`` for an erasure (no reply).  Torch in, torch out (same dtype
  and device); numpy in, numpy out.
* :class:`DataAttack` -- a *data-poisoning* attack: a malicious client changes its
  own training data ``(X, y)`` once and then behaves honestly on it.

Every attack declares, as class attributes, its registry ``name``, the training ``methods``
whose clients can play it (run config ``method``: ``sgd`` and the Newton methods ``comrade`` /
``giant``), the ``scale_param`` that run config ``attack-scale`` sets, and the ``method_params``
a method's clients add (e.g. COMRADE's Gaussian attack adds the noise to the worker's own
update).  A Newton worker plays an update attack on its single vector
(``craft(p[None, :], 1, round)[0]``) and a data attack on its GLM labels mapped to class
indices (logistic) or real targets (``num_classes=0``, least squares).

Every attack is a dataclass with a keyword-only ``seed``; the output is a
deterministic function of the inputs, the parameters, the seed and the round.
Statistics (means, standard deviations, norms) are computed in float64 and the
result is cast back to the input dtype, clipped to the dtype's finite range so a
float32 attack never produces ``inf`` (which aggregators reject as invalid input
rather than treat as a Byzantine vector).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from .._backend import ArrayLike, is_torch, torch


def as_update_matrix(honest: ArrayLike) -> ArrayLike:
    """Validate the honest updates: a ``(n_h, d)`` (or a single ``(d,)``) floating array.

    A 1-D input is one honest vector.  Integer inputs become float64 (numpy) /
    float32 (torch).  Raises ``ValueError`` on any other rank.
    """
    if is_torch(honest):
        h = honest.detach()
        if h.ndim == 1:
            h = h.unsqueeze(0)
        if h.ndim != 2:
            raise ValueError(f"honest updates must be (n_h, d), got shape {tuple(honest.shape)}")
        if not torch.is_floating_point(h):
            h = h.float()
        return h
    h = np.asarray(honest)
    if h.ndim == 1:
        h = h[None, :]
    if h.ndim != 2:
        raise ValueError(f"honest updates must be (n_h, d), got shape {h.shape}")
    if not np.issubdtype(h.dtype, np.floating):
        h = h.astype(np.float64)
    return h


def finite_float(value: Any, what: str, *, positive: bool = False, nonneg: bool = False) -> float:
    """``float(value)`` for an attack parameter ``what``: ``ValueError`` unless it is a finite real number (and
    ``> 0`` with ``positive``, ``>= 0`` with ``nonneg``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    if nonneg and v < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return v


def check_count(num_byzantine: Any) -> int:
    """``num_byzantine`` as a non-negative int (ValueError otherwise)."""
    if isinstance(num_byzantine, bool) or int(num_byzantine) != num_byzantine or num_byzantine < 0:
        raise ValueError(f"num_byzantine must be a non-negative integer, got {num_byzantine!r}")
    return int(num_byzantine)


def check_round(round: Any) -> int:  # noqa: A002 - the public argument is called ``round``
    """``round`` as a non-negative int (ValueError otherwise)."""
    if isinstance(round, bool) or int(round) != round or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    return int(round)


def require_rows(h: ArrayLike, who: str) -> None:
    """Raise ValueError if ``h`` has no row (the attack needs honest statistics)."""
    if h.shape[0] < 1:
        raise ValueError(f"{who} needs at least one honest update, got shape {tuple(h.shape)}")


def mean64(h: ArrayLike) -> ArrayLike:
    """Row mean of ``h`` accumulated in float64, same framework and device, float64 dtype."""
    if is_torch(h):
        return h.mean(dim=0, dtype=torch.float64)
    return h.mean(axis=0, dtype=np.float64)


def std64(h: ArrayLike) -> ArrayLike:
    """Per-coordinate population standard deviation (ddof=0) of the rows, float64."""
    if is_torch(h):
        return h.to(torch.float64).std(dim=0, correction=0)
    return h.astype(np.float64).std(axis=0)


def norm64(v: ArrayLike) -> float:
    """Euclidean norm of a vector as a Python float (computed in float64)."""
    if is_torch(v):
        return float(torch.linalg.vector_norm(v.to(torch.float64)))
    return float(np.linalg.norm(np.asarray(v, dtype=np.float64)))


def from_numpy64(x: np.ndarray, like: ArrayLike) -> ArrayLike:
    """A float64 numpy array moved to ``like``'s framework and device (still float64)."""
    if is_torch(like):
        return torch.as_tensor(x, dtype=torch.float64, device=like.device)
    return np.asarray(x, dtype=np.float64)


def cast_like(x64: ArrayLike, like: ArrayLike) -> ArrayLike:
    """Cast a float64 result to ``like``'s dtype, clipping to the dtype's finite range."""
    if is_torch(like):
        big = torch.finfo(like.dtype).max
        return torch.clamp(x64, -big, big).to(like.dtype)
    big = np.finfo(like.dtype).max
    return np.clip(x64, -big, big).astype(like.dtype)


def repeat_rows(v64: ArrayLike, num_byzantine: int, like: ArrayLike) -> ArrayLike:
    """``num_byzantine`` copies of the float64 vector ``v64`` as a fresh ``(f, d)`` array in ``like``'s dtype."""
    v = cast_like(v64, like)
    if is_torch(like):
        return v.unsqueeze(0).expand(num_byzantine, -1).clone()
    return np.repeat(v[None, :], num_byzantine, axis=0)


def empty_rows(like: ArrayLike) -> ArrayLike:
    """A ``(0, d)`` array in ``like``'s framework, dtype and device."""
    if is_torch(like):
        return like.new_zeros((0, like.shape[1]))
    return np.zeros((0, like.shape[1]), dtype=like.dtype)


@dataclass
class UpdateAttack(ABC):
    """A model-update attack: crafts the Byzantine replies of one round.

    Subclasses implement :meth:`_craft` on a validated ``(n_h, d)`` floating
    array with ``num_byzantine >= 1``; :meth:`craft` does the validation and
    returns a ``(0, d)`` array when ``num_byzantine == 0`` (or ``None`` for
    attacks that erase).

    Attributes
    ----------
    seed:
        Seed of the attack's randomness (keyword only).  Randomised attacks draw
        from ``numpy.random.default_rng([seed, round])``.
    """

    #: Registry name (``"alie"``, ``"sign-flip"``, ...).
    name: ClassVar[str] = "update-attack"
    #: Training methods whose clients can play it (run config ``method``).
    methods: ClassVar[tuple[str, ...]] = ("sgd",)
    #: The parameter run config ``attack-scale`` sets (None: the attack has none).
    scale_param: ClassVar[str | None] = None
    #: Extra parameters per method, e.g. ``{"comrade": {"relative": True}}``.
    method_params: ClassVar[dict[str, dict[str, Any]]] = {}

    seed: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.seed = int(self.seed)

    def craft(self, honest: ArrayLike, num_byzantine: int, round: int = 0) -> ArrayLike | None:  # noqa: A002
        """Return the ``(num_byzantine, d)`` Byzantine rows (same type as ``honest``) or ``None``.

        Parameters
        ----------
        honest:
            The honest updates the adversary knows, ``(n_h, d)`` (a ``(d,)`` vector
            counts as one row); numpy array or torch tensor.
        num_byzantine:
            Number of Byzantine rows to craft (``f``).
        round:
            Round number (non-negative), used by randomised attacks.
        """
        h = as_update_matrix(honest)
        f = check_count(num_byzantine)
        r = check_round(round)
        if f == 0:
            return empty_rows(h)
        return self._craft(h, f, r)

    __call__ = craft

    @abstractmethod
    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike | None:  # noqa: A002
        """Attack-specific crafting on validated inputs (``num_byzantine >= 1``)."""

    def rng(self, round: int) -> np.random.Generator:  # noqa: A002
        """The attack's generator for ``round``: ``default_rng([seed, round])``."""
        return np.random.default_rng([self.seed, round])


@dataclass
class DataAttack(ABC):
    """A data-poisoning attack: a malicious client rewrites its own ``(X, y)`` once.

    Attributes
    ----------
    seed:
        Seed of the attack's randomness (keyword only).
    """

    #: Registry name (``"label-flip"``, ...).
    name: ClassVar[str] = "data-attack"
    #: Training methods whose clients can play it (run config ``method``).
    methods: ClassVar[tuple[str, ...]] = ("sgd",)
    #: The parameter run config ``attack-scale`` sets (None: the attack has none).
    scale_param: ClassVar[str | None] = None
    #: Extra parameters per method, e.g. ``{"comrade": {"relative": True}}``.
    method_params: ClassVar[dict[str, dict[str, Any]]] = {}

    seed: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.seed = int(self.seed)

    @abstractmethod
    def poison(self, X: Any, y: Any, num_classes: int) -> tuple[Any, Any]:
        """Return the poisoned ``(X, y)`` (inputs are not modified in place)."""

    __call__ = poison


def param_names(cls: type) -> list[str]:
    """The constructor parameters of an attack dataclass."""
    return [f.name for f in fields(cls) if f.init]

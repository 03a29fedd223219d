"""Model-update attacks that need no knowledge of the defence.

All Byzantine rows are identical (the colluding workers agree on one vector)
except for :class:`GaussianNoise`, which draws one independent row per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .._backend import ArrayLike, centred_gram, is_torch
from .base import (
    UpdateAttack,
    cast_like,
    finite_float,
    from_numpy64,
    mean64,
    repeat_rows,
    require_rows,
    std64,
)


@dataclass
class GaussianNoise(UpdateAttack):
    """Gaussian noise (Data & Diggavi 2021, Sec. 2.1 "arbitrary vectors"; the "Gaussian attack" of
    Ghosh et al. 2020, COMRADE, Sec. 6).

    Two variants:

    * ``relative=False`` (default) -- *random vectors*: each Byzantine worker sends
      an independent ``N(mean_shift, std^2 I)`` vector, ignoring the honest updates.
    * ``relative=True`` -- *noise added to the update*: each sends the honest mean
      plus independent ``N(mean_shift, std^2 I)`` noise.

    Randomness: ``default_rng([seed, round])``; one independent row per worker.

    Attributes
    ----------
    std:
        Standard deviation of every coordinate (>= 0).
    mean_shift:
        Mean of every coordinate of the noise.
    relative:
        Whether the noise is added to the honest mean.
    """

    name: ClassVar[str] = "gaussian"
    methods: ClassVar[tuple[str, ...]] = ("sgd", "comrade", "giant")
    scale_param: ClassVar[str | None] = "std"
    #: COMRADE's Gaussian attack adds the noise to the worker's own update.
    method_params: ClassVar[dict[str, dict[str, Any]]] = {"comrade": {"relative": True}, "giant": {"relative": True}}

    std: float = 1.0
    mean_shift: float = 0.0
    relative: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.std = finite_float(self.std, "std", nonneg=True)
        self.mean_shift = finite_float(self.mean_shift, "mean_shift")
        self.relative = bool(self.relative)

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        d = honest.shape[1]
        noise = self.mean_shift + self.std * self.rng(round).standard_normal((num_byzantine, d))
        rows = from_numpy64(noise, honest)
        if self.relative:
            require_rows(honest, "GaussianNoise(relative=True)")
            rows = rows + mean64(honest)[None, :]
        return cast_like(rows, honest)


@dataclass
class ScaledNegative(UpdateAttack):
    """Scaled negative gradient: every Byzantine worker sends ``-scale * mean(honest)``.

    The classic "reversed / sign-flipped gradient" attack, e.g. the "negative"
    attack of Ghosh et al. 2020 (COMRADE) and the sign-flipping attack of
    Allen-Zhu et al. 2021 / Karimireddy et al. 2021.  A large ``scale`` also makes
    the mean of all replies point away from the honest direction.

    Attributes
    ----------
    scale:
        The factor (> 0).
    """

    name: ClassVar[str] = "scaled-negative"
    methods: ClassVar[tuple[str, ...]] = ("sgd", "comrade", "giant")
    scale_param: ClassVar[str | None] = "scale"

    scale: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale = finite_float(self.scale, "scale", positive=True)

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, type(self).__name__)
        return repeat_rows(-self.scale * mean64(honest), num_byzantine, honest)


@dataclass
class SignFlip(ScaledNegative):
    """Sign flip: every Byzantine worker sends ``-mean(honest)`` (:class:`ScaledNegative` with scale 1).

    See e.g. Allen-Zhu, Ebrahimian, Li, Alistarh 2021 ("Byzantine-resilient
    non-convex SGD") and Karimireddy, He, Jaggi 2021 ("Learning from history for
    Byzantine robust optimization"), where the attackers send the negated gradient.
    """

    name: ClassVar[str] = "sign-flip"
    scale_param: ClassVar[str | None] = None

    scale: float = field(default=1.0, init=False)


@dataclass
class InnerProductManipulation(UpdateAttack):
    """Inner-product manipulation (Xie, Koyejo, Gupta 2019, "Fall of empires: breaking
    Byzantine-tolerant SGD by inner product manipulation", UAI 2019).

    Every Byzantine worker sends ``-epsilon * mean(honest)``.  With ``epsilon`` small
    the vector is close to the honest ones (passes distance-based filters) yet makes
    the aggregate's inner product with the true gradient negative once enough
    Byzantine rows survive; ``epsilon = 0.1`` is the paper's small-epsilon setting.

    Attributes
    ----------
    epsilon:
        The factor (> 0).
    """

    name: ClassVar[str] = "ipm"
    scale_param: ClassVar[str | None] = "epsilon"

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.epsilon = finite_float(self.epsilon, "epsilon", positive=True)

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, "InnerProductManipulation")
        return repeat_rows(-self.epsilon * mean64(honest), num_byzantine, honest)


def alie_z_max(num_workers: int, num_byzantine: int) -> float:
    """The z of Baruch, Baruch, Goldberg 2019 ("A little is enough", NeurIPS 2019), Sec. 4.

    ``s = floor(n/2 + 1) - f`` is the number of honest workers the attackers need
    on their side for a majority; ``z_max = Phi^{-1}((n - s) / n)`` with ``Phi`` the
    standard normal CDF, ``n`` all workers and ``f`` the Byzantine ones.  When the
    attackers already hold a majority (``s <= 0``) the probability ``(n - s)/n``
    is >= 1 and it is clipped to ``1 - 1e-6`` (``z`` about 4.75) to stay finite.
    """
    n, f = int(num_workers), int(num_byzantine)
    if n < 1 or f < 0 or f > n:
        raise ValueError(f"need 0 <= num_byzantine <= num_workers and num_workers >= 1, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = min((n - s) / n, 1.0 - 1e-6)
    from scipy.stats import norm  # imported here: scipy.stats costs ~0.5 s per ClientApp process

    return float(norm.ppf(p))


@dataclass
class ALIE(UpdateAttack):
    """"A little is enough" (Baruch, Baruch, Goldberg 2019, NeurIPS).

    Every Byzantine worker sends ``mu - z * sigma``, with ``mu`` and ``sigma`` the
    per-coordinate mean and (population, ddof=0) standard deviation of the honest
    updates: a small shift in every coordinate, inside the honest spread, that
    coordinate-wise median / trimmed mean / Krum-type rules do not remove.

    Attributes
    ----------
    z:
        The number of standard deviations; ``None`` uses the paper's rule
        :func:`alie_z_max` with ``n = num_workers`` (or ``n_h + num_byzantine``
        when ``num_workers`` is ``None``) and ``f = num_byzantine``.
    num_workers:
        Total number of workers ``n`` for the ``z_max`` rule, when the honest rows
        passed to :meth:`craft` are not all the honest workers (client-side estimates).
    """

    name: ClassVar[str] = "alie"
    scale_param: ClassVar[str | None] = "z"

    z: float | None = None
    num_workers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z is not None:
            self.z = finite_float(self.z, "z")
        if self.num_workers is not None:
            if isinstance(self.num_workers, bool) or int(self.num_workers) != self.num_workers or self.num_workers < 1:
                raise ValueError(f"num_workers must be a positive integer, got {self.num_workers!r}")
            self.num_workers = int(self.num_workers)

    def z_for(self, num_honest: int, num_byzantine: int) -> float:
        """The ``z`` used when ``num_honest`` honest rows are known and ``num_byzantine`` are crafted."""
        if self.z is not None:
            return self.z
        n = self.num_workers if self.num_workers is not None else num_honest + num_byzantine
        return alie_z_max(n, min(num_byzantine, n))

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, "ALIE")
        z = self.z_for(honest.shape[0], num_byzantine)
        return repeat_rows(mean64(honest) - z * std64(honest), num_byzantine, honest)


def top_principal_scores(honest: ArrayLike) -> np.ndarray:
    """Centred projections ``<g_i - mean, u>`` of the rows on their top principal direction ``u``.

    Gram trick: with ``K = C C^T`` the centred ``(n_h, n_h)`` Gram matrix (``C`` the
    centred rows) and ``(lambda, v)`` its top eigenpair, ``u = C^T v / sqrt(lambda)``
    and ``C u = sqrt(lambda) v``.  Cost O(d n_h^2); no ``d x d`` matrix.  The sign of
    ``u`` is fixed so that the largest-magnitude score is positive.  All zeros when
    the rows coincide.
    """
    gram = centred_gram(honest)
    vals, vecs = np.linalg.eigh(gram)
    lam = float(vals[-1])
    if not lam > 0:
        return np.zeros(gram.shape[0])
    scores = math.sqrt(lam) * vecs[:, -1]
    if scores[int(np.argmax(np.abs(scores)))] < 0:
        scores = -scores
    return scores


@dataclass
class Mimic(UpdateAttack):
    """Mimic (Karimireddy, He, Jaggi 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", ICLR 2022, Sec. 5).

    All Byzantine workers copy one honest worker's update, over-representing that
    worker's data and biasing the aggregate under heterogeneity while sending only
    perfectly honest-looking vectors.  The paper picks the worker ``i*`` maximising
    ``<g_i, z>`` with ``z`` the top principal direction of the honest updates;
    here ``z`` is computed each round from the centred Gram matrix
    (:func:`top_principal_scores`, no ``d x d`` matrix) with its sign oriented
    towards the most extreme worker, so ``i*`` is the worker farthest from the
    honest mean along ``z`` (``argmax_i |<g_i - mean, z>|``; the mean's own
    projection is the same for every worker).  The paper estimates ``z`` once over
    warm-up rounds; this implementation is stateless and recomputes it per round.

    Attributes
    ----------
    target:
        Fixed index (row of ``honest``) to copy instead of the heuristic.
    last_target:
        The row copied by the last :meth:`craft` call (diagnostic, not a parameter).
    """

    name: ClassVar[str] = "mimic"

    target: int | None = None
    last_target: int | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target is not None:
            if isinstance(self.target, bool) or int(self.target) != self.target or self.target < 0:
                raise ValueError(f"target must be a non-negative integer or None, got {self.target!r}")
            self.target = int(self.target)

    def choose_target(self, honest: ArrayLike) -> int:
        """Index of the honest row the Byzantine workers copy."""
        n = honest.shape[0]
        if self.target is not None:
            if self.target >= n:
                raise ValueError(f"target {self.target} out of range for {n} honest updates")
            return self.target
        if n == 1:
            return 0
        return int(np.argmax(top_principal_scores(honest)))

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        require_rows(honest, "Mimic")
        i = self.choose_target(honest)
        self.last_target = i
        row = honest[i]
        if is_torch(honest):
            return row.unsqueeze(0).expand(num_byzantine, -1).clone()
        return np.repeat(row[None, :], num_byzantine, axis=0)


@dataclass
class Erasure(UpdateAttack):
    """Erasure: the Byzantine workers send nothing (Data & Diggavi 2021, Sec. 2.1).

    :meth:`craft` returns ``None``; the server knows who did not answer and may
    replace the missing replies by a fixed value.
    """

    name: ClassVar[str] = "erasure"

    def craft(self, honest: ArrayLike, num_byzantine: int, round: int = 0) -> None:  # noqa: A002
        """Always ``None`` (no reply); the arguments are validated for consistency."""
        super().craft(honest, num_byzantine, round)
        return None

    __call__ = craft

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> None:  # noqa: A002
        return None


@dataclass
class ArbitraryVector(UpdateAttack):
    """A fixed arbitrary (large) vector (Data & Diggavi 2021, Sec. 2.1: "corrupt nodes may send
    arbitrary vectors").

    Every Byzantine worker sends the same vector, independent of the honest
    updates and of the round: ``value`` if given (a scalar broadcast to every
    coordinate, or a length-``d`` vector), else ``scale * (1, ..., 1)``.  Clipped
    to the dtype's finite range.

    Attributes
    ----------
    scale:
        Value of every coordinate when ``value`` is ``None``.
    value:
        Explicit scalar or ``(d,)`` vector.
    """

    name: ClassVar[str] = "arbitrary"
    scale_param: ClassVar[str | None] = "scale"

    scale: float = 1e6
    value: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale = finite_float(self.scale, "scale")
        if self.value is not None:
            v = np.asarray(self.value.detach().cpu() if is_torch(self.value) else self.value, dtype=np.float64)
            if v.ndim > 1 or not np.isfinite(v).all():
                raise ValueError("value must be a finite scalar or 1-D vector")
            self.value = float(v) if v.ndim == 0 else v

    def _craft(self, honest: ArrayLike, num_byzantine: int, round: int) -> ArrayLike:  # noqa: A002
        d = honest.shape[1]
        if self.value is None:
            vec = np.full(d, self.scale)
        elif isinstance(self.value, float):
            vec = np.full(d, self.value)
        else:
            if self.value.shape != (d,):
                raise ValueError(f"value has shape {self.value.shape}, expected ({d},)")
            vec = self.value
        return repeat_rows(from_numpy64(vec, honest), num_byzantine, honest)


__all__ = [
    "ALIE", "ArbitraryVector", "Erasure", "GaussianNoise", "InnerProductManipulation", "Mimic",
    "ScaledNegative", "SignFlip", "alie_z_max", "top_principal_scores",
]

"""Pre-aggregation steps that wrap any aggregator: bucketing and nearest-neighbour mixing.

Both transform the ``(R, d)`` input into new vectors that are averages of inputs,
hand them to an ``inner`` aggregator, and map the inner diagnostics back to the
input rows: if the inner rule's ``weights`` describe its output as
``sum_b w_b h_b`` over the transformed vectors ``h_b = sum_i A_bi g_i``, the
output is ``sum_i (A^T w)_i g_i``, so the reported ``weights`` are ``A^T w``
(for rules whose weights are average coefficients, e.g. the coordinate-wise
median, this keeps that meaning).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._backend import ArrayLike, centred_gram, is_torch, sq_distances_from_gram
from .base import AggregationResult, Aggregator

from .._backend import torch  # the torch module, imported on first use (lean ClientApp processes)


def _load_inner(inner: Aggregator, state: Any, arrays: Mapping[str, np.ndarray], dim: int | None) -> None:
    """Restore a wrapper's inner rule from its ``inner/``-prefixed arrays."""
    if not isinstance(state, Mapping):
        raise ValueError(f"inner rule state must be a mapping, got {type(state).__name__}")
    stray = sorted(k for k in arrays if not k.startswith("inner/"))
    if stray:
        raise ValueError(f"unknown arrays {stray} in a pre-aggregation wrapper's state")
    inner.load_state_dict(state, {k[len("inner/"):]: v for k, v in arrays.items()}, dim=dim)


def _build_inner(inner: Aggregator | str, inner_params: dict[str, Any] | None) -> Aggregator:
    if isinstance(inner, Aggregator):
        if inner_params:
            raise ValueError("inner_params is only used when inner is given by its registry name")
        return inner
    if isinstance(inner, str):
        from . import make_aggregator  # lazy: the package __init__ may import this module

        return make_aggregator(inner, **(inner_params or {}))
    raise ValueError(f"inner must be an Aggregator or a registry name, got {inner!r}")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _mix(updates: ArrayLike, A: np.ndarray) -> ArrayLike:
    """``A @ updates`` in the input's framework, dtype and device (``A`` is small, float64)."""
    if is_torch(updates):
        return torch.as_tensor(A, dtype=updates.dtype, device=updates.device) @ updates
    return A.astype(updates.dtype) @ updates


class Bucketing(Aggregator):
    """Bucketing (Karimireddy, He, Jaggi, "Byzantine-robust learning on heterogeneous
    datasets via bucketing", ICLR 2022, Algorithm 1).

    Each call draws a random permutation ``pi`` of the R inputs, forms the
    ``ceil(R / s)`` bucket means ``y_b = mean{g_{pi(i)} : i in [(b-1)s, bs)}`` (the
    last bucket holds the remaining ``R mod s`` inputs if ``s`` does not divide R)
    and returns ``inner(y_1, ..., y_{ceil(R/s)})``.

    Parameters
    ----------
    inner:
        The aggregator applied to the bucket means (an instance, or a registry name
        built with ``inner_params``).
    bucket_size:
        ``s >= 1``.  ``s = 1`` only permutes the inputs.
    seed:
        Seed of the permutation generator.  The generator is created once, so the
        sequence of permutations over successive calls is reproducible;
        :meth:`reset` restarts it (and resets a stateful inner rule).

    Diagnostics: ``kept`` are the input rows of the buckets the inner rule kept;
    ``weights[i] = w_inner[b(i)] / |b(i)|`` (the coefficient of ``g_i`` in the output
    when the inner rule is a weighted mean); ``iterations`` and ``statistic`` are the
    inner rule's; ``info`` has ``buckets`` (input rows of every bucket), and the inner
    rule's ``inner_kept``, ``inner_weights`` and ``inner_info``.
    """

    name = "bucketing"

    def __init__(
        self,
        inner: Aggregator | str,
        bucket_size: int = 2,
        seed: int | None = 0,
        inner_params: dict[str, Any] | None = None,
    ) -> None:
        self.inner = _build_inner(inner, inner_params)
        self.bucket_size = _check_int(bucket_size, "bucket_size", 1)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Restart the permutation sequence from ``seed`` and reset a stateful inner rule."""
        self._rng = np.random.default_rng(self.seed)
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The permutation generator's state and the inner rule's state (arrays ``inner/<name>``)."""
        inner, inner_arrays = self.inner.state_dict()
        state = {"permutation_rng": self._rng.bit_generator.state, "inner": inner}
        return state, {f"inner/{k}": v for k, v in inner_arrays.items()}

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        *, dim: int | None = None) -> None:
        """Restore the generator (same bit generator kind) and the inner rule (on the bucket means, also d)."""
        unknown = sorted(set(state) - {"permutation_rng", "inner"})
        if unknown:
            raise ValueError(f"unknown bucketing state {unknown}")
        rng_state = state.get("permutation_rng")
        if not isinstance(rng_state, Mapping) or rng_state.get("bit_generator") != type(self._rng.bit_generator).__name__:
            raise ValueError("bucketing state lacks a matching 'permutation_rng'")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = dict(rng_state)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"bucketing permutation_rng state is malformed: {exc}") from None
        _load_inner(self.inner, state.get("inner", {}), arrays, dim)
        self._rng = rng

    def buckets(self, R: int) -> list[np.ndarray]:
        """Draw the next permutation and split it into buckets (advances the generator)."""
        perm = self._rng.permutation(R)
        return [perm[i : i + self.bucket_size] for i in range(0, R, self.bucket_size)]

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R, d = updates.shape
        s = self.bucket_size
        groups = self.buckets(R)
        perm = np.concatenate(groups)
        n_full = R // s
        if is_torch(updates):
            shuffled = updates[torch.as_tensor(perm, device=updates.device)]
            parts = [shuffled[: n_full * s].reshape(n_full, s, d).mean(dim=1)]
            if R % s:
                parts.append(shuffled[n_full * s :].mean(dim=0, keepdim=True))
            means = torch.cat(parts, dim=0)
        else:
            shuffled = updates[perm]
            parts = [shuffled[: n_full * s].reshape(n_full, s, d).mean(axis=1)]
            if R % s:
                parts.append(shuffled[n_full * s :].mean(axis=0, keepdims=True))
            means = np.concatenate(parts, axis=0)
        res = self.inner.aggregate(means)
        weights = np.zeros(R)
        for b, members in enumerate(groups):
            weights[members] = res.weights[b] / members.size
        kept = np.sort(np.concatenate([groups[b] for b in res.kept])) if res.kept.size else np.zeros(0, np.int64)
        return AggregationResult(
            estimate=res.estimate,
            kept=kept,
            weights=weights,
            iterations=res.iterations,
            statistic=res.statistic,
            info={
                "buckets": [g.tolist() for g in groups],
                "inner_kept": res.kept.tolist(),
                "inner_weights": res.weights.tolist(),
                "inner_info": res.info,
            },
        )


class NearestNeighborMixing(Aggregator):
    """Nearest-neighbour mixing, NNM (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot,
    Stephan, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under
    Heterogeneity", AISTATS 2023, Algorithm 1).

    Every input is replaced by the average of its ``R - f`` nearest inputs in
    Euclidean distance, itself included: ``y_i = 1/(R-f) sum_{j in N_i} g_j``; then
    ``inner(y_1, ..., y_R)`` is returned.  Distances come from the centred Gram
    matrix (no ``(R, R, d)`` tensor); ties are broken by row index (stable sort)
    and a point always counts as its own nearest neighbour.  Requires ``R > 2f``
    (ValueError otherwise), the paper's setting.

    Parameters
    ----------
    inner:
        The aggregator applied to the mixed vectors (an instance, or a registry
        name built with ``inner_params``).
    num_byzantine:
        ``f``, the assumed number of Byzantine inputs.

    Diagnostics: ``weights = A^T w_inner`` where ``A`` is the ``R x R`` mixing
    matrix; ``kept`` = the union of the neighbourhoods ``N_i`` of the mixed vectors
    the inner rule kept; ``iterations``/``statistic`` are the inner rule's;
    ``info`` has the inner ``inner_kept``, ``inner_weights``, ``inner_info``.
    """

    name = "nnm"

    def __init__(
        self, inner: Aggregator | str, num_byzantine: int = 0, inner_params: dict[str, Any] | None = None
    ) -> None:
        self.inner = _build_inner(inner, inner_params)
        self.num_byzantine = _check_int(num_byzantine, "num_byzantine", 0)

    def reset(self) -> None:
        """Reset a stateful inner rule (NNM itself has no state)."""
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The inner rule's state (NNM itself has none; arrays ``inner/<name>``)."""
        inner, inner_arrays = self.inner.state_dict()
        return {"inner": inner}, {f"inner/{k}": v for k, v in inner_arrays.items()}

    def load_state_dict(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        *, dim: int | None = None) -> None:
        """Restore the inner rule (it aggregates the mixed inputs, also of dimension d)."""
        unknown = sorted(set(state) - {"inner"})
        if unknown:
            raise ValueError(f"unknown nnm state {unknown}")
        _load_inner(self.inner, state.get("inner", {}), arrays, dim)

    def mixing_matrix(self, updates: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(A, neighbours)``: the row-stochastic mixing matrix and each row's ``R - f`` neighbours."""
        return self.mixing_matrix_from_gram(centred_gram(updates))

    def mixing_matrix_from_gram(self, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`mixing_matrix` from the rows' Gram matrix (any centring: only distances enter)."""
        R = gram.shape[0]
        f = self.num_byzantine
        if R <= 2 * f:
            raise ValueError(f"nnm needs R > 2f inputs, got R={R} with f={f}")
        k = R - f
        D = sq_distances_from_gram(gram)
        np.fill_diagonal(D, -1.0)  # a point is its own nearest neighbour
        nbrs = np.argsort(D, axis=1, kind="stable")[:, :k]
        A = np.zeros((R, R))
        np.put_along_axis(A, nbrs, 1.0 / k, axis=1)
        return A, nbrs

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        R = updates.shape[0]
        A, nbrs = self.mixing_matrix(updates)
        res = self.inner.aggregate(_mix(updates, A))
        weights = A.T @ res.weights
        kept = np.unique(nbrs[res.kept]) if res.kept.size else np.zeros(0, np.int64)
        return AggregationResult(
            estimate=res.estimate,
            kept=kept,
            weights=weights,
            iterations=res.iterations,
            statistic=res.statistic,
            info={
                "num_neighbours": int(R - self.num_byzantine),
                "inner_kept": res.kept.tolist(),
                "inner_weights": res.weights.tolist(),
                "inner_info": res.info,
            },
        )

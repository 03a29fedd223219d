"""randk sparsification with one coordinate set per round (Data & Diggavi, Algorithm 2, Section 5).

Each round the server draws ``K_t``, a uniformly random k-subset of ``[d]``, and
broadcasts it; every honest worker uploads ``(d/k) * p_r[K_t]`` (unbiased:
``E[(d/k) select_K(v)] = v`` coordinate-wise); the server robustly aggregates the
R vectors in ``R^k`` and updates only the coordinates ``K_t``.

Procedure ``randk-v1`` (what a client must reproduce from the broadcast seed):

1. ``bits = numpy.random.PCG64(numpy.random.SeedSequence(entropy=seed, spawn_key=(server_round,)))``
2. ``keys = bits.random_raw(d)`` -- d unsigned 64-bit integers (the PCG64 stream is
   stable across numpy versions, unlike ``Generator`` methods).
3. ``K_t`` = the indices of the k smallest keys, ties broken by the lower index,
   returned sorted ascending (int64).

Ranking i.i.d. uniform keys gives every k-subset the same probability.  Clients
that cannot run this receive ``K_t`` explicitly as an index array instead.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

RANDK_PROCEDURE = "randk-v1"


def draw_coordinates(d: int, k: int, seed: int, server_round: int) -> np.ndarray:
    """Draw ``K_t`` with procedure ``randk-v1`` (see module docstring); sorted int64, length k."""
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d, got k={k}, d={d}")
    if seed < 0 or server_round < 0:
        raise ValueError("seed and server_round must be non-negative")
    bits = np.random.PCG64(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(server_round),)))
    keys = bits.random_raw(d)
    if k == d:
        return np.arange(d, dtype=np.int64)
    kth = np.partition(keys, k - 1)[k - 1]
    below = np.flatnonzero(keys < kth)
    ties = np.flatnonzero(keys == kth)[: k - below.size]
    return np.sort(np.concatenate([below, ties])).astype(np.int64)


def coordinate_digest(indices: np.ndarray) -> int:
    """CRC32 of the int64 index array: clients echo it so the server can spot stale replies."""
    return int(zlib.crc32(np.ascontiguousarray(indices, dtype=np.int64).tobytes()))


def randk_compress(vec: np.ndarray, indices: np.ndarray, d: int | None = None) -> np.ndarray:
    """``(d/k) * vec[K]``: the k values an honest worker uploads (Algorithm 2)."""
    d = vec.shape[-1] if d is None else d
    return (d / indices.size) * vec[..., indices]


def scatter(values: np.ndarray, indices: np.ndarray, d: int) -> np.ndarray:
    """Embed ``values`` (length k) at ``indices`` of a zero vector of length d."""
    out = np.zeros(d, dtype=np.result_type(values.dtype, np.float32))
    out[indices] = values
    return out


@dataclass(frozen=True)
class RandK:
    """randk configuration for :class:`~flwr_byzantine.strategies.RobustSGD`.

    Exactly one of ``k`` (coordinates per round) and ``fraction`` (k = ceil(fraction*d))
    is used; ``form`` chooses what goes on the wire: ``"seed"`` (clients regenerate
    ``K_t`` with ``randk-v1``) or ``"indices"`` (the explicit int64 index array).
    """

    k: int | None = None
    fraction: float | None = None
    seed: int = 0
    form: str = "seed"

    def __post_init__(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise ValueError("give exactly one of k and fraction")
        if self.k is not None and self.k < 1:
            raise ValueError("k must be >= 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if self.form not in ("seed", "indices"):
            raise ValueError("form must be 'seed' or 'indices'")

    def k_for(self, d: int) -> int:
        """Number of coordinates for a model of dimension d."""
        k = self.k if self.k is not None else int(np.ceil(self.fraction * d))
        return int(min(max(k, 1), d))

    def coordinates(self, d: int, server_round: int) -> np.ndarray:
        """``K_t`` for this round."""
        return draw_coordinates(d, self.k_for(d), self.seed, server_round)

"""Sketched Gram matrix for RGE at large ``d`` (server-private randomness, fresh every round).

The exact centred Gram product costs ``O(d R^2)`` flops, far more than reading the
updates once.  :func:`sketch_rows` maps every row ``g`` (length ``d``) to ``S g`` of
length ``m = k1 + k2`` with two CountSketches whose bucket of coordinate ``i`` is
``i mod k`` (``k = k1`` and ``k = k2 = k1 - 1``, coprime, ``k1 k2 >= d``) and whose
signs are random: one sign per run of ``k`` consecutive coordinates, drawn fresh
from the server's generator at every call.  Viewing a row as an ``(L, k)`` matrix,
``S_k g = s^T reshape(g)`` is one matrix-vector product per row (BLAS, one streaming
pass over the data), so the sketch costs two reads of the updates.

Properties (``E`` over the signs):

* ``E <S x, S y> = <x, y>`` for every ``x, y`` (distinct coordinates never share a
  sign inside a bucket, and each sketch is scaled by ``1/sqrt(2)``);
* two distinct coordinates collide in at most one of the two sketches (``k1`` and
  ``k2`` are coprime and ``k1 k2 >= d``), so a client that puts its deviation on
  coordinates it knows collide in one sketch (the bucket map is public) is spread
  over many buckets of the other: its squared norm is seen at no less than about half
  its value, and it cannot cancel because the signs are secret and fresh every round.

The filter then runs on the Gram matrix of the centred sketched rows; the estimate
is always the exact mean of the surviving *original* rows.
"""

from __future__ import annotations

import math

import numpy as np

from .._backend import ArrayLike, is_torch, to_numpy64

#: Default sketch length ``m`` (about ``2 * k1``).
DEFAULT_SKETCH_DIM = 2048


def sketch_buckets(d: int, dim: int) -> tuple[int, int]:
    """The two bucket counts ``(k1, k1 - 1)``: ``k1 = max(dim // 2, ceil(sqrt(d)) + 1)``, so ``k1 (k1 - 1) >= d``."""
    k1 = max(int(dim) // 2, math.isqrt(max(d - 1, 0)) + 2, 2)
    return k1, k1 - 1


def _one_sketch(updates: ArrayLike, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(R, k)`` float64 CountSketch: bucket ``i mod k``, a random sign per run of ``k`` coordinates."""
    R, d = updates.shape
    L, tail = divmod(d, k)
    signs = rng.integers(0, 2, size=L + (tail > 0)) * 2.0 - 1.0
    if is_torch(updates):
        import torch  # already imported (the input is a tensor); a module-level import would cost every
        #               importer of the aggregators torch, the lean ClientApp included

        s = torch.as_tensor(signs, dtype=updates.dtype, device=updates.device)
        out = torch.zeros((R, k), dtype=updates.dtype, device=updates.device)
        if L:
            out += torch.matmul(s[:L], updates[:, : L * k].reshape(R, L, k))
        if tail:
            out[:, :tail] += s[L] * updates[:, L * k :]
        return to_numpy64(out)
    s = signs.astype(updates.dtype, copy=False)
    out = np.zeros((R, k), dtype=np.float64)
    if L:
        out += np.matmul(s[:L], updates[:, : L * k].reshape(R, L, k))
    if tail:
        out[:, :tail] += s[L] * updates[:, L * k :]
    return out


def sketch_rows(updates: ArrayLike, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Sketch every row of ``updates`` (``(R, d)``) to length ``k1 + k2`` (float64 numpy, see the module docstring)."""
    k1, k2 = sketch_buckets(updates.shape[1], dim)
    scale = 1.0 / math.sqrt(2.0)
    return np.concatenate([_one_sketch(updates, k1, rng), _one_sketch(updates, k2, rng)], axis=1) * scale


def sketched_centred_gram(updates: ArrayLike, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Gram matrix of the centred sketched rows, ``(R, R)`` float64 (an unbiased estimate of the centred Gram)."""
    Y = sketch_rows(updates, dim, rng)
    Y -= Y.mean(axis=0)
    if str(updates.dtype).endswith(("float32", "float16")):  # the sketch is approximate anyway
        Y32 = Y.astype(np.float32)
        gram = (Y32 @ Y32.T).astype(np.float64)
    else:
        gram = Y @ Y.T
    return 0.5 * (gram + gram.T)

"""Sketched Gram matrix for RGE at large ``d`` (server-private randomness, fresh every round).

The exact centred Gram product costs ``O(d R^2)`` flops, far more than reading the
updates once.  :func:`sketch_rows` maps every row ``g`` (length ``d``) to ``S g`` of
length ``m = k1 + k2`` with two CountSketches that share one vector of random signs
``s`` (one per coordinate, drawn fresh from the server's generator at every call): the
bucket of coordinate ``i`` is ``i mod k1`` in the first and ``i mod k2`` in the second
(``k2 = k1 - 1``, coprime, ``k1 k2 >= d``).  Both sketches come from one
streaming pass over the rows (a block of rows times the signs, in cache, summed by both bucket
maps: a row viewed as an ``(L, k)`` matrix summed over ``L``), about one read of the updates.

Properties (``E`` over the signs):

* ``E <S x, S y> = <x, y>`` for every ``x, y`` (the signs of distinct coordinates are
  independent, and each sketch is scaled by ``1/sqrt(2)``);
* every bucket sums coordinates with independent signs, so no vector -- a constant
  shift (ALIE), a periodic pattern -- collapses to a few random scalars;
* two distinct coordinates collide in at most one of the two sketches (``k1`` and
  ``k2`` are coprime and ``k1 k2 >= d``): a client that puts its deviation on
  coordinates it knows collide in one sketch (the bucket map is public, the signs are
  not) is spread over many buckets of the other, so its squared norm is seen at no
  less than about half its value.

The filter then runs on the Gram matrix of the centred sketched rows; the estimate
is always the exact mean of the surviving *original* rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._backend import ArrayLike, is_torch, to_numpy64

def sketch_buckets(d: int, dim: int) -> tuple[int, int]:
    """The two bucket counts ``(k1, k1 - 1)``: ``k1 = max(dim // 2, ceil(sqrt(d)) + 1)``, so ``k1 (k1 - 1) >= d``."""
    k1 = max(int(dim) // 2, math.isqrt(max(d - 1, 0)) + 2, 2)
    return k1, k1 - 1


#: Bytes of the signed rows held at once by :func:`sketch_rows` (numpy path).
SKETCH_BLOCK_BYTES = 1 << 20


def _bucket_sums(rows: Any, k: int) -> Any:
    """``(n, k)`` sums of the coordinates of each row by bucket ``i mod k`` (rows already signed).

    A row viewed as an ``(L, k)`` matrix is summed over ``L``; the tail adds to the first buckets.
    """
    n, d = rows.shape
    L, tail = divmod(d, k)
    out = rows[:, : L * k].reshape(n, L, k).sum(1)
    if tail:
        out[:, :tail] += rows[:, L * k :]
    return out


def sketch_rows(updates: ArrayLike, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Sketch every row of ``updates`` (``(R, d)``) to length ``k1 + k2`` (float64 numpy, see the module docstring).

    One streaming pass: a block of rows (about :data:`SKETCH_BLOCK_BYTES`) is multiplied by the
    signs into a cache-resident buffer, and both bucket maps sum that buffer.
    """
    R, d = updates.shape
    k1, k2 = sketch_buckets(d, dim)
    bits = np.unpackbits(np.frombuffer(rng.bytes((d + 7) // 8), dtype=np.uint8))[:d]
    if is_torch(updates):
        import torch

        signs = torch.as_tensor(bits, device=updates.device).to(updates.dtype) * 2 - 1
        signed = updates * signs
        Y = np.concatenate([to_numpy64(_bucket_sums(signed, k1)), to_numpy64(_bucket_sums(signed, k2))], axis=1)
    else:
        signs = bits.astype(updates.dtype) * 2 - 1
        Y = np.empty((R, k1 + k2))
        rb = max(1, SKETCH_BLOCK_BYTES // max(d * updates.itemsize, 1))
        buf = np.empty((min(rb, R), d), dtype=updates.dtype)
        for r0 in range(0, R, rb):
            r1 = min(R, r0 + rb)
            signed = np.multiply(updates[r0:r1], signs, out=buf[: r1 - r0])
            Y[r0:r1, :k1] = _bucket_sums(signed, k1)
            Y[r0:r1, k1:] = _bucket_sums(signed, k2)
    Y *= 1.0 / math.sqrt(2.0)
    return Y


def centre_gram(Y: np.ndarray, low_precision: bool) -> np.ndarray:
    """Gram matrix of the centred rows of the sketch ``Y`` (float64; products in float32 if ``low_precision``)."""
    Y = Y - Y.mean(axis=0)
    if low_precision:  # the sketch is approximate anyway
        Y32 = Y.astype(np.float32)
        gram = (Y32 @ Y32.T).astype(np.float64)
    else:
        gram = Y @ Y.T
    return 0.5 * (gram + gram.T)


def sketched_centred_gram(updates: ArrayLike, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Gram matrix of the centred sketched rows, ``(R, R)`` float64 (an unbiased estimate of the centred Gram)."""
    return centre_gram(sketch_rows(updates, dim, rng), _low_precision(updates))


def _low_precision(updates: ArrayLike) -> bool:
    return str(updates.dtype).endswith(("float32", "float16"))

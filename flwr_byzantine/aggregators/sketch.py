"""Sketched Gram matrix for RGE at large ``d`` (server-private randomness, fresh every round).

The exact centred Gram product costs ``O(d R^2)`` flops, far more than reading the
updates once.  :func:`sketch_rows` maps every row ``g`` (length ``d``) to ``S g`` of
length ``m = k1 + k2`` with two CountSketches that share one vector of random signs
``s`` (one per coordinate, drawn fresh from the server's generator at every call): the
bucket of coordinate ``i`` is ``i mod k1`` in the first and ``i mod k2`` in the second
(``k2 = k1 - 1``, coprime, ``k1 k2 >= d``).  Both sketches come from one
streaming pass over the rows (a compiled loop, :func:`~.kernels.count_sketch`: each row segment
times the signs, in L1, added to both bucket maps), about one read of the updates.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import ArrayLike, is_torch, to_numpy64

def sketch_buckets(d: int, dim: int) -> tuple[int, int]:
    """The two bucket counts ``(k1, k1 - 1)``: ``k1 = max(dim // 2, ceil(sqrt(d)) + 1)``, so ``k1 (k1 - 1) >= d``."""
    k1 = max(int(dim) // 2, math.isqrt(max(d - 1, 0)) + 2, 2)
    return k1, k1 - 1


def _bucket_sums(rows: Any, k: int) -> Any:
    """``(n, k)`` sums of the coordinates of each row by bucket ``i mod k`` (rows already signed; torch path).

    A row viewed as an ``(L, k)`` matrix is summed over ``L``; the tail adds to the first buckets.
    """
    n, d = rows.shape
    L, tail = divmod(d, k)
    out = rows[:, : L * k].reshape(n, L, k).sum(1)
    if tail:
        out[:, :tail] += rows[:, L * k :]
    return out


def _sign_bits(d: int, rng: np.random.Generator) -> np.ndarray:
    """``d`` fresh random bits from ``rng`` (one per coordinate: its sign), as :func:`sketch_rows` draws them."""
    return np.unpackbits(np.frombuffer(rng.bytes((d + 7) // 8), dtype=np.uint8))[:d]


def _signs_of(bits: np.ndarray) -> np.ndarray:
    """The signs +1/-1 of ``bits``, one byte a coordinate (the vector stays in L2 while the rows stream)."""
    return bits.astype(np.int8) * 2 - 1


def sketch_signs(d: int, rng: np.random.Generator) -> np.ndarray:
    """The ``int8`` signs that :func:`sketch_rows` draws from ``rng`` for ``d`` coordinates (the same draw: a caller
    that sketches the rows in a pass of its own, :func:`~.kernels.clip_fold_sketch_rows`, leaves ``rng`` where
    :func:`sketch_rows` would)."""
    return _signs_of(_sign_bits(d, rng))


def sketch_rows(updates: ArrayLike, dim: int, rng: np.random.Generator,
                sq_norms: np.ndarray | None = None, col_sums: np.ndarray | None = None,
                dtype: Any = np.float64) -> np.ndarray:
    """Sketch every row of ``updates`` (``(R, d)``) to length ``k1 + k2`` (float64 numpy, see the module docstring;
    ``dtype=np.float32`` for numpy rows: the same values rounded to float32, half the bytes, e.g. for a consumer
    that works in float32 anyway).

    One streaming pass (numpy rows: the compiled :func:`~.kernels.count_sketch`, bucket sums in the rows'
    dtype as before, times ``1/sqrt(2)`` in float64, stored in ``dtype``): each row is read once, times the signs, into
    both bucket maps.  ``sq_norms`` (a float64 array of length
    ``R``, numpy rows only): filled with the rows' squared norms from the same read (NaN/Inf for a row
    with a NaN/Inf entry), e.g. for the input check; ``col_sums`` (an array of ``updates``' dtype and length
    ``d``, numpy rows only): filled with ``updates.sum(axis=0)`` from the same read.
    """
    R, d = updates.shape
    k1, k2 = sketch_buckets(d, dim)
    bits = _sign_bits(d, rng)
    if is_torch(updates):
        import torch

        if sq_norms is not None or col_sums is not None:
            raise ValueError("sq_norms and col_sums are for numpy rows")
        signs = torch.as_tensor(bits, device=updates.device).to(updates.dtype) * 2 - 1
        signed = updates * signs
        Y = np.concatenate([to_numpy64(_bucket_sums(signed, k1)), to_numpy64(_bucket_sums(signed, k2))], axis=1)
    else:
        from .kernels import count_sketch

        signs = _signs_of(bits)
        Y = np.empty((R, k1 + k2), dtype=np.float32 if np.dtype(dtype) == np.float32 else np.float64)
        count_sketch(updates, signs, k1, k2, Y, np.empty(R) if sq_norms is None else sq_norms,
                     np.empty(0, dtype=updates.dtype) if col_sums is None else col_sums, 1.0 / math.sqrt(2.0))
        return Y  # scaled in the pass
    Y *= 1.0 / math.sqrt(2.0)
    return Y


@dataclass(frozen=True)
class RowSketch:
    """What one pass of :func:`sketch_rows` took over every row of an ``(R, d)`` matrix, for a second consumer of the
    same rows (the default defence's gross screen hands it to its filter when the filter reads those rows unchanged:
    one pass over them instead of two; issue 12).

    ``Y``: the sketch, ``(R, k1 + k2)`` float64, taken with ``dim`` (bucket counts ``sketch_buckets(d, dim)``);
    ``sq_norms``: the rows' squared norms (float64); ``col_sums``: the column sums in the rows' dtype, or ``None`` when
    the pass did not take them."""

    Y: np.ndarray
    sq_norms: np.ndarray
    col_sums: np.ndarray | None
    dim: int

    @classmethod
    def empty(cls, R: int, d: int, dim: int, col_sums_dtype: Any = None) -> "RowSketch":
        """Zeros for a pass to fill (the values :func:`sketch_rows` gives a zero row): a float64 sketch of ``R`` rows
        with the bucket counts of ``sketch_buckets(d, dim)``, their squared norms and, with ``col_sums_dtype``, the
        column sums in that dtype."""
        k1, k2 = sketch_buckets(d, dim)
        sums = None if col_sums_dtype is None else np.zeros(d, dtype=col_sums_dtype)
        return cls(np.zeros((R, k1 + k2)), np.zeros(R), sums, int(dim))

    def fits(self, R: int, d: int, dim: int, col_sums: bool, dtype: Any) -> bool:
        """Whether it stands for the pass a consumer of ``R x d`` rows of ``dtype`` with sketch length ``dim`` would
        take (the same bucket counts, a float64 sketch; the column sums, in the rows' dtype, when it needs them)."""
        return (self.Y.shape[0] == R and self.Y.dtype == np.float64
                and sketch_buckets(d, self.dim) == sketch_buckets(d, dim) and self.Y.shape[1] == sum(sketch_buckets(d, dim))
                and (not col_sums or (self.col_sums is not None and self.col_sums.dtype == np.dtype(dtype))))


def centre_gram(Y: np.ndarray, low_precision: bool) -> np.ndarray:
    """Gram matrix of the centred rows of the sketch ``Y`` (float64; products in float32 if ``low_precision``).

    numpy's ``Yc = Y - Y.mean(axis=0)`` (cast to float32 if ``low_precision``), ``G = Yc @ Yc.T`` (one BLAS
    ``syrk``), ``0.5 (G + G^T)`` in float64, bit for bit; the centring and cast, and the widening and symmetrising,
    each one compiled pass (:func:`~.kernels.centred_rows`, :func:`~.kernels.symmetrised64`) instead of numpy's
    temporaries of the sketch's and the Gram matrix's size."""
    return centre_factor(Y, low_precision).dense()  # products in float32 for float32 rows: the sketch is approximate


#: From this many rows a sketched filter keeps the centred Gram matrix as its factor (:class:`CentredFactor`): forming
#: ``Yc Yc^T`` costs ``R^2 m / 2`` multiply-adds, the filter's 60-100 products with it ``2 R m`` each, whatever ``m``
#: (issue 12, the sixteenth landing: at R = 1000, m = 1024, 20 ms for the matrix, 0.05-0.11 ms a product with it,
#: 0.11 ms with the factor; RGE's decode of R rows of d = 2e4, the factor against the matrix: 27.0 / 23.2 ms at
#: R = 500, 26.0 / 25.8 at 600, 28.5 / 32.1 at 700, 39.4 / 51.3 at 1000, 56.8 / 103 at 1500, far attackers;
#: 39.5 / 41.2 and 48.2 / 55.6 ms at R = 700 and 1000 on clean rounds).
FACTOR_MIN_ROWS = 700


class CentredFactor:
    """The centred Gram matrix ``K = Yc Yc^T`` of a sketch ``Y`` (``Yc`` its rows centred, ``(n, m)``), kept as the
    factor ``Yc``: a product ``K v`` is two with ``Yc`` (``2 n m`` multiply-adds, in ``Yc``'s dtype), and ``K`` is
    never formed (``n^2 m / 2``), for the filter's Lanczos solves at large ``n`` (:func:`~.sigma.top_eig_centred`,
    :func:`~.saddle.spectral_step`).  The dense matrix of a few rows is :meth:`dense` (small solves).

    ``shape`` is ``K``'s, ``dtype`` the factor's (the products' precision: float32 for float32 rows, as
    :func:`centre_gram`'s products)."""

    def __init__(self, Yc: np.ndarray) -> None:
        if Yc.ndim != 2:
            raise ValueError("the factor must be a matrix")
        self.factor = np.ascontiguousarray(Yc)
        n = self.factor.shape[0]
        self.shape = (n, n)
        self.dtype = self.factor.dtype

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        """``K v`` for a vector ``v`` (cast to the factor's dtype), in the factor's dtype."""
        v = np.asarray(v, dtype=self.dtype)
        return self.factor @ (v @ self.factor)

    def diagonal(self) -> np.ndarray:
        """``diag(K)``, the rows' squared norms (float64 sums of the factor's entries)."""
        F = self.factor
        return np.einsum("ij,ij->i", F, F, dtype=np.float64)

    def rows(self, idx: np.ndarray) -> CentredFactor:
        """``K[np.ix_(idx, idx)]`` as a factor (the rows ``idx`` of ``Yc``, gathered)."""
        return CentredFactor(self.factor[np.asarray(idx, dtype=np.intp)])

    def dense(self) -> np.ndarray:
        """``K`` formed (float64, symmetrised: :func:`centre_gram`'s values for the same factor)."""
        from .kernels import symmetrised64

        return symmetrised64(self.factor @ self.factor.T)


def dense_gram(K: np.ndarray | CentredFactor) -> np.ndarray:
    """``K`` as a float64 matrix (a :class:`CentredFactor` formed)."""
    return K.dense() if isinstance(K, CentredFactor) else np.asarray(K, dtype=np.float64)


def gram_rows(K: np.ndarray | CentredFactor, idx: np.ndarray) -> np.ndarray | CentredFactor:
    """``K[np.ix_(idx, idx)]``: a matrix's submatrix, or a :class:`CentredFactor`'s rows (:meth:`CentredFactor.rows`)."""
    return K.rows(idx) if isinstance(K, CentredFactor) else K[np.ix_(idx, idx)]


def centre_factor(Y: np.ndarray, low_precision: bool) -> CentredFactor:
    """:func:`centre_gram`'s matrix kept as its factor: the centred rows of ``Y`` (float32 if ``low_precision``)."""
    from .kernels import centred_rows

    Y = np.ascontiguousarray(Y, dtype=np.float64)
    Yc = np.empty(Y.shape, dtype=np.float32 if low_precision else np.float64)
    centred_rows(Y, Y.mean(axis=0), Yc)
    return CentredFactor(Yc)


def sketched_centred_gram(updates: ArrayLike, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Gram matrix of the centred sketched rows, ``(R, R)`` float64 (an unbiased estimate of the centred Gram)."""
    return centre_gram(sketch_rows(updates, dim, rng), _low_precision(updates))


def _low_precision(updates: ArrayLike) -> bool:
    return str(updates.dtype).endswith(("float32", "float16"))

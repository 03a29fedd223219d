"""Array-backend helpers shared by the aggregators (numpy and torch, no Flower).

Aggregators receive the R client vectors as one ``(R, d)`` array, either a
``numpy.ndarray`` or a ``torch.Tensor`` (possibly on a GPU).  The heavy O(d R^2)
work (Gram products, weighted sums) stays in the input's framework and on its
device; the small R x R work runs in float64 numpy.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Union

import numpy as np


class _LazyTorch:
    """The ``torch`` module, imported on first attribute access.

    Importing torch costs about a second and 300 MB per process; a deployment's
    ClientApp runs in a fresh process per message and needs torch only when it
    is handed tensors, so the numpy paths never pay for it.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("torch"), name)


# torch is a hard dependency of the project, but keep the math importable without it
torch: Any = _LazyTorch() if importlib.util.find_spec("torch") is not None else None

ArrayLike = Union[np.ndarray, "torch.Tensor"]

#: Number of coordinates processed per chunk in the centred Gram product.
GRAM_CHUNK = 1 << 16


def is_torch(x: Any) -> bool:
    """Return True if ``x`` is a ``torch.Tensor``."""
    mod = sys.modules.get("torch")  # no tensor can exist before torch is imported
    return mod is not None and isinstance(x, mod.Tensor)


#: Inputs whose squared Frobenius norm exceeds this are widened to float64 by
#: ``check_matrix(..., widen_large=True)``: every rule's sums of squares (norms, pairwise
#: distances, Gram entries) are at most a few times this, so they stay finite in float32.
LARGE_ENERGY = float(np.finfo(np.float32).max) / 64


def require_finite(updates: ArrayLike) -> None:
    """The elementwise scan behind every screen of the aggregator input (numpy or torch): ``ValueError`` on a NaN or
    Inf entry.  The screens call it only where a reduction they took anyway is not finite (or is large)."""
    finite = bool(torch.isfinite(updates).all()) if is_torch(updates) else bool(np.isfinite(updates).all())
    if not finite:
        raise ValueError("aggregator input contains NaN or Inf")


def check_matrix(updates: ArrayLike, *, widen_large: bool = False, screen: bool = True) -> ArrayLike:
    """Validate the aggregator input: a 2-D real floating array ``(R, d)`` with R >= 1.

    Integer inputs are converted to float64 (numpy) / float32 (torch); complex input
    is refused (its imaginary part would be silently dropped).  Raises ``ValueError``
    on wrong rank, empty input, complex or non-finite entries.  With ``widen_large``
    a float32/float16 input whose squared norm exceeds :data:`LARGE_ENERGY` (finite
    entries near the float32 maximum, say) is returned as float64, so that the rules'
    sums and squares cannot overflow; the caller casts the estimate back.  The check
    is one reduction (a dot product) unless that reduction is not finite or large.
    With ``screen=False`` only the shape and dtype are checked: the caller screens a
    reduction it computes anyway (:func:`screened_mean`), saving that pass.
    """
    if is_torch(updates):
        if updates.ndim != 2 or updates.shape[0] < 1:
            raise ValueError(f"expected an (R, d) tensor with R >= 1, got shape {tuple(updates.shape)}")
        if torch.is_complex(updates):
            raise ValueError("aggregator input is complex; expected real floating point")
        if not torch.is_floating_point(updates):
            updates = updates.float()
        if not screen:
            return updates
        flat = updates.reshape(-1)
        energy = float(torch.dot(flat, flat))
        if not np.isfinite(energy) or energy > LARGE_ENERGY:
            require_finite(updates)
            if widen_large and updates.dtype != torch.float64:
                updates = updates.double()
        return updates
    arr = np.asarray(updates)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"expected an (R, d) array with R >= 1, got shape {arr.shape}")
    if np.iscomplexobj(arr):
        raise ValueError(f"aggregator input is complex ({arr.dtype}); expected real floating point")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not screen:
        return arr
    flat = arr.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        energy = float(np.dot(flat, flat))
    if not np.isfinite(energy) or energy > LARGE_ENERGY:
        require_finite(arr)
        if widen_large and arr.dtype.itemsize < 8:
            arr = arr.astype(np.float64)
    return arr


def screened_mean(updates: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
    """Row mean of a shape-checked ``(R, d)`` array, screening the input for NaN/Inf on the mean.

    A NaN or Inf entry always makes its column's mean non-finite, so a finite mean proves
    the input finite without a second pass.  A non-finite mean triggers the elementwise
    scan: NaN/Inf entries raise ``ValueError``; finite entries whose sum overflowed the
    input dtype (float32 near 3e38) are widened to float64 and averaged again.  Returns
    ``(updates, mean)``, ``updates`` possibly widened (the caller casts its estimate back
    with :func:`restore_dtype`).
    """
    mean = mean_rows(updates)
    if is_torch(mean):
        if bool(torch.isfinite(mean).all()):
            return updates, mean
        require_finite(updates)
        wide = updates.double()
    else:
        if np.isfinite(mean).all():
            return updates, mean
        require_finite(updates)
        wide = updates.astype(np.float64)
    return wide, mean_rows(wide)


def restore_dtype(estimate: ArrayLike, like: ArrayLike) -> ArrayLike:
    """``estimate`` in the floating dtype of ``like`` (undoes ``widen_large``; other inputs unchanged).

    No clipping: a value beyond the target dtype's range becomes +-inf, which callers
    treat as a failed aggregation (RobustSGD leaves the model unchanged).
    """
    if is_torch(like):
        if like.is_floating_point() and estimate.dtype != like.dtype:
            return estimate.to(like.dtype)
        return estimate
    dtype = getattr(like, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.floating) and np.asarray(estimate).dtype != dtype:
        with np.errstate(over="ignore"):
            return np.asarray(estimate).astype(dtype)
    return estimate


def to_numpy64(x: ArrayLike) -> np.ndarray:
    """Copy ``x`` to a float64 numpy array on the host."""
    if is_torch(x):
        return x.detach().to("cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def mean_rows(updates: ArrayLike) -> ArrayLike:
    """Plain mean over rows, in the input's framework, dtype and device."""
    if is_torch(updates):
        return updates.mean(dim=0)
    return updates.mean(axis=0)


def subset_mean(updates: ArrayLike, idx: np.ndarray) -> ArrayLike:
    """Mean of the rows ``idx``; exactly ``mean_rows`` when ``idx`` is every row."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == updates.shape[0]:
        return mean_rows(updates)
    w = np.zeros(updates.shape[0])
    w[idx] = 1.0 / idx.size
    return weighted_sum(updates, w)


def weighted_sum(updates: ArrayLike, weights: np.ndarray) -> ArrayLike:
    """Return ``sum_i weights[i] * updates[i]`` in the input's framework/dtype/device."""
    weights = np.asarray(weights, dtype=np.float64)
    if is_torch(updates):
        w = torch.as_tensor(weights, dtype=updates.dtype, device=updates.device)
        return w @ updates
    return weights.astype(updates.dtype, copy=False) @ updates


#: The one-pass centred Gram (uncentred products, centred in R x R) is used when the rows' spread
#: is at least this fraction of their energy; below it a common offset dominates and the rows are
#: centred before the products (one pass more), which avoids the cancellation.
ALGEBRAIC_CENTRING_MIN = 0.5


def _chunk_products(updates: ArrayLike, chunk: int, offset: ArrayLike | None, rows: Any = None) -> np.ndarray:
    """``sum over column chunks of (B - offset)(B - offset)^T`` in float64 (chunk products in the input dtype).

    ``rows`` (an index array) restricts ``B`` to those rows, gathered chunk by chunk.
    """
    d = updates.shape[1]
    n = updates.shape[0] if rows is None else len(rows)
    gram = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, chunk):
        block = updates[:, start : start + chunk] if rows is None else updates[rows, start : start + chunk]
        if offset is not None:
            block = block - offset[start : start + chunk]
        prod64 = to_numpy64(block @ block.T)
        if not np.isfinite(prod64).all():
            scale = float(to_numpy64(block.abs().max() if is_torch(block) else np.abs(block).max()))
            scaled = to_numpy64(block) / scale
            prod64 = (scaled @ scaled.T) * scale * scale
        gram += prod64
    return gram


def centred_gram(updates: ArrayLike, chunk: int = GRAM_CHUNK, *, with_scale: bool = False,
                 mean: ArrayLike | None = None, rows: np.ndarray | None = None):
    """Gram matrix of the rows after subtracting their mean, as float64 ``(R, R)``.

    ``K = (G - 1 gbar^T)(G - 1 gbar^T)^T`` computed in chunks of ``chunk`` coordinates,
    each chunk product in the input dtype and accumulated in float64.  One pass: the
    uncentred products ``G G^T``, centred in R x R space (``H G G^T H``); when the rows
    share an offset large against their spread (trace of the centred matrix below
    :data:`ALGEBRAIC_CENTRING_MIN` times the uncentred one) that would cancel, the rows
    are centred before the products instead (one pass more).  Centring makes every
    downstream quantity translation invariant.  If a chunk product overflows (absurd
    magnitudes), the chunk is rescaled by its largest absolute value and recomputed in
    float64.  Cost: O(d R^2), memory O(R * chunk); no d x d matrix is ever formed.

    With ``with_scale=True`` returns ``(K, scale)`` where ``scale = sum_i ||g_i||^2``
    of the *uncentred* rows: the magnitude against which rounding noise of the inputs
    is measured.  ``mean`` is the row mean when the caller has it already.  ``rows``: the Gram
    matrix of ``updates[rows]`` (and their mean), gathered chunk by chunk instead of copied.
    """
    if rows is not None:
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size and int(rows[-1]) - int(rows[0]) == rows.size - 1 and bool(np.all(np.diff(rows) == 1)):
            updates, rows = updates[int(rows[0]) : int(rows[-1]) + 1], None  # a run of rows: a view
    n = updates.shape[0] if rows is None else rows.size
    raw = _chunk_products(updates, chunk, None, rows)
    energy = float(np.trace(raw))
    row = raw.mean(axis=0)
    gram = raw - row[None, :] - row[:, None] + row.mean()
    if not (np.isfinite(energy) and float(np.trace(gram)) >= ALGEBRAIC_CENTRING_MIN * energy):
        if mean is None:
            mean = mean_rows(updates) if rows is None else subset_mean(updates, rows)
        gram = _chunk_products(updates, chunk, mean, rows)
        if not np.isfinite(energy):
            mean64 = to_numpy64(mean)
            energy = float(np.trace(gram) + n * float(mean64 @ mean64))
    gram = 0.5 * (gram + gram.T)
    if with_scale:
        return gram, energy
    return gram


def sq_distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``||g_i - g_j||^2`` from a Gram matrix."""
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist

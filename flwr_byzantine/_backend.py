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


def check_matrix(updates: ArrayLike) -> ArrayLike:
    """Validate the aggregator input: a 2-D floating array ``(R, d)`` with R >= 1.

    Integer inputs are converted to float64 (numpy) / float32 (torch).  Raises
    ``ValueError`` on wrong rank, empty input or non-finite entries.
    """
    if is_torch(updates):
        if updates.ndim != 2 or updates.shape[0] < 1:
            raise ValueError(f"expected an (R, d) tensor with R >= 1, got shape {tuple(updates.shape)}")
        if not torch.is_floating_point(updates):
            updates = updates.float()
        # One reduction first (cheap); the elementwise scan only if the sum is not finite.
        if not bool(torch.isfinite(updates.sum(dtype=torch.float64))) and not bool(torch.isfinite(updates).all()):
            raise ValueError("aggregator input contains NaN or Inf")
        return updates
    arr = np.asarray(updates)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"expected an (R, d) array with R >= 1, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum(dtype=np.float64)
    if not np.isfinite(total) and not np.isfinite(arr).all():
        raise ValueError("aggregator input contains NaN or Inf")
    return arr


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


def centred_gram(updates: ArrayLike, chunk: int = GRAM_CHUNK, *, with_scale: bool = False):
    """Gram matrix of the rows after subtracting their mean, as float64 ``(R, R)``.

    ``K = (G - 1 gbar^T)(G - 1 gbar^T)^T`` computed in chunks of ``chunk``
    coordinates, each chunk product in the input dtype and accumulated in float64.
    Centring makes every downstream quantity translation invariant and avoids the
    cancellation of ``H (G G^T) H`` when the vectors share a large offset.  If a
    chunk product overflows (absurd magnitudes), the chunk is rescaled by its
    largest absolute value and recomputed in float64.  Cost: O(d R^2), memory
    O(R * chunk); no d x d matrix is ever formed.

    With ``with_scale=True`` returns ``(K, scale)`` where ``scale = sum_i ||g_i||^2``
    of the *uncentred* rows (``trace(K) + R ||gbar||^2``): the magnitude against
    which rounding noise of the inputs is measured.
    """
    n, d = updates.shape
    gram = np.zeros((n, n), dtype=np.float64)
    mean = mean_rows(updates)
    for start in range(0, d, chunk):
        block = updates[:, start : start + chunk] - mean[start : start + chunk]
        prod = block @ block.T
        prod64 = to_numpy64(prod)
        if not np.isfinite(prod64).all():
            scale = float(to_numpy64(block.abs().max() if is_torch(block) else np.abs(block).max()))
            scaled = to_numpy64(block) / scale
            prod64 = (scaled @ scaled.T) * scale * scale
        gram += prod64
    gram = 0.5 * (gram + gram.T)
    if with_scale:
        mean64 = to_numpy64(mean)
        return gram, float(np.trace(gram) + n * float(mean64 @ mean64))
    return gram


def sq_distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``||g_i - g_j||^2`` from a Gram matrix."""
    diag = np.diag(gram)
    dist = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist

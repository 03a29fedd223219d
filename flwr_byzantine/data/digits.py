"""scikit-learn's bundled 8x8 handwritten digits (1797 x 64), available offline.

The default dataset of the flwr-byzantine app: small enough for CPU simulations with
tens of Flower clients, real enough that label-skewed (Dirichlet) partitions give the
heterogeneous local datasets of Section 2 of Data & Diggavi (arXiv 2005.07866).
Nothing is downloaded: ``sklearn.datasets.load_digits`` reads a file shipped with
scikit-learn.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_FEATURES = 64
NUM_CLASSES = 10
#: Raw digits pixels are integers in [0, 16].
_PIXEL_MAX = 16.0


@functools.lru_cache(maxsize=16)
def _digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    X = (np.asarray(bunch.data, dtype=np.float64) / _PIXEL_MAX).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=int(seed), shuffle=True, stratify=y
    )
    out = tuple(np.ascontiguousarray(a) for a in (X_train, y_train, X_test, y_test))
    for a in out:
        a.setflags(write=False)
    return out  # type: ignore[return-value]


def load_digits_arrays(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, deterministic train/test split of the digits data.

    Parameters
    ----------
    test_fraction:
        Fraction of the 1797 samples held out for the central test set, in (0, 1).
    seed:
        Seed of the split (``train_test_split(random_state=seed, stratify=y)``); the
        same ``(test_fraction, seed)`` always gives the same split.

    Returns
    -------
    X_train, y_train, X_test, y_test:
        Features as float32 in [0, 1] (pixels divided by 16), shape ``(n, 64)``;
        labels as int64 in {0, ..., 9}.  The split is computed once per process and
        cached; the returned arrays are fresh writable copies.
    """
    return tuple(a.copy() for a in _digits_split(float(test_fraction), int(seed)))  # type: ignore[return-value]

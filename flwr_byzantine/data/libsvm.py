"""Data for COMRADE / GIANT experiments (regularised GLMs), numpy + scikit-learn.

* LIBSVM files (the paper's a9a and w5a): :func:`load_libsvm`.  Nothing is downloaded at run
  time; fetch the files yourself from the LIBSVM binary-classification page
  https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html, e.g.::

      curl -O https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a
      curl -O https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a.t
      curl -O https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/w5a
      curl -O https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/w5a.t

  (a9a: 123 features, 32,561 / 16,281 rows; w5a: 300 features, 9,888 / 39,861 rows).
* Offline defaults: scikit-learn's breast-cancer data (standardised, 30 features) and the
  8x8 digits made binary (label +1 for digits 5-9, -1 for 0-4; pixels scaled to [0, 1]).
* :func:`make_synthetic_logistic`: a logistic-regression generator with a known w_true.
* Partitions: :func:`uniform_partitions` (uniform row sampling, the paper's setting) and
  :func:`dirichlet_partitions` (label skew through ``flwr_datasets``' DirichletPartitioner).

Labels of every binary data set are returned in {-1, +1} (what
:class:`~flwr_byzantine.newton.objectives.LogisticObjective` uses; it also accepts {0, 1}).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flwr_byzantine.data.partition import dirichlet_partition
import scipy.sparse as sp
from .. import seeds

#: Where the paper's data sets can be downloaded (train, test).
LIBSVM_URLS: dict[str, tuple[str, str]] = {
    "a9a": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a",
            "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/a9a.t"),
    "w5a": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/w5a",
            "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/w5a.t"),
}

#: Number of features of the paper's data sets (test files may omit the last columns).
LIBSVM_NUM_FEATURES: dict[str, int] = {"a9a": 123, "w5a": 300}

DATASETS = ("breast-cancer", "digits", "synthetic", "libsvm")


@dataclass
class GLMDataset:
    """A train/test split for a GLM.

    ``X_*`` are dense float64 arrays or CSR matrices, ``y_*`` float64 labels in {-1, +1}
    (binary) or reals; ``w_true`` is set for synthetic data.
    """

    name: str
    X_train: np.ndarray | sp.csr_matrix
    y_train: np.ndarray
    X_test: np.ndarray | sp.csr_matrix
    y_test: np.ndarray
    w_true: np.ndarray | None = None

    @property
    def num_features(self) -> int:
        """d (including the intercept column if one was added)."""
        return int(self.X_train.shape[1])


def binary_labels(y: np.ndarray) -> np.ndarray:
    """Two-valued labels mapped to {-1, +1} (the larger value becomes +1)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    values = np.unique(y)
    if values.size > 2:
        raise ValueError(f"expected a binary label set, got {values.size} distinct values")
    if values.size == 2 and set(values.tolist()) != {-1.0, 1.0}:
        return np.where(y == values[1], 1.0, -1.0)
    if values.size == 1 and values[0] not in (-1.0, 1.0):
        return np.where(y > 0, 1.0, -1.0)
    return y.copy()


def load_libsvm(path: str | Path, n_features: int | None = None, *, dense: bool = True):
    """Read a LIBSVM / SVMlight file with ``sklearn.datasets.load_svmlight_file``.

    Returns ``(X, y)`` with labels mapped to {-1, +1}.  ``n_features`` fixes d (needed for
    test files whose last features never occur, e.g. a9a.t); ``dense=False`` keeps CSR.
    """
    from sklearn.datasets import load_svmlight_file

    path = Path(path).expanduser()
    if not path.is_file():
        name = path.name.removesuffix(".t")
        hint = f" Download it from {LIBSVM_URLS[name][0]}" if name in LIBSVM_URLS else ""
        raise FileNotFoundError(f"LIBSVM file {path} not found.{hint}")
    X, y = load_svmlight_file(str(path), n_features=n_features, dtype=np.float64)
    X = sp.csr_matrix(X)
    return (X.toarray() if dense else X), binary_labels(y)


def _with_intercept(X):
    ones = np.ones((X.shape[0], 1))
    if sp.issparse(X):
        return sp.hstack([X, sp.csr_matrix(ones)], format="csr")
    return np.hstack([X, ones])


def _split(X, y, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)


def _standardise(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = X_train.mean(axis=0)
    sd = X_train.std(axis=0)
    sd[sd == 0] = 1.0
    return (X_train - mu) / sd, (X_test - mu) / sd


def load_breast_cancer_binary(seed: int = 0, test_fraction: float = 0.2, add_intercept: bool = True) -> GLMDataset:
    """scikit-learn breast cancer (569 x 30), standardised on the train split, labels +-1."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X.astype(np.float64), binary_labels(y), test_fraction, seed)
    Xtr, Xte = _standardise(Xtr, Xte)
    if add_intercept:
        Xtr, Xte = _with_intercept(Xtr), _with_intercept(Xte)
    return GLMDataset("breast-cancer", Xtr, ytr, Xte, yte)


def load_digits_binary(seed: int = 0, test_fraction: float = 0.2, add_intercept: bool = True) -> GLMDataset:
    """scikit-learn 8x8 digits (1797 x 64), pixels / 16, label +1 for digits >= 5 else -1."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    yb = np.where(y >= 5, 1.0, -1.0)
    Xtr, Xte, ytr, yte = _split(X.astype(np.float64) / 16.0, yb, test_fraction, seed)
    if add_intercept:
        Xtr, Xte = _with_intercept(Xtr), _with_intercept(Xte)
    return GLMDataset("digits", Xtr, ytr, Xte, yte)


def make_synthetic_logistic(
    n: int = 4000,
    d: int = 20,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    condition_number: float = 10.0,
    signal: float = 2.0,
) -> GLMDataset:
    """Synthetic logistic regression with a known ``w_true``.

    x ~ N(0, Sigma) with Sigma's eigenvalues spread geometrically from 1 to 1/condition_number
    (random rotation); w_true uniform on the sphere of radius ``signal``; y = +1 with probability
    sigmoid(w_true^T x), else -1.  No intercept column.
    """
    if n < 2 or d < 1 or condition_number < 1:
        raise ValueError("need n >= 2, d >= 1 and condition_number >= 1")
    rng = np.random.default_rng([seed, seeds.SYNTHETIC_GLM])
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eig = np.geomspace(1.0, 1.0 / condition_number, d)
    X = (rng.normal(size=(n, d)) * np.sqrt(eig)) @ Q.T
    w_true = rng.normal(size=d)
    w_true *= signal / np.linalg.norm(w_true)
    prob = 1.0 / (1.0 + np.exp(-(X @ w_true)))
    y = np.where(rng.random(n) < prob, 1.0, -1.0)
    n_test = int(round(test_fraction * n))
    return GLMDataset("synthetic", X[n_test:], y[n_test:], X[:n_test], y[:n_test], w_true=w_true)


def load_glm_dataset(
    name: str,
    seed: int = 0,
    *,
    path: str = "",
    test_path: str = "",
    n_features: int | None = None,
    synthetic_n: int = 4000,
    synthetic_d: int = 20,
    test_fraction: float = 0.2,
) -> GLMDataset:
    """Data set by name: ``breast-cancer``, ``digits``, ``synthetic`` or ``libsvm``.

    ``libsvm`` reads ``path`` (and ``test_path`` if given, else a seeded ``test_fraction``
    split), dense, with an intercept column appended; ``n_features`` defaults to the known d
    of a9a / w5a when the file name says so.
    """
    if name == "breast-cancer":
        return load_breast_cancer_binary(seed, test_fraction)
    if name == "digits":
        return load_digits_binary(seed, test_fraction)
    if name == "synthetic":
        return make_synthetic_logistic(synthetic_n, synthetic_d, seed=seed, test_fraction=test_fraction)
    if name == "libsvm":
        if not path:
            raise ValueError("dataset 'libsvm' needs a path to a LIBSVM file (see LIBSVM_URLS)")
        if n_features is None:
            n_features = LIBSVM_NUM_FEATURES.get(Path(path).name.removesuffix(".t"))
        X, y = load_libsvm(path, n_features)
        if test_path:
            Xte, yte = load_libsvm(test_path, X.shape[1])
            Xtr, ytr = X, y
        else:
            Xtr, Xte, ytr, yte = _split(X, y, test_fraction, seed)
        return GLMDataset(Path(path).name, _with_intercept(Xtr), ytr, _with_intercept(Xte), yte)
    raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")


def uniform_partitions(n: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform row sampling (the paper's sketching, Appendix A), without replacement.

    A seeded random permutation of the n rows cut into ``num_partitions`` contiguous pieces of
    sizes differing by at most one; every row belongs to exactly one worker.
    """
    if num_partitions < 1 or n < num_partitions:
        raise ValueError(f"need 1 <= num_partitions <= n, got {num_partitions} partitions of {n} rows")
    perm = np.random.default_rng([seed, seeds.GLM_UNIFORM_SPLIT]).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_partitions)]


def dirichlet_partitions(
    y: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Label-skewed partitions: per class, proportions drawn from Dirichlet(alpha).

    The same partitioner as the gradient app (:func:`flwr_byzantine.data.partition.dirichlet_partition`,
    flwr-datasets' ``DirichletPartitioner``), with labels in {-1, +1} or {0, 1} mapped to
    class indices.  Small ``alpha`` means strong heterogeneity.
    """
    labels = np.unique(np.asarray(y).reshape(-1), return_inverse=True)[1].astype(np.int64)
    return dirichlet_partition(labels, num_partitions, alpha, seed=seed, min_partition_size=min_partition_size)


def federated_split(
    data: GLMDataset,
    num_partitions: int,
    *,
    partitioner: str = "uniform",
    alpha: float = 1.0,
    seed: int = 0,
    server_fraction: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of the training set per worker, and the rows kept by the server.

    A seeded ``server_fraction`` of the training rows is held out for the server (its own data,
    used only for a server-side line search); the rest is partitioned by ``partitioner``
    (``"uniform"`` or ``"dirichlet"``).  Returns ``(client_rows, server_rows)`` as indices into
    ``data.X_train``.
    """
    n = int(data.X_train.shape[0])
    if not 0.0 <= server_fraction < 1.0:
        raise ValueError("server_fraction must be in [0, 1)")
    perm = np.random.default_rng([seed, seeds.GLM_SERVER_ROWS]).permutation(n)
    n_server = int(round(server_fraction * n))
    server_rows = np.sort(perm[:n_server])
    pool = np.sort(perm[n_server:])
    if partitioner == "uniform":
        parts = uniform_partitions(pool.size, num_partitions, seed)
    elif partitioner == "dirichlet":
        parts = dirichlet_partitions(data.y_train[pool], num_partitions, alpha, seed)
    else:
        raise ValueError(f"unknown partitioner {partitioner!r}; valid: ['dirichlet', 'uniform']")
    return [pool[p] for p in parts], server_rows

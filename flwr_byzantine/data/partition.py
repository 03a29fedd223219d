"""Per-client datasets for the Flower clients and the central test set for the server.

Heterogeneity (Section 2 of Data & Diggavi, arXiv 2005.07866: each worker's local
dataset is arbitrary, non-IID) comes from one of two sources:

* real data (``"digits"``, Hub image datasets): label skew from a Dirichlet(``alpha``)
  partition of the training split (``flwr_datasets.partitioner.DirichletPartitioner``);
  smaller ``alpha`` = more skew, ``alpha = inf`` = IID;
* synthetic data (``"synthetic-linreg"``, ``"synthetic-logreg"``): the statistical
  heterogeneous model of Section 6 (:class:`~flwr_byzantine.data.synthetic.SyntheticHeterogeneous`),
  where ``kappa`` sets the spread of the local population gradients and ``alpha`` is
  not used.

Synthetic names take optional parameters after a colon, e.g.
``"synthetic-linreg:kappa=2,d=20,n=100"`` (keys: ``kappa`` (default 1.0), ``d`` (50),
``n`` points per worker (200), ``noise`` std (0.1), ``shift`` feature-mean shift (0.0));
the number of workers is always ``num_partitions``.  So a run config's ``dataset``
string selects ``kappa`` without a separate key.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

from flwr_byzantine.data.digits import NUM_CLASSES as DIGITS_CLASSES
from flwr_byzantine.data.digits import NUM_FEATURES as DIGITS_FEATURES
from flwr_byzantine.data.digits import load_digits_arrays
from flwr_byzantine.data.hub import HUB_DATASETS, load_hub_partition, load_hub_test_set
from flwr_byzantine.data.synthetic import SyntheticHeterogeneous
from .. import seeds

SYNTHETIC_DATASETS = ("synthetic-linreg", "synthetic-logreg")
#: Parameters of the synthetic datasets and their defaults (see the module docstring).
SYNTHETIC_DEFAULTS: dict[str, float] = {"kappa": 1.0, "d": 50, "n": 200, "noise": 0.1, "shift": 0.0}
#: Size of the synthetic central test set.
SYNTHETIC_TEST_SIZE = 2000
VALID_DATASETS: tuple[str, ...] = ("digits", *SYNTHETIC_DATASETS, *HUB_DATASETS)

_MAX_ATTEMPTS_MSG = "max number of attempts"


def _unknown(dataset: str) -> ValueError:
    return ValueError(
        f"unknown dataset {dataset!r}; valid names: {list(VALID_DATASETS)} "
        f"(synthetic names may add ':kappa=..,d=..,n=..,noise=..,shift=..')"
    )


def parse_synthetic_name(dataset: str) -> tuple[str, dict[str, float]]:
    """``"synthetic-linreg:kappa=2,d=20"`` -> ``("linreg", {"kappa": 2.0, "d": 20, ...defaults})``."""
    base, _, spec = dataset.partition(":")
    if base not in SYNTHETIC_DATASETS:
        raise _unknown(dataset)
    params = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SYNTHETIC_DEFAULTS:
            raise ValueError(f"bad synthetic parameter {item!r} in {dataset!r}; keys: {list(SYNTHETIC_DEFAULTS)}")
        try:
            num = float(value)
        except ValueError:
            raise ValueError(f"synthetic parameter {key!r} in {dataset!r} must be a number, got {value!r}") from None
        if key in ("d", "n"):
            if num != int(num) or num < 1:
                raise ValueError(f"synthetic parameter {key!r} must be a positive integer, got {value!r}")
            num = int(num)
        params[key] = num
    return base.removeprefix("synthetic-"), params


def _kind(dataset: str) -> str:
    if not isinstance(dataset, str):
        raise _unknown(str(dataset))
    if dataset == "digits":
        return "digits"
    if dataset.partition(":")[0] in SYNTHETIC_DATASETS:
        return "synthetic"
    if dataset in HUB_DATASETS:
        return "hub"
    raise _unknown(dataset)


def dataset_info(dataset: str) -> dict:
    """``{"num_features", "num_classes", "task"}`` of ``dataset`` (``num_classes`` is 1 for regression)."""
    kind = _kind(dataset)
    if kind == "digits":
        return {"num_features": DIGITS_FEATURES, "num_classes": DIGITS_CLASSES, "task": "classification"}
    if kind == "synthetic":
        task, params = parse_synthetic_name(dataset)
        if task == "linreg":
            return {"num_features": int(params["d"]), "num_classes": 1, "task": "regression"}
        return {"num_features": int(params["d"]), "num_classes": 2, "task": "classification"}
    meta = HUB_DATASETS[dataset]
    return {"num_features": meta["num_features"], "num_classes": meta["num_classes"], "task": "classification"}


# ------------------------------------------------------------------ partitioners
def iid_partition(n: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded random permutation of ``range(n)`` cut into ``num_partitions`` near-equal parts."""
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if int(num_partitions) != num_partitions or not 1 <= num_partitions <= max(n, 1):
        raise ValueError(f"num_partitions must be in [1, {max(n, 1)}], got {num_partitions!r}")
    perm = np.random.default_rng(seed).permutation(int(n))
    return [p.astype(np.int64) for p in np.array_split(perm, int(num_partitions))]


def _repair_min_size(parts: list[np.ndarray], min_size: int, seed: int) -> list[np.ndarray]:
    """Move randomly chosen samples from the largest partitions to those below ``min_size``."""
    rng = np.random.default_rng([int(seed), seeds.PARTITION_REPAIR])
    parts = [p.copy() for p in parts]
    while True:
        sizes = np.array([len(p) for p in parts])
        small = int(np.argmin(sizes))
        if sizes[small] >= min_size:
            return parts
        donor = int(np.argmax(sizes))
        take = min(min_size - sizes[small], sizes[donor] - min_size)
        pick = rng.choice(sizes[donor], size=take, replace=False)
        keep = np.ones(sizes[donor], dtype=bool)
        keep[pick] = False
        parts[small] = np.concatenate([parts[small], parts[donor][pick]])
        parts[donor] = parts[donor][keep]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed partition of ``range(len(labels))`` with ``flwr_datasets``' ``DirichletPartitioner``.

    For each class the partitioner draws the shares of the ``num_partitions`` partitions
    from Dirichlet(``alpha``); it redraws (up to 10 times) until every partition has at
    least ``min_partition_size`` samples (capped at ``len(labels) // num_partitions`` so the
    request is feasible).  The first attempt is the plain partitioner
    (``self_balancing=False``, ``seed``); if it gives up, it is rerun with
    ``self_balancing=True``.  If that also gives up (very small ``alpha`` with more
    partitions than classes can fill, e.g. 20 partitions of 10 digit classes at
    ``alpha=0.05``), a self-balanced draw without the size constraint is *repaired*:
    samples chosen at random (seeded) move from the largest partitions to those below
    the minimum, which keeps the skew of the draw.  Everything is deterministic in
    ``seed``.  ``alpha = inf`` gives :func:`iid_partition`.

    Returns one int64 index array per partition; they are disjoint and cover every index.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    alpha = float(alpha)
    if int(num_partitions) != num_partitions or not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be in [1, {n}], got {num_partitions!r}")
    num_partitions = int(num_partitions)
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (inf for IID), got {alpha!r}")
    if math.isinf(alpha):
        return iid_partition(n, num_partitions, seed)
    min_size = max(0, min(int(min_partition_size), n // num_partitions))
    ds = datasets.Dataset.from_dict({"label": labels.tolist(), "index": np.arange(n, dtype=np.int64)})
    for self_balancing, size in ((False, min_size), (True, min_size), (True, 0)):
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=size, self_balancing=self_balancing, shuffle=True, seed=int(seed),
        )
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                parts = [np.asarray(partitioner.load_partition(p)["index"], dtype=np.int64)
                         for p in range(num_partitions)]
        except ValueError as exc:
            if _MAX_ATTEMPTS_MSG not in str(exc):
                raise
            continue
        return parts if size == min_size else _repair_min_size(parts, min_size, int(seed))
    raise AssertionError("a Dirichlet draw without a size constraint cannot fail")


# ------------------------------------------------------------------ loaders
@functools.lru_cache(maxsize=8)
def _digits_partitions(num_partitions: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    _, y_train, _, _ = load_digits_arrays(seed=seed)
    return tuple(dirichlet_partition(y_train, num_partitions, alpha, seed=seed))


@functools.lru_cache(maxsize=8)
def _synthetic(task: str, d: int, num_workers: int, n: int, kappa: float, noise: float, shift: float,
               seed: int) -> SyntheticHeterogeneous:
    return SyntheticHeterogeneous(d=d, num_workers=num_workers, n_per_worker=n, kappa_mean=kappa,
                                  noise_std=noise, task=task, seed=seed, feature_shift=shift)


def _synthetic_for(dataset: str, num_workers: int, seed: int, kappa: float | None) -> SyntheticHeterogeneous:
    task, p = parse_synthetic_name(dataset)
    k = float(p["kappa"] if kappa is None else kappa)
    return _synthetic(task, int(p["d"]), int(num_workers), int(p["n"]), k, float(p["noise"]), float(p["shift"]),
                      int(seed))


@functools.lru_cache(maxsize=256)
def _load_partition_cached(dataset: str, partition_id: int, num_partitions: int, alpha: float, seed: int,
                           kappa: float | None) -> tuple[np.ndarray, np.ndarray]:
    kind = _kind(dataset)
    if kind == "digits":
        X_train, y_train, _, _ = load_digits_arrays(seed=seed)
        idx = _digits_partitions(num_partitions, alpha, seed)[partition_id]
        X, y = X_train[idx], y_train[idx]
    elif kind == "synthetic":
        X, y = _synthetic_for(dataset, num_partitions, seed, kappa).worker_data(partition_id)
    else:
        meta = HUB_DATASETS[dataset]
        X, y = load_hub_partition(dataset, partition_id, num_partitions, alpha, seed, split="train",
                                  image_key=meta["image_key"], label_key=meta["label_key"])
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    alpha: float,
    seed: int = 0,
    *,
    kappa: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training data ``(X float32 (n, num_features), y)`` of client ``partition_id``.

    * ``"digits"``: Dirichlet(``alpha``) label-skewed partition (:func:`dirichlet_partition`,
      ``min_partition_size=10``) of the training split of :func:`load_digits_arrays` with
      the same ``seed``.
    * ``"synthetic-linreg"`` / ``"synthetic-logreg"`` (optionally with ``:key=value,...``):
      worker ``partition_id`` of a :class:`SyntheticHeterogeneous` model with
      ``num_workers = num_partitions`` and, by default, ``d=50``, ``n=200`` per worker,
      ``kappa_mean=1.0``, ``noise_std=0.1``; ``kappa`` here overrides the name's value.
      ``alpha`` is not used.
    * a name in ``HUB_DATASETS`` (network needed on first use): :func:`load_hub_partition`.

    ``y`` is int64 for classification and float32 for regression.  Computed once per
    process for each argument tuple; the returned arrays are fresh writable copies.
    Raises ``ValueError`` for an unknown dataset (listing the valid names) or a
    ``partition_id`` outside ``[0, num_partitions)``.
    """
    _kind(dataset)
    if isinstance(num_partitions, bool) or int(num_partitions) != num_partitions or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if isinstance(partition_id, bool) or int(partition_id) != partition_id or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {int(num_partitions)}), got {partition_id!r}")
    alpha = float(alpha)
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (inf for IID), got {alpha!r}")
    X, y = _load_partition_cached(dataset, int(partition_id), int(num_partitions), alpha, int(seed),
                                  None if kappa is None else float(kappa))
    return X.copy(), y.copy()


def load_test_set(
    dataset: str,
    seed: int = 0,
    *,
    num_partitions: int | None = None,
    kappa: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out central test set ``(X, y)`` for server-side evaluation.

    * ``"digits"``: the test split of :func:`load_digits_arrays` (20 %, stratified, ``seed``).
    * synthetic: :data:`SYNTHETIC_TEST_SIZE` fresh points.  With ``num_partitions`` given
      they come from the mixture of the ``num_partitions`` workers' distributions (the
      global population objective).  Without it (the default, since the server does not
      know the partition count up front) they come from the centre distribution
      (features ``N(0, I)``, optimum ``x*``), which does not depend on the number of
      workers; for linear regression with no feature shift its risk differs from the
      mixture's only by a constant, so it has the same minimiser ``x*``.
    * Hub names: the dataset's test split (network needed on first use).
    """
    kind = _kind(dataset)
    if kind == "digits":
        _, _, X, y = load_digits_arrays(seed=int(seed))
        return X, y
    if kind == "synthetic":
        workers = 1 if num_partitions is None else int(num_partitions)
        return _synthetic_for(dataset, workers, int(seed), kappa).test_data(SYNTHETIC_TEST_SIZE)
    meta = HUB_DATASETS[dataset]
    return load_hub_test_set(dataset, split=meta["test_split"], image_key=meta["image_key"],
                             label_key=meta["label_key"])

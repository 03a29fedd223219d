"""Image-classification datasets from the Hugging Face Hub, partitioned with flwr-datasets.

For users with a network: :func:`load_hub_partition` goes through
``flwr_datasets.FederatedDataset`` with a ``DirichletPartitioner`` on the ``"label"``
column (label-skewed, heterogeneous partitions as in Section 2 of Data & Diggavi) and
returns flattened float32 images in [0, 1].

Offline use (and the tests) take one of two other routes, chosen from ``name`` /
``dataset``:

* ``dataset=`` an already-loaded ``datasets.Dataset`` / ``DatasetDict``, or ``name`` a
  directory written by ``save_to_disk``: loaded with ``datasets.load_from_disk`` and
  partitioned by the same partitioner directly (``FederatedDataset`` can only call
  ``datasets.load_dataset``);
* ``name`` a local directory of data files (parquet, csv, ...): ``FederatedDataset``
  itself, since ``datasets.load_dataset`` reads local directories without a network.

Both routes shuffle the split with ``seed`` before partitioning exactly as
``FederatedDataset(shuffle=True, seed=seed)`` does, so they give identical partitions
of identical data.  ``alpha = inf`` gives IID partitions (``IidPartitioner``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import numpy as np

#: Hub datasets known to :func:`flwr_byzantine.data.load_partition` / ``dataset_info``.
HUB_DATASETS: dict[str, dict[str, Any]] = {
    "ylecun/mnist": {"num_features": 784, "num_classes": 10, "image_key": "image", "label_key": "label",
                     "test_split": "test"},
    "zalando-datasets/fashion_mnist": {"num_features": 784, "num_classes": 10, "image_key": "image",
                                       "label_key": "label", "test_split": "test"},
    "uoft-cs/cifar10": {"num_features": 3072, "num_classes": 10, "image_key": "img", "label_key": "label",
                        "test_split": "test"},
}

_MAX_ATTEMPTS_MSG = "max number of attempts"


def _make_partitioner(num_partitions: int, alpha: float, seed: int, label_key: str,
                      min_partition_size: int, self_balancing: bool):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if math.isinf(alpha):
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by=label_key, alpha=float(alpha),
        min_partition_size=min_partition_size, self_balancing=self_balancing, shuffle=True, seed=seed,
    )


def _check_args(partition_id: int, num_partitions: int, alpha: float) -> None:
    if int(num_partitions) != num_partitions or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if int(partition_id) != partition_id or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id!r}")
    if math.isnan(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0 (inf for IID), got {alpha!r}")


def images_to_arrays(ds, image_key: str = "image", label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Flattened float32 features and int64 labels of a ``datasets.Dataset`` of images.

    PIL images (any mode; palette / binary modes are converted to ``L`` or ``RGB``) or
    array-like cells.  ``uint8`` pixels are divided by 255, so features lie in [0, 1].
    """
    if image_key not in ds.column_names or label_key not in ds.column_names:
        raise ValueError(f"dataset columns are {ds.column_names}; need {image_key!r} and {label_key!r}")
    rows = []
    for im in ds[image_key]:
        if hasattr(im, "mode") and im.mode not in ("L", "RGB"):
            im = im.convert("RGB" if len(im.getbands()) > 1 else "L")
        a = np.asarray(im)
        rows.append(a.astype(np.float32).reshape(-1) / 255.0 if a.dtype == np.uint8
                    else a.astype(np.float32).reshape(-1))
    y = np.asarray(ds[label_key], dtype=np.int64)
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), y
    return np.stack(rows), y


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def _select_split(data, split: str):
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} not in the dataset's splits {list(data)}")
        return data[split]
    if isinstance(data, datasets.Dataset):
        return data
    raise TypeError(f"dataset must be a datasets.Dataset or DatasetDict, got {type(data).__name__}")


def _partition_local(ds, partition_id: int, num_partitions: int, alpha: float, seed: int,
                     label_key: str, min_partition_size: int):
    """Partition an in-memory split the way ``FederatedDataset(shuffle=True, seed=seed)`` would."""
    ds = ds.shuffle(seed=seed)
    last: Exception | None = None
    for self_balancing in (False, True):
        partitioner = _make_partitioner(num_partitions, alpha, seed, label_key, min_partition_size, self_balancing)
        partitioner.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return partitioner.load_partition(partition_id)
        except ValueError as exc:
            if _MAX_ATTEMPTS_MSG not in str(exc):
                raise
            last = exc
    raise ValueError(f"Dirichlet partitioning failed for alpha={alpha}, min_partition_size="
                     f"{min_partition_size}: {last}")


@functools.lru_cache(maxsize=8)
def _federated_dataset(name: str, num_partitions: int, alpha: float, seed: int, split: str, label_key: str,
                       min_partition_size: int, kwargs: tuple[tuple[str, Any], ...]):
    """A ``FederatedDataset`` whose partition assignment is already determined (cached per process)."""
    from flwr_datasets import FederatedDataset

    last: Exception | None = None
    for self_balancing in (False, True):
        partitioner = _make_partitioner(num_partitions, alpha, seed, label_key, min_partition_size, self_balancing)
        fds = FederatedDataset(dataset=name, partitioners={split: partitioner}, shuffle=True, seed=seed,
                               **dict(kwargs))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                fds.load_partition(0, split)  # downloads and fixes the assignment of every partition
            return fds
        except ValueError as exc:
            if _MAX_ATTEMPTS_MSG not in str(exc):
                raise
            last = exc
    raise ValueError(f"Dirichlet partitioning of {name!r} failed for alpha={alpha}, "
                     f"min_partition_size={min_partition_size}: {last}")


def load_hub_partition(
    name: str = "ylecun/mnist",
    partition_id: int = 0,
    num_partitions: int = 10,
    alpha: float = 1.0,
    seed: int = 0,
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
    *,
    dataset=None,
    min_partition_size: int = 10,
    **load_dataset_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Partition ``partition_id`` of ``num_partitions`` Dirichlet(``alpha``) partitions of ``split``.

    Parameters
    ----------
    name:
        Hub dataset id (e.g. ``"ylecun/mnist"``), a local directory of data files (read by
        ``FederatedDataset`` through ``datasets.load_dataset``), or a directory written by
        ``save_to_disk``.  Ignored when ``dataset`` is given.
    dataset:
        An already-loaded ``datasets.Dataset`` or ``DatasetDict`` (offline use).
    alpha:
        Dirichlet concentration over the label column (smaller = more label skew);
        ``float("inf")`` for IID partitions.  If the ``DirichletPartitioner`` cannot meet
        ``min_partition_size`` in its 10 attempts, it is retried with
        ``self_balancing=True``.
    load_dataset_kwargs:
        Passed to ``datasets.load_dataset`` (e.g. ``cache_dir=...``); must be hashable.

    Returns
    -------
    X, y:
        Flattened float32 images in [0, 1], shape ``(n_partition, H*W*C)``, and int64 labels.
    """
    alpha = float(alpha)
    _check_args(partition_id, num_partitions, alpha)
    partition_id, num_partitions, seed = int(partition_id), int(num_partitions), int(seed)
    if dataset is None and _is_saved_to_disk(str(name)):
        import datasets

        dataset = datasets.load_from_disk(str(name))
    if dataset is not None:
        part = _partition_local(_select_split(dataset, split), partition_id, num_partitions, alpha, seed,
                                label_key, min_partition_size)
    else:
        fds = _federated_dataset(str(name), num_partitions, alpha, seed, split, label_key, int(min_partition_size),
                                 tuple(sorted(load_dataset_kwargs.items())))
        part = fds.load_partition(partition_id, split)
    return images_to_arrays(part, image_key, label_key)


def load_hub_test_set(
    name: str = "ylecun/mnist",
    split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    *,
    dataset=None,
    **load_dataset_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole ``split`` (the central test set) as flattened float32 images and int64 labels.

    Same sources as :func:`load_hub_partition`; for a Hub id or a data-file directory it
    goes through ``FederatedDataset.load_split`` (no shuffling).
    """
    if dataset is None and _is_saved_to_disk(str(name)):
        import datasets

        dataset = datasets.load_from_disk(str(name))
    if dataset is not None:
        ds = _select_split(dataset, split)
    else:
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(dataset=str(name), partitioners={split: 1}, shuffle=False, **load_dataset_kwargs)
        ds = fds.load_split(split)
    return images_to_arrays(ds, image_key, label_key)

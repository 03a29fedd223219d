"""On-disk cache of client partitions (and the central test set): fresh processes skip sklearn and HF datasets.

A SuperNode runs every message in a new ``flwr-clientapp`` process.  Building a
digits partition imports scikit-learn (``load_digits``) and Hugging Face
``datasets`` (the Dirichlet partitioner): about 1.5 s and 200 MB per process,
more than the training step.  :func:`cached_partition` stores the partition's
``(X, y)`` once as an ``.npz`` file and reads it back afterwards.

The file name is a SHA-256 of the arguments *and of the source code of the data
package*, so editing a loader or partitioner invalidates every entry; files are
written atomically (temporary file + rename), so concurrent processes of one
machine never read a half-written entry.  The directory is environment variable
``FLWR_BYZANTINE_CACHE`` (``off`` disables the cache), else
``~/.cache/flwr-byzantine``.  Any cache failure falls back to computing the
partition; a corrupt entry is recomputed and replaced.

Provisioning a device (so that not even its first round pays for the imports)::

    python -m flwr_byzantine.data.cache --dataset digits --num-partitions 20 --partition-id 3

(without ``--partition-id``: every partition), with the run's ``dirichlet-alpha``
(``--alpha``) and ``seed`` (``--seed``) and the SuperNode's ``FLWR_BYZANTINE_CACHE``.
``--test-set`` also caches the ServerApp's central test set (:func:`cached_test_set`), so
the ServerApp does not hold scikit-learn either; on the server's machine::

    python -m flwr_byzantine.data.cache --dataset digits --num-partitions 0 --test-set
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from flwr_byzantine.data.partition import load_partition, load_test_set

#: Environment variable naming the cache directory (``off``: no cache).
CACHE_ENV = "FLWR_BYZANTINE_CACHE"


def cache_dir() -> Path | None:
    """The cache directory, or None when ``FLWR_BYZANTINE_CACHE=off``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "flwr-byzantine"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the data package's source files (a change invalidates the cache)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(dataset: str, partition_id: int, num_partitions: int, alpha: float, seed: int) -> str:
    """File stem of a partition's cache entry."""
    args = json.dumps([dataset, int(partition_id), int(num_partitions), repr(float(alpha)), int(seed),
                       _code_digest()])
    return hashlib.sha256(args.encode()).hexdigest()[:32]


def test_set_key(dataset: str, seed: int) -> str:
    """File stem of the central test set's cache entry."""
    args = json.dumps(["test-set", dataset, int(seed), _code_digest()])
    return hashlib.sha256(args.encode()).hexdigest()[:32]


def _cached(name: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``compute()``'s ``(X, y)``, read from / written to the cache file ``name`` (no cache: just compute)."""
    root = cache_dir()
    if root is None:
        return compute()
    path = root / name
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["X"], npz["y"]
    except (OSError, KeyError, ValueError):  # missing or corrupt entry: compute and (re)write it
        pass
    X, y = compute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, X=X, y=y)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only or full disk: the cache is an optimisation only
    return X, y


def cached_partition(dataset: str, partition_id: int, num_partitions: int, alpha: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~flwr_byzantine.data.partition.load_partition`, read from / written to the disk cache.

    Like ``load_partition`` it returns fresh writable arrays (and raises on invalid arguments).
    """
    name = f"partition-{cache_key(dataset, partition_id, num_partitions, alpha, seed)}.npz"
    return _cached(name, lambda: load_partition(dataset, partition_id, num_partitions, alpha, seed))


def cached_test_set(dataset: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~flwr_byzantine.data.partition.load_test_set` ``(dataset, seed)``, through the same disk cache.

    The ServerApp's central evaluation set: with the entry present its process never
    imports scikit-learn or ``datasets`` (about 120 MB held through every round).
    """
    return _cached(f"test-set-{test_set_key(dataset, seed)}.npz", lambda: load_test_set(dataset, seed))


def main(argv: list[str] | None = None) -> None:
    """Command line: write the cache entries of some or all partitions (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Fill the ClientApp's partition cache.")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument("--partition-id", type=int, action="append", default=None,
                        help="partition to cache (repeatable; default: all)")
    parser.add_argument("--alpha", type=float, default=1.0, help="run config dirichlet-alpha")
    parser.add_argument("--seed", type=int, default=0, help="run config seed")
    parser.add_argument("--test-set", action="store_true",
                        help="also cache the central test set (the ServerApp's evaluation data)")
    args = parser.parse_args(argv)
    root = cache_dir()
    if root is None:
        parser.error(f"the cache is off ({CACHE_ENV}=off)")
    ids = args.partition_id if args.partition_id is not None else range(args.num_partitions)
    for pid in ids:
        X, _ = cached_partition(args.dataset, pid, args.num_partitions, args.alpha, args.seed)
        print(f"partition {pid}/{args.num_partitions} of {args.dataset}: {len(X)} examples, cached in {root}")
    if args.test_set:
        X, _ = cached_test_set(args.dataset, args.seed)
        print(f"test set of {args.dataset}: {len(X)} examples, cached in {root}")


if __name__ == "__main__":
    main()

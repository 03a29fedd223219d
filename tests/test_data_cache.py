"""The ClientApp's on-disk partition cache: same arrays as the loader, robust to corrupt entries."""

from __future__ import annotations

import numpy as np

from flwr_byzantine.data import cache as data_cache
from flwr_byzantine.data import load_partition

DS = "synthetic-logreg:d=6,n=30"


def test_cache_hit_returns_the_loaders_arrays_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.CACHE_ENV, str(tmp_path))
    X0, y0 = load_partition(DS, 1, 4, 1.0, 3)
    X1, y1 = data_cache.cached_partition(DS, 1, 4, 1.0, 3)  # miss: computed and written
    files = list(tmp_path.glob("partition-*.npz"))
    assert len(files) == 1
    X2, y2 = data_cache.cached_partition(DS, 1, 4, 1.0, 3)  # hit: read back
    for X, y in ((X1, y1), (X2, y2)):
        assert X.dtype == X0.dtype and y.dtype == y0.dtype
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(y, y0)
        assert X.flags.writeable and y.flags.writeable  # fresh copies, like load_partition
    data_cache.cached_partition(DS, 2, 4, 1.0, 3)
    data_cache.cached_partition(DS, 1, 4, 1.0, 4)
    assert len(list(tmp_path.glob("partition-*.npz"))) == 3  # partition id and seed are part of the key


def test_corrupt_entry_is_recomputed_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.CACHE_ENV, str(tmp_path))
    data_cache.cached_partition(DS, 0, 4, 1.0, 0)
    (path,) = tmp_path.glob("partition-*.npz")
    path.write_bytes(b"garbage")
    X, y = data_cache.cached_partition(DS, 0, 4, 1.0, 0)
    np.testing.assert_array_equal(X, load_partition(DS, 0, 4, 1.0, 0)[0])
    with np.load(path) as npz:  # rewritten
        np.testing.assert_array_equal(npz["y"], y)


def test_cache_off_and_unwritable_dir_fall_back_to_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.CACHE_ENV, "off")
    assert data_cache.cache_dir() is None
    X, _ = data_cache.cached_partition(DS, 0, 4, 1.0, 0)
    np.testing.assert_array_equal(X, load_partition(DS, 0, 4, 1.0, 0)[0])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(data_cache.CACHE_ENV, str(blocker / "sub"))
    X, _ = data_cache.cached_partition(DS, 0, 4, 1.0, 0)
    np.testing.assert_array_equal(X, load_partition(DS, 0, 4, 1.0, 0)[0])


def test_key_depends_on_the_data_code(monkeypatch):
    key = data_cache.cache_key(DS, 0, 4, 1.0, 0)
    assert key != data_cache.cache_key(DS, 0, 4, 0.5, 0)
    monkeypatch.setattr(data_cache, "_code_digest", lambda: "edited")
    assert key != data_cache.cache_key(DS, 0, 4, 1.0, 0)


def test_command_line_fills_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(data_cache.CACHE_ENV, str(tmp_path))
    data_cache.main(["--dataset", DS, "--num-partitions", "3", "--partition-id", "1", "--seed", "2"])
    assert len(list(tmp_path.glob("partition-*.npz"))) == 1
    data_cache.main(["--dataset", DS, "--num-partitions", "3", "--seed", "2"])
    assert len(list(tmp_path.glob("partition-*.npz"))) == 3
    assert "partition 2/3" in capsys.readouterr().out
    monkeypatch.setattr(data_cache, "load_partition", lambda *a: (_ for _ in ()).throw(AssertionError("miss")))
    data_cache.cached_partition(DS, 2, 3, 1.0, 2)  # a hit: the loader is not called


def test_test_set_is_cached_bit_for_bit_and_by_the_command_line(tmp_path, monkeypatch):
    from flwr_byzantine.data import load_test_set

    monkeypatch.setenv(data_cache.CACHE_ENV, str(tmp_path))
    data_cache.main(["--dataset", DS, "--num-partitions", "0", "--seed", "2", "--test-set"])
    (path,) = tmp_path.glob("test-set-*.npz")
    X0, y0 = load_test_set(DS, 2)
    monkeypatch.setattr(data_cache, "load_test_set", lambda *a: (_ for _ in ()).throw(AssertionError("miss")))
    X, y = data_cache.cached_test_set(DS, 2)  # a hit: the loader is not called
    assert X.dtype == X0.dtype and y.dtype == y0.dtype
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)
    assert data_cache.test_set_key(DS, 2) != data_cache.test_set_key(DS, 3)
    assert data_cache.test_set_key(DS, 2) not in {data_cache.cache_key(DS, i, 4, 1.0, 2) for i in range(4)}

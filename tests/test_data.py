"""Offline tests of flwr_byzantine.data and flwr_byzantine.models (no downloads)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from flwr_byzantine.data import (
    SyntheticHeterogeneous,
    dataset_info,
    dirichlet_partition,
    iid_partition,
    load_digits_arrays,
    load_hub_partition,
    load_hub_test_set,
    load_partition,
    load_test_set,
)
from flwr_byzantine.models import (
    MLP,
    LinearRegression,
    LogisticRegression,
    build_model,
    loss_fn_for,
)


# --------------------------------------------------------------------------- digits
def test_digits_split_shapes_ranges_dtypes():
    X_tr, y_tr, X_te, y_te = load_digits_arrays()
    assert X_tr.shape == (1437, 64) and X_te.shape == (360, 64)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert X_tr.dtype == np.float32 and y_tr.dtype == np.int64
    for X in (X_tr, X_te):
        assert X.min() >= 0.0 and X.max() <= 1.0 and X.max() == 1.0
    assert set(np.unique(y_tr)) == set(range(10)) == set(np.unique(y_te))


def test_digits_split_deterministic_and_seeded():
    a = load_digits_arrays(seed=3)
    b = load_digits_arrays(seed=3)
    c = load_digits_arrays(seed=4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    # returned arrays are copies: writing to them must not change the cache
    a[0][:] = -1.0
    assert load_digits_arrays(seed=3)[0].min() >= 0.0


def test_digits_split_is_stratified():
    _, y_tr, _, y_te = load_digits_arrays(test_fraction=0.25, seed=1)
    y_all = np.concatenate([y_tr, y_te])
    expected = np.bincount(y_all, minlength=10) * 0.25
    assert len(y_te) == pytest.approx(0.25 * len(y_all), abs=1)
    assert np.all(np.abs(np.bincount(y_te, minlength=10) - expected) <= 1.0)


# --------------------------------------------------------------------------- partitions
def _label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each partition's label distribution and the global one."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tvs))


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_dirichlet_partition_disjoint_cover_deterministic():
    _, y, _, _ = load_digits_arrays()
    parts = dirichlet_partition(y, 8, alpha=0.5, seed=0)
    assert len(parts) == 8
    _assert_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(y, 8, alpha=0.5, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = dirichlet_partition(y, 8, alpha=0.5, seed=1)
    assert not all(np.array_equal(np.sort(p), np.sort(q)) for p, q in zip(parts, other))


def test_dirichlet_partition_lower_alpha_more_skewed():
    _, y, _, _ = load_digits_arrays()
    skew = {a: np.mean([_label_skew(y, dirichlet_partition(y, 6, alpha=a, seed=s), 10) for s in range(2)])
            for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5  # strongly skewed
    assert skew[100.0] < 0.1  # close to IID


def test_dirichlet_partition_hard_case_still_meets_min_size():
    # 20 partitions at alpha=0.05 rarely meet min size 10 with plain sampling; the fallbacks must
    _, y, _, _ = load_digits_arrays()
    parts = dirichlet_partition(y, 20, alpha=0.05, seed=0)
    _assert_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 10
    assert _label_skew(y, parts, 10) > 0.6  # the repair keeps the draw's label skew
    again = dirichlet_partition(y, 20, alpha=0.05, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_dirichlet_partition_inf_alpha_is_iid_and_bad_alpha_rejected():
    y = np.repeat(np.arange(5), 20)
    parts = dirichlet_partition(y, 4, alpha=float("inf"), seed=0)
    _assert_disjoint_cover(parts, 100)
    assert sorted(len(p) for p in parts) == [25, 25, 25, 25]
    with pytest.raises(ValueError):
        dirichlet_partition(y, 4, alpha=0.0)
    with pytest.raises(ValueError):
        dirichlet_partition(y, 101, alpha=1.0)


def test_iid_partition():
    parts = iid_partition(103, 5, seed=2)
    _assert_disjoint_cover(parts, 103)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert all(np.array_equal(p, q) for p, q in zip(parts, iid_partition(103, 5, seed=2)))
    assert not all(np.array_equal(p, q) for p, q in zip(parts, iid_partition(103, 5, seed=3)))


def test_load_partition_digits_covers_train_split():
    X_tr, y_tr, _, _ = load_digits_arrays(seed=0)
    got = [load_partition("digits", i, 5, 0.3, seed=0) for i in range(5)]
    assert sum(len(y) for _, y in got) == len(y_tr)
    for X, y in got:
        assert X.dtype == np.float32 and X.shape[1] == 64 and y.dtype == np.int64 and len(X) == len(y)
    # each row is a training row with the matching label
    rows = {X_tr[i].tobytes(): y_tr[i] for i in range(len(y_tr))}
    X0, y0 = got[0]
    assert all(rows[x.tobytes()] == lab for x, lab in zip(X0, y0))
    # cached but returned as independent copies
    X0[:] = 5.0
    assert load_partition("digits", 0, 5, 0.3, seed=0)[0].max() <= 1.0


def test_load_partition_errors_list_valid_names():
    with pytest.raises(ValueError, match="digits"):
        load_partition("nope", 0, 4, 1.0)
    with pytest.raises(ValueError, match="partition_id"):
        load_partition("digits", 4, 4, 1.0)
    with pytest.raises(ValueError, match="partition_id"):
        load_partition("digits", -1, 4, 1.0)
    with pytest.raises(ValueError, match="synthetic-linreg"):
        load_test_set("nope")
    with pytest.raises(ValueError):
        dataset_info("nope")
    with pytest.raises(ValueError):
        load_partition("synthetic-linreg:bogus=1", 0, 4, 1.0)


def test_dataset_info():
    assert dataset_info("digits") == {"num_features": 64, "num_classes": 10, "task": "classification"}
    assert dataset_info("synthetic-linreg") == {"num_features": 50, "num_classes": 1, "task": "regression"}
    assert dataset_info("synthetic-logreg") == {"num_features": 50, "num_classes": 2, "task": "classification"}
    assert dataset_info("synthetic-linreg:d=7")["num_features"] == 7
    assert dataset_info("ylecun/mnist")["num_features"] == 784


def test_load_synthetic_partitions_and_test_set():
    X, y = load_partition("synthetic-linreg", 2, 6, 1.0, seed=0)
    assert X.shape == (200, 50) and X.dtype == np.float32 and y.dtype == np.float32
    X2, y2 = load_partition("synthetic-logreg:d=10,n=30", 1, 3, 1.0, seed=0)
    assert X2.shape == (30, 10) and y2.dtype == np.int64 and set(np.unique(y2)) <= {0, 1}
    # kappa from the name and from the keyword agree
    a = load_partition("synthetic-linreg:kappa=3,d=5,n=20", 0, 4, 1.0)
    b = load_partition("synthetic-linreg:d=5,n=20", 0, 4, 1.0, kappa=3.0)
    c = load_partition("synthetic-linreg:d=5,n=20", 0, 4, 1.0)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    Xt, yt = load_test_set("synthetic-linreg")
    assert Xt.shape == (2000, 50) and yt.dtype == np.float32
    Xd, yd = load_test_set("digits")
    assert Xd.shape == (360, 64)


# --------------------------------------------------------------------------- synthetic model
@pytest.mark.parametrize("task", ["linreg", "logreg"])
def test_kappa_mean_zero_without_heterogeneity(task):
    m = SyntheticHeterogeneous(d=8, num_workers=5, n_per_worker=50, kappa_mean=0.0, task=task, seed=1,
                               population_samples=500)
    rng = np.random.default_rng(0)
    for x in (np.zeros(8), rng.standard_normal(8)):
        assert m.kappa_mean(x) < 1e-10


@pytest.mark.parametrize("task", ["linreg", "logreg"])
def test_kappa_mean_increases_with_parameter(task):
    x = np.random.default_rng(5).standard_normal(8)
    vals = [SyntheticHeterogeneous(8, 5, 50, k, task=task, seed=2, population_samples=500).kappa_mean(x)
            for k in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(vals, vals[1:])), vals
    if task == "linreg":  # closed form: exactly the parameter, at every x
        np.testing.assert_allclose(vals, [0.0, 0.5, 1.0, 2.0, 4.0], atol=1e-10)


def test_kappa_mean_exact_when_fewer_dims_than_workers():
    m = SyntheticHeterogeneous(d=3, num_workers=10, n_per_worker=5, kappa_mean=1.5, seed=0)
    assert m.kappa_mean(np.ones(3)) == pytest.approx(1.5, abs=1e-10)
    assert m.kappa_max(np.ones(3)) >= 1.5
    np.testing.assert_allclose(m.local_optima.mean(axis=0), m.x_star, atol=1e-12)


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_linreg_global_optimum_is_minimiser(shift):
    m = SyntheticHeterogeneous(d=6, num_workers=4, n_per_worker=[10, 20, 30, 40], kappa_mean=2.0,
                               noise_std=0.1, seed=3, feature_shift=shift)
    xo = m.global_optimum()
    assert np.linalg.norm(m.population_gradient(xo)) < 1e-10
    if shift == 0.0:
        np.testing.assert_allclose(xo, m.x_star, atol=1e-12)
    else:  # covariate shift moves the optimum away from the average of the local optima
        assert np.linalg.norm(xo - m.local_optima.mean(axis=0)) > 1e-3
    # independent check: least squares on a large sample of the mixture lands near it
    X, y = m.test_data(20000)
    ls = np.linalg.lstsq(X.astype(np.float64), y.astype(np.float64), rcond=None)[0]
    assert np.linalg.norm(ls - xo) < 0.05
    # local optima zero their own population gradient, not the global one
    assert np.linalg.norm(m.population_gradient(m.local_optima[0], 0)) < 1e-10
    assert np.linalg.norm(m.population_gradient(m.local_optima[0])) > 0.1


def test_logreg_global_optimum_is_minimiser():
    m = SyntheticHeterogeneous(d=5, num_workers=4, n_per_worker=20, kappa_mean=1.0, task="logreg", seed=0,
                               population_samples=2000)
    xo = m.global_optimum()
    assert np.linalg.norm(m.population_gradient(xo)) < 1e-8
    base = m._population_loss_logreg(xo)
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert m._population_loss_logreg(xo + 0.05 * rng.standard_normal(5)) > base


def test_synthetic_worker_data_properties():
    m = SyntheticHeterogeneous(d=4, num_workers=3, n_per_worker=[5, 7, 9], kappa_mean=1.0, seed=0)
    shapes = [m.worker_data(r)[0].shape for r in range(3)]
    assert shapes == [(5, 4), (7, 4), (9, 4)]
    X, y = m.worker_data(1)
    np.testing.assert_array_equal(X, m.worker_data(1)[0])
    X[:] = 0
    assert np.abs(m.worker_data(1)[0]).sum() > 0
    # x* depends on (seed, d) only, not on the number of workers
    np.testing.assert_array_equal(m.x_star, SyntheticHeterogeneous(4, 7, 5, 1.0, seed=0).x_star)
    with pytest.raises(ValueError):
        m.worker_data(3)
    with pytest.raises(ValueError):
        SyntheticHeterogeneous(4, 3, [5, 7], 1.0)
    # noise-free linreg: each worker's responses are exactly linear in its own optimum
    q = SyntheticHeterogeneous(d=4, num_workers=3, n_per_worker=6, kappa_mean=1.0, noise_std=0.0, seed=0)
    Xq, yq = q.worker_data(2)
    np.testing.assert_allclose(Xq @ q.local_optima[2], yq, rtol=1e-5, atol=1e-5)


def test_empirical_kappa_tracks_population_kappa():
    x = np.zeros(5)
    small = SyntheticHeterogeneous(5, 4, 4000, 0.0, seed=0).empirical_kappa(x)
    big = SyntheticHeterogeneous(5, 4, 4000, 2.0, seed=0).empirical_kappa(x)
    assert small < 0.2 and big > 1.5


# --------------------------------------------------------------------------- hub loader (offline)
def _fake_mnist(n_train: int = 100, n_test: int = 30, mode: str = "L"):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (28, 28) if mode == "L" else (8, 8, 3)

    def make(n):
        imgs = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(n)]
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        return datasets.Dataset.from_dict({"image": imgs, "label": (np.arange(n) % 10).tolist()}, features=feats)

    return datasets.DatasetDict({"train": make(n_train), "test": make(n_test)})


def test_hub_loader_on_in_memory_dataset():
    dd = _fake_mnist()
    parts = [load_hub_partition("unused", i, 4, 0.5, 0, dataset=dd, min_partition_size=5) for i in range(4)]
    assert sum(len(y) for _, y in parts) == 100
    for X, y in parts:
        assert X.shape == (len(y), 784) and X.dtype == np.float32 and y.dtype == np.int64
        assert X.min() >= 0.0 and X.max() <= 1.0
    X0, y0 = load_hub_partition("unused", 0, 4, 0.5, 0, dataset=dd, min_partition_size=5)
    np.testing.assert_array_equal(X0, parts[0][0])
    # pixel values are exactly the images' bytes / 255
    pix = {np.asarray(im, dtype=np.float32).reshape(-1).tobytes() for im in dd["train"]["image"]}
    assert all((np.asarray(np.round(r * 255), dtype=np.float32)).tobytes() in pix for r in X0)
    Xt, yt = load_hub_test_set(dataset=dd)
    assert Xt.shape == (30, 784) and yt.shape == (30,)
    with pytest.raises(ValueError):
        load_hub_partition("unused", 4, 4, 0.5, 0, dataset=dd)


def test_hub_loader_rgb_images():
    dd = _fake_mnist(40, 10, mode="RGB")
    X, y = load_hub_partition("unused", 0, 2, float("inf"), 0, dataset=dd["train"])
    assert X.shape == (20, 8 * 8 * 3) and len(y) == 20


def test_hub_loader_from_disk_and_through_federated_dataset(tmp_path, monkeypatch):
    import flwr_datasets.common.telemetry as telemetry

    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    dd = _fake_mnist()
    saved = tmp_path / "saved"
    dd.save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    for split in dd:
        dd[split].to_parquet(str(files / f"{split}.parquet"))
    cache = str(tmp_path / "cache")

    mem = [load_hub_partition("unused", i, 3, 1.0, 7, dataset=dd, min_partition_size=5) for i in range(3)]
    disk = [load_hub_partition(str(saved), i, 3, 1.0, 7, min_partition_size=5) for i in range(3)]
    # a local data-file directory goes through flwr_datasets.FederatedDataset (datasets.load_dataset)
    fds = [load_hub_partition(str(files), i, 3, 1.0, 7, min_partition_size=5, cache_dir=cache) for i in range(3)]
    assert sum(len(y) for _, y in fds) == 100
    for (Xm, ym), (Xd, yd), (Xf, yf) in zip(mem, disk, fds):
        assert Xf.shape == (len(yf), 784)
        np.testing.assert_array_equal(Xm, Xd)
        np.testing.assert_array_equal(ym, yd)
        np.testing.assert_array_equal(Xm, Xf)  # same shuffle + partitioner as FederatedDataset
        np.testing.assert_array_equal(ym, yf)
    Xt, yt = load_hub_test_set(str(files), cache_dir=cache)
    assert Xt.shape == (30, 784) and yt.dtype == np.int64
    Xs, _ = load_hub_test_set(str(saved))
    np.testing.assert_array_equal(Xs, Xt)


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name,classes,cls", [("logreg", 10, LogisticRegression), ("mlp", 3, MLP),
                                              ("linear", 1, LinearRegression)])
def test_models_shapes_and_determinism(name, classes, cls):
    before = torch.random.get_rng_state()
    m1 = build_model(name, 12, classes, seed=0)
    assert torch.equal(before, torch.random.get_rng_state())  # global RNG untouched
    m2 = build_model(name, 12, classes, seed=0)
    m3 = build_model(name, 12, classes, seed=1)
    assert isinstance(m1, cls)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    out = m1(torch.zeros(5, 12))
    assert out.shape == ((5, classes) if name != "linear" else (5,))


def test_build_model_rejects_bad_combinations():
    with pytest.raises(ValueError):
        build_model("cnn", 4, 2, 0)
    with pytest.raises(ValueError):
        build_model("linear", 4, 10, 0)
    with pytest.raises(ValueError):
        build_model("logreg", 4, 1, 0)
    with pytest.raises(ValueError):
        loss_fn_for("ranking")


def test_loss_functions():
    reg = loss_fn_for("regression")
    out = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([0.0, 2.0, 5.0])
    assert float(reg(out, y)) == pytest.approx(0.5 * (1 + 0 + 4) / 3)
    assert float(reg(out[:, None], y)) == pytest.approx(0.5 * 5 / 3)
    clf = loss_fn_for("classification")
    logits = torch.zeros(4, 3)
    assert float(clf(logits, torch.tensor([0, 1, 2, 0]))) == pytest.approx(np.log(3))


def test_linear_model_at_global_optimum_reaches_noise_floor():
    """End to end: the synthetic test set, the torch model and the loss agree with the closed form."""
    X, y = load_test_set("synthetic-linreg:d=10,noise=0.2", seed=0)
    m = SyntheticHeterogeneous(10, 1, 5, 1.0, noise_std=0.2, seed=0)
    model = build_model("linear", 10, 1, seed=0)
    with torch.no_grad():
        model.linear.weight.copy_(torch.as_tensor(m.global_optimum(), dtype=torch.float32)[None, :])
        model.linear.bias.zero_()
        loss = float(loss_fn_for("regression")(model(torch.as_tensor(X)), torch.as_tensor(y)))
    assert loss == pytest.approx(0.5 * 0.2**2, rel=0.1)


def test_data_package_does_not_import_flwr():
    code = ("import sys, flwr_byzantine.data as d; d.load_partition('digits', 0, 2, 1.0); "
            "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'flwr imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""COMRADE / GIANT math (pure numpy, no Flower): objectives, solvers, trimming, compressors,
line search, attacks, data, convergence and robustness with the in-process driver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_byzantine.data.libsvm import (
    dirichlet_partitions,
    federated_split,
    load_glm_dataset,
    load_libsvm,
    make_synthetic_logistic,
    uniform_partitions,
)
from flwr_byzantine.attacks import ATTACKS, attack_names, make_attack, run_attack_params
from flwr_byzantine.config import ConfigError, NewtonConfig, RunConfig, parse_run_config
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine.newton import (
    Identity,
    LeastSquaresObjective,
    LogisticObjective,
    NewtonWorker,
    ScaledSign,
    TopK,
    backtracking_line_search,
    choose_step,
    conjugate_gradient,
    empirical_rho,
    federated_objective,
    make_compressor,
    minimise,
    newton_direction,
    newton_step,
    num_kept,
    poison_glm_labels,
    rounds_to_tolerance,
    run_comrade,
    run_giant,
    trim_by_norm,
)

RNG = np.random.default_rng(0)


def small_logistic(n=200, d=6, lam=1e-2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-X @ rng.normal(size=d))), 1.0, -1.0)
    return LogisticObjective(X, y, lam)


def fd_gradient(f, w, h=1e-6):
    return np.array([(f(w + h * e) - f(w - h * e)) / (2 * h) for e in np.eye(w.size)])


# ----------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("kind", ["logistic", "least-squares"])
def test_gradient_hessian_hvp_match_finite_differences(kind):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 5))
    y = np.where(rng.random(50) < 0.5, 1.0, -1.0) if kind == "logistic" else rng.normal(size=50)
    obj = (LogisticObjective if kind == "logistic" else LeastSquaresObjective)(X, y, 0.1)
    w = rng.normal(size=5)
    np.testing.assert_allclose(obj.gradient(w), fd_gradient(obj.value, w), rtol=1e-5, atol=1e-7)
    H_fd = np.stack([fd_gradient(lambda u, i=i: obj.gradient(u)[i], w) for i in range(5)])
    np.testing.assert_allclose(obj.hessian(w), H_fd, rtol=1e-5, atol=1e-6)
    v = rng.normal(size=5)
    np.testing.assert_allclose(obj.hvp(w, v), obj.hessian(w) @ v, rtol=1e-10, atol=1e-12)
    val, g = obj.value_and_gradient(w)
    assert val == pytest.approx(obj.value(w)) and np.allclose(g, obj.gradient(w))


def test_local_gradient_formula_matches_paper():
    """g_i = (1/s) sum_j l'_j(w^T x_j) x_j + lambda w with l'(z) = -y sigma(-y z) (Appendix A, eq. (9))."""
    obj = small_logistic(n=30, d=4, lam=0.3)
    w = RNG.normal(size=4)
    z = obj.X @ w
    manual = np.mean((-obj.y / (1 + np.exp(obj.y * z)))[:, None] * obj.X, axis=0) + 0.3 * w
    np.testing.assert_allclose(obj.gradient(w), manual, rtol=1e-12)
    c = np.exp(z) / (1 + np.exp(z)) ** 2
    np.testing.assert_allclose(obj.hessian(w), (obj.X.T * c) @ obj.X / 30 + 0.3 * np.eye(4), rtol=1e-10)


def test_labels_zero_one_equal_pm1_and_bad_labels_raise():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(20, 3))
    y01 = (rng.random(20) < 0.5).astype(float)
    a, b = LogisticObjective(X, y01, 0.1), LogisticObjective(X, 2 * y01 - 1, 0.1)
    w = rng.normal(size=3)
    assert a.value(w) == pytest.approx(b.value(w))
    with pytest.raises(ValueError):
        LogisticObjective(X, np.arange(20.0), 0.1)
    with pytest.raises(ValueError):
        LogisticObjective(X, y01[:5], 0.1)
    with pytest.raises(ValueError):
        LogisticObjective(X, y01, -1.0)


def test_sparse_and_dense_agree():
    obj = small_logistic(n=40, d=5)
    sobj = LogisticObjective(sp.csr_matrix(obj.X), obj.y, obj.lam)
    w, v = RNG.normal(size=5), RNG.normal(size=5)
    assert sobj.value(w) == pytest.approx(obj.value(w))
    np.testing.assert_allclose(sobj.gradient(w), obj.gradient(w), rtol=1e-12)
    np.testing.assert_allclose(sobj.hessian(w), obj.hessian(w), rtol=1e-12)
    np.testing.assert_allclose(sobj.hvp(w, v), obj.hvp(w, v), rtol=1e-12)


def test_logistic_is_numerically_stable_for_huge_margins():
    obj = LogisticObjective(np.array([[1e4], [-1e4]]), np.array([1.0, 1.0]), 0.0)
    for w in (np.array([10.0]), np.array([-10.0])):
        assert np.isfinite(obj.value(w)) and np.isfinite(obj.gradient(w)).all() and np.isfinite(obj.hessian(w)).all()


def test_federated_objective_is_mean_of_local_objectives():
    obj = small_logistic(n=103, d=4)
    parts = uniform_partitions(103, 5, seed=0)  # sizes 21, 21, 21, 20, 20
    fed = federated_objective("logistic", obj.X, obj.y, parts, obj.lam)
    w = RNG.normal(size=4)
    locals_ = [obj.subset(p) for p in parts]
    assert fed.value(w) == pytest.approx(np.mean([o.value(w) for o in locals_]))
    np.testing.assert_allclose(fed.gradient(w), np.mean([o.gradient(w) for o in locals_], axis=0), rtol=1e-12)
    np.testing.assert_allclose(fed.hessian(w), np.mean([o.hessian(w) for o in locals_], axis=0), rtol=1e-12)


def test_minimise_matches_scipy_optimum():
    from scipy.optimize import minimize

    obj = small_logistic(n=300, d=8, lam=1e-3)
    w_star = minimise(obj)
    assert np.linalg.norm(obj.gradient(w_star)) < 1e-10
    ref = minimize(obj.value, np.zeros(8), jac=obj.gradient, method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w_star, ref, atol=1e-6)


# ----------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("kind", ["logistic", "least-squares"])
def test_cg_direction_matches_direct_solve(kind):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 30))
    y = np.where(rng.random(80) < 0.5, 1.0, -1.0) if kind == "logistic" else rng.normal(size=80)
    obj = (LogisticObjective if kind == "logistic" else LeastSquaresObjective)(X, y, 1e-2)
    w = rng.normal(size=30) * 0.3
    direct = newton_direction(obj, w, cg_threshold=100)
    cg = newton_direction(obj, w, cg_threshold=10, cg_tol=1e-12)
    assert direct.method == "cholesky" and cg.method == "cg" and cg.iterations > 0
    np.testing.assert_allclose(cg.p, direct.p, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(obj.hessian(w) @ direct.p, obj.gradient(w), rtol=1e-9, atol=1e-12)
    # GIANT's right-hand side: a given vector instead of the local gradient
    g = rng.normal(size=30)
    np.testing.assert_allclose(newton_direction(obj, w, g, cg_threshold=10, cg_tol=1e-12).p,
                               np.linalg.solve(obj.hessian(w), g), rtol=1e-8)


def test_cg_never_forms_the_hessian(monkeypatch):
    obj = small_logistic(n=60, d=12)
    monkeypatch.setattr(type(obj), "hessian", lambda self, w: (_ for _ in ()).throw(AssertionError("formed H")))
    res = newton_direction(obj, np.zeros(12), cg_threshold=5)
    assert res.method == "cg" and res.residual < 1e-9


def test_conjugate_gradient_on_random_spd_and_zero_rhs():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(40, 40))
    A = A @ A.T + 0.5 * np.eye(40)
    b = rng.normal(size=40)
    x, it, res = conjugate_gradient(lambda v: A @ v, b, tol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-7)
    assert res <= 1e-12 and it <= 400
    x0, it0, res0 = conjugate_gradient(lambda v: A @ v, np.zeros(40))
    assert it0 == 0 and res0 == 0.0 and not x0.any()


def test_direct_solve_falls_back_for_singular_hessian():
    X = np.zeros((10, 3))
    X[:, 0] = 1.0  # features 2 and 3 are always 0 -> singular Hessian with lambda = 0
    obj = LeastSquaresObjective(X, np.ones(10), 0.0)
    res = newton_direction(obj, np.zeros(3))
    assert res.method == "lstsq" and np.isfinite(res.p).all()
    np.testing.assert_allclose(res.p, [-1.0, 0.0, 0.0], atol=1e-12)


# ----------------------------------------------------------------------------- trimming
@pytest.mark.parametrize("m, beta, expected", [
    (10, 0.0, 10), (10, 0.1, 9), (10, 0.15, 9), (20, 0.15, 17), (20, 0.2, 16), (20, 0.25, 15),
    (7, 0.25, 6), (3, 0.9, 1), (1, 0.5, 1), (100, 0.3, 70), (30, 0.1, 27),
])
def test_num_kept_is_ceil_one_minus_beta_m(m, beta, expected):
    assert num_kept(m, beta) == expected


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), beta=st.floats(0.0, 0.95), d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_trim_keeps_exactly_ceil_smallest_norms(m, beta, d, seed):
    P = np.random.default_rng(seed).normal(size=(m, d)) * np.random.default_rng(seed + 1).exponential(size=(m, 1))
    mean, kept = trim_by_norm(P, beta)
    k = max(1, math.ceil((1 - beta) * m - 1e-9 * max(1.0, (1 - beta) * m)))
    assert kept.size == min(m, k) and np.all(np.diff(kept) > 0)
    norms = np.linalg.norm(P, axis=1)
    dropped = np.setdiff1d(np.arange(m), kept)
    if dropped.size:
        assert norms[kept].max() <= norms[dropped].min()
    np.testing.assert_allclose(mean, P[kept].mean(axis=0))


def test_trim_beta_zero_is_plain_mean_and_input_checks():
    P = RNG.normal(size=(5, 3))
    mean, kept = trim_by_norm(P, 0.0)
    np.testing.assert_allclose(mean, P.mean(axis=0))
    assert kept.tolist() == [0, 1, 2, 3, 4]
    for bad in (np.zeros(3), np.zeros((0, 3)), np.array([[np.nan, 0.0]])):
        with pytest.raises(ValueError):
            trim_by_norm(bad, 0.1)
    with pytest.raises(ValueError):
        trim_by_norm(P, 1.0)


def test_trim_removes_large_byzantine_directions():
    honest = RNG.normal(size=(8, 4)) * 0.1 + 1.0
    bad = np.full((2, 4), 100.0)
    mean, kept = trim_by_norm(np.vstack([honest, bad]), 0.25)
    assert set(kept.tolist()) <= set(range(8))
    np.testing.assert_allclose(mean, honest[kept].mean(axis=0))


def test_newton_step_keeps_model_when_too_few_or_non_finite():
    w = np.ones(3)
    res = newton_step(w, np.zeros((1, 3)), 0.0, min_valid=2)
    assert not res.applied and "valid" in res.reason and np.array_equal(res.w, w)
    res = newton_step(w, np.full((2, 3), 1e308), 0.0, step_size=1e10)
    assert not res.applied and np.array_equal(res.w, w)
    res = newton_step(w, np.ones((4, 3)), 0.25, step_size=0.5)
    assert res.applied and res.kept.size == 3 and np.allclose(res.w, 0.5)


# ----------------------------------------------------------------------------- compressors
@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 60), frac=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_topk_is_rho_approximate_with_rho_k_over_d(d, frac, seed):
    x = np.random.default_rng(seed).normal(size=d)
    comp = TopK(fraction=frac).compress(x)
    k = TopK(fraction=frac).k_for(d)
    assert comp.rho == pytest.approx(k / d)
    assert np.sum((comp.decoded - x) ** 2) <= (1 - comp.rho) * np.sum(x ** 2) + 1e-12
    assert comp.empirical_rho >= comp.rho - 1e-12
    assert comp.nbytes == TopK(fraction=frac).expected_nbytes(d) == 12 * k
    assert np.count_nonzero(comp.decoded) <= k


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_scaled_sign_rho_is_exact(d, seed):
    x = np.random.default_rng(seed).normal(size=d)
    comp = ScaledSign().compress(x)
    np.testing.assert_allclose(comp.decoded, np.abs(x).sum() / d * np.where(x >= 0, 1.0, -1.0))
    exact = np.abs(x).sum() ** 2 / (d * (x @ x))
    assert comp.empirical_rho == pytest.approx(exact, abs=1e-10)
    assert ScaledSign.vector_rho(x) == pytest.approx(exact)
    assert exact >= comp.rho - 1e-12 and comp.rho == pytest.approx(1 / d)
    assert comp.nbytes == math.ceil(d / 8) + 8


def test_identity_and_bytes():
    x = RNG.normal(size=10)
    comp = Identity().compress(x)
    assert comp.rho == 1.0 and comp.empirical_rho == 1.0 and comp.nbytes == 80
    assert np.array_equal(comp.decoded, x)
    assert empirical_rho(np.zeros(3), np.zeros(3)) == 1.0
    assert isinstance(make_compressor("topk", 0.2), TopK) and isinstance(make_compressor("sign"), ScaledSign)
    with pytest.raises(ValueError):
        make_compressor("bogus")


@pytest.mark.parametrize("payload", [
    {"indices": np.array([0, 9], np.int32), "values": np.ones(2)},           # out of range (d = 5)
    {"indices": np.array([1, 1], np.int32), "values": np.ones(2)},           # duplicate
    {"indices": np.array([0, 1], np.int32), "values": np.array([np.nan, 1])},  # NaN
    {"indices": np.array([0, 1, 2], np.int32), "values": np.ones(3)},        # wrong k
    {"indices": np.array([0.0, 1.0]), "values": np.ones(2)},                 # float indices
    {"values": np.ones(2)},                                                  # missing array
])
def test_topk_decode_rejects_malformed_payloads(payload):
    with pytest.raises(ValueError):
        TopK(k=2).decode(payload, 5)


def test_sign_and_identity_decode_reject_malformed_payloads():
    with pytest.raises(ValueError):
        ScaledSign().decode({"signs": np.zeros(3, np.uint8), "scale": np.ones(1)}, 8)
    with pytest.raises(ValueError):
        ScaledSign().decode({"signs": np.zeros(1, np.uint8), "scale": np.array([-1.0])}, 8)
    with pytest.raises(ValueError):
        ScaledSign().decode({"signs": np.zeros(1, np.uint8), "scale": np.array([np.inf])}, 8)
    with pytest.raises(ValueError):
        Identity().decode({"p": np.ones(4)}, 5)
    with pytest.raises(ValueError):
        Identity().decode({"p": np.ones(5, np.int64)}, 5)


# ----------------------------------------------------------------------------- line search
def test_fixed_step_without_server_data_and_armijo_with_it():
    res = choose_step(np.zeros(2), np.ones(2))
    assert res.step == 1.0 and res.method == "fixed"
    obj = small_logistic(n=100, d=3, lam=0.1)
    w = np.zeros(3)
    p = 5.0 * newton_direction(obj, w).p  # overshooting direction: backtracking must shrink it
    res = choose_step(w, p, server_objective=obj)
    assert res.method == "armijo" and res.accepted and res.step < 1.0
    assert obj.value(w - res.step * p) < obj.value(w)


def test_line_search_returns_zero_when_nothing_decreases():
    res = backtracking_line_search(lambda w: float(w @ w), np.zeros(2), np.ones(2), np.zeros(2), max_evaluations=5)
    assert res.step == 0.0 and not res.accepted


def test_newton_step_with_server_objective_decreases_it():
    obj = small_logistic(n=100, d=3, lam=0.1)
    P = np.stack([10.0 * newton_direction(obj, np.zeros(3)).p] * 3)
    res = newton_step(np.zeros(3), P, 0.0, server_objective=obj)
    assert res.applied and res.step < 1.0 and obj.value(res.w) < obj.value(np.zeros(3))


# ----------------------------------------------------------------------------- attacks
def newton_attack(name: str, scale: float = 1.0, seed: int = 0):
    """A registry attack as a Newton client builds it (``clients.newton.node_attack``)."""
    return make_attack(name, seed=seed, **run_attack_params(name, scale, "comrade"))


def _sent(worker: NewtonWorker, w: np.ndarray, server_round: int = 1) -> np.ndarray:
    return worker.direction(w, server_round=server_round).vector


def test_newton_attacks_are_registry_entries():
    names = attack_names("comrade")
    assert names == attack_names("giant")
    assert {"gaussian", "scaled-negative", "sign-flip", "label-flip", "random-labels"} <= set(names)
    assert set(names) <= set(ATTACKS) and set(names) <= set(attack_names("sgd"))
    for name in ("alie", "ipm", "mimic", "defence-aware", "erasure", "sleeper", "memory-aware"):
        assert name not in names  # need colluders' statistics, the aggregator, erase, or need history
    with pytest.raises(ValueError, match="Newton worker"):
        NewtonWorker(np.eye(3), np.array([1.0, -1.0, 1.0]), attack=make_attack("alie"))


def test_update_attacks_act_on_the_worker_vector():
    obj = small_logistic(n=60, d=4, lam=0.1)
    X, y = obj.X, obj.y
    w = np.full(4, 0.1)
    honest = _sent(NewtonWorker(X, y, lam=0.1), w)
    neg = NewtonWorker(X, y, lam=0.1, attack=newton_attack("scaled-negative", 2.0))
    np.testing.assert_allclose(_sent(neg, w), -2.0 * honest, rtol=1e-12)
    np.testing.assert_allclose(NewtonWorker(X, y, lam=0.1, attack=newton_attack("sign-flip")).gradient(w).vector,
                               -obj.gradient(w), rtol=1e-12)
    gauss = NewtonWorker(X, y, lam=0.1, attack=newton_attack("gaussian", 1.0, seed=3))
    g1 = _sent(gauss, w, 1)
    assert np.array_equal(g1, _sent(NewtonWorker(X, y, lam=0.1, attack=newton_attack("gaussian", 1.0, seed=3)), w, 1))
    assert not np.array_equal(g1, _sent(gauss, w, 2))
    # COMRADE's Gaussian attack adds the noise to the worker's own update (the registry's method_params)
    big = NewtonWorker(X, y, lam=0.1, attack=newton_attack("gaussian", 1e-9, seed=3))
    np.testing.assert_allclose(_sent(big, w), honest, atol=1e-7)


def test_label_attacks_follow_the_glm_label_convention():
    pm1 = np.array([1.0, -1.0, 1.0])
    flip = newton_attack("label-flip")
    assert np.array_equal(poison_glm_labels(flip, None, pm1, "logistic"), -pm1)
    assert np.array_equal(poison_glm_labels(flip, None, np.array([0.0, 1.0]), "logistic"), [1.0, 0.0])
    r = poison_glm_labels(newton_attack("random-labels", seed=1), None, np.ones(200), "logistic")
    assert set(np.unique(r).tolist()) == {-1.0, 1.0}
    targets = np.array([0.5, -2.0, 3.0, 7.0])
    assert np.array_equal(poison_glm_labels(flip, None, targets, "least-squares"), -targets)
    perm = poison_glm_labels(newton_attack("random-labels", seed=1), None, targets, "least-squares")
    assert sorted(perm.tolist()) == sorted(targets.tolist()) and not np.array_equal(perm, targets)
    obj = small_logistic(n=40, d=3, lam=0.1)
    worker = NewtonWorker(obj.X, obj.y, lam=0.1, attack=flip)
    np.testing.assert_array_equal(worker.objective.y, -obj.y)
    ids = malicious_partition_ids(20, 4, seed=0)
    assert len(ids) == 4 == len(set(ids)) and ids == malicious_partition_ids(20, 4, seed=0)


# ----------------------------------------------------------------------------- data
def test_libsvm_loader_on_a_small_file(tmp_path):
    path = tmp_path / "tiny.svm"
    path.write_text("+1 1:0.5 3:1\n-1 2:2.0\n+1 1:1 2:1 3:1\n-1 3:-1\n")
    X, y = load_libsvm(path, n_features=4)
    assert X.shape == (4, 4) and y.tolist() == [1.0, -1.0, 1.0, -1.0]
    assert X[0].tolist() == [0.5, 0.0, 1.0, 0.0]
    Xs, _ = load_libsvm(path, dense=False)
    assert sp.issparse(Xs) and Xs.shape == (4, 3)
    data = load_glm_dataset("libsvm", path=str(path), test_path=str(path), n_features=3)
    assert data.X_train.shape == (4, 4) and np.all(data.X_train[:, -1] == 1.0)  # intercept column
    with pytest.raises(FileNotFoundError, match="a9a"):
        load_libsvm(tmp_path / "a9a")
    (tmp_path / "zero_one.svm").write_text("0 1:1\n1 1:2\n")
    assert load_libsvm(tmp_path / "zero_one.svm")[1].tolist() == [-1.0, 1.0]


def test_offline_datasets_and_synthetic():
    bc = load_glm_dataset("breast-cancer", seed=0)
    assert bc.X_train.shape[1] == 31 and set(np.unique(bc.y_train)) == {-1.0, 1.0}
    np.testing.assert_allclose(bc.X_train[:, :-1].mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(bc.X_train[:, :-1].std(axis=0), 1.0, atol=1e-10)
    dg = load_glm_dataset("digits", seed=0)
    assert dg.X_train.shape[1] == 65 and dg.X_train.max() <= 1.0 and set(np.unique(dg.y_test)) == {-1.0, 1.0}
    syn = make_synthetic_logistic(500, 7, seed=1)
    assert syn.X_train.shape == (400, 7) and syn.w_true.shape == (7,)
    assert np.array_equal(syn.X_train, make_synthetic_logistic(500, 7, seed=1).X_train)
    with pytest.raises(ValueError):
        load_glm_dataset("nope")


def test_partitions_cover_every_row_once():
    parts = uniform_partitions(103, 10, seed=0)
    allrows = np.concatenate(parts)
    assert sorted(allrows.tolist()) == list(range(103)) and {p.size for p in parts} == {10, 11}
    y = np.where(np.random.default_rng(0).random(400) < 0.5, 1.0, -1.0)
    dparts = dirichlet_partitions(y, 5, alpha=0.5, seed=0)
    assert sorted(np.concatenate(dparts).tolist()) == list(range(400))
    data = make_synthetic_logistic(1000, 3, seed=0)
    cparts, server = federated_split(data, 4, server_fraction=0.1, seed=0)
    rows = np.concatenate(cparts + [server])
    assert server.size == 80 and sorted(rows.tolist()) == list(range(800))


# ----------------------------------------------------------------------------- config
def test_newton_config_defaults_validation_and_unknown_keys():
    cfg = NewtonConfig.from_mapping({"aggregator": "rge", "newton-beta": 0.3}, {"num-server-rounds": 4})
    assert cfg.beta == 0.3 and cfg.num_server_rounds == 4 and cfg.method == "comrade"
    assert cfg.as_dict()["newton-lambda"] == cfg.lam and cfg.as_dict()["method"] == "comrade"
    assert NewtonConfig.from_mapping(cfg.as_dict()) == cfg
    for bad in ({"newton-beta": 1.0}, {"method": "sgd"}, {"newton-lambda": "x"},
                {"newton-attack": "bogus"}, {"num-server-rounds": 0}, {"newton-step-size": 0},
                {"newton-bta": 0.3}, {"no-such-key": 1}, {"newton-method": "giant"}):
        with pytest.raises(ConfigError):
            NewtonConfig.from_mapping(bad)


@pytest.mark.parametrize("method", ["comrade", "giant"])
def test_newton_run_config_attacks_come_from_the_registry(method):
    for name in attack_names(method):
        assert parse_run_config({"method": method, "newton-attack": name}).attack == name
    for name in sorted(set(ATTACKS) - set(attack_names(method))) + ["negative", "flipped-label", "none"]:
        with pytest.raises(ConfigError, match="'newton-attack' must be one of"):
            parse_run_config({"method": method, "newton-attack": name})


def test_one_run_config_dispatches_on_method():
    assert isinstance(parse_run_config({}), RunConfig)
    sgd = parse_run_config({"method": "sgd", "newton-beta": 0.3})  # the other method's keys are ignored
    assert isinstance(sgd, RunConfig) and sgd.method == "sgd"
    giant = parse_run_config({"method": "giant", "aggregator": "mean"}, {"newton-beta": 0.1})
    assert isinstance(giant, NewtonConfig) and giant.method == "giant" and giant.beta == 0.1
    for bad in ("newton", "SGD", 3, ""):
        with pytest.raises(ConfigError, match=r"^run config 'method' must be one of \['sgd', 'comrade', 'giant'\]"):
            parse_run_config({"method": bad})
    with pytest.raises(ConfigError, match="unknown run config key 'newton-bta'"):
        parse_run_config({"method": "sgd", "newton-bta": 0.3})
    with pytest.raises(ConfigError, match="'method'"):
        RunConfig.from_mapping({"method": "comrade"})


# ----------------------------------------------------------------------------- convergence
def _federation(m=10, n=6000, d=10, lam=1e-2, seed=0, attacks=None, compressor=None, kind="logistic"):
    data = make_synthetic_logistic(n, d, seed=seed)
    y = data.y_train if kind == "logistic" else data.X_train @ data.w_true + 0.1 * np.random.default_rng(seed).normal(
        size=data.y_train.size)
    parts, _ = federated_split(data, m, seed=seed)
    attacks = attacks or {}
    workers = [NewtonWorker(data.X_train[p], y[p], kind, lam, attack=attacks.get(i), compressor=compressor)
               for i, p in enumerate(parts)]
    fed = federated_objective(kind, data.X_train, y, parts, lam)
    test = LogisticObjective(data.X_test, data.y_test, lam) if kind == "logistic" else None
    return workers, fed, minimise(fed), test


@pytest.mark.parametrize("kind", ["logistic", "least-squares"])
def test_giant_converges_to_the_true_minimiser(kind):
    workers, fed, w_star, _ = _federation(kind=kind)
    w, hist = run_giant(workers, np.zeros(fed.d), 12, reference=fed, w_star=w_star)
    assert np.linalg.norm(w - w_star) < 1e-8 * max(1.0, np.linalg.norm(w_star))
    assert hist[-1]["comm_rounds"] == 24


def test_comrade_single_worker_is_newton_and_converges_quadratically():
    workers, fed, w_star, _ = _federation(m=1)
    w, hist = run_comrade(workers, np.zeros(fed.d), 8, 0.0, reference=fed, w_star=w_star)
    assert np.linalg.norm(w - w_star) < 1e-12
    dists = [h["dist"] for h in hist]
    k = next(i for i, v in enumerate(dists) if v < 1e-2)
    assert dists[k + 1] <= 10 * dists[k] ** 2  # quadratic phase


def test_comrade_converges_to_a_small_neighbourhood_in_one_round_per_iteration():
    """COMRADE's fixed point is not exactly w* (Theorem 1's additive 2 eps / sqrt(sigma_min) term)."""
    workers, fed, w_star, test = _federation(m=10, n=20000)
    w, hist = run_comrade(workers, np.zeros(fed.d), 8, 0.0, reference=fed, w_star=w_star, test=test)
    assert np.linalg.norm(w - w_star) < 0.05 * np.linalg.norm(w_star)
    assert hist[-1]["comm_rounds"] == 8 and abs(hist[-1]["test_accuracy"] - test.accuracy(w_star)) < 0.01
    assert rounds_to_tolerance(hist, "dist", 0.1 * np.linalg.norm(w_star)) <= 3


def test_comrade_with_topk_compression_still_converges():
    workers, fed, w_star, test = _federation(m=10, n=20000, compressor=TopK(fraction=0.5))
    w, hist = run_comrade(workers, np.zeros(fed.d), 25, 0.0, reference=fed, w_star=w_star, test=test)
    assert np.linalg.norm(w - w_star) < 0.1 * np.linalg.norm(w_star)
    assert hist[-1]["bytes_up"] == 25 * 10 * 12 * 5 and min(h.get("rho_min", 1) for h in hist) >= 0.5


@pytest.mark.parametrize("attack, scale", [
    ("gaussian", 2.0), ("random-labels", 1.0), ("label-flip", 1.0), ("scaled-negative", 3.0),
])
@pytest.mark.parametrize("num_bad", [2, 4])  # 10 % and 20 % of 20 workers
def test_comrade_survives_attacks(attack, scale, num_bad):
    bad = malicious_partition_ids(20, num_bad, seed=1)
    attacks = {i: newton_attack(attack, scale, seed=i) for i in bad}
    workers, fed, w_star, test = _federation(m=20, n=20000, attacks=attacks)
    clean_acc = test.accuracy(w_star)
    w, hist = run_comrade(workers, np.zeros(fed.d), 10, 0.25, reference=fed, w_star=w_star, test=test)
    assert np.isfinite(w).all()
    assert test.accuracy(w) >= clean_acc - 0.02
    assert np.linalg.norm(w - w_star) < 0.25 * np.linalg.norm(w_star)


def test_non_robust_comrade_breaks_under_gaussian_attack():
    bad = malicious_partition_ids(20, 4, seed=1)
    attacks = {i: newton_attack("gaussian", 2.0, seed=i) for i in bad}
    workers, fed, w_star, test = _federation(m=20, n=20000, attacks=attacks)
    w0, _ = run_comrade(workers, np.zeros(fed.d), 10, 0.0, reference=fed, w_star=w_star)
    w1, _ = run_comrade(workers, np.zeros(fed.d), 10, 0.25, reference=fed, w_star=w_star)
    assert np.linalg.norm(w0 - w_star) > 5 * np.linalg.norm(w1 - w_star)


def test_norm_trimming_is_an_ordinary_registered_aggregator():
    from flwr_byzantine.aggregators import build_for_federation, make_aggregator
    from flwr_byzantine.config import RunConfig

    rng = np.random.default_rng(3)
    P = rng.normal(size=(10, 5))
    P[[2, 7]] *= 100.0  # two long rows
    res = make_aggregator("norm-trim", beta=0.25).aggregate(P)
    assert 2 not in res.kept and 7 not in res.kept and len(res.kept) == 8  # ceil(0.75 * 10)
    np.testing.assert_allclose(res.estimate, P[res.kept].mean(axis=0))
    mean, kept = trim_by_norm(P, 0.25)
    np.testing.assert_array_equal(kept, res.kept)
    np.testing.assert_allclose(mean, res.estimate)
    assert RunConfig.from_mapping({"aggregator": "norm-trim"}).aggregator == "norm-trim"
    assert build_for_federation("norm-trim", 10, 0.2).beta == 0.25
    import torch
    est = make_aggregator("norm-trim").aggregate(torch.as_tensor(P, dtype=torch.float32)).estimate
    np.testing.assert_allclose(est.numpy(), res.estimate, rtol=1e-5)

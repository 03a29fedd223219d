"""The saddle solver's compiled eigen kernels against numpy's full decomposition."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators.saddle import _eig_above, _eig_p, _eig_top


def _sym(n: int, seed: int, repeated: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if repeated:  # a doubled top eigenvalue, as at the saddle point
        Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        ev = np.sort(rng.uniform(0.0, 1.0, size=n))
        ev[-2:] = 3.0
        S = (Q * ev) @ Q.T
    else:
        A = rng.normal(size=(n, 3 * n))
        S = A @ A.T
    return 0.5 * (S + S.T)


@pytest.mark.parametrize("n,k,repeated", [(20, 1, False), (20, 3, False), (19, 2, True), (64, 5, False), (3, 3, False)])
def test_eig_above_returns_exactly_the_eigenpairs_above_the_floor(n, k, repeated):
    S = _sym(n, n + k, repeated)
    w, V = np.linalg.eigh(S)
    floor = 0.5 * (w[-k] + w[-k - 1]) if k < n else w[0] - 1.0
    sig, U = _eig_above(S, floor)
    assert sig.size == k
    np.testing.assert_allclose(sig, w[-k:], rtol=1e-12, atol=1e-12 * w[-1])
    np.testing.assert_allclose(S @ U, U * sig, atol=1e-11 * w[-1])  # eigenpairs of S
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-12)
    if not repeated:  # simple eigenvalues: the same vectors up to sign
        np.testing.assert_allclose(np.abs(U), np.abs(V[:, -k:]), atol=1e-9)


def test_eig_above_is_empty_above_the_top():
    S = _sym(20, 1)
    sig, U = _eig_above(S, 2.0 * np.linalg.eigvalsh(S)[-1])
    assert sig.size == 0 and U.shape == (20, 0)


@pytest.mark.parametrize("n", [20, 40])
def test_eig_top_covers_its_reach_below_the_new_top(n):
    """Above ``SMALL_EIGH_MAX`` points the window is kept only when it reaches ``reach`` below the top of the new
    point; else the full decomposition (here the window's guess of the top is too high, so that the window stops
    short of ``reach`` below the true top, and then far too low, so that the window would hold everything).  Up to
    ``SMALL_EIGH_MAX`` points every eigenpair, from the compiled small solver."""
    from flwr_byzantine.aggregators.small_eigh import SMALL_EIGH_MAX

    rng = np.random.default_rng(3)
    G = rng.normal(size=(3 * n, n))
    K = G.T @ G
    d = np.sqrt(rng.uniform(0.5, 1.0, size=n))
    Wt = np.full((n, n), 1.0 / n)
    full, _, _ = _eig_p(K, d, Wt, True, -np.inf)
    top = full[-1]
    reach = 0.1 * top
    sig, U, _ = _eig_top(K, d, Wt, top, reach, 1)
    in_window = np.count_nonzero(full >= top - reach - 0.05 * top)
    assert in_window < n
    assert sig.size == (n if n <= SMALL_EIGH_MAX else in_window)
    np.testing.assert_allclose(sig, full[-sig.size:], rtol=1e-12)
    for guess in (1.08 * top, 0.01 * top):
        sig, _, _ = _eig_top(K, d, Wt, guess, reach, 1)
        assert sig.size == n
        np.testing.assert_allclose(sig, full, rtol=1e-12, atol=1e-12 * top)


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_spectral_steps_weighted_centred_matrix_is_numpys_bit_for_bit(n):
    """The spectral step's ``P`` in one compiled pass: the numpy formulation's values exactly, symmetric, for a Gram
    matrix that is symmetric only to rounding."""
    from flwr_byzantine.aggregators.saddle import _weighted_centred

    rng = np.random.default_rng(n)
    A = rng.standard_normal((n, n))
    K = A @ A.T
    K[0, -1] += 1e-9  # not exactly symmetric
    w = rng.random(n)
    w /= w.sum()
    d = np.sqrt(rng.random(n) + 0.5)
    Kw = K @ w
    wKw = float(w @ Kw)
    P = K - Kw[:, None] - Kw[None, :] + wKw
    P *= d[:, None]
    P *= d[None, :]
    P = 0.5 * (P + P.T)
    Q = _weighted_centred(K, Kw, wKw, d)
    assert np.array_equal(P, Q) and np.array_equal(Q, Q.T)


def _p_matrix(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A Gram matrix ``K``, weights ``d``, a feasible-looking ``Wt`` and the full ``P(W) = D (I - Wt) K (I - Wt)^T D``."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, 3 * n))
    K = G @ G.T
    d = np.sqrt(rng.uniform(0.5, 1.0, size=n))
    Wt = rng.uniform(size=(n, n))
    Wt /= Wt.sum(axis=1, keepdims=True)
    Bt = d[:, None] * (np.eye(n) - Wt)
    return K, d, Wt, Bt @ K @ Bt.T


@pytest.mark.parametrize("n", [3, 18, 24, 30])
@pytest.mark.parametrize("vectors", [True, False])
def test_eig_p_is_the_decomposition_of_the_whole_symmetric_matrix(n, vectors):
    """Up to SMALL_EIGH_MAX points only the lower triangle of P(W) is formed: the eigenpairs are still those of P."""
    K, d, Wt, P = _p_matrix(n, n)
    w = np.linalg.eigvalsh(0.5 * (P + P.T))
    sig, U, BK = _eig_p(K, d, Wt, vectors, -np.inf)
    np.testing.assert_allclose(sig, np.maximum(w, 0.0), rtol=1e-10, atol=1e-10 * w[-1])
    np.testing.assert_allclose(BK, (d[:, None] * (np.eye(n) - Wt)) @ K, rtol=1e-12, atol=1e-12 * np.abs(BK).max())
    if vectors:
        np.testing.assert_allclose(P @ U, U * sig, atol=1e-9 * w[-1])
        np.testing.assert_allclose(U.T @ U, np.eye(n), atol=1e-12)


def test_eig_p_hands_lapack_the_whole_matrix_when_the_small_solver_refers_it(monkeypatch):
    """Where eigh_small gives up, LAPACK's MRRR solver (which reads the other triangle in its Fortran layout) gets the
    upper triangle copied from the lower one: the eigenpairs above the floor are P's (the Python body of the
    compiled function, with a small solver that always refers the matrix)."""
    from flwr_byzantine.aggregators import saddle

    n = 12
    K, d, Wt, P = _p_matrix(n, 7)
    w = np.linalg.eigvalsh(0.5 * (P + P.T))
    monkeypatch.setattr(saddle, "eigh_small", lambda S, vectors: (np.empty(0), np.empty((0, 0)), False))
    floor = 0.5 * (w[-3] + w[-4])
    sig, U, _ = saddle._eig_p.py_func(K, d, Wt, True, floor)
    np.testing.assert_allclose(sig, w[-3:], rtol=1e-10)
    np.testing.assert_allclose(P @ U, U * sig, atol=1e-9 * w[-1])


def test_grad_leaves_out_the_eigenvectors_of_negligible_weight():
    """The gradient from the eigenpairs within the soft-max window equals the one from every pair to rounding, and
    reads no other eigenvector (those columns are NaN here)."""
    from flwr_byzantine.aggregators.saddle import _WINDOW, _grad, _smooth

    n = 18
    K, d, Wt, P = _p_matrix(n, 3)
    sig, U, BK = _eig_p(K, d, Wt, True, -np.inf)
    mu = (sig[-1] - sig[-4]) / (_WINDOW + 1.0)  # the top three pairs inside the window, the rest far below it
    z = _smooth(sig, mu)[1]
    assert np.sum(z > z.max() * np.exp(-_WINDOW)) == 3
    Z = (U * z) @ U.T
    full = -2.0 * d[:, None] * (Z @ BK)
    hidden = U.copy()
    hidden[:, z <= z.max() * np.exp(-_WINDOW)] = np.nan
    g = _grad(BK, hidden, z, d)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, full, rtol=0, atol=1e-13 * np.abs(full).max())

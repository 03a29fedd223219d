"""The compiled small symmetric eigensolver (Householder + implicit QL) and the small products of the saddle solver."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators.saddle import _matmul
from flwr_byzantine.aggregators.small_eigh import SMALL_EIGH_MAX, eigh_small


def _cases(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n + 3))
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.sort(rng.uniform(0.0, 1.0, size=n))
    ev[-min(3, n):] = 2.0  # a tripled top eigenvalue, as at the saddle point
    G = rng.normal(size=(n, 50))
    W = rng.dirichlet(np.ones(n), size=n)
    B = np.eye(n) - W  # a P(W) of the saddle problem: a zero eigenvalue, the others spread
    P = B @ (G - G.mean(0)) @ (G - G.mean(0)).T @ B.T
    return [
        A @ A.T,                                   # positive definite
        -(A @ A.T),                                # negative definite
        rng.normal(size=(n, n)),                   # indefinite (the lower triangle is the matrix)
        (Q * ev) @ Q.T,                            # repeated top eigenvalue
        np.diag(rng.integers(0, 3, size=n).astype(float)),  # diagonal with repeats
        np.outer(A[:, 0], A[:, 0]),                # rank one
        np.zeros((n, n)),
        np.eye(n),
        1e-200 * (A @ A.T),                        # tiny and huge scales
        1e200 * (A @ A.T) / np.abs(A).max() ** 2,
        0.5 * (P + P.T),
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 20, SMALL_EIGH_MAX, 40])
@pytest.mark.parametrize("vectors", [True, False])
def test_eigh_small_matches_lapack_to_rounding(n, vectors):
    """Ascending eigenvalues within ``8 n eps ||S||`` of LAPACK's; orthonormal eigenvectors with residual
    ``||S V - V diag(w)|| <= 8 n eps ||S||``; only the lower triangle is read, and ``S`` is left as it was."""
    eps = np.finfo(float).eps
    for k, S in enumerate(_cases(n, 100 + n)):
        low = np.tril(S) + np.tril(S, -1).T  # the symmetric matrix that S's lower triangle defines
        before = S.copy()
        w, V, ok = eigh_small(S, vectors)
        assert ok
        np.testing.assert_array_equal(S, before)
        ref = np.linalg.eigvalsh(low)
        scale = max(np.abs(ref).max(), np.finfo(float).tiny)
        assert np.all(np.diff(w) >= 0), k
        np.testing.assert_allclose(w, ref, rtol=0, atol=8 * n * eps * scale, err_msg=f"case {k}")
        if vectors:
            assert V.shape == (n, n)
            np.testing.assert_allclose(V.T @ V, np.eye(n), rtol=0, atol=8 * n * eps, err_msg=f"case {k}")
            np.testing.assert_allclose(low @ V, V * w, rtol=0, atol=8 * n * eps * scale, err_msg=f"case {k}")
        else:
            assert V.shape == (0, 0)


@pytest.mark.parametrize("vectors", [True, False])
def test_eigh_small_refers_to_lapack_when_the_iteration_does_not_converge_or_an_entry_is_not_finite(vectors):
    """With no QL step allowed the iteration fails on any matrix that is not diagonal, and a NaN or an infinity is
    refused: ``ok`` False with empty arrays (the callers then ask LAPACK)."""
    rng = np.random.default_rng(5)
    A = rng.normal(size=(7, 9))
    S = A @ A.T
    for M, steps in ((S, 0), (np.where(np.eye(7, dtype=bool), np.nan, S), 60), (np.full((3, 3), np.inf), 60)):
        w, V, ok = eigh_small(M, vectors, steps)
        assert not ok and w.size == 0 and V.size == 0
    assert eigh_small(np.diag([3.0, 1.0, 2.0]), vectors, 0)[2]  # diagonal: no step needed


def test_saddle_and_sigma_ask_lapack_where_the_small_solver_refers_them():
    """A matrix the small solver refers back (a NaN): the saddle solver's eigenproblem and the sigma_0 estimator's
    top pair take LAPACK's path, which refuses it as before."""
    from flwr_byzantine.aggregators.saddle import _eig_p
    from flwr_byzantine.aggregators.sigma import _top_eig_dense

    n = 6
    K = np.eye(n)
    K[2, 3] = K[3, 2] = np.nan
    with pytest.raises(np.linalg.LinAlgError):
        _eig_p(K, np.ones(n), np.zeros((n, n)), True, -np.inf)
    with pytest.raises(ValueError):  # SciPy's LAPACK wrapper: the array must not contain infs or NaNs
        _top_eig_dense(K, np.arange(n, dtype=np.intp))


@pytest.mark.parametrize("shape", [(20, 20, 20), (19, 2, 19), (1, 20, 1), (3, 0, 4), (25, 20, 20), (30, 30, 30)])
def test_small_matmul_is_the_product(shape):
    m, k, n = shape
    rng = np.random.default_rng(m + k + n)
    A = rng.normal(size=(m, k))
    B = rng.normal(size=(k, n))
    np.testing.assert_allclose(_matmul(A, B), A @ B, rtol=1e-13, atol=1e-13 * max(k, 1))


@pytest.mark.parametrize("n", [1, 2, 5, 20, SMALL_EIGH_MAX, SMALL_EIGH_MAX + 1, 40])
def test_sigma_estimators_top_pair_is_lapacks_on_either_side_of_the_small_size(n):
    """The sigma_0 estimator's top eigenpair of a centred Gram submatrix: the compiled small solver up to
    ``SMALL_EIGH_MAX`` points, LAPACK's top pair above; the same value to rounding and the same vector up to sign."""
    from flwr_byzantine.aggregators.sigma import _centred_submatrix, _top_eig_dense

    rng = np.random.default_rng(n)
    G = rng.normal(size=(n + 5, 30))
    G[:2] += 4.0
    K = G @ G.T
    idx = np.sort(rng.choice(n + 5, size=n, replace=False)).astype(np.intp)
    lam, vec = _top_eig_dense(K, idx)
    w, V = np.linalg.eigh(_centred_submatrix(K, idx))
    assert lam == pytest.approx(max(w[-1], 0.0), rel=1e-13, abs=1e-12 * np.abs(K).max())
    assert vec.shape == (n,)
    np.testing.assert_allclose(abs(float(vec @ V[:, -1])), 1.0, atol=1e-12)  # a simple top eigenvalue: up to sign

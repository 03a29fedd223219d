"""Regularised GLM objectives of COMRADE (Ghosh, Maity & Mazumdar, NeurIPS 2020), pure numpy.

The paper's objective (its equation (2), restated in Appendix A) is

    f(w) = (1/n) sum_j l_j(w^T x_j) + (lambda/2) ||w||^2,

with local gradient and Hessian of worker i holding the rows S_i (Appendix A, equation (9))

    g_i = (1/s) sum_{j in S_i} l'_j(w^T x_j) x_j + lambda w,
    H_i = (1/s) sum_{j in S_i} l''_j(w^T x_j) x_j x_j^T + lambda I = (1/s) A_i^T A_i + lambda I,

where the rows of A_i are sqrt(l''_j(w^T x_j)) x_j.  Two GLMs are provided:

* :class:`LogisticObjective`: l_j(z) = log(1 + exp(-y_j z)) with y_j in {-1, +1}.  Labels
  given in {0, 1} are mapped to {-1, +1} (0 -> -1); any other label set raises ``ValueError``.
* :class:`LeastSquaresObjective`: l_j(z) = (z - y_j)^2 / 2 with real y_j.

``X`` may be a dense ``numpy`` array or a ``scipy.sparse`` matrix (LIBSVM data); every
product is written so that ``X`` is never densified.  There is no separate intercept: add a
constant feature (the data loaders do) if one is wanted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import scipy.sparse as sp

def as_pm1_labels(y: np.ndarray) -> np.ndarray:
    """Labels as float64 in {-1, +1}; accepts {-1, +1} or {0, 1} (0 -> -1)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if not np.isfinite(y).all():
        raise ValueError("labels must be finite")
    values = set(np.unique(y).tolist())
    if values <= {-1.0, 1.0}:
        return y.copy()
    if values <= {0.0, 1.0}:
        return 2.0 * y - 1.0
    raise ValueError(f"logistic labels must be in {{-1, +1}} or {{0, 1}}, got values {sorted(values)[:6]}")


def _log1pexp(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)), overflow-free."""
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), overflow-free."""
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


class GLMObjective(ABC):
    """f(w) = (1/n) sum_j l(w^T x_j; y_j) + (lam/2)||w||^2 on the rows of ``X``.

    Subclasses define the scalar loss ``l`` and its first two derivatives in ``z = w^T x``.

    Parameters
    ----------
    X:
        ``(n, d)`` features, dense or ``scipy.sparse``.
    y:
        ``(n,)`` targets.
    lam:
        Ridge coefficient lambda >= 0 (lambda > 0 makes f strongly convex, as the paper assumes).
    weights:
        Optional per-row weights a_j >= 0 summing to 1 replacing the uniform 1/n:
        f(w) = sum_j a_j l_j(w^T x_j) + (lam/2)||w||^2.  :func:`federated_objective` uses
        a_j = 1/(m |S_i|) for the federation's objective (1/m) sum_i f_i when partition sizes
        differ.
    """

    #: Registry name.
    name: str = "glm"

    def __init__(self, X, y, lam: float, weights: np.ndarray | None = None) -> None:
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float64)
        else:
            X = np.asarray(X, dtype=np.float64)
            if X.ndim != 2:
                raise ValueError(f"X must be 2-D, got shape {X.shape}")
            if not np.isfinite(X).all():
                raise ValueError("X must be finite")
        y = self._check_labels(np.asarray(y).reshape(-1))
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} entries")
        if X.shape[0] == 0:
            raise ValueError("empty data set")
        self.X = X
        self.y = y
        self.lam = float(lam)
        if weights is None:
            self.weights = np.full(X.shape[0], 1.0 / X.shape[0])
        else:
            wts = np.asarray(weights, dtype=np.float64).reshape(-1)
            if wts.shape != (X.shape[0],) or not np.isfinite(wts).all() or (wts < 0).any():
                raise ValueError("weights must be finite, >= 0 and one per row")
            if not np.isclose(wts.sum(), 1.0, rtol=1e-9, atol=0):
                raise ValueError(f"weights must sum to 1, got {wts.sum()!r}")
            self.weights = wts

    # ---------------------------------------------------------------- shapes
    @property
    def n(self) -> int:
        """Number of data points."""
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        """Dimension of w."""
        return int(self.X.shape[1])

    # ------------------------------------------------------ scalar loss parts
    @abstractmethod
    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        """Validated float64 labels."""

    @abstractmethod
    def _loss(self, z: np.ndarray) -> np.ndarray:
        """l(z_j; y_j), elementwise."""

    @abstractmethod
    def _d1(self, z: np.ndarray) -> np.ndarray:
        """l'(z_j; y_j), elementwise."""

    @abstractmethod
    def _d2(self, z: np.ndarray) -> np.ndarray:
        """l''(z_j; y_j) >= 0, elementwise."""

    # ---------------------------------------------------------------- helpers
    def _w(self, w: np.ndarray) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        if w.shape[0] != self.d:
            raise ValueError(f"w has {w.shape[0]} entries, expected d = {self.d}")
        return w

    def margins(self, w: np.ndarray) -> np.ndarray:
        """z_j = w^T x_j for every row."""
        return np.asarray(self.X @ self._w(w)).reshape(-1)

    def _xt(self, v: np.ndarray) -> np.ndarray:
        """X^T v as a dense vector."""
        return np.asarray(self.X.T @ v).reshape(-1)

    # ------------------------------------------------------------- interface
    def value(self, w: np.ndarray) -> float:
        """f(w)."""
        w = self._w(w)
        return float(self.weights @ self._loss(self.margins(w)) + 0.5 * self.lam * float(w @ w))

    def gradient(self, w: np.ndarray) -> np.ndarray:
        """g(w) = sum_j a_j l'_j(w^T x_j) x_j + lam w, a_j = 1/n (Appendix A, eq. (9))."""
        w = self._w(w)
        return self._xt(self.weights * self._d1(self.margins(w))) + self.lam * w

    def value_and_gradient(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """(f(w), g(w)) sharing one pass over the data (for scipy.optimize)."""
        w = self._w(w)
        z = self.margins(w)
        val = float(self.weights @ self._loss(z) + 0.5 * self.lam * float(w @ w))
        return val, self._xt(self.weights * self._d1(z)) + self.lam * w

    def curvature(self, w: np.ndarray) -> np.ndarray:
        """l''_j(w^T x_j) for every row (the squared row scales of A in Appendix A)."""
        return self._d2(self.margins(w))

    def hessian(self, w: np.ndarray) -> np.ndarray:
        """H(w) = X^T diag(a * l'') X + lam I as a dense ``(d, d)`` array (a_j = 1/n: Appendix A)."""
        c = self.weights * self.curvature(w)
        if sp.issparse(self.X):
            H = np.asarray((self.X.T @ sp.diags(c) @ self.X).todense())
        else:
            H = self.X.T @ (c[:, None] * self.X)
        H[np.diag_indices_from(H)] += self.lam
        return 0.5 * (H + H.T)

    def hvp(self, w: np.ndarray, v: np.ndarray, curvature: np.ndarray | None = None) -> np.ndarray:
        """Hessian-vector product H(w) v = X^T (a * l'' * (X v)) + lam v, without forming H.

        ``curvature`` (from :meth:`curvature`) may be passed to reuse it across many products
        at the same ``w`` (conjugate gradient does).
        """
        c = self.curvature(w) if curvature is None else curvature
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        Xv = np.asarray(self.X @ v).reshape(-1)
        return self._xt(self.weights * c * Xv) + self.lam * v

    def subset(self, rows: np.ndarray) -> "GLMObjective":
        """The same objective (uniform weights) on the rows ``rows`` only (a worker's local objective)."""
        rows = np.asarray(rows)
        return type(self)(self.X[rows], self.y[rows], self.lam)


class LogisticObjective(GLMObjective):
    """Regularised logistic regression, l_j(z) = log(1 + exp(-y_j z)), y_j in {-1, +1}.

    Labels in {0, 1} are accepted and mapped to {-1, +1}.  l'_j(z) = -y_j sigma(-y_j z) and
    l''_j(z) = sigma(z)(1 - sigma(z)) in (0, 1/4].
    """

    name = "logistic"

    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        return as_pm1_labels(y)

    def _loss(self, z: np.ndarray) -> np.ndarray:
        return _log1pexp(-self.y * z)

    def _d1(self, z: np.ndarray) -> np.ndarray:
        return -self.y * _sigmoid(-self.y * z)

    def _d2(self, z: np.ndarray) -> np.ndarray:
        s = _sigmoid(z)
        return s * (1.0 - s)

    def predict(self, w: np.ndarray, X=None) -> np.ndarray:
        """Predicted labels in {-1, +1} (on ``X``, default the objective's own rows)."""
        X = self.X if X is None else X
        z = np.asarray(X @ self._w(w)).reshape(-1)
        return np.where(z >= 0, 1.0, -1.0)

    def accuracy(self, w: np.ndarray) -> float:
        """Fraction of rows classified correctly by sign(w^T x)."""
        return float(np.mean(self.predict(w) == self.y))


class LeastSquaresObjective(GLMObjective):
    """Ridge regression, l_j(z) = (z - y_j)^2 / 2: l' = z - y_j, l'' = 1 (constant Hessian)."""

    name = "least-squares"

    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if not np.isfinite(y).all():
            raise ValueError("targets must be finite")
        return y

    def _loss(self, z: np.ndarray) -> np.ndarray:
        return 0.5 * (z - self.y) ** 2

    def _d1(self, z: np.ndarray) -> np.ndarray:
        return z - self.y

    def _d2(self, z: np.ndarray) -> np.ndarray:
        return np.ones_like(z)


OBJECTIVES: dict[str, type[GLMObjective]] = {
    LogisticObjective.name: LogisticObjective,
    LeastSquaresObjective.name: LeastSquaresObjective,
}


def make_objective(kind: str, X, y, lam: float, weights: np.ndarray | None = None) -> GLMObjective:
    """Objective ``kind`` (``"logistic"`` or ``"least-squares"``) on ``(X, y)`` with ridge ``lam``."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[kind](X, y, lam, weights)


def federated_objective(kind: str, X, y, parts, lam: float) -> GLMObjective:
    """The federation's objective (1/m) sum_i f_i, f_i the mean loss on rows ``parts[i]``.

    Equal to the plain objective on the union of the rows when all partitions have the same
    size (the paper's setting); otherwise each row of partition i weighs 1/(m |S_i|).  This is
    the function whose minimiser GIANT converges to.
    """
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    if not parts or any(p.size == 0 for p in parts):
        raise ValueError("every partition must be non-empty")
    rows = np.concatenate(parts)
    weights = np.concatenate([np.full(p.size, 1.0 / (len(parts) * p.size)) for p in parts])
    return make_objective(kind, X[rows], np.asarray(y)[rows], lam, weights=weights)


def minimise(objective: GLMObjective, w0: np.ndarray | None = None, tol: float = 1e-12) -> np.ndarray:
    """The exact minimiser w* of ``objective`` (scipy L-BFGS-B, polished by Newton steps).

    Used as the reference point for ||w_t - w*||.  The Newton polish (a few full
    Newton steps with the exact Hessian) brings the gradient norm to machine precision.
    """
    from scipy.optimize import minimize  # local import: scipy.optimize is slow to import

    w = np.zeros(objective.d) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    res = minimize(objective.value_and_gradient, w, jac=True, method="L-BFGS-B",
                   options={"maxiter": 10_000, "ftol": 1e-15, "gtol": tol})
    w = res.x
    for _ in range(20):
        g = objective.gradient(w)
        if np.linalg.norm(g) <= tol:
            break
        H = objective.hessian(w) if objective.d <= 2000 else None
        if H is None:
            break
        step = np.linalg.solve(H, g)
        w = w - step
    return w

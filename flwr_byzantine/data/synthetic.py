r"""The statistical heterogeneous model of Section 6 of Data & Diggavi (arXiv 2005.07866).

Section 6 of the paper: worker ``r`` draws its ``n_r`` samples i.i.d. from its *own*
distribution ``q_r``; ``mu_r(x) = E_{z ~ q_r} f(z, x)`` is its population risk and
``mu(x) = (1/R) sum_r mu_r(x)`` the global one.  Heterogeneity enters the analysis
through Assumption 7, eq. (23): ``||grad mu_r(x) - grad mu(x)|| <= kappa_mean`` for all
``x``; together with the sampling error it bounds the gradient dissimilarity ``kappa``
of eq. (18) (the empirical analogue of eq. (4)), which sets the error floor
``O(kappa^2)`` of Theorems 1 and 2.  The paper's running example is linear regression,
``f(z, x) = 1/2 (<w, x> - y)^2`` with ``z = (w, y)``.

This module makes that model concrete, with ``kappa_mean`` a knob:

* a global optimum ``x*`` in ``R^d`` (norm ``optimum_norm``; it depends only on
  ``(seed, d)``, not on the number of workers);
* worker ``r`` has its own local optimum ``x_r* = x* + kappa_mean * u_r``, where the
  shift directions ``u_r`` are centred (``sum_r u_r = 0``) and normalised so that
  ``mean_r ||u_r|| = 1`` (when ``d >= R`` they are the vertices of a randomly rotated
  regular simplex, so every ``||u_r|| = 1`` and the mean and the max in eq. (23)
  coincide);
* features ``w ~ N(m_r, I_d)``, where the per-worker feature means
  ``m_r = feature_shift * v_r`` (``v_r`` built like ``u_r``) are zero by default;
* responses: ``y = <x_r*, w> + noise_std * N(0, 1)`` (``task="linreg"``), or
  ``y ~ Bernoulli(sigmoid(<x_r*, w>))`` (``task="logreg"``, loss
  ``log(1 + exp(<w, x>)) - y <w, x>``; ``noise_std`` is not used, the Bernoulli draw
  is the label noise).

Population quantities.  For linear regression they are closed form: with
``S_r = E[w w^T] = I + m_r m_r^T``, ``grad mu_r(x) = S_r (x - x_r*)`` and the population
optimum is ``(sum_r S_r)^{-1} sum_r S_r x_r*``, which is ``x*`` (the average of the local
optima) when ``feature_shift = 0``.  In that default case ``grad mu_r(x) - grad mu(x) =
-kappa_mean u_r`` for *every* ``x``, so :meth:`SyntheticHeterogeneous.kappa_mean`
returns exactly the constructor's ``kappa_mean``.  For logistic regression there is
no closed form: population gradients are Monte-Carlo averages over a fixed sample of
``population_samples`` feature vectors per worker (one standard-normal base sample
shifted by each ``m_r``: common random numbers), using the exact conditional mean
``E[y | w] = sigmoid(<x_r*, w>)`` instead of sampled labels (a Rao-Blackwellised
estimate: it vanishes exactly at ``x = x_r*``), and the global optimum is found by
damped Newton steps on the pooled sample.  There ``kappa_mean`` is a monotone knob for
the spread of the local optima rather than exactly the value of eq. (23).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

TASKS = ("linreg", "logreg")

# Independent random streams, keyed by (seed, stream, ...) so that e.g. x* and the
# noise of worker r do not depend on how many workers there are.
_STREAM_OPTIMUM = 0
_STREAM_SHIFT = 1
_STREAM_FEATURE_MEAN = 2
_STREAM_WORKER = 3
_STREAM_TEST = 4
_STREAM_POPULATION = 5


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def centred_directions(num: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` vectors in ``R^d`` (rows) with zero sum and mean norm 1.

    For ``d >= num`` they are ``e_r - mean_j e_j`` for a random orthonormal family
    ``e_1..e_num`` (a rotated regular simplex), rescaled so every row has norm exactly 1.
    For ``d < num`` they are centred Gaussian vectors rescaled to mean norm 1.  With a
    single vector the only centred choice is the zero vector.
    """
    if num < 1 or d < 1:
        raise ValueError(f"need num >= 1 and d >= 1, got num={num}, d={d}")
    if num == 1:
        return np.zeros((1, d))
    if d >= num:
        q, _ = np.linalg.qr(rng.standard_normal((d, num)))
        u = q.T - q.T.mean(axis=0, keepdims=True)
        return u / np.sqrt(1.0 - 1.0 / num)
    g = rng.standard_normal((num, d))
    g -= g.mean(axis=0, keepdims=True)
    mean_norm = float(np.linalg.norm(g, axis=1).mean())
    return g / mean_norm if mean_norm > 0 else g


class SyntheticHeterogeneous:
    r"""Section 6's statistical heterogeneous model with a tunable ``kappa_mean``.

    Parameters
    ----------
    d:
        Dimension of the features and of the model ``x`` (no intercept, as in the paper).
    num_workers:
        Number of workers ``R``.
    n_per_worker:
        ``n_r``: one int for all workers or one int per worker (sizes may differ).
    kappa_mean:
        Spread of the local optima, ``x_r* = x* + kappa_mean * u_r``.  For linear
        regression without feature shift this is exactly ``mean_r ||grad mu_r(x) -
        grad mu(x)||`` at every ``x`` (Assumption 7, eq. (23)); 0 gives i.i.d. workers.
    noise_std:
        Standard deviation of the additive response noise (linear regression only).
    task:
        ``"linreg"`` (responses float32, loss ``1/2 (<w, x> - y)^2``) or ``"logreg"``
        (labels int64 in {0, 1}, logistic loss).
    seed:
        Master seed; every draw is a deterministic function of it.
    feature_shift:
        Norm scale of the per-worker feature means ``m_r`` (a second, covariate-shift
        source of heterogeneity); 0 by default.
    optimum_norm:
        ``||x*||``; default 1 for linear regression and 3 for logistic regression
        (a clearer classification signal: about 85 % Bayes accuracy).
    population_samples:
        Monte-Carlo sample size per worker for the logistic-regression population
        quantities (ignored for linear regression, which is closed form).
    """

    def __init__(
        self,
        d: int,
        num_workers: int,
        n_per_worker: int | Sequence[int],
        kappa_mean: float,
        noise_std: float = 0.1,
        task: str = "linreg",
        seed: int = 0,
        *,
        feature_shift: float = 0.0,
        optimum_norm: float | None = None,
        population_samples: int = 2000,
    ) -> None:
        if int(d) != d or d < 1:
            raise ValueError(f"d must be a positive integer, got {d!r}")
        if int(num_workers) != num_workers or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if not np.isfinite(kappa_mean) or kappa_mean < 0:
            raise ValueError(f"kappa_mean must be finite and >= 0, got {kappa_mean!r}")
        if not np.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
        if not np.isfinite(feature_shift) or feature_shift < 0:
            raise ValueError(f"feature_shift must be finite and >= 0, got {feature_shift!r}")
        if int(population_samples) != population_samples or population_samples < 1:
            raise ValueError(f"population_samples must be a positive integer, got {population_samples!r}")
        self.d = int(d)
        self.num_workers = R = int(num_workers)
        if isinstance(n_per_worker, (int, np.integer)):
            sizes = [int(n_per_worker)] * R
        else:
            sizes = [int(n) for n in n_per_worker]
            if len(sizes) != R:
                raise ValueError(f"n_per_worker has {len(sizes)} entries for {R} workers")
        if min(sizes) < 1:
            raise ValueError(f"every n_r must be >= 1, got {sizes}")
        self.n_per_worker: list[int] = sizes
        self.kappa = float(kappa_mean)
        self.noise_std = float(noise_std)
        self.task = task
        self.seed = int(seed)
        self.feature_shift = float(feature_shift)
        if optimum_norm is None:
            optimum_norm = 1.0 if task == "linreg" else 3.0
        if not np.isfinite(optimum_norm) or optimum_norm < 0:
            raise ValueError(f"optimum_norm must be finite and >= 0, got {optimum_norm!r}")
        self.optimum_norm = float(optimum_norm)
        self.population_samples = int(population_samples)

        g = np.random.default_rng([self.seed, _STREAM_OPTIMUM, self.d]).standard_normal(self.d)
        self.x_star: np.ndarray = self.optimum_norm * g / np.linalg.norm(g)
        self.shift_directions: np.ndarray = centred_directions(
            R, self.d, np.random.default_rng([self.seed, _STREAM_SHIFT, self.d, R]))
        #: Local optima x_r* (rows), the minimisers of the local population risks mu_r.
        self.local_optima: np.ndarray = self.x_star[None, :] + self.kappa * self.shift_directions
        #: Per-worker feature means m_r (rows).
        self.feature_means: np.ndarray = self.feature_shift * centred_directions(
            R, self.d, np.random.default_rng([self.seed, _STREAM_FEATURE_MEAN, self.d, R]))
        self._worker_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for a in (self.x_star, self.shift_directions, self.local_optima, self.feature_means):
            a.setflags(write=False)

    # ------------------------------------------------------------------ sampling
    def _check_worker(self, r: int) -> int:
        if int(r) != r or not 0 <= r < self.num_workers:
            raise ValueError(f"worker index must be in [0, {self.num_workers}), got {r!r}")
        return int(r)

    def _draw(self, r: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        w = self.feature_means[r] + rng.standard_normal((n, self.d))
        t = w @ self.local_optima[r]
        if self.task == "linreg":
            y = (t + self.noise_std * rng.standard_normal(n)).astype(np.float32)
        else:
            y = (rng.random(n) < _sigmoid(t)).astype(np.int64)
        return w.astype(np.float32), y

    def worker_data(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_r`` i.i.d. samples of worker ``r`` from ``q_r``: ``(X float32 (n_r, d), y)``.

        ``y`` is float32 for ``linreg`` and int64 in {0, 1} for ``logreg``.  Deterministic
        in ``(seed, r)``; computed once and returned as fresh copies.
        """
        r = self._check_worker(r)
        if r not in self._worker_cache:
            rng = np.random.default_rng([self.seed, _STREAM_WORKER, r])
            X, y = self._draw(r, self.n_per_worker[r], rng)
            X.setflags(write=False)
            y.setflags(write=False)
            self._worker_cache[r] = (X, y)
        X, y = self._worker_cache[r]
        return X.copy(), y.copy()

    def test_data(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` fresh samples from the mixture ``(1/R) sum_r q_r`` (sample ``i`` from worker ``i mod R``).

        Its population risk is ``mu(x)``, the global objective of the model.  Deterministic
        in ``(seed, n)`` and independent of the workers' training samples.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        n = int(n)
        rng = np.random.default_rng([self.seed, _STREAM_TEST, n])
        owners = np.arange(n) % self.num_workers
        X = np.empty((n, self.d), dtype=np.float32)
        y = np.empty(n, dtype=np.float32 if self.task == "linreg" else np.int64)
        for r in range(min(n, self.num_workers)):
            idx = np.flatnonzero(owners == r)
            X[idx], y[idx] = self._draw(r, idx.size, rng)
        return X, y

    # ------------------------------------------------------- population quantities
    @functools.cached_property
    def _population_base(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _STREAM_POPULATION, self.d])
        return rng.standard_normal((self.population_samples, self.d))

    def _population_sample(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Logistic regression: worker ``r``'s Monte-Carlo features and their exact ``E[y | w]``.

        All workers share one standard-normal base sample (common random numbers), so
        differences between workers are not blurred by Monte-Carlo noise; in particular
        identical distributions (``kappa_mean = 0``, no feature shift) give identical
        population gradients.
        """
        w = self._population_base + self.feature_means[r]
        return w, _sigmoid(w @ self.local_optima[r])

    def _as_point(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size != self.d:
            raise ValueError(f"x must have {self.d} entries, got {x.size}")
        return x

    def population_gradient(self, x: np.ndarray, r: int | None = None) -> np.ndarray:
        """``grad mu_r(x)`` (worker ``r``) or ``grad mu(x) = (1/R) sum_r grad mu_r(x)`` (``r=None``).

        Linear regression: ``S_r (x - x_r*)`` with ``S_r = I + m_r m_r^T`` (exact).
        Logistic regression: Monte-Carlo average of ``(sigmoid(<w, x>) - E[y | w]) w``.
        """
        x = self._as_point(x)
        if r is None:
            return np.mean([self.population_gradient(x, k) for k in range(self.num_workers)], axis=0)
        r = self._check_worker(r)
        if self.task == "linreg":
            diff = x - self.local_optima[r]
            m = self.feature_means[r]
            return diff + m * float(m @ diff)
        w, p = self._population_sample(r)
        return w.T @ (_sigmoid(w @ x) - p) / w.shape[0]

    def population_gradients(self, x: np.ndarray) -> np.ndarray:
        """All local population gradients at ``x`` as an ``(R, d)`` array."""
        x = self._as_point(x)
        return np.stack([self.population_gradient(x, r) for r in range(self.num_workers)])

    def kappa_mean(self, x: np.ndarray) -> float:
        """``mean_r ||grad mu_r(x) - grad mu(x)||``: the average local/global population gap (eq. (23))."""
        g = self.population_gradients(x)
        return float(np.linalg.norm(g - g.mean(axis=0), axis=1).mean())

    def kappa_max(self, x: np.ndarray) -> float:
        """``max_r ||grad mu_r(x) - grad mu(x)||``: the left side of Assumption 7, eq. (23), at ``x``."""
        g = self.population_gradients(x)
        return float(np.linalg.norm(g - g.mean(axis=0), axis=1).max())

    def _population_loss_logreg(self, x: np.ndarray) -> float:
        total = 0.0
        for r in range(self.num_workers):
            w, p = self._population_sample(r)
            t = w @ x
            total += float(np.mean(np.logaddexp(0.0, t) - p * t))
        return total / self.num_workers

    @functools.cached_property
    def _global_optimum(self) -> np.ndarray:
        if self.task == "linreg":
            S = np.eye(self.d) * self.num_workers
            b = np.zeros(self.d)
            for r in range(self.num_workers):
                m, xr = self.feature_means[r], self.local_optima[r]
                S += np.outer(m, m)
                b += xr + m * float(m @ xr)
            out = np.linalg.solve(S, b)
        else:
            out = self.local_optima.mean(axis=0).copy()
            loss = self._population_loss_logreg(out)
            for _ in range(100):
                grad = self.population_gradient(out)
                if np.linalg.norm(grad) < 1e-12:
                    break
                H = np.zeros((self.d, self.d))
                for r in range(self.num_workers):
                    w = self._population_sample(r)[0]
                    s = _sigmoid(w @ out)
                    H += (w * (s * (1.0 - s))[:, None]).T @ w / w.shape[0]
                H /= self.num_workers
                step = np.linalg.solve(H + 1e-12 * np.eye(self.d), grad)
                t = 1.0
                while t > 1e-8:  # backtracking keeps every Newton step a descent step
                    cand = out - t * step
                    cand_loss = self._population_loss_logreg(cand)
                    if cand_loss <= loss - 1e-4 * t * float(grad @ step):
                        break
                    t *= 0.5
                if cand_loss >= loss:
                    break
                out, loss = cand, cand_loss
        out.setflags(write=False)
        return out

    def global_optimum(self) -> np.ndarray:
        """Minimiser of the population risk ``mu(x) = (1/R) sum_r mu_r(x)``.

        Linear regression: ``(sum_r S_r)^{-1} sum_r S_r x_r*`` (closed form); with no
        feature shift this is the average of the local optima, ``x*``.  Logistic
        regression: damped Newton on the pooled Monte-Carlo sample (to gradient norm
        ``1e-12`` or no further decrease).  Returns a copy.
        """
        return self._global_optimum.copy()

    # ------------------------------------------------------- empirical quantities
    def empirical_gradient(self, x: np.ndarray, r: int) -> np.ndarray:
        """``grad f_bar_r(x)``: gradient of worker ``r``'s mean loss on its own samples."""
        x = self._as_point(x)
        X, y = self.worker_data(r)
        X = X.astype(np.float64)
        t = X @ x
        resid = t - y if self.task == "linreg" else _sigmoid(t) - y
        return X.T @ resid / X.shape[0]

    def empirical_kappa(self, x: np.ndarray) -> float:
        """``max_r ||grad f_bar_r(x) - grad f_bar(x)||`` on the drawn samples: the ``kappa`` of eq. (18) at ``x``."""
        g = np.stack([self.empirical_gradient(x, r) for r in range(self.num_workers)])
        return float(np.linalg.norm(g - g.mean(axis=0), axis=1).max())

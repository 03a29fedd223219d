"""Robust Gradient Estimation (RGE): Algorithm 3 of Data & Diggavi (outlier filter of SCV18).

Given the R vectors of a round, RGE repeatedly solves the saddle problem (91),
scores every active point by its reconstruction error tau_i (93), softly
down-weights ``c_i <- (1 - tau_i / tau_max) c_i`` (line 6), removes points with
``c_i < 1/2`` (line 7), and stops as soon as ``sum_i c_i tau_i <= 4 R sigma_0^2``
(line 5).  It returns the plain mean of the surviving points (line 12).

Everything after one centred Gram product (O(d R^2), chunked, in the input's
framework and device) happens on R x R matrices; no d x d matrix is formed.  With
``sketch_dim`` the Gram matrix is that of a server-private sketch of the rows
(:mod:`.sketch`, one streaming pass instead of ``O(d R^2)``); the estimate is still
the exact mean of the surviving rows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from .._backend import LARGE_ENERGY, ArrayLike, centred_gram, check_matrix, is_torch, screened_mean, subset_mean, to_numpy64
from ._generators import PrivateGenerator
from .base import AggregationResult, Aggregator
from .saddle import capped_simplex_cap, solve_saddle, spectral_step
from .sigma import estimate_sigma0, start_on
from .sketch import (FACTOR_MIN_ROWS, CentredFactor, RowSketch, centre_factor, centre_gram, dense_gram, gram_rows,
                     sketch_rows, sketch_signs)
from .streaming import rows_mean

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


@functools.lru_cache(maxsize=1)
def _blas_libraries() -> tuple:
    """The BLAS libraries' threadpoolctl controllers, found once (the search costs about 10 us a call)."""
    return tuple(_blas_controller().select(user_api="blas").lib_controllers)


def _single_thread_blas():
    """Context limiting BLAS to one thread (threadpoolctl, a scikit-learn dependency)."""
    return _blas_threads(1)


def _blas_threads(n: int | None):
    """Context limiting BLAS to ``n`` threads (``None``: leave the process setting alone).

    Nothing to do when every BLAS library already runs ``n`` threads (a process started with one BLAS thread, or the
    filter inside :meth:`RGE.aggregate`'s own limit): the check is one ``get_num_threads`` call a library, where
    entering and leaving threadpoolctl's limit cost about 35 us, 1-2 % of a decode at the App's size (issue 12)."""
    if n is None or all(lib.num_threads == n for lib in _blas_libraries()):
        return contextlib.nullcontext()
    return _blas_controller().limit(limits=n, user_api="blas")


#: Longest rows (bytes) whose column sums a sketched filter's pass takes (``column_sums``): the sums' vector of longer
#: rows leaves L2, and adding every row to it cost more than reading the survivors once after the filter
#: (:func:`~.streaming.rows_mean`; issue 12, the thirty-first landing: see ``docs/benchmarks.md``).
COLUMN_SUMS_MAX_BYTES = 1 << 20

#: With a sketch, the survivors' mean is a float64 downdate of the full mean (a pass over the removed
#: rows only) when the removed rows' energy is at most this multiple of the survivors': far larger
#: rows would have dominated the rounding of the full mean, and the survivors are then averaged anew.
DOWNDATE_MAX_ENERGY_RATIO = 4.0


def _downdate_ok(row_energy: np.ndarray, kept: np.ndarray) -> bool:
    """Whether the removed rows' energy ``sum ||g_j||^2`` is at most the ratio times the survivors'."""
    mask = np.zeros(row_energy.size, dtype=bool)
    mask[kept] = True
    return float(row_energy[~mask].sum()) <= DOWNDATE_MAX_ENERGY_RATIO * float(row_energy[mask].sum())


def _mean_without(updates: ArrayLike, mean: ArrayLike, kept: np.ndarray) -> ArrayLike:
    """Mean of the rows ``kept`` from the mean of all rows: ``(R mean - sum of the others) / |kept|``.

    The removed rows are added in place one by one (no copy of them), in the input dtype.
    """
    R = updates.shape[0]
    mask = np.ones(R, dtype=bool)
    mask[kept] = False
    removed = np.flatnonzero(mask)
    acc = mean * R
    for j in removed:
        acc -= updates[int(j)]
    acc /= kept.size
    return acc


class RGE(Aggregator):
    """Robust Gradient Estimation, Algorithm 3 of Data & Diggavi (arXiv 2005.07866).

    Parameters
    ----------
    eps_tilde:
        Assumed Byzantine fraction ``eps_tilde`` (Algorithm 3 line 1: ``alpha = 1 -
        eps_tilde >= 3/4``, so at most 0.25).  Sets the capped-simplex cap
        ``(4 - alpha) / (alpha (2 + alpha) R)`` of (91) and, in automatic mode,
        the trimming of the sigma_0 estimator.
    sigma0:
        ``sigma_0`` of Theorem 3 (not squared), or ``None`` for the automatic
        estimate :func:`~flwr_byzantine.aggregators.sigma.estimate_sigma0_sq`.
        Use :func:`~flwr_byzantine.aggregators.sigma.sigma0_from_theory` for the
        paper's expression.
    tol_rel:
        Relative duality-gap tolerance of every saddle solve (91): the solve stops once its certified gap
        ``UB - LB`` is within ``tol_rel * UB``, so the statistic of line 5 is known to ``tol_rel`` relative, well
        inside the threshold's own constant (4, or the default defence's 1.5).  Default 1e-2 (issue 12: on the App's
        20 digits rounds 436 solver iterations instead of 1,548 at 1e-3, the same kept rows in 20 of 20; on the
        1,440 rounds of ``benchmarks.saddle_before_after``, 99.7-100 % of the kept sets identical to 1e-3's).
    max_solver_iter:
        Iteration cap of every saddle solve (a warning is logged if reached).
    threshold_factor:
        The constant of the stopping rule ``sum_i c_i tau_i <= threshold_factor * R * sigma_0^2``
        (Algorithm 3 line 5 uses 4, the default).  Smaller values filter more aggressively and
        may drop honest points on clean data; ``benchmarks/robustness.py`` measures the trade-off.
    sketch_dim:
        ``None`` (default): the exact centred Gram matrix.  An integer ``m``: when ``d > 2 m``
        the filter runs on the Gram matrix of a length-``m`` sketch of the rows
        (:func:`~flwr_byzantine.aggregators.sketch.sketched_centred_gram`, fresh server-private
        signs every call); the estimate is the exact mean of the surviving rows.
    seed:
        Seed of the sketch's generator (``None``: fresh OS entropy); only used with ``sketch_dim``.
    blas_threads:
        BLAS threads of the whole decode (default 1; ``None`` keeps the process setting).  The
        passes over the data are memory-bound and the R x R filter latency-bound, so on a
        server shared with other work extra threads make a decode slower, never faster
        (``benchmarks/decode_time.py`` measures 1 against 2); the filter loop always uses one.
    spectral_above:
        ``None`` (default): every pass solves the saddle problem (91).  An integer ``n``: passes
        with more than ``n`` active points take the classical spectral filter step instead
        (:func:`~flwr_byzantine.aggregators.saddle.spectral_step`, ``W`` fixed at the weighted
        mean): O(n^2) per Lanczos iteration instead of O(n^3) per solver iteration, for
        hundreds to thousands of clients.  Its statistic is an upper bound on (91)'s value, so
        it stops no later than Algorithm 3 would at that pass.
    column_sums:
        With a sketch (numpy rows): ``True`` (default), the sketch's pass also sums the columns, and the survivors'
        mean is that sum less the removed rows (a downdate); ``False``, the pass takes the rows' squared norms only
        (the input check and the noise floor's energy) and the survivors' mean is one BLAS product over the rows
        after the filter.  The column sums are a length-``d`` vector read and written for every row: from several
        hundred rows on the product costs less (issue 12: at R = 1000, d = 1e5 the sketch with the sums took
        2.3x ``np.mean``, without them 1.3x, the product 0.77x; at R = 100, d = 1e6 1.85x against 1.37x + 0.97x).
        Rows longer than :data:`COLUMN_SUMS_MAX_BYTES` never take them (:meth:`sums_columns`): the survivors' mean is
        then one compiled read of the survivors (:func:`~.streaming.rows_mean`).
    """

    name = "rge"
    #: The sketches' private signs (made on first use: a rule that never sketches never reads the OS's entropy).
    _rng = PrivateGenerator()

    def __init__(
        self,
        eps_tilde: float = 0.25,
        sigma0: float | None = None,
        tol_rel: float = 1e-2,
        max_solver_iter: int = 3000,
        threshold_factor: float = 4.0,
        sketch_dim: int | None = None,
        seed: int | None = None,
        spectral_above: int | None = None,
        blas_threads: int | None = 1,
        column_sums: bool = True,
    ) -> None:
        if not 0.0 <= eps_tilde <= 0.25:
            raise ValueError(f"eps_tilde must be in [0, 1/4] (alpha = 1 - eps_tilde >= 3/4), got {eps_tilde}")
        if sigma0 is not None and not (np.isfinite(sigma0) and sigma0 >= 0):
            raise ValueError(f"sigma0 must be a finite non-negative number or None, got {sigma0}")
        if not 0 < tol_rel < 1:
            raise ValueError("tol_rel must be in (0, 1)")
        self.eps_tilde = float(eps_tilde)
        self.sigma0 = None if sigma0 is None else float(sigma0)
        self.tol_rel = float(tol_rel)
        self.max_solver_iter = int(max_solver_iter)
        if not (np.isfinite(threshold_factor) and threshold_factor > 0):
            raise ValueError(f"threshold_factor must be a positive finite number, got {threshold_factor}")
        self.threshold_factor = float(threshold_factor)
        if sketch_dim is not None and (isinstance(sketch_dim, bool) or int(sketch_dim) != sketch_dim or sketch_dim < 4):
            raise ValueError(f"sketch_dim must be an integer >= 4 or None, got {sketch_dim!r}")
        self.sketch_dim = None if sketch_dim is None else int(sketch_dim)
        self.seed = seed
        self._rng = seed  # the generator's seed (PrivateGenerator)
        if spectral_above is not None and (isinstance(spectral_above, bool) or int(spectral_above) != spectral_above
                                           or spectral_above < 1):
            raise ValueError(f"spectral_above must be a positive integer or None, got {spectral_above!r}")
        self.spectral_above = None if spectral_above is None else int(spectral_above)
        if blas_threads is not None and (isinstance(blas_threads, bool) or int(blas_threads) != blas_threads
                                         or blas_threads < 1):
            raise ValueError(f"blas_threads must be a positive integer or None, got {blas_threads!r}")
        self.blas_threads = None if blas_threads is None else int(blas_threads)
        self.column_sums = bool(column_sums)

    #: The row mean, computed once for the centring, screens the input for NaN/Inf.
    screens_finiteness = True

    def _aggregate(self, updates: ArrayLike) -> AggregationResult:
        with _blas_threads(self.blas_threads):
            return self._decode(updates)

    def sums_columns(self, d: int, dtype: Any) -> bool:
        """Whether this filter's sketching pass over rows of length ``d`` and ``dtype`` also sums their columns
        (``column_sums``, for rows of at most :data:`COLUMN_SUMS_MAX_BYTES`); else the survivors' mean is one read
        of the survivors after the filter."""
        return self.column_sums and d * np.dtype(dtype).itemsize <= COLUMN_SUMS_MAX_BYTES

    def presketch_request(self, R: int, d: int, dtype: Any) -> tuple[np.ndarray, RowSketch] | None:
        """For a caller that writes the ``R x d`` numpy rows (``dtype`` float32 or float64) this filter will then read
        (:meth:`aggregate_rows`' ``updates``): the private signs this filter's own pass would draw (drawn now, from its
        generator, so that it will not draw them again) and a zeroed :class:`~.sketch.RowSketch` for the caller's pass
        to fill (:func:`~.kernels.clip_fold_sketch_rows`) and hand back as ``presketch``; ``None`` where this filter
        does not sketch such rows.  A caller that then does not call the filter must not ask: the signs of its next
        call would change (issue 12: the memories' fold sketches them, one pass over the rows fewer)."""
        dtype = np.dtype(dtype)
        if self.sketch_dim is None or not d > 2 * self.sketch_dim or dtype not in (np.float32, np.float64):
            return None
        signs = sketch_signs(d, self._rng)
        return signs, RowSketch.empty(R, d, self.sketch_dim, dtype if self.sums_columns(d, dtype) else None)

    def aggregate_rows(self, updates: ArrayLike, rows: np.ndarray, *, sigma0: float | None = None,
                       estimate: bool = True, presketch: RowSketch | None = None) -> AggregationResult:
        """:meth:`aggregate` of ``updates[rows]`` without copying those rows (``rows`` ascending).

        For a caller that has validated ``updates`` already (:func:`~flwr_byzantine._backend.check_matrix`)
        and excludes some rows: ``kept`` indexes ``rows``, as for ``aggregate(updates[rows])``.  With a
        sketch every row is sketched and the estimate is a downdate of the full mean; the exact filter
        gathers the rows chunk by chunk for its Gram matrix (no copy either).  ``sigma0`` (not squared)
        overrides the rule's ``sigma0`` for this call (e.g. one estimated by the caller on other rows);
        ``None``: the rule's own.  ``estimate=False``: only the decisions (``estimate`` is ``None``),
        for a caller that combines the survivors itself (one pass over the rows fewer).  ``presketch``: the sketch,
        squared norms and column sums of every row of ``updates`` from a pass the caller took anyway with fresh
        private signs (:class:`~.sketch.RowSketch`); a sketched filter whose pass it stands for
        (:meth:`~.sketch.RowSketch.fits`) uses it instead of taking its own (issue 12: one pass over the rows fewer).
        """
        rows = np.asarray(rows, dtype=np.intp)
        with _blas_threads(self.blas_threads):
            if rows.size == updates.shape[0]:
                res = self._decode(updates, sigma0=sigma0, estimate=estimate, presketch=presketch)
            elif rows.size > 1:
                res = self._decode(updates, rows, sigma0=sigma0, estimate=estimate, presketch=presketch)
            else:
                res = self._decode(updates[rows], sigma0=sigma0, estimate=estimate)
        from .._backend import restore_dtype

        if res.estimate is not None:
            res.estimate = restore_dtype(res.estimate, updates)
        return res

    def _decode(self, updates: ArrayLike, rows: np.ndarray | None = None, *, sigma0: float | None = None,
                estimate: bool = True, presketch: RowSketch | None = None) -> AggregationResult:
        t0 = time.perf_counter()
        R, d = updates.shape
        sketched = self.sketch_dim is not None and d > 2 * self.sketch_dim
        mean = Y = None
        energy = None  # the rows' squared norms, when the sketch's pass took them instead of the column sums
        if rows is not None and not sketched:
            # the exact filter on a subset of validated rows: their Gram matrix gathered chunk by chunk
            R = rows.size
            gram, scale = centred_gram(updates, with_scale=True, rows=rows)
        elif sketched and not is_torch(updates) and updates.dtype in (np.float32, np.float64):
            # one compiled pass: the sketch, the rows' squared norms (float64) and, with column_sums, the column sums,
            # whose mean is bit for bit mean_rows'.  The norms screen the input: a NaN/Inf entry, or float32 rows whose
            # squares would overflow the float32 sketch's Gram matrix (energy above LARGE_ENERGY), rewind the signs and
            # take check_matrix's screen (NaN/Inf: ValueError; large: widened to float64) and screened_mean's path
            state = self._rng.bit_generator.state
            sums = self.sums_columns(d, updates.dtype)
            if presketch is not None and presketch.fits(R, d, self.sketch_dim, sums, updates.dtype):
                # the caller's pass over these rows stands for this one (the same products, other fresh signs)
                Y, energy = presketch.Y, presketch.sq_norms.copy()
                mean = presketch.col_sums.copy() if sums else None
            else:
                energy = np.empty(R)
                mean = np.empty(d, dtype=updates.dtype) if sums else None
                Y = sketch_rows(updates, self.sketch_dim, self._rng, sq_norms=energy, col_sums=mean)
            if mean is not None:
                mean /= R
            total = float(np.sum(energy))
            if not (np.isfinite(total) and (updates.dtype == np.float64 or total <= LARGE_ENERGY)
                    and (mean is None or np.isfinite(mean).all())):
                self._rng.bit_generator.state = state
                Y = mean = None
                updates, mean = screened_mean(check_matrix(updates, widen_large=True))
            if sums or Y is None:
                energy = None  # the column sums' downdate path below (or the widened rows')
        else:
            updates, mean = screened_mean(updates)
        if sketched:
            if Y is None:
                Y = sketch_rows(updates, self.sketch_dim, self._rng)
            # ~ ||g_i||^2 (uncentred), for the downdate's check (the exact norms replace it without column sums)
            row_energy = np.einsum("ij,ij->i", Y, Y) if energy is None else energy
            if rows is not None:  # only the rows `rows` enter the filter: their mean is a downdate
                all_mean, R = mean, rows.size
                if energy is None:
                    mean = (_mean_without(updates, all_mean, rows) if _downdate_ok(row_energy, rows)
                            else subset_mean(updates, rows))
                Y = Y[rows]
            low = str(updates.dtype).endswith(("float32", "float16"))
            # from FACTOR_MIN_ROWS rows only products with the matrix are needed: it stays a factor
            gram = centre_factor(Y, low) if R >= FACTOR_MIN_ROWS else centre_gram(Y, low)
            if energy is not None:  # sum_i ||g_i||^2 of the filtered rows, from the sketch's pass
                scale = float(np.sum(energy if rows is None else energy[rows]))
            else:
                mean64 = to_numpy64(mean)
                scale = float(np.sum(gram.diagonal())) + R * float(mean64 @ mean64)  # (a matrix's or a factor's)
        elif rows is None:
            gram, scale = centred_gram(updates, with_scale=True, mean=mean)
        t_gram = time.perf_counter() - t0
        eps_dtype = float(np.finfo(np.float32 if str(updates.dtype).endswith(("float32", "float16", "bfloat16"))
                                   else np.float64).eps)
        # The R x R loop is latency-bound: BLAS threads only add contention there.
        with _single_thread_blas():
            res = self.filter_gram(gram, None, t_gram=t_gram, noise_floor=10.0 * eps_dtype * scale, sigma0=sigma0)
        if not estimate:
            res.estimate = None
        elif res.kept.size == R and mean is not None:
            res.estimate = mean
        else:
            kept = res.kept if rows is None else rows[res.kept]
            if energy is not None:  # no column sums: the survivors' mean, one compiled read of their rows
                res.estimate = rows_mean(updates, kept)
            elif sketched and _downdate_ok(row_energy, kept):
                res.estimate = _mean_without(updates, all_mean if rows is not None else mean, kept)
            else:
                res.estimate = subset_mean(updates, kept)
        res.info["sketch_dim"] = self.sketch_dim if sketched else None
        return res

    def filter_gram(
        self,
        gram: np.ndarray | CentredFactor,
        updates: ArrayLike | None = None,
        *,
        t_gram: float = 0.0,
        noise_floor: float = 0.0,
        sigma0: float | None = None,
    ) -> AggregationResult:
        """Run the filter on a precomputed (centred) Gram matrix (or a :class:`~.sketch.CentredFactor` of it: the
        large rounds' sketched filter, whose solves need only products with the matrix).

        If ``updates`` is given the estimate is the mean of the surviving rows;
        otherwise ``estimate`` is ``None`` and only the diagnostics are returned.
        ``noise_floor`` is a lower bound on the stopping threshold: spread at the
        level of the inputs' rounding error (``10 * machine-eps * sum_i ||g_i||^2``
        when called through :meth:`aggregate`) is not evidence of corruption.  ``sigma0`` (not
        squared) overrides the rule's ``sigma0`` for this call.
        """
        t0 = time.perf_counter()
        R = gram.shape[0]
        alpha = 1.0 - self.eps_tilde
        cap = capped_simplex_cap(alpha, R)
        sigma0 = self.sigma0 if sigma0 is None else float(sigma0)
        est = None  # the estimator's top eigenvectors: the spectral steps' Lanczos starts
        if sigma0 is None:
            est = estimate_sigma0(gram, self.eps_tilde)
            sigma0_sq = est.value
            sigma_mode = "auto"
        else:
            sigma0_sq = sigma0**2
            sigma_mode = "explicit"
        threshold = max(self.threshold_factor * R * sigma0_sq, noise_floor)  # Algorithm 3, line 5 (factor 4)

        active = np.arange(R)
        c = np.ones(R)
        # the last solution's W and the points it kept: the next saddle solve's warm start, gathered only when one
        # runs (a spectral step's W, every column alike, is never gathered at R in the hundreds)
        warm: tuple[np.ndarray, np.ndarray] | None = None
        statistic = 0.0
        iterations = 0
        solver_iters = 0
        max_gap = 0.0
        not_converged = 0
        spectral_passes = 0
        history: list[dict[str, float]] = []
        for iterations in range(1, R + 1):
            if active.size <= 1:
                statistic = 0.0
                break
            Ka = gram if active.size == R else gram_rows(gram, active)  # read only: no copy of the whole matrix
            spectral = self.spectral_above is not None and active.size > self.spectral_above
            if spectral:
                # the first step's matrix is the estimator's first one (all weights 1); a later step's, after the
                # filter has removed about what the estimator trimmed, is near its last one (issue 12: at R = 1000 the
                # step on 800 honest points, a nearly flat spectrum, took 66 products from a random start)
                v0 = None if est is None else est.top if active.size == R else start_on(active, est.kept, est.kept_top)
                sol = spectral_step(Ka, c[active], cap, stop_below=threshold, v0=v0)
                spectral_passes += 1
            else:
                sol = solve_saddle(
                    dense_gram(Ka), c[active], cap, W0=None if warm is None else warm[0][np.ix_(warm[1], warm[1])],
                    tol_rel=self.tol_rel,
                    max_iter=self.max_solver_iter, stop_below=threshold,
                )
            solver_iters += sol.iterations
            if not sol.early_exit and not spectral:
                max_gap = max(max_gap, sol.gap / max(sol.upper, 1e-300))
                if not sol.converged:
                    not_converged += 1
            # sum_i c_i tau_i at the (certified) saddle point; an early exit certifies
            # upper <= threshold, which is all line 5 needs.
            statistic = sol.upper if sol.early_exit else sol.value
            history.append({"active": int(active.size), "statistic": float(statistic)})
            if statistic <= threshold:  # line 5 fails: stop (line 9)
                break
            tau = np.maximum(sol.tau, 0.0)
            tau_max = float(tau.max())
            if tau_max <= 0.0:
                break
            c[active] *= 1.0 - tau / tau_max  # line 6
            keep = c[active] >= 0.5  # line 7
            if not keep.any():
                # Only possible when sigma0 is far below the honest spread (every point
                # scores alike): keep the last active set rather than return nothing.
                logger.warning("RGE: the filter would remove every point (sigma0 too small?); "
                               "keeping the last %d active points", active.size)
                break
            warm = (sol.W, keep)
            active = active[keep]
        if not_converged:
            logger.warning(
                "RGE: %d saddle solve(s) hit max_solver_iter=%d before the duality gap reached %.1e",
                not_converged, self.max_solver_iter, self.tol_rel,
            )
        weights = np.zeros(R)
        weights[active] = 1.0 / active.size
        estimate = subset_mean(updates, active) if updates is not None else None
        return AggregationResult(
            estimate=estimate,
            kept=active.copy(),
            weights=weights,
            iterations=iterations,
            statistic=float(statistic),
            info={
                "threshold": float(threshold),
                "sigma0_sq": float(sigma0_sq),
                "sigma0_mode": sigma_mode,
                "cap": float(cap),
                "solver_iterations": int(solver_iters),
                "max_relative_gap": float(max_gap),
                "unconverged_solves": int(not_converged),
                "spectral_passes": int(spectral_passes),
                "soft_weights": c.tolist(),
                "history": history,
                "gram_seconds": float(t_gram),
                "filter_seconds": float(time.perf_counter() - t0),
            },
        )

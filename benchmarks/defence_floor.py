"""The memory traffic floor of the default defence's decode: its arrays streamed, with no arithmetic to speak of.

One command::

    nice -n 5 python -m benchmarks.defence_floor [--sizes 100,1000000 1000,100000] [--repeats 7]

The default defence (:class:`~flwr_byzantine.aggregators.RobustDefence` on a fast round) keeps two tables of
the rows' size, the self-references ``T`` and the worker momentum's memories ``M``, besides the round's rows
``G``.  Whatever the arithmetic, a round must

* read ``G`` before the drift and the radius are known (the gross screen, the drift's sample and every row's
  deviation from its reference: the clipping radius is a median over the rows, so no row can be clipped
  before every row has been read once),
* then read ``G`` and ``T`` again and write ``T`` (the clipped rows become the references), read and write
  ``M`` (the clipped rows folded into the memories),
* and the filter's decisions, which depend on every memory, come before the estimate (the survivors' mean: a read
  of their memories, or a downdate of column sums taken in the fold).

This script times trivial compiled loops (sums and copies, ``float32``, 1 BLAS thread, one row after
another) that move exactly those bytes, in units of ``np.mean(G, axis=0)`` (interleaved, median of
``--repeats``):

* ``passes_floor``: the passes as the defence runs them since the thirtieth landing (the screen's read of ``G``;
  ``G`` and ``T`` for the drift and the deviations; one pass that reads ``G``, ``T`` and ``M`` and writes ``T``
  and ``M``, the clipping inside the fold; ``M`` read for the survivors' mean);
* ``fused_floor``: the fewest passes -- one read of ``G`` and ``T`` (screen, drift and deviations in one pass),
  then the clipping inside the fold, and the survivors' mean from that pass;
* ``vectors_floor``: ``passes_floor`` with the row-length vectors that every row of a pass reads as well: the
  deviations' pass reads the drift, the evidence's direction and the last estimate beside each row, the fold the
  drift, the last estimate (the input clipping's centre) and the sketch's signs (one byte each).  At ``d = 1e6``
  these 4 MB vectors do not stay in the caches while the rows stream (issue 12, the thirty-second landing: each
  one added 0.3-0.55x ``np.mean`` at R = 100, d = 1e6 on the development machine, 0.05-0.2x at d = 1e5).

and reports each pass's share.  It is a lower bound for the defence on this machine, not a benchmark of
it: the real passes add the arithmetic (the sketches and the drift's network are compute-bound), the drift's
sample (a second read of its rows) and the filter's ``R x R`` work.  Writes ``defence_floor.json`` into ``--out``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numba
import numpy as np

from benchmarks._sized import sized_main

SIZES = [(100, 1_000_000), (1000, 100_000)]


@numba.njit(cache=True, fastmath={"reassoc"})
def read_rows(A: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = sum(A[r])`` (float32 lanes): one read of ``A``."""
    for r in range(A.shape[0]):
        a = A[r]
        acc = np.float32(0.0)
        for c in range(a.size):
            acc += a[c]
        out[r] = acc


@numba.njit(cache=True, fastmath={"reassoc"})
def read_two(A: np.ndarray, B: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = sum(A[r] - B[r])``: one read of ``A`` and of ``B``."""
    for r in range(A.shape[0]):
        a = A[r]
        b = B[r]
        acc = np.float32(0.0)
        for c in range(a.size):
            acc += a[c] - b[c]
        out[r] = acc


@numba.njit(cache=True)
def update_two(G: np.ndarray, T: np.ndarray, M: np.ndarray) -> None:
    """``T[r] += 0.5 G[r]; M[r] = 0.7 M[r] + 0.3 T[r]``: three arrays read, two written, one pass."""
    h = np.float32(0.5)
    a = np.float32(0.7)
    b = np.float32(0.3)
    for r in range(G.shape[0]):
        g = G[r]
        t = T[r]
        m = M[r]
        for c in range(g.size):
            y = t[c] + h * g[c]
            t[c] = y
            m[c] = a * m[c] + b * y


@numba.njit(cache=True, fastmath={"reassoc"})
def read_two_vectors(A: np.ndarray, B: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray,
                     out: np.ndarray) -> None:
    """``out[r] = sum(((A[r] - B[r]) - u) * v + w)``: one read of ``A`` and ``B``, and of the three vectors for every
    row (the deviations' pass: the drift, the evidence's direction, the last estimate)."""
    for r in range(A.shape[0]):
        a = A[r]
        b = B[r]
        acc = np.float32(0.0)
        for c in range(a.size):
            acc += ((a[c] - b[c]) - u[c]) * v[c] + w[c]
        out[r] = acc


@numba.njit(cache=True, fastmath={"reassoc"})
def update_two_vectors(G: np.ndarray, T: np.ndarray, M: np.ndarray, u: np.ndarray, v: np.ndarray,
                       s: np.ndarray, out: np.ndarray) -> None:
    """``T[r] += 0.5 (G[r] - u); M[r] = 0.7 M[r] + 0.3 (T[r] - v)``, ``out[r] = sum(s * T[r])``: :func:`update_two`'s
    bytes, and two vectors and one of bytes read for every row (the fold: the drift, the input clipping's centre,
    the sketch's signs)."""
    h = np.float32(0.5)
    a = np.float32(0.7)
    b = np.float32(0.3)
    for r in range(G.shape[0]):
        g = G[r]
        t = T[r]
        m = M[r]
        acc = np.float32(0.0)
        for c in range(g.size):
            y = t[c] + h * (g[c] - u[c])
            t[c] = y
            m[c] = a * m[c] + b * (y - v[c])
            acc += s[c] * y
        out[r] = acc


def _median_ratio(fn: Callable[[], Any], G: np.ndarray, repeats: int) -> float:
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.mean(G, axis=0)
        ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        ratios.append((time.perf_counter() - t0) / ref)
    return statistics.median(ratios)


def measure(sizes: list[tuple[int, int]], repeats: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for R, d in sizes:
        rng = np.random.default_rng(seed)
        G = rng.standard_normal((R, d), dtype=np.float32)
        T = rng.standard_normal((R, d), dtype=np.float32)
        M = rng.standard_normal((R, d), dtype=np.float32)
        u, v, w = (rng.standard_normal(d, dtype=np.float32) for _ in range(3))
        s = np.where(rng.random(d) < 0.5, -1, 1).astype(np.int8)
        out = np.empty(R, dtype=np.float32)
        # compile and fault every page in before timing
        read_rows(G, out), read_two(G, T, out), update_two(G, T, M)
        read_two_vectors(G, T, u, v, w, out), update_two_vectors(G, T, M, u, v, s, out)
        passes = {
            "read G (the gross screen)": lambda: read_rows(G, out),
            "read G and T (drift and deviations)": lambda: read_two(G, T, out),
            "read G, T and M, write T and M (the clipping inside the fold)": lambda: update_two(G, T, M),
            "read M (the survivors' mean)": lambda: read_rows(M, out),
            "read G and T, three vectors every row (the deviations as they run)":
                lambda: read_two_vectors(G, T, u, v, w, out),
            "read G, T and M, write T and M, two vectors and the signs every row (the fold as it runs)":
                lambda: update_two_vectors(G, T, M, u, v, s, out),
        }
        ratio = {name: _median_ratio(fn, G, repeats) for name, fn in passes.items()}
        screen, deviations, fold, mean, deviations_vectors, fold_vectors = ratio.values()
        passes_floor = screen + deviations + fold + mean
        fused_floor = deviations + fold
        vectors_floor = screen + deviations_vectors + fold_vectors + mean
        row = {"R": R, "d": d, "passes": ratio, "passes_floor": passes_floor, "fused_floor": fused_floor,
               "vectors_floor": vectors_floor}
        print(f"R={R} d={d:.0e}: the passes as run {passes_floor:.2f}x np.mean, the fewest passes {fused_floor:.2f}x, "
              f"the passes with the vectors every row reads {vectors_floor:.2f}x; "
              + "; ".join(f"{k} {v:.2f}x" for k, v in ratio.items()), flush=True)
        rows.append(row)
        del G, T, M
    return rows


def main(argv: list[str] | None = None) -> int:
    return sized_main("defence_floor", __doc__, SIZES, ("--repeats", 7, 3), measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())

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
* and the filter's decisions, which depend on every memory, come before the estimate (a downdate of
  the memories' column sums: a read of the removed rows only).

This script times trivial compiled loops (sums and copies, ``float32``, 1 BLAS thread, one row after
another) that move exactly those bytes, in units of ``np.mean(G, axis=0)`` (interleaved, median of
``--repeats``):

* ``fused_floor``: the fewest passes -- one read of ``G`` and ``T`` (screen, drift and deviations in one pass),
  then one pass reading ``G``, ``T`` and ``M`` and writing ``T`` and ``M``;
* ``passes_floor``: the passes as the defence runs them (the screen's read of ``G``; ``G`` and ``T`` for
  the deviations; ``G`` and ``T`` read, ``T`` written for the clipping; ``T`` and ``M`` read, ``M`` written for
  the fold; ``M`` read for the filter's sketch).

and reports each pass's share.  It is a lower bound for the defence on this machine, not a benchmark of
it: the real passes add the arithmetic (the sketches and the drift's network are compute-bound), and the
filter's ``R x R`` work.  Writes ``defence_floor.json`` into ``--out``.
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
def update_one(G: np.ndarray, T: np.ndarray) -> None:
    """``T[r] += 0.5 G[r]``: ``G`` and ``T`` read, ``T`` written (the clipping into the references)."""
    h = np.float32(0.5)
    for r in range(G.shape[0]):
        g = G[r]
        t = T[r]
        for c in range(g.size):
            t[c] += h * g[c]


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
        out = np.empty(R, dtype=np.float32)
        # compile and fault every page in before timing
        read_rows(G, out), read_two(G, T, out), update_one(G, T), update_two(G, T, M)
        passes = {
            "read G (the gross screen)": lambda: read_rows(G, out),
            "read G and T (drift and deviations)": lambda: read_two(G, T, out),
            "read G and T, write T (the clipping)": lambda: update_one(G, T),
            "read T and M, write M (the fold)": lambda: update_one(T, M),
            "read M (the filter's sketch)": lambda: read_rows(M, out),
            "read G, T and M, write T and M (clipping and fold in one pass)": lambda: update_two(G, T, M),
        }
        ratio = {name: _median_ratio(fn, G, repeats) for name, fn in passes.items()}
        names = list(passes)
        passes_floor = sum(ratio[n] for n in names[:5])
        fused_floor = ratio[names[1]] + ratio[names[5]]
        row = {"R": R, "d": d, "passes": ratio, "passes_floor": passes_floor, "fused_floor": fused_floor}
        print(f"R={R} d={d:.0e}: the passes as run {passes_floor:.2f}x np.mean, the fewest passes {fused_floor:.2f}x; "
              + "; ".join(f"{k} {v:.2f}x" for k, v in ratio.items()), flush=True)
        rows.append(row)
        del G, T, M
    return rows


def main(argv: list[str] | None = None) -> int:
    return sized_main("defence_floor", __doc__, SIZES, ("--repeats", 7, 3), measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())

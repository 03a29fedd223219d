"""Compiled single-thread loops for the default defence's streaming passes (issue 12).

In numpy every in-cache operation on a tile of the rows costs about as much as streaming the tile
from memory, so a pass that subtracts, squares and sums is several passes' worth of time.  The loops
here (numba, ``cache=True``, one thread: the decode is measured against a one-thread ``np.mean``)
read each row once, row after row (one long contiguous run per row: on this machine several rows'
runs interleaved in one loop -- column tiles across the rows, or two passes fused into one loop over
three or more arrays -- measured slower than the same bytes read row by row, issue 12's fifth round),
and do all the arithmetic of a pass on it:

* :func:`drift_and_deviations`: the self-reference drift (the coordinate-wise median of the changes
  ``G[r] - T[s]`` of some rows, Section "self-reference" of :mod:`.temporal`) by a *selection
  network* evaluated across a block of columns at once (compare-exchanges of whole rows of a
  transposed block: branch-free, vectorised; exact, the same value as ``np.median``; or the median of the medians of
  a few groups of 31, each network unrolled), and every row's squared distance ``||G[r] - T[s] - drift||^2`` in a
  second, row-wise read;
* :func:`column_medians`: the same network on blocks of a matrix's rows (``np.median(A, axis=0)``); for 31 values
  (the drift's sample up to R = 127, and each group of it above) the network runs unrolled, from the generated
  :mod:`._median31`;
* :func:`clip_rows`: ``V[r] = T[s] + drift + (G[r] - T[s] - drift) f_r`` and optionally ``T[s] = V[r]`` (or only
  the latter)
  (the elementwise arithmetic of the numpy formulation, bit for bit), and optionally the written rows'
  squared distances to a centre; on fast rounds the worker momentum's input clipping takes those distances before
  any row is written, from two more sums of :func:`drift_and_deviations` (``centre``), and the clipping itself runs
  inside the memories' fold (below);
* :func:`count_sketch`: both bucket maps of :func:`~.sketch.sketch_rows` and the rows' squared norms
  (the input check's energy) from one read of each row;
* :func:`centre_sq_distances` and :func:`clip_fold_rows`: the worker momentum's input clipping around the
  last estimate (the rows' distances, then the clip and the blend into the memory in one pass,
  :meth:`~.memory.ClientMomentum.fold_rows`; the copy of the memories into a buffer is skipped when the
  caller reads the table's rows in place); :func:`clip_fold_sketch_rows` also sketches the memories for the sketched
  filter that reads them next, while each row is in the cache (one read of the rows fewer); both also clip each row
  against its self-reference and store it there on the way (``sfactors``, :func:`_self_clip_fold_span`: one pass
  for the clipping and the fold, issue 12, the thirtieth landing);
* :func:`weighted_deviation_rows` and :func:`rows_sum`: the survivors' clipping deviation and the survivors' mean on
  large rounds, reading only the rows concerned (float64 sums);
* :func:`closest_window` and :func:`window_counts`: Bulyan's coordinate stage on sorted columns and the usage counts
  of a per-coordinate window (the peers' rules, not the defence's).

*Reductions.*  The squared norms and dot products of the defence's passes (the self-reference's deviations and changes,
the clipped rows' distances to a centre, the survivors' distances and projections) are taken tile by tile of
:data:`KERNEL_TILE` columns: a tile's sum in the rows' dtype, with reassociation allowed (vector lanes: the only
fast-math flag set, and only on those sums; float32 lanes for float32 rows, eight to a vector on AVX2, where widening
each value to float64 takes four), widened to float64 and added across tiles in float64.  A tile whose sum in the rows'
dtype is not finite (an overflow: a float32 square beyond 3.4e38) is summed again in float64 (:func:`_sq_diff` and the
like).  A float32 tile of 512 squares keeps a relative error of about 1e-7 (the differences themselves are rounded to
float32 before they are squared, as numpy rounds them); values below about 1e-19, whose float32 squares underflow,
add next to nothing.  Issue 12, the twenty-ninth landing: the deviations' pass 2.3x ``np.mean`` against 3.0x at R = 1000, d = 1e5
and 2.0x against 3.2x at R = 100, d = 1e6 (a one-off script, one thread, the pass alone).  The elementwise arithmetic
keeps IEEE order.  Inputs are the rows' dtype (float32 or float64).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from ._exchange import compare_exchange
from ._median31 import median31_block

#: Columns of one tile of the float64 sums of a compiled pass: each row's sum is accumulated tile after tile
#: (the rows themselves are read row after row, one contiguous run each: column tiles of all rows, every
#: row a separate short run, measured 1.7-1.9x slower than the same arithmetic row by row).  512 columns: a pass
#: that reads back the tile it has just written (the clipping's distances) finds it, and the tiles of the vectors
#: it shares across rows, in L1 (issue 12, the sixteenth landing: the clipping 1.87x / 2.35x ``np.mean`` against
#: 1.95x / 2.82x with 4096 at R = 1000, d = 1e5 / R = 100, d = 1e6; 2 % of a default-defence round at both).
KERNEL_TILE = 512
#: Rows of :func:`drift_and_deviations`' pass taken at once, tile by tile (:func:`_deviation_rows`).  Two, while the
#: sums widened every value to float64 (the pass 1.45x against 1.73x ``np.mean`` at R = 1000, d = 1e5, 1.81x against
#: 2.23x at R = 100, d = 1e6; issue 12, the seventeenth landing); one since the tiles are summed in float32 lanes
#: (*Reductions* above; a one-off script's variants of the pass, one thread: 1.7-1.8x against 2.2x at R = 1000, d = 1e5,
#: 1.9-2.1x against 2.0-2.5x at R = 100, d = 1e6; the twenty-ninth landing).
DEVIATION_ROWS = 1
#: Values of one transposed block of the selection network (``padded size x columns``), kept in L2.
SELECT_BLOCK_VALUES = 1 << 16


@numba.njit(cache=True)
def _deviation(g, t, dr):
    """``(g - t) - dr`` in the operands' dtype, widened to float64 (IEEE order: no fast-math here)."""
    return np.float64((g - t) - dr)


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_sq_deviation(g, t, dr, n):
    """``sum_c ((g[c] - t[c]) - dr[c])**2`` in float64: the differences in IEEE order (:func:`_deviation`),
    only the float64 sum reassociated into vector lanes."""
    acc = 0.0
    for c in range(n):
        x = _deviation(g[c], t[c], dr[c])
        acc += x * x
    return acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _lane_sq_deviation(g, t, dr, n, zero):
    """:func:`_sum_sq_deviation` summed in the type of ``zero`` (the rows' dtype): a tile's squares in float32 lanes
    for float32 rows (:func:`_sq_deviation`)."""
    acc = zero
    for c in range(n):
        x = (g[c] - t[c]) - dr[c]
        acc += x * x
    return np.float64(acc)


@numba.njit(cache=True)
def _sq_deviation(g, t, dr, n, zero):
    """``sum_c ((g[c] - t[c]) - dr[c])**2`` of one tile as float64, summed in the rows' dtype (``zero``: a zero of it;
    *Reductions* in the module docstring), or in float64 where that sum is not finite (an overflow of the rows' dtype;
    NaN stays NaN)."""
    s = _lane_sq_deviation(g, t, dr, n, zero)
    if s < np.inf:
        return s
    return _sum_sq_deviation(g, t, dr, n)


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort of ``n`` (a power of two) wires."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=64)
def selection_network(m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Compare-exchanges that put the middle value(s) of ``m`` values at positions ``(m - 1) // 2`` and ``m // 2``.

    Batcher's sorting network on ``N`` = the next power of two wires, the ``N - m`` padding wires holding
    ``+inf``: comparators whose upper wire surely holds ``+inf`` are no-ops and dropped (forward), then every
    comparator that cannot reach the two middle positions (backward).  Returns ``(lo, hi, N)``: after the
    exchanges ``lo[t] <- min, hi[t] <- max`` in order, positions ``(m - 1) // 2`` and ``m // 2`` hold the
    sorted values there (a sorting network sorts every input; dropping comparators that feed neither
    position leaves those two outputs unchanged).
    """
    if m < 1:
        raise ValueError("selection of an empty set")
    return _pruned_network(m, ((m - 1) // 2, m // 2))


def _pruned_network(m: int, outputs: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Batcher's sorting network on the next power of two ``N >= m`` of wires, the ``N - m`` padding wires greater than
    every value: comparators whose upper wire surely holds padding are dropped (forward), then every comparator that
    cannot reach a position of ``outputs`` (backward).  Returns ``(lo, hi, N)``."""
    N = 1
    while N < m:
        N *= 2
    inf = [w >= m for w in range(N)]
    fwd = []
    for i, j in _batcher_pairs(N):
        if inf[j]:
            continue  # min(a, +inf) = a: nothing moves
        if inf[i]:  # the value moves down, +inf up
            inf[i], inf[j] = False, True
        fwd.append((i, j))
    need = set(outputs)
    keep = []
    for i, j in reversed(fwd):
        if i in need or j in need:
            keep.append((i, j))
            need.update((i, j))
    keep.reverse()
    lo = np.array([p[0] for p in keep], dtype=np.intp)
    hi = np.array([p[1] for p in keep], dtype=np.intp)
    return lo, hi, N


#: Values per column whose median network runs unrolled (:mod:`._median31`: every wire in a vector register, two
#: operations per compare-exchange instead of two loads, two selects and two stores; 152 exchanges, in an order that
#: keeps few values live: 5.3-5.5x faster in float32, 3.6-3.9x in float64, 31 x 1e6 values, docs/benchmarks.md).  It
#: is the default defence's drift sample up to R = 127 nodes (``DRIFT_ROWS``).  Larger networks spill (63 values:
#: slower than the loop, and 50 s to compile).
UNROLLED_MEDIAN = 31


def unrolled_median_source(m: int) -> str:
    """The source of :mod:`._median31` for ``m`` values (odd): :func:`selection_network`'s compare-exchanges on ``m``
    local variables per column (the padding wires' ``+inf`` followed at generation time: an exchange with one is a
    move or nothing), in the order :func:`_short_lived_order` gives, each value loaded just before its first use,
    the middle one written out; a column with a NaN gives NaN (as :func:`_median_block` gives), kept on the way as
    each value is loaded.  ``tests/test_fused_passes.py`` checks the committed module against this."""
    if m < 1 or m % 2 == 0:
        raise ValueError("an odd number of values")
    lo, hi, npad = selection_network(m)
    ops: list[tuple[str, int, int]] = []
    pad = set(range(m, npad))  # the wires that hold +inf, as the exchanges move them
    for a, b in zip(lo.tolist(), hi.tolist()):
        if b in pad:  # min(x, +inf) = x: nothing moves (the pruned network has none of these)
            continue
        if a in pad:  # the value moves down, +inf up
            ops.append(("move", a, b))
            pad.discard(a)
            pad.add(b)
            continue
        ops.append(("exchange", a, b))
    mid = (m - 1) // 2
    L = ['"""Generated by ``flwr_byzantine.aggregators.kernels.unrolled_median_source(%d)``: do not edit."""' % m,
         "", "import numba", "", "from ._exchange import compare_exchange", "", "",
         "@numba.njit(cache=True)",
         f"def median{m}_block(B, w, out, c_out):",
         f'    """``out[c_out + c] = median(B[:{m}, c])`` for ``c < w``: :func:`~.kernels._median_block`\'s values."""',
         "    for c in range(w):"]
    held: set[int] = set()

    def load(v: int) -> None:  # the value's first use: loaded, and a NaN among the loaded values kept in `nan`
        L.append(f"        x{v} = B[{v}, c]")
        L.append(f"        nan = x{v}" if not held else f"        nan = x{v} if x{v} != x{v} else nan")
        held.add(v)

    for kind, a, b in _short_lived_order(ops, m, mid):
        if kind == "move":
            if b not in held:
                load(b)
            L.append(f"        x{a} = x{b}")
            held.add(a)
            continue
        for v in (a, b):
            if v not in held:
                load(v)
        L.append(f"        x{a}, x{b} = compare_exchange(x{a}, x{b})")
    if mid not in held:  # (m = 1: no exchange)
        load(mid)
    L += [f"        out[c_out + c] = nan if nan != nan else x{mid}", ""]
    return "\n".join(L)


def _short_lived_order(ops: list[tuple[str, int, int]], m: int, keep: int) -> list[tuple[str, int, int]]:
    """``ops`` (compare-exchanges and moves on wires) in an order that keeps few values live: each step, of the ops
    whose wires' earlier ops are done, the one that loads the fewest new values less the values it leaves dead (no op
    left on that wire; ``keep`` stays live), the earliest first on ties.  Every op still follows the ops before it on
    its wires, so each wire sees the same operations in the same order: the same values, bit for bit.  The network
    of 31 values keeps every wire in a vector register for longer stretches than in Batcher's order: issue 12, the
    thirty-first landing, 1.5x faster a column."""
    n = len(ops)
    last: dict[int, int] = {}
    deps: list[set[int]] = [set() for _ in range(n)]
    users: dict[int, list[int]] = {}
    for t, (_, a, b) in enumerate(ops):
        for v in (a, b):
            if v in last:
                deps[t].add(last[v])
            last[v] = t
            users.setdefault(v, []).append(t)
    left = {v: len(u) for v, u in users.items()}
    done: set[int] = set()
    held: set[int] = set()
    order = []
    while len(order) < n:
        best, best_cost = -1, None
        for t in range(n):
            if t in done or not deps[t] <= done:
                continue
            kind, a, b = ops[t]
            reads = (b,) if kind == "move" else (a, b)
            new = sum(1 for v in reads if v not in held and v < m)
            dead = sum(1 for v in (a, b) if left[v] == 1 and v != keep)
            cost = new - dead
            if best_cost is None or cost < best_cost:
                best, best_cost = t, cost
        done.add(best)
        order.append(ops[best])
        _, a, b = ops[best]
        held.update((a, b))
        left[a] -= 1
        left[b] -= 1
    return order


@numba.njit(cache=True)
def _median_block(B, w, lo, hi, m, out, c_out):
    """Median of each of the ``w`` columns of ``B[:m]`` into ``out[c_out:]``: :data:`UNROLLED_MEDIAN` values by the
    unrolled network (:mod:`._median31`, the same exchanges), others by :func:`_network_median_block`."""
    if m == UNROLLED_MEDIAN:
        median31_block(B, w, out, c_out)
        return
    _network_median_block(B, w, lo, hi, m, out, c_out)


@numba.njit(cache=True)
def _network_median_block(B, w, lo, hi, m, out, c_out):
    """Median of each of the ``w`` columns of ``B[:m]`` into ``out[c_out:]``; the rows ``m..`` of ``B`` (the
    network's padding wires) are set to ``+inf`` here first.

    ``np.median``'s value: the middle one, or the two middle ones added in the dtype and halved; a
    column with a NaN gives NaN.  Each exchange is :func:`~._exchange.compare_exchange` (no branch: a fraction of the
    compile time).  The loop over the network's exchanges (``lo``, ``hi``), for any ``m``: callers that never see
    :data:`UNROLLED_MEDIAN` values call it directly and do not compile the unrolled network (3.3 s on first use).
    """
    for k in range(m, B.shape[0]):
        Bk = B[k]
        for c in range(w):
            Bk[c] = np.inf
    for t in range(lo.size):
        a_row = B[lo[t]]
        b_row = B[hi[t]]
        for c in range(w):
            a_row[c], b_row[c] = compare_exchange(a_row[c], b_row[c])
    k = (m - 1) // 2
    o = out[c_out:c_out + w]
    mid = B[k]
    if m % 2:
        for c in range(w):
            o[c] = mid[c]
    else:
        nxt = B[k + 1]
        for c in range(w):
            o[c] = (mid[c] + nxt[c]) * 0.5  # (a + b) in the dtype, halved exactly
    # NaN: np.median's result is NaN for the column (the network orders NaN arbitrarily)
    for r in range(m):
        Br = B[r]
        for c in range(w):
            x = Br[c]
            if x != x:
                o[c] = x


@numba.njit(cache=True)
def _aligned_block(n, w, dtype):
    """An uninitialised ``(n, w)`` C array starting on a 64-byte boundary (numba's own start on 32): with ``w`` a
    multiple of 16 every row of a network's block is a run of whole cache lines, one AVX-512 load per 16 floats
    (the networks measured 1.1-1.9x faster than on a block 32 bytes off)."""
    raw = np.empty(n * w + 64, dtype=dtype)
    off = ((64 - raw.ctypes.data % 64) % 64) // raw.itemsize
    return raw[off:off + n * w].reshape((n, w))


@numba.njit(cache=True)
def column_medians(A, lo, hi, npad, out, block_values):
    """``out = np.median(A, axis=0)``: the selection network (``lo``, ``hi`` of :func:`selection_network` for
    ``A.shape[0]`` values, ``npad`` wires) on blocks of ``block_values // npad`` columns of every row (each row's
    block one contiguous copy), :func:`_network_median_block`'s values (exactly ``np.median``'s, NaN columns NaN).
    For :data:`UNROLLED_MEDIAN` rows :func:`column_medians31` gives the same values faster (the caller's choice: this
    one never compiles the unrolled network, which the App's small rounds never run)."""
    m, d = A.shape
    wm = max(8, block_values // npad)
    B = _aligned_block(npad, wm, out.dtype)
    for b0 in range(0, d, wm):
        b1 = min(d, b0 + wm)
        _load_block(A, b0, b1, B)
        _network_median_block(B, b1 - b0, lo, hi, m, out, b0)


@numba.njit(cache=True)
def column_medians31(A, npad, out, block_values):
    """:func:`column_medians` of :data:`UNROLLED_MEDIAN` rows by the unrolled network (:mod:`._median31`, 3.6-5.5x faster).
    """
    d = A.shape[1]
    wm = max(8, block_values // npad)
    B = _aligned_block(npad, wm, out.dtype)
    for b0 in range(0, d, wm):
        b1 = min(d, b0 + wm)
        _load_block(A, b0, b1, B)
        median31_block(B, b1 - b0, out, b0)


@numba.njit(cache=True)
def _load_block(A, c0, c1, B):
    """``B[k, :c1 - c0] = A[k, c0:c1]`` for every row ``k`` of ``A`` (each row's block one contiguous copy)."""
    for k in range(A.shape[0]):
        a = A[k, c0:c1]
        Bk = B[k]
        for c in range(c1 - c0):
            Bk[c] = a[c]


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_sq_deviation_and_change(g, t, dr, u, n):
    """``(sum_c e_c^2, sum_c x_c^2, sum_c x_c u_c)`` with ``x = g - t`` and ``e = x - dr`` (the rows' dtype, IEEE
    order, as :func:`_deviation`), summed in float64; only the sums reassociated."""
    acc = 0.0
    acc_x = 0.0
    acc_u = 0.0
    for c in range(n):
        x = g[c] - t[c]
        e = np.float64(x - dr[c])
        x64 = np.float64(x)
        acc += e * e
        acc_x += x64 * x64
        acc_u += x64 * np.float64(u[c])
    return acc, acc_x, acc_u


@numba.njit(cache=True, fastmath={"reassoc"})
def _lane_sq_deviation_and_change(g, t, dr, u, n, zero):
    """:func:`_sum_sq_deviation_and_change` summed in the type of ``zero`` (the rows' dtype)."""
    acc = zero
    acc_x = zero
    acc_u = zero
    for c in range(n):
        x = g[c] - t[c]
        e = x - dr[c]
        acc += e * e
        acc_x += x * x
        acc_u += x * u[c]
    return np.float64(acc), np.float64(acc_x), np.float64(acc_u)


@numba.njit(cache=True)
def _sq_deviation_and_change(g, t, dr, u, n, zero):
    """:func:`_sum_sq_deviation_and_change` of one tile, summed in the rows' dtype (*Reductions* in the module
    docstring), or in float64 where one of the three sums is not finite."""
    a, b, p = _lane_sq_deviation_and_change(g, t, dr, u, n, zero)
    if a < np.inf and b < np.inf and abs(p) < np.inf:
        return a, b, p
    return _sum_sq_deviation_and_change(g, t, dr, u, n)


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_sq_deviation_change_centre(g, t, dr, u, c, n):
    """:func:`_sum_sq_deviation_and_change`'s three sums and ``(sum a^2, sum a e)`` with ``a = (t + dr) - c`` and
    ``e = (g - t) - dr`` (the rows' dtype, IEEE order), in float64; only the sums reassociated.  ``a + f e`` is the
    row clipped with factor ``f`` minus ``c`` (:func:`_clip_segment`'s ``(t + dr) + e f``), so its squared distance to
    ``c`` is ``sum a^2 + 2 f sum a e + f^2 sum e^2`` (:func:`drift_and_deviations`' ``centre``)."""
    acc = 0.0
    acc_x = 0.0
    acc_u = 0.0
    acc_a = 0.0
    acc_ae = 0.0
    for k in range(n):
        ref = t[k]
        x = g[k] - ref
        e = np.float64(x - dr[k])
        a = np.float64((ref + dr[k]) - c[k])
        x64 = np.float64(x)
        acc += e * e
        acc_x += x64 * x64
        acc_u += x64 * np.float64(u[k])
        acc_a += a * a
        acc_ae += a * e
    return acc, acc_x, acc_u, acc_a, acc_ae


@numba.njit(cache=True, fastmath={"reassoc"})
def _lane_sq_deviation_change_centre(g, t, dr, u, c, n, zero):
    """:func:`_sum_sq_deviation_change_centre` summed in the type of ``zero`` (the rows' dtype)."""
    acc = zero
    acc_x = zero
    acc_u = zero
    acc_a = zero
    acc_ae = zero
    for k in range(n):
        ref = t[k]
        x = g[k] - ref
        e = x - dr[k]
        a = (ref + dr[k]) - c[k]
        acc += e * e
        acc_x += x * x
        acc_u += x * u[k]
        acc_a += a * a
        acc_ae += a * e
    return np.float64(acc), np.float64(acc_x), np.float64(acc_u), np.float64(acc_a), np.float64(acc_ae)


@numba.njit(cache=True)
def _sq_deviation_change_centre(g, t, dr, u, c, n, zero):
    """:func:`_sum_sq_deviation_change_centre` of one tile in the rows' dtype, or in float64 where a sum is not
    finite."""
    a, b, p, q, r = _lane_sq_deviation_change_centre(g, t, dr, u, c, n, zero)
    if a < np.inf and b < np.inf and abs(p) < np.inf and q < np.inf and abs(r) < np.inf:
        return a, b, p, q, r
    return _sum_sq_deviation_change_centre(g, t, dr, u, c, n)


@numba.njit(cache=True)
def _median_of_groups(Mg, k, w, out, c_out):
    """``out[c_out + c] = median(Mg[:k, c])`` for ``c < w`` (``k`` odd, a few values: an insertion sort per column);
    a column with a NaN gives NaN."""
    vals = np.empty(k, dtype=Mg.dtype)
    for c in range(w):
        nan = False
        for j in range(k):
            x = Mg[j, c]
            if x != x:
                nan = True
            i = j
            while i > 0 and vals[i - 1] > x:
                vals[i] = vals[i - 1]
                i -= 1
            vals[i] = x
        out[c_out + c] = Mg[0, c] * np.nan if nan else vals[k // 2]


@numba.njit(cache=True)
def drift_and_deviations(G, rows, T, slots, sample, lo, hi, npad, drift, sq, block_values, u, change_sq, change_dots,
                         groups, centre, base_sq, cross):
    """``drift = median_k (G[rows[sample[k]]] - T[slots[sample[k]]])`` per coordinate, and
    ``sq[i] = ||G[rows[i]] - T[slots[i]] - drift||^2`` (float64) for every ``i``.

    ``groups`` (odd, above 1): the sample is that many consecutive groups of ``sample.size // groups`` positions and the
    drift is, per coordinate, the median of the groups' medians (``lo``, ``hi``, ``npad``: the network of one group;
    a group of :data:`UNROLLED_MEDIAN` runs unrolled, 3-8x cheaper a value than one network over the whole sample).

    First the drift, column block by column block: the sampled rows' changes of a block go transposed
    into a padded buffer and the selection network (``lo``, ``hi`` of :func:`selection_network` for
    ``sample.size`` values, ``npad`` wires) leaves their medians in the middle rows (blocks of
    ``block_values // npad`` columns).  Then every row's deviations, row after row (one contiguous run
    per row: column tiles of all rows, each row a separate short run, measured 1.7x slower), summed tile by
    tile of :data:`KERNEL_TILE` columns, :data:`DEVIATION_ROWS` rows at a time (:func:`_deviation_rows`).  The
    differences are ``(G - T) - drift`` in the rows' dtype, as numpy computes them.  ``u`` (a unit vector of the rows'
    dtype, or empty to skip): also every row's change from its reference,
    ``change_sq[i] = ||G[rows[i]] - T[slots[i]]||^2`` and ``change_dots[i] = <G[rows[i]] - T[slots[i]], u>``
    (float64), from the same read (the default defence's monotonicity evidence on large rounds).
    ``centre`` (the rows' dtype, or empty to skip; with ``u`` of the same length, and ``change_sq``, ``change_dots``
    to fill: a zero ``u`` when the changes are not wanted): also ``base_sq[i] = ||a||^2`` and ``cross[i] = <a, e>`` with
    ``a = (T[slots[i]] + drift) - centre`` and ``e = (G[rows[i]] - T[slots[i]]) - drift``: row ``i`` clipped with
    factor ``f`` (:func:`clip_rows`) is ``a + f e`` away from ``centre``, a squared distance of
    ``base_sq + 2 f cross + f^2 sq`` (the worker momentum's input clipping on fast rounds: the distances before the
    clipping writes the rows, so that the memories' fold can clip them in its own pass, :func:`clip_fold_sketch_rows`).
    """
    n = rows.size
    d = G.shape[1]
    m = sample.size // groups
    wm = max(8, block_values // npad)
    B = _aligned_block(npad, wm, drift.dtype)
    Mg = np.empty((groups, wm), dtype=drift.dtype)
    for b0 in range(0, d, wm):
        b1 = min(d, b0 + wm)
        w = b1 - b0
        for j in range(groups):
            for k in range(m):
                g = G[rows[sample[j * m + k]], b0:b1]
                t = T[slots[sample[j * m + k]], b0:b1]
                Bk = B[k]
                for c in range(w):
                    Bk[c] = g[c] - t[c]
            if groups == 1:
                _median_block(B, w, lo, hi, m, drift, b0)
            else:
                _median_block(B, w, lo, hi, m, Mg[j], 0)
        if groups > 1:
            _median_of_groups(Mg, groups, w, drift, b0)
    zero = np.zeros(1, dtype=drift.dtype)[0]  # the tiles' sums in the differences' dtype (*Reductions*)
    for i0 in range(0, n, DEVIATION_ROWS):
        _deviation_rows(G, rows, T, slots, drift, u, sq, change_sq, change_dots, i0, min(n, i0 + DEVIATION_ROWS),
                        zero, centre, base_sq, cross)


@numba.njit(cache=True)
def _deviation_rows(G, rows, T, slots, drift, u, sq, change_sq, change_dots, i0, i1, zero, centre, base_sq, cross):
    """:func:`drift_and_deviations`' sums for the rows ``i0 <= i < i1``, tile by tile of :data:`KERNEL_TILE` columns,
    every row's tiles summed in their order as one row alone would sum them (the same bits whatever
    :data:`DEVIATION_ROWS`): with several rows the drift's and ``u``'s tile serves them all while it is in L1."""
    d = G.shape[1]
    changes = u.size > 0
    to_centre = centre.size > 0  # (with u: the changes' sums too)
    for i in range(i0, i1):
        sq[i] = 0.0
        if changes or to_centre:
            change_sq[i] = 0.0
            change_dots[i] = 0.0
        if to_centre:
            base_sq[i] = 0.0
            cross[i] = 0.0
    for c0 in range(0, d, KERNEL_TILE):
        c1 = min(d, c0 + KERNEL_TILE)
        for i in range(i0, i1):
            g = G[rows[i], c0:c1]
            t = T[slots[i], c0:c1]
            if to_centre:  # (the caller passes a zero u and discards the changes when it wants none)
                a, b, p, q, r = _sq_deviation_change_centre(g, t, drift[c0:c1], u[c0:c1], centre[c0:c1], c1 - c0,
                                                            zero)
                sq[i] += a
                change_sq[i] += b
                change_dots[i] += p
                base_sq[i] += q
                cross[i] += r
            elif changes:
                a, b, p = _sq_deviation_and_change(g, t, drift[c0:c1], u[c0:c1], c1 - c0, zero)
                sq[i] += a
                change_sq[i] += b
                change_dots[i] += p
            else:
                sq[i] += _sq_deviation(g, t, drift[c0:c1], c1 - c0, zero)


@numba.njit(cache=True)
def _clip_segment(v, g, t, dr, f, store):
    """``v = (t + dr) + ((g - t) - dr) * f`` elementwise (IEEE order), and ``t = v`` when ``store``."""
    if store:
        for c in range(g.size):
            ref = t[c]
            y = (ref + dr[c]) + ((g[c] - ref) - dr[c]) * f
            v[c] = y
            t[c] = y
    else:
        for c in range(g.size):
            ref = t[c]
            v[c] = (ref + dr[c]) + ((g[c] - ref) - dr[c]) * f


@numba.njit(cache=True)
def _store_segment(g, t, dr, f):
    """``t = (t + dr) + ((g - t) - dr) * f`` elementwise (IEEE order): :func:`_clip_segment` writing only the reference."""
    for c in range(g.size):
        ref = t[c]
        t[c] = (ref + dr[c]) + ((g[c] - ref) - dr[c]) * f


@numba.njit(cache=True)
def clip_rows(V, G, rows, T, slots, drift, factors, store, centre, csq):
    """``V[rows[i]] = T[s] + drift + ((G[rows[i]] - T[s]) - drift) * factors[i]`` with ``s = slots[i]``;
    ``store``: also ``T[s] = V[rows[i]]`` (each row's reference read before it is overwritten).
    ``centre`` (``V``'s dtype, length ``d``, or empty to skip): also ``csq[i] = ||V[rows[i]] - centre||^2``
    (float64) from the written values, tile by tile of :data:`KERNEL_TILE` columns while they are in L1 (the
    sums of :func:`centre_sq_distances` on ``V``, bit for bit: one read of the rows fewer).

    ``V`` with no rows (``(0, 0)``, with ``store``): the clipped rows are written only into ``T`` (one write of
    the rows fewer, for a caller that reads them there), ``csq`` from the values written there.

    Elementwise in the dtype of ``V``, in numpy's order of operations (bit for bit).
    """
    d = G.shape[1]
    dist = centre.size > 0
    zero = np.zeros(1, dtype=V.dtype)[0]
    if V.shape[0] == 0:
        for i in range(rows.size):
            g = G[rows[i]]
            t = T[slots[i]]
            f = factors[i]
            acc = 0.0
            for c0 in range(0, d, KERNEL_TILE):
                c1 = min(d, c0 + KERNEL_TILE)
                _store_segment(g[c0:c1], t[c0:c1], drift[c0:c1], f)
                if dist:
                    acc += _sq_diff(t[c0:c1], centre[c0:c1], c1 - c0, zero)
            if dist:
                csq[i] = acc
        return
    for i in range(rows.size):
        g = G[rows[i]]
        t = T[slots[i]]
        v = V[rows[i]]
        f = factors[i]
        acc = 0.0
        for c0 in range(0, d, KERNEL_TILE):
            c1 = min(d, c0 + KERNEL_TILE)
            _clip_segment(v[c0:c1], g[c0:c1], t[c0:c1], drift[c0:c1], f, store)
            if dist:
                acc += _sq_diff(v[c0:c1], centre[c0:c1], c1 - c0, zero)
        if dist:
            csq[i] = acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _sketch_segment(gs, ss, y1, y2, b2, k2, cs, acc):
    """Add ``s_i g_i`` of one segment (at most ``k1`` coordinates, starting at a multiple of ``k1``) to the
    first map's buckets ``0..`` and the second map's ``b2..`` (wrapping once), and (``cs`` not empty) ``g_i`` to the
    column sums ``cs``; returns ``sum g_i^2`` as float64, summed in the type of ``acc`` (its start, zero: the rows'
    dtype; a float32 segment's squares in float32 lanes, 0.2-0.4x ``np.mean`` a pass cheaper than widening each to
    float64, to a relative 1e-6 or so over a segment of about 1024 values: issue 12, the twenty-first landing).

    Two loops, one per side of the second map's wrap, each reading a coordinate once and adding its signed value to
    both maps (no staging buffer: issue 12, 1.1-1.3x faster than staging the signed segment first).  The products and
    bucket sums are in the rows' dtype (one exact sign flip, then one addition per bucket and segment, in the order
    of the numpy formulation); only the returned float64 sum of squares is reassociated (vector lanes).
    """
    w = gs.size
    first = min(w, k2 - b2)
    y2a = y2[b2:b2 + first]
    for c in range(first):
        x = gs[c] * ss[c]
        acc += x * x
        y1[c] += x
        y2a[c] += x
    y1b = y1[first:w]
    gb = gs[first:w]
    sb = ss[first:w]
    for c in range(w - first):
        x = gb[c] * sb[c]
        acc += x * x
        y1b[c] += x
        y2[c] += x
    if cs.size:  # the column sums of the rows (one addition per entry, row after row)
        for c in range(w):
            cs[c] += gs[c]
    return np.float64(acc)


@numba.njit(cache=True)
def count_sketch(G, signs, k1, k2, Y, sq, colsum, scale):
    """``Y[r, b] = sum_{i mod k1 = b} s_i G[r, i]`` (``b < k1``) and ``Y[r, k1 + b] = sum_{i mod k2 = b} s_i G[r, i]``,
    and ``sq[r] = ||G[r]||^2`` (float64: the segments' sums, each in ``G``'s dtype, :func:`_sketch_segment`; a float32
    square beyond float32's range is Inf, which the callers' input check takes as it takes large rows: the full
    check, then float64), for every row ``r``; ``k1 = k2 + 1``; ``signs`` +1 or -1, ``int8`` (or
    ``G``'s dtype: the same values).  One byte a sign: the vector, read again for every row, stays in L2 (the
    screen's sketch at R = 1000, d = 1e5, 2047 buckets: 1.0-1.2x ``np.mean`` against 1.4-1.5x with ``float32``
    signs, which the rows' stream evicts; issue 12, the thirteenth landing).
    ``colsum`` (``G``'s dtype, length ``d``, or empty to skip): the column sums ``sum_r G[r]``, added row after
    row in the dtype as ``G.sum(axis=0)`` adds them.

    Row by row (one contiguous run each: column spans of all rows measured 1.5x slower), in segments
    of ``k1`` coordinates (:func:`_sketch_segment`: both bucket maps and the squares from one read of the
    segment, in L1).  The buckets are summed in ``G``'s dtype segment after segment, as numpy's sum of the
    row viewed as an ``(L, k1)`` matrix (then the tail) does, and stored in ``Y`` (float64).  Rows with NaN
    or Inf give NaN or Inf sums.  Each bucket sum is stored times ``scale`` (a float64 product, rounded to ``Y``'s
    dtype: ``Y`` float32 holds what float64 ``Y`` would hold, rounded).
    """
    R, d = G.shape
    want_sum = colsum.size > 0
    y1 = np.empty(k1, dtype=G.dtype)  # the two maps' buckets in separate arrays: the loops vectorise without alias checks
    y2 = np.empty(k2, dtype=G.dtype)
    zero = np.zeros(1, dtype=G.dtype)[0]  # each segment's squares summed in the rows' dtype
    if want_sum:
        for c in range(d):
            colsum[c] = 0.0
    for r in range(R):
        sq[r] = _sketch_row(G[r], signs, k1, k2, y1, y2, Y[r], colsum, want_sum, zero, scale)


@numba.njit(cache=True)
def _sketch_row(g, signs, k1, k2, y1, y2, yr, colsum, want_sum, zero, scale):
    """One row of :func:`count_sketch`: its buckets into ``yr`` (times ``scale``), its column sums added to ``colsum``
    (``want_sum``); returns its squared norm (``y1``, ``y2``: scratch of ``k1`` and ``k2`` values of ``g``'s dtype)."""
    d = g.size
    y1[:] = 0.0
    y2[:] = 0.0
    acc = 0.0
    for c0 in range(0, d, k1):
        c1 = min(d, c0 + k1)
        acc += _sketch_segment(g[c0:c1], signs[c0:c1], y1, y2, c0 % k2, k2, colsum[c0:c1] if want_sum else colsum,
                               zero)
    for b in range(k1):
        yr[b] = np.float64(y1[b]) * scale
    for b in range(k2):
        yr[k1 + b] = np.float64(y2[b]) * scale
    return acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _diff_stats_store_segment(g, t, u):
    """``x = g - t`` (the table's dtype), ``(sum x^2, sum x u)`` in float64, then ``t = g``; only the two float64
    sums are reassociated (vector lanes): each ``x`` is one subtraction, each term one product."""
    sq = 0.0
    dot = 0.0
    for c in range(g.size):
        x = g[c] - t[c]
        x64 = np.float64(x)
        sq += x64 * x64
        dot += x64 * np.float64(u[c])
        t[c] = g[c]
    return sq, dot


@numba.njit(cache=True)
def diff_stats_store(G, rows, T, prev, u, sq, dots):
    """For every ``i``: ``x = G[rows[i]] - T[prev[i]]``, ``sq[i] = ||x||^2``, ``dots[i] = x . u`` (float64), then
    ``T[prev[i]] = G[rows[i]]``; row after row (one contiguous run each), summed tile by tile of
    :data:`KERNEL_TILE` columns (``u`` stays in the last-level cache), each row read and written once.  ``prev`` must not repeat (a row of the table is one node's)."""
    n = rows.size
    d = G.shape[1]
    for i in range(n):
        g = G[rows[i]]
        t = T[prev[i]]
        a = 0.0
        b = 0.0
        for c0 in range(0, d, KERNEL_TILE):
            c1 = min(d, c0 + KERNEL_TILE)
            s, p = _diff_stats_store_segment(g[c0:c1], t[c0:c1], u[c0:c1])
            a += s
            b += p
        sq[i] = a
        dots[i] = b


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_sq_diff(g, c, n):
    """``sum_i (g[i] - c[i])**2`` in float64: each difference one subtraction in the rows' dtype, only the
    float64 sum reassociated (vector lanes)."""
    acc = 0.0
    for i in range(n):
        x = np.float64(g[i] - c[i])
        acc += x * x
    return acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _lane_sq_diff(g, c, n, zero):
    """:func:`_sum_sq_diff` summed in the type of ``zero`` (the rows' dtype)."""
    acc = zero
    for i in range(n):
        x = g[i] - c[i]
        acc += x * x
    return np.float64(acc)


@numba.njit(cache=True)
def _sq_diff(g, c, n, zero):
    """``sum_i (g[i] - c[i])**2`` of one tile as float64, summed in the rows' dtype (*Reductions* in the module
    docstring), or in float64 where that sum is not finite."""
    s = _lane_sq_diff(g, c, n, zero)
    if s < np.inf:
        return s
    return _sum_sq_diff(g, c, n)


@numba.njit(cache=True)
def centre_sq_distances(G, rows, centre, sq):
    """``sq[i] = ||G[rows[i]] - centre||^2`` (float64) for every ``i``, one read of those rows, row after row, summed
    tile by tile of :data:`KERNEL_TILE` columns (the centre stays in the last-level cache):
    :func:`centre_distances_and_projections` without a direction."""
    centre_distances_and_projections(G, rows, centre, centre[:0], sq, sq[:0])


@numba.njit(cache=True, fastmath={"reassoc"})
def _sum_sq_diff_and_dot(g, c, u, n):
    """``(sum_i (g[i] - c[i])**2, sum_i (g[i] - c[i]) u[i])`` in float64: each difference one subtraction in the rows'
    dtype, only the float64 sums reassociated (vector lanes)."""
    acc = 0.0
    dot = 0.0
    for i in range(n):
        x = np.float64(g[i] - c[i])
        acc += x * x
        dot += x * np.float64(u[i])
    return acc, dot


@numba.njit(cache=True, fastmath={"reassoc"})
def _lane_sq_diff_and_dot(g, c, u, n, zero):
    """:func:`_sum_sq_diff_and_dot` summed in the type of ``zero`` (the rows' dtype)."""
    acc = zero
    dot = zero
    for i in range(n):
        x = g[i] - c[i]
        acc += x * x
        dot += x * u[i]
    return np.float64(acc), np.float64(dot)


@numba.njit(cache=True)
def _sq_diff_and_dot(g, c, u, n, zero):
    """:func:`_sum_sq_diff_and_dot` of one tile, summed in the rows' dtype (*Reductions* in the module docstring), or
    in float64 where either sum is not finite."""
    a, p = _lane_sq_diff_and_dot(g, c, u, n, zero)
    if a < np.inf and abs(p) < np.inf:
        return a, p
    return _sum_sq_diff_and_dot(g, c, u, n)


@numba.njit(cache=True)
def centre_distances_and_projections(G, rows, centre, u, sq, proj):
    """``sq[i] = ||G[rows[i]] - centre||^2`` and, ``u`` not empty, ``proj[i] = <G[rows[i]] - centre, u>`` (float64),
    one read of those rows, row after row, summed tile by tile of :data:`KERNEL_TILE` columns (the clipping of the
    survivors, :func:`~.streaming.distances_and_projections`, on large rounds: 1.44-1.46x ``np.mean`` against
    2.0-2.4x for numpy's tiles at R = 1000, d = 1e5 and R = 100, d = 1e6; issue 12)."""
    d = G.shape[1]
    along = u.size > 0
    zero = np.zeros(1, dtype=G.dtype)[0]
    for r in range(rows.size):
        g = G[rows[r]]
        acc = 0.0
        dot = 0.0
        for c0 in range(0, d, KERNEL_TILE):
            c1 = min(d, c0 + KERNEL_TILE)
            if along:
                a, p = _sq_diff_and_dot(g[c0:c1], centre[c0:c1], u[c0:c1], c1 - c0, zero)
                acc += a
                dot += p
            else:
                acc += _sq_diff(g[c0:c1], centre[c0:c1], c1 - c0, zero)
        sq[r] = acc
        if along:
            proj[r] = dot


@numba.njit(cache=True, inline="always")
def _clipped(g, c, f):
    """The input clipping of one coordinate, ``(g - c) * f + c``, in ``G``'s dtype (numpy's order)."""
    return (g - c) * f + c


@numba.njit(cache=True, inline="always")
def _blended(t, x, b_old, b_new):
    """The momentum's blend of one coordinate, ``b_old * t + b_new * x`` (numpy's order and dtypes)."""
    return b_old * t + b_new * x


@numba.njit(cache=True)
def _self_clip_fold_span(m, g, s, dr, sf, t, centre, f, clip, cont, b_old, b_new):
    """The self-reference's clipping of one span, ``s = (s + dr) + ((g - s) - dr) * sf`` (:func:`_store_segment`:
    ``s`` the node's reference, ``g`` its reply), then :func:`_fold_span` of the clipped values into the memory ``t``
    (and ``m``), in one loop: each value clipped, stored and folded while it is in a register, bit for bit the two
    passes (:func:`clip_rows` with ``store``, then :func:`clip_fold_rows` reading the references' table)."""
    n = g.size
    if clip and cont and m.size == 0:  # the default defence's usual row: no copy, a continued memory
        for c in range(n):
            ref = s[c]
            v = (ref + dr[c]) + ((g[c] - ref) - dr[c]) * sf
            s[c] = v
            t[c] = _blended(t[c], _clipped(v, centre[c], f), b_old, b_new)
        return
    to_m = m.size > 0
    for c in range(n):
        ref = s[c]
        v = (ref + dr[c]) + ((g[c] - ref) - dr[c]) * sf
        s[c] = v
        x = _clipped(v, centre[c], f) if clip else v
        y = _blended(t[c], x, b_old, b_new) if cont else x
        t[c] = y
        if to_m:
            m[c] = y


@numba.njit(cache=True)
def clip_fold_rows(M, G, rows, src, centre, factors, clip, T, slots, cont, b_old, b_new, own, drift, sfactors):
    """Worker momentum of clipped rows, one read of each row and of its memory, one write of each.

    For every ``i`` with ``r = rows[i]``, ``s = slots[i]``, ``q = src[i]`` (the row of ``G`` that is row ``r``'s
    input: ``r`` itself, or its row in another table such as the self-reference's; ``q < 0``: row ``r`` of ``own``,
    the round's rows, for a row that is not in that table), with ``g`` that row:
    ``x = (g - centre) * factors[i] + centre``
    (``clip``; else ``x = g``) in ``G``'s dtype, then ``T[s] = b_old * T[s] + b_new * x`` where ``cont[i]``
    (else ``T[s] = x``) and ``M[r] = T[s]`` (``M`` with no rows, ``(0, 0)``: only the table is written).
    ``b_old`` has ``T``'s dtype, ``b_new`` and ``factors`` ``G``'s: numpy's order and dtypes of
    ``beta * T[s] + (1 - beta) * x`` with ``x = diff * f + centre``, bit for bit.  ``slots`` must not repeat.

    ``sfactors`` (``G``'s dtype, one per row, or empty): the self-reference's clipping in the same pass.  A row with
    ``q >= 0`` is then ``own[r]`` clipped against its reference ``G[q]``, ``(G[q] + drift) + ((own[r] - G[q]) - drift)
    * sfactors[i]``, which is also written into ``G[q]`` (:func:`clip_rows` with ``store``, bit for bit; ``drift`` of
    ``G``'s dtype): the clipping's write and the fold's read of the clipped rows in one pass (issue 12, the thirtieth
    landing).  ``src`` must not repeat then.
    """
    none = np.empty(0, dtype=T.dtype)
    to_m = M.shape[0] > 0
    self_clip = sfactors.size > 0
    for i in range(rows.size):
        # without M: only the table written (a second output aliasing the table would keep the loops from vectorising)
        m = M[rows[i]] if to_m else none
        if self_clip and src[i] >= 0:
            _self_clip_fold_span(m, own[rows[i]], G[src[i]], drift, sfactors[i], T[slots[i]], centre, factors[i], clip,
                                 cont[i], b_old, b_new)
        else:
            g = G[src[i]] if src[i] >= 0 else own[rows[i]]
            _fold_span(m, g, T[slots[i]], centre, factors[i], clip, cont[i], b_old, b_new)


#: Coordinates a row of :func:`clip_fold_sketch_rows` is folded in before they are sketched (rounded to whole segments):
#: the span's rows (the input, the memory, the copy) stay in L2 for the sketch (whole rows of d = 1e6 went to the
#: last-level cache, and the fused pass saved nothing there; issue 12, the twenty-eighth landing).
FOLD_SKETCH_SPAN = 32768


@numba.njit(cache=True)
def _fold_span(m, g, t, centre, f, clip, cont, b_old, b_new):
    """The fold of one span of a row, :func:`clip_fold_rows`' and :func:`clip_fold_sketch_rows`' (:func:`_clipped`,
    :func:`_blended`): ``t`` and ``m`` become the folded values (``m`` empty: ``t`` only)."""
    if m.size:
        if clip and cont:
            for c in range(g.size):
                y = _blended(t[c], _clipped(g[c], centre[c], f), b_old, b_new)
                t[c] = y
                m[c] = y
        elif clip:
            for c in range(g.size):
                x = _clipped(g[c], centre[c], f)
                t[c] = x
                m[c] = x
        elif cont:
            for c in range(g.size):
                y = _blended(t[c], g[c], b_old, b_new)
                t[c] = y
                m[c] = y
        else:
            for c in range(g.size):
                x = g[c]
                t[c] = x
                m[c] = x
    elif clip and cont:
        for c in range(g.size):
            t[c] = _blended(t[c], _clipped(g[c], centre[c], f), b_old, b_new)
    elif clip:
        for c in range(g.size):
            t[c] = _clipped(g[c], centre[c], f)
    elif cont:
        for c in range(g.size):
            t[c] = _blended(t[c], g[c], b_old, b_new)
    else:
        for c in range(g.size):
            t[c] = g[c]


@numba.njit(cache=True)
def clip_fold_sketch_rows(M, G, rows, src, centre, factors, clip, T, slots, cont, b_old, b_new, own, drift, sfactors,
                          signs, k1, k2, Y, sq, colsum, scale):
    """:func:`clip_fold_rows` (the same ``T`` and ``M``, bit for bit) that also sketches every folded row as
    :func:`count_sketch` sketches the rows of the result: ``Y[rows[i]]``, ``sq[rows[i]]`` and (``colsum`` not empty)
    the column sums over the folded rows, in ``rows``' order (ascending: ``count_sketch``'s order over a matrix whose
    other rows are zero; the same segments, :func:`_sketch_segment`, in the same order).  Each row is folded span by
    span of about :data:`FOLD_SKETCH_SPAN` coordinates (whole segments of ``k1``), and each span is sketched while it
    is in L2: the worker momentum's memories and the sketched filter's sketch of them from one read of the rows
    instead of two (issue 12, the twenty-eighth landing).  Rows not in ``rows`` are left as they are (the caller
    passes zeros: ``count_sketch``'s values for a zero row).  ``drift``, ``sfactors``: the self-reference's clipping
    in the same pass, as in :func:`clip_fold_rows`.
    """
    d = G.shape[1]
    want_sum = colsum.size > 0
    y1 = np.empty(k1, dtype=T.dtype)
    y2 = np.empty(k2, dtype=T.dtype)
    zero = np.zeros(1, dtype=T.dtype)[0]
    none = np.empty(0, dtype=T.dtype)
    span = max(1, FOLD_SKETCH_SPAN // k1) * k1
    if want_sum:
        for c in range(d):
            colsum[c] = 0.0
    to_m = M.shape[0] > 0
    self_clip = sfactors.size > 0
    for i in range(rows.size):
        r = rows[i]
        own_clip = self_clip and src[i] >= 0
        g = own[r] if own_clip or src[i] < 0 else G[src[i]]
        ref = G[src[i]] if own_clip else G[0, :0]  # (the references' dtype either way)
        t = T[slots[i]]
        f = factors[i]
        ci = cont[i]
        y1[:] = 0.0
        y2[:] = 0.0
        acc = 0.0
        for s0 in range(0, d, span):
            s1 = min(d, s0 + span)
            if own_clip:
                _self_clip_fold_span(M[r][s0:s1] if to_m else none, g[s0:s1], ref[s0:s1], drift[s0:s1], sfactors[i],
                                     t[s0:s1], centre[s0:s1] if clip else centre, f, clip, ci, b_old, b_new)
            else:
                _fold_span(M[r][s0:s1] if to_m else none, g[s0:s1], t[s0:s1], centre[s0:s1] if clip else centre, f,
                           clip, ci, b_old, b_new)
            for c0 in range(s0, s1, k1):
                c1 = min(d, c0 + k1)
                acc += _sketch_segment(t[c0:c1], signs[c0:c1], y1, y2, c0 % k2, k2,
                                       colsum[c0:c1] if want_sum else colsum, zero)
        sq[r] = acc
        yr = Y[r]
        for b in range(k1):
            yr[b] = np.float64(y1[b]) * scale
        for b in range(k2):
            yr[k1 + b] = np.float64(y2[b]) * scale


@numba.njit(cache=True)
def centred_rows(Y, mu, out):
    """``out[i, j] = Y[i, j] - mu[j]`` (float64), rounded to ``out``'s dtype: numpy's ``(Y - mu).astype(out.dtype)``."""
    n, m = Y.shape
    for i in range(n):
        y = Y[i]
        o = out[i]
        for j in range(m):
            o[j] = y[j] - mu[j]


#: Side of the square tiles in which the ``(n, n)`` symmetrising passes visit a matrix and its transpose together
#: (:func:`symmetrised64`, :func:`~.saddle._weighted_centred`): a row of the upper triangle against a column of the
#: lower one read whole missed the cache at every element (5.2 ms at n = 1000 against 2.0 ms in tiles, issue 12).
SYM_TILE = 64


@numba.njit(cache=True)
def symmetrised64(G):
    """``0.5 (G + G^T)`` of a square matrix in float64 (``G`` widened first): numpy's
    ``g = G.astype(np.float64); 0.5 * (g + g.T)``, bit for bit; the upper triangle visited in :data:`SYM_TILE`
    tiles, each with its mirror tile."""
    n = G.shape[0]
    out = np.empty((n, n))
    for i0 in range(0, n, SYM_TILE):
        i1 = min(n, i0 + SYM_TILE)
        for j0 in range(i0, n, SYM_TILE):
            j1 = min(n, j0 + SYM_TILE)
            for i in range(i0, i1):
                for j in range(max(i, j0), j1):
                    a = np.float64(G[i, j])
                    b = np.float64(G[j, i])
                    out[i, j] = 0.5 * (a + b)
                    out[j, i] = 0.5 * (b + a)
    return out


@functools.lru_cache(maxsize=256)
def window_network(m: int, b: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Compare-exchanges that put the sorted values of positions ``b .. m - b - 1`` of ``m`` values in place.

    :func:`selection_network`'s construction (Batcher's network on the next power of two of wires, padding wires
    greater than every value, comparators that move nothing dropped forward, those that cannot reach a window
    position dropped backward) with the whole window as its outputs.  Returns ``(lo, hi, N)``.
    """
    if not (0 <= b and 2 * b < m):
        raise ValueError(f"no window of {m} values without {b} at each end")
    return _pruned_network(m, tuple(range(b, m - b)))


@numba.njit(cache=True)
def window_sums(G, b, lo, hi, npad, out, counts, block_cols):
    """Coordinate-wise window of ``G`` (``(m, d)``, no NaN): ``out[c]`` = the sum of the sorted values ``b .. m-b-1`` of
    column ``c`` (added in ``G``'s dtype in sorted order) divided by ``m - 2b``, and ``counts[r]`` += the number of
    columns whose window holds row ``r``'s value.

    The values of a block of ``block_cols`` columns go transposed into a ``(npad, w)`` buffer with their row numbers
    beside them; the network of :func:`window_network` orders the pairs ``(value, row)`` (a total order: equal values
    in row order, the stable sort's tie-break, so the counts are those of ``np.argsort(kind="stable")``), each
    compare-exchange across the block's columns at once (branch-free, vectorised).
    """
    m, d = G.shape
    k = m - 2 * b
    B = np.empty((npad, block_cols), dtype=G.dtype)
    I = np.empty((npad, block_cols), dtype=np.int32)
    inf = np.inf
    for c0 in range(0, d, block_cols):
        c1 = min(d, c0 + block_cols)
        w = c1 - c0
        _load_block(G, c0, c1, B)
        for r in range(m):
            Ir = I[r]
            for c in range(w):
                Ir[c] = r
        for r in range(m, npad):
            Br = B[r]
            Ir = I[r]
            for c in range(w):
                Br[c] = inf
                Ir[c] = r
        for t in range(lo.size):
            a_row = B[lo[t]]
            b_row = B[hi[t]]
            ia_row = I[lo[t]]
            ib_row = I[hi[t]]
            for c in range(w):
                a = a_row[c]
                bb = b_row[c]
                ia = ia_row[c]
                ib = ib_row[c]
                swap = (bb < a) | ((bb == a) & (ib < ia))
                a_row[c] = bb if swap else a
                b_row[c] = a if swap else bb
                ia_row[c] = ib if swap else ia
                ib_row[c] = ia if swap else ib
        o = out[c0:c1]
        first = B[b]
        for c in range(w):
            o[c] = first[c]
        for p in range(b + 1, m - b):
            Bp = B[p]
            for c in range(w):
                o[c] += Bp[c]
        for c in range(w):
            o[c] /= k
        for p in range(b, m - b):
            Ip = I[p]
            for c in range(w):
                counts[Ip[c]] += 1


@numba.njit(cache=True)
def closest_window(V, beta, est, lo_val, hi_val):
    """Bulyan's coordinate stage on sorted rows (El Mhamdi et al. 2018, Algorithm 2's ``beta``-closest-to-median
    mean): for every row ``j`` of ``V`` (``(c, theta)``, each row sorted ascending), the window of the ``beta``
    values closest to the row's median, grown from the median outwards (at each step the closer neighbour joins,
    the lower one on a tie: the order of a stable sort of the distances, computed in float64);
    ``est[j]`` = the window's mean (a float64 sum), ``lo_val[j]`` / ``hi_val[j]`` = its smallest and largest values.
    The same windows as the numpy loop of :func:`~.krum._closest_window_numpy` (one vectorised step per window
    position: 60 % of a Bulyan round at R = 100, d = 1e5, issue 12)."""
    c, theta = V.shape
    lo, hi = (theta - 1) // 2, theta // 2
    for j in range(c):
        v = V[j]
        med = 0.5 * (np.float64(v[lo]) + np.float64(v[hi]))
        left = hi
        right = hi
        for _ in range(beta):
            dl = abs(np.float64(v[left - 1]) - med) if left > 0 else np.inf
            dr = abs(np.float64(v[right]) - med) if right < theta else np.inf
            if dl <= dr:
                left -= 1
            else:
                right += 1
        acc = 0.0
        for i in range(left, right):
            acc += np.float64(v[i])
        est[j] = acc / beta
        lo_val[j] = v[left]
        hi_val[j] = v[right - 1]


@numba.njit(cache=True)
def window_counts(T, lo, hi, k, counts, tied):
    """``counts[r]`` += the number of rows ``j`` of ``T`` (``(c, R)``) with ``lo[j] <= T[j, r] <= hi[j]``, and
    ``tied[j]`` = whether row ``j`` holds other than ``k`` such values (values tied with a window's edge): the
    counting of :func:`~.coordinate.window_usage` in one compiled read of ``T`` (NaN is in no window)."""
    c, R = T.shape
    for j in range(c):
        a = lo[j]
        b = hi[j]
        t = T[j]
        n = 0
        for r in range(R):
            x = t[r]
            if x >= a and x <= b:
                counts[r] += 1
                n += 1
        tied[j] = n != k


@numba.njit(cache=True)
def weighted_deviation_rows(Y, rows, centre, weights, out):
    """``out += sum_k weights[k] (Y[rows[k]] - centre)`` (``out`` float64, length ``d``), row after row: each
    difference in ``Y``'s dtype (numpy's ``Y - centre``), times the weight and added in float64.  The clipping's second
    read of its clipped rows on large rounds (numpy's tiles and a matrix-vector product per tile took 1.2x ``np.mean``
    for half the rows at R = 1000, d = 1e5, issue 12)."""
    d = Y.shape[1]
    for k in range(rows.size):
        y = Y[rows[k]]
        w = weights[k]
        for c in range(d):
            out[c] += w * np.float64(y[c] - centre[c])


@numba.njit(cache=True)
def rows_sum(G, rows, out):
    """``out += sum_k G[rows[k]]`` (``out`` float64, length ``d``), four rows at a time (``out`` read and written once
    per four rows), each value widened to float64.  The survivors' mean of the many-row filter: 0.56x ``np.mean``
    against 0.76x for BLAS's product with a weight vector, which reads the removed rows too (R = 1000, d = 1e5,
    800 rows kept; issue 12)."""
    n = rows.size
    d = G.shape[1]
    k = 0
    while k + 4 <= n:
        a = G[rows[k]]
        b = G[rows[k + 1]]
        e = G[rows[k + 2]]
        f = G[rows[k + 3]]
        for c in range(d):
            out[c] += (np.float64(a[c]) + np.float64(b[c])) + (np.float64(e[c]) + np.float64(f[c]))
        k += 4
    while k < n:
        a = G[rows[k]]
        for c in range(d):
            out[c] += np.float64(a[c])
        k += 1

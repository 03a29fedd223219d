"""Fused passes of the default defence's fast rounds (issue 12).

Large rounds fuse several passes over the rows into one compiled pass each (the input clipping's
distances inside the self-reference clipping, ...).  Each fused kernel is checked against the plain
numpy formulation, and a fast round of :class:`~flwr_byzantine.aggregators.RobustDefence` with the
fusions must give the unfused passes' results bit for bit: estimates, decisions and memories.
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine.aggregators import kernels
from flwr_byzantine.aggregators.defence import RobustDefence
from flwr_byzantine.aggregators.streaming import clip_to_references
from tolerances import SUM_RTOL

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (4, 7), (9, kernels.KERNEL_TILE + 11), (30, 2 * kernels.KERNEL_TILE)])
def test_clip_rows_distances_are_the_written_rows_distances(dtype, n, d):
    rng = np.random.default_rng(n * 7 + d)
    G = rng.standard_normal((n + 2, d)).astype(dtype)
    T = rng.standard_normal((n + 3, d)).astype(dtype)
    rows = np.sort(rng.choice(n + 2, n, replace=False))
    slots = rng.permutation(n + 3)[:n]
    drift = rng.standard_normal(d).astype(dtype)
    factors = np.minimum(1.0, rng.uniform(0.1, 2.0, n))
    centre = (rng.standard_normal(d) + 2.0).astype(dtype)
    V, T1 = np.zeros_like(G), T.copy()
    csq = clip_to_references(V, G, rows, T1, slots, drift, factors, store=True, centre=centre)
    V2, T2 = np.zeros_like(G), T.copy()
    assert clip_to_references(V2, G, rows, T2, slots, drift, factors, store=True) is None
    assert np.array_equal(V, V2) and np.array_equal(T1, T2)  # the rows and references as without the distances
    want = np.empty(n)
    kernels.centre_sq_distances(V, rows, centre, want)
    assert np.array_equal(csq, want)  # the separate pass's sums, bit for bit
    plain = np.sum(np.square((V[rows] - centre).astype(np.float64)), axis=1)
    np.testing.assert_allclose(csq, plain, rtol=SUM_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_centre_distances_of_a_subset_of_rows(dtype):
    rng = np.random.default_rng(3)
    G = rng.standard_normal((9, 5000)).astype(dtype)
    centre = rng.standard_normal(5000).astype(dtype)
    rows = np.array([7, 2, 5], dtype=np.intp)
    sq = np.empty(3)
    kernels.centre_sq_distances(G, rows, centre, sq)
    np.testing.assert_allclose(sq, np.sum(np.square((G[rows] - centre).astype(np.float64)), axis=1),
                               rtol=SUM_RTOL[dtype])


def _attacked_rounds(n_rounds: int, R: int, d: int, seed: int = 0):
    """float32 rounds with far rows, a jump, a new node and an idle one; ``(G, ids)`` per round."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(R, d)).astype(np.float32)
    out = []
    for t in range(n_rounds):
        G = centres * np.float32(0.5) + np.float32(0.05 * t) + rng.normal(size=(R, d)).astype(np.float32) * 0.3
        G[:2] += np.float32(40.0)  # gross
        if t in (2, 3, 6):
            G[2:4] = -G[2:4] * np.float32(6.0)  # far from the last estimate: left out of the round
        if t == 5:
            G[6] += np.float32(2.5)  # a jump
        ids = list(range(R))
        if t == 4:
            ids[-1] = 10_000 + t  # a new node in place of the last one (which is idle for a round)
        out.append((G, ids))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_rounds_fused_are_the_unfused_passes_bit_for_bit(dtype):
    R, d = 24, 5000  # sketched screen and filter (d > 4096; the filter's rows, fewer than R, above fast_above too)
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)
    plain.fuse_passes = False
    assert fused._fast_round(R, d)
    for G, ids in _attacked_rounds(9, R, d):
        G = G.astype(dtype)
        a = fused.aggregate(G, client_ids=ids)
        b = plain.aggregate(G, client_ids=ids)
        assert np.array_equal(a.estimate, b.estimate)
        assert a.kept.tolist() == b.kept.tolist() and np.array_equal(a.weights, b.weights)
        for key in ("gross", "suspected", "duplicates", "input_clipped", "jumped", "self_clipped", "clipped"):
            assert a.info.get(key) == b.info.get(key), key
    sa, arr_a = fused.state_dict()
    sb, arr_b = plain.state_dict()
    assert sa == sb and sorted(arr_a) == sorted(arr_b)
    for key in arr_a:
        assert np.array_equal(arr_a[key], arr_b[key]), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,d", [(1, 5), (2, 3), (3, 1000), (20, 650), (31, 4099), (64, 70), (101, 5000), (1000, 300)])
def test_column_median_is_numpys_bit_for_bit(dtype, R, d):
    rng = np.random.default_rng(R + d)
    A = rng.standard_normal((R, d)).astype(dtype)
    A[:, 0] = 1.5  # ties
    if R > 2 and d > 2:
        A[0, 1] = np.inf
        A[1, 2] = -np.inf
    from flwr_byzantine.aggregators.streaming import column_median

    assert np.array_equal(column_median(A), np.median(A, axis=0))
    if d > 3:
        A[R // 2, 3] = np.nan
        got, want = column_median(A), np.median(A, axis=0)
        assert np.isnan(got[3]) and np.array_equal(got, want, equal_nan=True)


def test_column_median_takes_the_unrolled_network_for_31_rows_only(monkeypatch):
    """31 rows go to :func:`~.kernels.column_medians31` (the unrolled network), every other count to the loop over the
    network, which does not compile the unrolled one (the App's rounds of 20 never need it)."""
    from flwr_byzantine.aggregators.streaming import column_median

    calls = []
    for name in ("column_medians", "column_medians31"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    for R in (20, 31, 33):
        A = np.random.default_rng(R).standard_normal((R, 300))
        assert np.array_equal(column_median(A), np.median(A, axis=0))
    assert calls == ["column_medians", "column_medians31", "column_medians"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_returns_the_memory_table_rows_when_they_are_a_run(dtype):
    from flwr_byzantine.aggregators.memory import ClientMomentum

    rng = np.random.default_rng(2)
    a, b = ClientMomentum(beta=0.5), ClientMomentum(beta=0.5)
    ids = [5, 6, 7, 8]
    for t in range(3):
        G = rng.standard_normal((4, 300)).astype(dtype)
        centre = rng.standard_normal(300).astype(dtype)
        factors = rng.uniform(0.3, 1.0, 4).astype(dtype)
        Ma = a.fold_rows(G, np.arange(4), ids, centre=centre, factors=factors, table_view=True)
        Mb = b.fold_rows(G, np.arange(4), ids, centre=centre, factors=factors)
        assert not Ma.flags.writeable and Mb.flags.writeable  # a view of a's table: read-only
        assert np.array_equal(Ma, Mb)
    for node in ids:
        assert np.array_equal(a.momentum_of(node), b.momentum_of(node))
    # rows in another order than their memories, or not every row folded: the buffer, as without table_view
    G = rng.standard_normal((4, 300)).astype(dtype)
    M1 = a.fold_rows(G, np.arange(4), [8, 7, 6, 5], table_view=True)
    M2 = b.fold_rows(G, np.arange(4), [8, 7, 6, 5])
    assert M1.flags.writeable and np.array_equal(M1, M2)
    out = np.full((4, 300), 7.0, dtype=dtype)
    M1 = a.fold_rows(G, np.array([0, 2]), [8, 6], out=out, table_view=True)
    assert M1 is out and np.all(out[[1, 3]] == 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_rounds_with_every_row_folded_use_the_memory_table_bit_for_bit(dtype):
    """No gross rows: every row's memory is folded, the filter reads the memory table's rows in place."""
    R, d = 24, 5000
    rng = np.random.default_rng(7)
    fused = RobustDefence(eps_tilde=0.2, seed=1, fast_above=R * d)
    plain = RobustDefence(eps_tilde=0.2, seed=1, fast_above=R * d)
    plain.fuse_passes = False
    centres = rng.normal(size=(R, d)).astype(np.float32)
    views = 0
    for t in range(8):
        G = (centres * np.float32(0.5) + rng.normal(size=(R, d)).astype(np.float32) * 0.3).astype(dtype)
        G[:3] -= dtype(0.8)  # a shifted group: not gross
        a = fused.aggregate(G, client_ids=list(range(R)))
        b = plain.aggregate(G, client_ids=list(range(R)))
        assert a.info["gross"] == [] and np.array_equal(a.estimate, b.estimate)
        assert a.kept.tolist() == b.kept.tolist() and np.array_equal(a.weights, b.weights)
        views += fused._memory_out is None
    assert views == 8  # the buffer was never needed
    arr_a, arr_b = fused.state_dict()[1], plain.state_dict()[1]
    assert all(np.array_equal(arr_a[k], arr_b[k]) for k in arr_a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_rows_into_the_references_only_writes_what_the_buffer_would_hold(dtype):
    """``V=None``: the clipped rows go only into the references' table, the same values and distances."""
    rng = np.random.default_rng(11)
    n, d = 6, kernels.KERNEL_TILE + 5
    G = rng.standard_normal((n + 1, d)).astype(dtype)
    T = rng.standard_normal((n + 2, d)).astype(dtype)
    rows, slots = np.arange(1, n + 1), rng.permutation(n + 2)[:n]
    drift = rng.standard_normal(d).astype(dtype)
    factors = np.minimum(1.0, rng.uniform(0.1, 2.0, n))
    centre = rng.standard_normal(d).astype(dtype)
    V, T1, T2 = np.zeros_like(G), T.copy(), T.copy()
    csq1 = clip_to_references(V, G, rows, T1, slots, drift, factors, store=True, centre=centre)
    csq2 = clip_to_references(None, G, rows, T2, slots, drift, factors, store=True, centre=centre)
    assert np.array_equal(T1, T2) and np.array_equal(T2[slots], V[rows]) and np.array_equal(csq1, csq2)
    assert clip_to_references(None, G, rows, T.copy(), slots, drift, factors, store=True) is None
    with pytest.raises(ValueError):
        clip_to_references(None, G, rows, T.copy(), slots, drift, factors)  # nowhere to write the rows
    with pytest.raises(ValueError):  # a table narrower than the rows' arithmetic: not the rows' values
        clip_to_references(None, G.astype(np.float64), rows, T.astype(np.float32), slots,
                           drift.astype(np.float64), factors, store=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_reads_its_rows_from_a_source_table(dtype):
    from flwr_byzantine.aggregators.memory import ClientMomentum

    rng = np.random.default_rng(4)
    a, b = ClientMomentum(beta=0.6), ClientMomentum(beta=0.6)
    ids = [3, 9, 4, 1]
    for t in range(3):
        S = rng.standard_normal((7, 500)).astype(dtype)  # the rows live in another table, in another order
        src = rng.permutation(7)[:3]
        rows = np.array([0, 2, 3])
        G = np.zeros((4, 500), dtype=dtype)
        G[rows] = S[src]
        centre = rng.standard_normal(500).astype(dtype)
        factors = rng.uniform(0.3, 1.0, 3).astype(dtype)
        kw = dict(centre=centre, factors=factors) if t else {}
        Ma = a.fold_rows(np.empty((4, 500), dtype=dtype), rows, [ids[r] for r in rows], source=(S, src), **kw)
        Mb = b.fold_rows(G, rows, [ids[r] for r in rows], **kw)
        assert np.array_equal(Ma[rows], Mb[rows])
    for node in (3, 4, 1):
        assert np.array_equal(a.momentum_of(node), b.momentum_of(node))
    with pytest.raises(ValueError):
        a.fold_rows(G, rows, [3, 4, 1], source=(S, np.array([0, 1, 7])))  # no row 7 in the source
    with pytest.raises(ValueError):
        a.fold_rows(G, rows, [3, 4, 1], source=(S.astype(np.float16), src))  # another dtype


def test_self_reference_into_table_leaves_the_clipped_rows_in_its_table_until_settled():
    """``into_table``: no rows written out; the table holds what ``V`` would hold (a mature jump's clipped row
    included; a new node's row once adopted) until :meth:`settle`, after which it is the table of the plain call; a
    checkpoint settles first."""
    from flwr_byzantine.aggregators.temporal import SelfReference

    rng = np.random.default_rng(8)
    R, d = 20, 300
    a, b = SelfReference(burn_in=0), SelfReference(burn_in=0)
    centres = rng.normal(size=(R, d)).astype(np.float32) * 3
    ids = list(range(R))
    for t in range(5):
        G = centres + rng.normal(size=(R, d)).astype(np.float32) * np.float32(0.3) + np.float32(0.1 * t)
        skip = [5] if t == 2 else []
        if t == 3:
            G[[2, 7]] *= -1.0  # two mature jumps
        Vb, ib = b.apply(G, ids, skip=skip)
        Va, ia = a.apply(G, ids, skip=skip, into_table=True)
        assert Va is None and ia["jumped"] == ib["jumped"] and ia["self_clipped"] == ib["self_clipped"]
        # a new node's row is not stored until the caller adopts it (the first round's every row, node 5 after its skip)
        assert ia["new_rows"] == ib["new_rows"] == (list(range(R)) if t == 0 else [5] if t == 3 else [])
        assert not any(ids[r] in a.refs.index for r in ia["new_rows"])
        a.adopt([ids[r] for r in ia["new_rows"]], G[ia["new_rows"]])
        seen = [r for r in range(R) if r not in skip]
        assert np.array_equal(a.refs.rows[a.refs.slots([ids[r] for r in seen])], Vb[seen])
        if t == 3:
            assert sorted(ia["jumped"]) == [2, 7] and a._pending is not None
            assert not np.array_equal(a.refs.get([2]), b.refs.get([2]))  # the clipped row, not the drift's follower
        a.settle()
        assert a._pending is None
        assert sorted(a.refs.index) == sorted(b.refs.index)
        assert all(np.array_equal(a.refs.get([n]), b.refs.get([n])) for n in a.refs.index)
    # a pending fix is settled by the checkpoint, and a forgotten node stays forgotten
    G = -(centres + np.float32(0.5))
    a.apply(G, ids, into_table=True)
    b.apply(G, ids)
    a.forget([0])
    b.forget([0])
    assert a.state_dict()["ids"] == b.state_dict()["ids"]
    assert np.array_equal(a.state_dict()["refs"], b.state_dict()["refs"])
    # a table wider than the rows: the rows are written out as without into_table
    c = SelfReference()
    c.apply(centres.astype(np.float64), ids)
    V, _ = c.apply(centres, ids, into_table=True)
    assert V is not None and V.dtype == np.float32


def test_fused_fast_rounds_read_the_clipped_rows_from_the_references_table(monkeypatch):
    """Rounds with a last estimate take the clipped rows from the self-reference's table (no buffer written),
    and give the unfused passes' results bit for bit (:func:`test_fast_rounds_fused_are_the_unfused_passes_bit_for_bit`)."""
    from flwr_byzantine.aggregators.temporal import SelfReference

    calls: list[bool] = []
    apply = SelfReference.apply

    def spy(self, *a, **k):
        out = apply(self, *a, **k)
        calls.append(out[0] is None)
        return out

    monkeypatch.setattr(SelfReference, "apply", spy)
    R, d = 24, 5000
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    for G, ids in _attacked_rounds(6, R, d):
        fused.aggregate(G, client_ids=ids)
        assert fused.self_reference._pending is None  # settled within the round
    assert calls == [False] + [True] * 5  # the first round has no last estimate to clip the memories around


def test_the_unrolled_median_module_is_the_generators_output():
    """``_median31.py`` is generated (:func:`~flwr_byzantine.aggregators.kernels.unrolled_median_source`): committed as
    the generator writes it, so numba caches it like any module and no network is compiled at run time."""
    from pathlib import Path

    from flwr_byzantine.aggregators import _median31

    assert Path(_median31.__file__).read_text() == kernels.unrolled_median_source(kernels.UNROLLED_MEDIAN)
    with pytest.raises(ValueError):
        kernels.unrolled_median_source(32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_unrolled_median_is_the_networks_on_every_order(dtype):
    """31 values a column: the unrolled exchanges against the loop over the same network and ``np.median``, on random
    columns, sorted and reversed ones, ties, infinities and NaN."""
    from flwr_byzantine.aggregators._median31 import median31_block

    rng = np.random.default_rng(31)
    m, w = 31, 200
    B = rng.standard_normal((32, w)).astype(dtype)
    B[:m, 0] = np.arange(m)
    B[:m, 1] = np.arange(m)[::-1]
    B[:m, 2] = 1.0
    B[:m, 3] = rng.integers(0, 3, m)
    B[5, 4], B[6, 4] = np.inf, -np.inf
    B[:m, 5] = np.inf
    B[7, 6] = np.nan
    B[0, 7] = np.nan  # the first value loaded
    B[30, 8] = np.nan  # the last row
    B[[2, 19], 9] = np.nan, np.inf
    got = np.empty(w, dtype=dtype)
    median31_block(B, w, got, 0)
    lo, hi, _ = kernels.selection_network(m)
    loop = np.empty(w, dtype=dtype)
    kernels._network_median_block.py_func(B.copy(), w, lo, hi, m, loop, 0)  # the interpreted loop
    want = np.median(B[:m], axis=0)
    assert np.array_equal(got, want, equal_nan=True) and np.array_equal(loop, want, equal_nan=True)
    assert np.isnan(got[6]) and got[5] == np.inf and np.isnan(got[7:10]).all() and not np.isnan(got[10:]).any()


@pytest.mark.parametrize("m", [1, 3, 5, 9, 15])
def test_the_median_generator_gives_the_median_for_any_odd_count(m):
    """:func:`~flwr_byzantine.aggregators.kernels.unrolled_median_source` for other sizes (loaded as a module, not
    cached): the reordered exchanges still give each column's median, NaN columns NaN."""
    source = kernels.unrolled_median_source(m).replace("from ._exchange", "from flwr_byzantine.aggregators._exchange")
    ns: dict = {}
    exec(source.replace("@numba.njit(cache=True)", "@numba.njit"), ns)
    B = np.random.default_rng(m).standard_normal((16, 40))
    B[:m, 1] = np.arange(m)[::-1]
    B[m - 1, 2] = np.nan
    got = np.empty(40)
    ns[f"median{m}_block"](B, 40, got, 0)
    assert np.array_equal(got, np.median(B[:m], axis=0), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_compare_exchange_is_the_branches_bit_for_bit(dtype):
    """The networks' exchange, one compare and two selects when compiled (:mod:`._exchange`), moves exactly what
    ``(b, a) if b < a else (a, b)`` compiled as branches moves: signed zeros, infinities, ties and NaN included; a
    pair of two types or of integers is not taken."""
    import numba

    from flwr_byzantine.aggregators._exchange import compare_exchange

    @numba.njit
    def selects(a, b):
        return compare_exchange(a, b)

    @numba.njit
    def branches(a, b):
        return (b, a) if b < a else (a, b)

    vals = np.array([np.nan, -0.0, 0.0, 1.0, -1.0, np.inf, -np.inf, 2.5, np.finfo(dtype).tiny], dtype=dtype)
    got = np.array([selects(a, b) for a in vals for b in vals], dtype=dtype)
    want = np.array([branches(a, b) for a in vals for b in vals], dtype=dtype)
    plain = np.array([compare_exchange(a, b) for a in vals for b in vals], dtype=dtype)  # the Python fallback
    assert got.dtype == dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert np.array_equal(plain.view(np.uint8), want.view(np.uint8))
    assert np.array_equal(got[vals.size + 2], [-0.0, 0.0]) and np.signbit(got[vals.size + 2][0])  # (-0, 0) stays
    assert np.signbit(got[2 * vals.size + 1][1])  # (0, -0): no swap either
    with pytest.raises(numba.TypingError):
        selects(np.int64(1), np.int64(2))
    with pytest.raises(numba.TypingError):
        selects(np.float32(1), np.float64(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_network_blocks_start_on_a_cache_line(dtype):
    for n, w in [(32, 2048), (1, 8), (128, 512)]:
        B = kernels._aligned_block(n, w, np.dtype(dtype))
        assert B.shape == (n, w) and B.dtype == dtype and B.flags.c_contiguous and B.ctypes.data % 64 == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_fast_rounds_under_churn_are_the_unfused_passes_bit_for_bit(seed):
    """Random federations with churn (nodes leave, return and join, rows reordered), gross rows, jumps (mature ones
    folded or left out), far rows and copies, in float32 and float64: the fused passes (the clipped rows left in the
    references' table, jump fixes settled after the fold) give the unfused passes' estimates, decisions and state."""
    from flwr_byzantine.aggregators.temporal import SelfReference

    pending = []
    apply = SelfReference.apply

    def spy(self, *a, **k):
        out = apply(self, *a, **k)
        pending.append(self._pending is not None)
        return out

    for dtype in DTYPES:
        rng = np.random.default_rng(seed)
        d, pool, fresh, centres = 5000, list(range(60)), 1000, {}
        fused = RobustDefence(eps_tilde=0.2, seed=seed, fast_above=20 * d)
        plain = RobustDefence(eps_tilde=0.2, seed=seed, fast_above=20 * d)
        plain.fuse_passes = False
        fused.self_reference.apply = spy.__get__(fused.self_reference)
        for t in range(20):
            ids = [i for i in pool if rng.random() < 0.85]
            if rng.random() < 0.5:
                ids.append(fresh)
                pool.append(fresh)
                fresh += 1
            if rng.random() < 0.2:
                rng.shuffle(ids)
            for i in ids:
                centres.setdefault(i, rng.normal(size=d))
            R = len(ids)
            G = np.stack([centres[i] * 0.5 + 0.05 * t + rng.normal(size=d) * 0.3 for i in ids]).astype(dtype)
            G[rng.choice(R, rng.integers(0, 4), replace=False)] += dtype(40.0)  # gross
            if rng.random() < 0.4:
                jr = rng.choice(R, 2, replace=False)
                G[jr] = -G[jr] * dtype(3.0)  # jumps, or far from the last estimate
            if rng.random() < 0.3:
                a, b = rng.choice(R, 2, replace=False)
                G[b] = G[a]  # a copy
            ra, rb = fused.aggregate(G, client_ids=ids), plain.aggregate(G, client_ids=ids)
            assert np.array_equal(ra.estimate, rb.estimate), t
            assert ra.kept.tolist() == rb.kept.tolist() and np.array_equal(ra.weights, rb.weights), t
            for key in ("gross", "suspected", "duplicates", "input_clipped", "jumped", "self_clipped", "clipped"):
                assert ra.info.get(key) == rb.info.get(key), (t, key)
            assert fused.self_reference._pending is None
        sa, arr_a = fused.state_dict()
        sb, arr_b = plain.state_dict()
        assert sa == sb and sorted(arr_a) == sorted(arr_b)
        assert all(np.array_equal(arr_a[k], arr_b[k]) for k in arr_a)
    assert any(pending)  # some rounds left a mature jump's fix to settle after the fold


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_rounds_of_fresh_clients_every_round(dtype):
    """A cross-device federation: every round a fresh sample of clients (no node seen before, or back after an
    absence), on fused fast rounds.  A round whose nodes are all new left the references' table empty, and the
    fold rejected it as a source ("source must be a table of the rows' width and dtype"): every such round failed.
    Now the rounds run as the unfused passes run them, bit for bit, the far rows are left out, and the memories'
    table holds the nodes of the last two rounds (a node back after more than one idle round restarts anyway),
    reusing its rows instead of growing by R rows a round."""
    R, d = 30, 5000
    rng = np.random.default_rng(7)
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=R * d)
    plain.fuse_passes = False
    truth = rng.normal(size=d)
    for t in range(8):
        ids = list(range(t * R, (t + 1) * R)) if t % 4 != 3 else list(range(R))  # round 3 and 7: the first clients
        G = (truth + rng.normal(size=(R, d)) * 0.3).astype(dtype)
        G[:4] = dtype(-8.0) * G[:4]  # far rows
        a = fused.aggregate(G, client_ids=ids)
        b = plain.aggregate(G, client_ids=ids)
        assert np.array_equal(a.estimate, b.estimate) and a.kept.tolist() == b.kept.tolist(), t
        assert not set(a.kept.tolist()) & {0, 1, 2, 3}, t
        for rule in (fused, plain):
            assert len(rule.memory) <= 2 * R and rule.memory._m.rows.shape[0] <= 2 * R, t
    assert len(fused.memory) == len(plain.memory) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_with_every_row_new_does_not_read_the_source_table(dtype):
    """``source`` rows all ``-1`` (every node new): the table is not read, whatever its shape or dtype (an emptied
    references' table is ``(0, 0)`` float64), and the fold is the plain fold of the rows."""
    from flwr_byzantine.aggregators.memory import ClientMomentum

    rng = np.random.default_rng(8)
    G = rng.standard_normal((5, 300)).astype(dtype)
    rows = np.array([0, 2, 4])
    a, b = ClientMomentum(beta=0.6), ClientMomentum(beta=0.6)
    Ma = a.fold_rows(G, rows, [7, 8, 9], source=(np.zeros((0, 0)), np.full(3, -1)))
    Mb = b.fold_rows(G, rows, [7, 8, 9])
    assert np.array_equal(Ma[rows], Mb[rows])
    with pytest.raises(ValueError):
        a.fold_rows(G, rows, [7, 8, 9], source=(np.zeros((0, 0)), np.full(2, -1)))  # not one per folded row


def test_momentum_forgets_memories_that_can_no_longer_continue():
    """A node absent for more than ``max_idle_rounds`` calls restarts from its next vector: its memory is dropped
    (``momentum_of`` gives ``None``) and its row goes to the next new node; a node absent for fewer keeps it."""
    from flwr_byzantine.aggregators.memory import ClientMomentum

    for idle in (1, 2):
        mem = ClientMomentum(beta=0.5, max_idle_rounds=idle)
        X = np.ones((2, 4))
        mem.fold_rows(X, np.arange(2), [1, 2])
        for k in range(idle + 1):
            mem.fold_rows(X, np.arange(1), [1])
            assert (mem.momentum_of(2) is None) == (k + 1 > idle), (idle, k)
        rows = mem._m.rows
        mem.fold_rows(X, np.arange(2), [1, 3])  # node 3 takes node 2's row
        assert mem._m.rows is rows and sorted(mem._m.index.values()) == [0, 1]


def test_an_emptied_table_reuses_its_matrix_for_rows_of_its_shape():
    """Every node dropped: the next nodes' table reuses the matrix when their rows have its width and dtype (its
    pages are mapped), and takes a fresh one, in the new rows' dtype, otherwise."""
    from flwr_byzantine.aggregators.memory import _RowTable

    t = _RowTable()
    t.put([1, 2, 3], np.ones((3, 8), dtype=np.float32))
    first = t.rows
    t.drop([1, 2, 3])
    assert len(t) == 0 and t.dim is None
    t.put([4, 5], np.full((2, 8), 2.0, dtype=np.float32))
    assert t.rows is first and np.array_equal(t.get([4, 5]), np.full((2, 8), 2.0, dtype=np.float32))
    t.drop([4, 5])
    t.put([6], np.ones((1, 8)))  # float64 rows: a fresh float64 table (a table takes its first rows' dtype)
    assert t.rows is not first and t.rows.dtype == np.float64
    t.drop([6])
    t.put([7], np.ones((1, 9), dtype=np.float32))  # another width
    assert t.rows.shape[1] == 9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("to_buffer", [True, False])
@pytest.mark.parametrize("sums", [True, False])
@pytest.mark.parametrize("d,dim", [(700, 64), (kernels.FOLD_SKETCH_SPAN + 1234, 520), (9001, 2048)])
@pytest.mark.parametrize("self_clip", [False, True])
def test_fold_with_the_sketch_is_the_fold_then_count_sketch(dtype, to_buffer, sums, d, dim, self_clip):
    """The fused fold-and-sketch pass: the memories and the output rows of the plain fold, and the sketch, squared
    norms and column sums that count_sketch takes of the output with the other rows zero, bit for bit (spans and
    segments that do not divide ``d``; clipped and unclipped rows, continued and fresh memories).  ``self_clip``: both
    passes also clip the rows against their references in the source table and store them there (the row of ``src``
    -1 folded as it is); the unfused reference is ``clip_rows`` with ``store``, then the plain fold reading the
    table."""
    from flwr_byzantine.aggregators.sketch import sketch_buckets

    rng = np.random.default_rng(d + dim)
    R = 9
    G = rng.standard_normal((R, d)).astype(dtype)
    T0 = rng.standard_normal((R + 2, d)).astype(dtype)
    rows = np.array([0, 2, 3, 5, 8], dtype=np.intp)
    slots = np.array([4, 0, 7, 10, 2], dtype=np.intp)
    src = np.array([1, 3, -1, 6, 0], dtype=np.intp)
    S = rng.standard_normal((7, d)).astype(dtype)
    centre = rng.standard_normal(d).astype(dtype)
    cont = np.array([True, False, True, False, True])
    b_old, b_new = T0.dtype.type(0.9), G.dtype.type(0.1)
    k1, k2 = sketch_buckets(d, dim)
    signs = np.where(rng.random(d) < 0.5, -1, 1).astype(np.int8)
    none = np.empty(0, dtype=dtype)
    drift = (rng.standard_normal(d) * 0.3).astype(dtype)
    for clip in (True, False):
        factors = rng.uniform(0.2, 1.0, rows.size).astype(dtype)
        sf = np.where(rng.random(rows.size) < 0.5, 1.0, rng.uniform(0.1, 1.0, rows.size)).astype(dtype)
        T1, T2, S1, S2, S3 = T0.copy(), T0.copy(), S.copy(), S.copy(), S.copy()
        M1 = np.zeros_like(G) if to_buffer else np.empty((0, 0), dtype=dtype)
        M2 = np.zeros_like(G) if to_buffer else np.empty((0, 0), dtype=dtype)
        M3 = np.zeros_like(G) if to_buffer else np.empty((0, 0), dtype=dtype)
        if self_clip:  # the two passes: the clipping stored into the references, then the fold reading them
            own = src >= 0
            clip_to_references(None, G, rows[own], S1, src[own], drift, sf[own], store=True)
        kernels.clip_fold_rows(M1, S1, rows, src, centre, factors, clip, T1, slots, cont, b_old, b_new, G, none, none)
        Y, sq = np.zeros((R, k1 + k2)), np.zeros(R)
        cs = np.zeros(d if sums else 0, dtype=dtype)
        fd, fs = (drift, sf) if self_clip else (none, none)
        kernels.clip_fold_sketch_rows(M2, S2, rows, src, centre, factors, clip, T2, slots, cont, b_old, b_new, G, fd,
                                      fs, signs, k1, k2, Y, sq, cs, 0.75)
        assert np.array_equal(T1, T2) and np.array_equal(M1, M2) and np.array_equal(S1, S2)
        T3 = T0.copy()
        kernels.clip_fold_rows(M3, S3, rows, src, centre, factors, clip, T3, slots, cont, b_old, b_new, G, fd, fs)
        assert np.array_equal(T1, T3) and np.array_equal(M1, M3) and np.array_equal(S1, S3)
        out = np.zeros_like(G)
        out[rows] = T1[slots]
        Yw, sqw, csw = np.empty((R, k1 + k2)), np.empty(R), np.empty(d if sums else 0, dtype=dtype)
        kernels.count_sketch(out, signs, k1, k2, Yw, sqw, csw, 0.75)
        assert np.array_equal(Y, Yw) and np.array_equal(cs, csw)
        np.testing.assert_allclose(sq, sqw, rtol=1e-12)  # a reassociated float64 sum (lanes)
        assert np.all(sq[np.setdiff1d(np.arange(R), rows)] == 0)


def test_fold_rows_checks_the_sketch_it_fills():
    from flwr_byzantine.aggregators.memory import ClientMomentum
    from flwr_byzantine.aggregators.sketch import RowSketch

    G = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)
    signs = np.ones(300, dtype=np.int8)
    with pytest.raises(ValueError, match="ascending"):
        ClientMomentum().fold_rows(G, np.array([2, 0]), [5, 6], sketch=(signs, RowSketch.empty(4, 300, 16)))
    with pytest.raises(ValueError, match="memories' dtype"):
        ClientMomentum().fold_rows(G, np.array([0, 2]), [5, 6],
                                   sketch=(signs, RowSketch.empty(4, 300, 16, np.float64)))
    Z = RowSketch.empty(4, 300, 16, np.float32)
    M = ClientMomentum().fold_rows(G, np.array([0, 2]), [5, 6], sketch=(signs, Z))
    want = np.empty_like(Z.Y)
    from flwr_byzantine.aggregators.sketch import sketch_buckets

    kernels.count_sketch(np.where(np.isin(np.arange(4), [0, 2])[:, None], M, 0).astype(np.float32), signs,
                         *sketch_buckets(300, 16), want, np.empty(4), np.empty(300, np.float32), 1 / np.sqrt(2.0))
    assert np.array_equal(Z.Y, want)


def test_presketch_request_draws_the_signs_the_filters_own_pass_would():
    from flwr_byzantine.aggregators.rge import RGE
    from flwr_byzantine.aggregators.sketch import sketch_rows

    a, b = RGE(sketch_dim=64, seed=3), RGE(sketch_dim=64, seed=3)
    G = np.random.default_rng(1).standard_normal((5, 400)).astype(np.float32)
    signs, Z = a.presketch_request(5, 400, np.float32)
    assert Z.Y.shape == (5, 63) and Z.col_sums is not None and Z.col_sums.dtype == np.float32 and not Z.Y.any()
    kernels.count_sketch(G, signs, 32, 31, Z.Y, Z.sq_norms, Z.col_sums, 1 / np.sqrt(2.0))
    assert np.array_equal(Z.Y, sketch_rows(G, 64, b._rng))  # the same draw
    assert np.array_equal(a._rng.random(3), b._rng.random(3))  # and both generators left in the same place
    assert RGE(sketch_dim=64).presketch_request(5, 100, np.float32) is None  # d <= 2 dim: no sketch
    assert RGE().presketch_request(5, 400, np.float32) is None  # the exact filter
    assert RGE(sketch_dim=64).presketch_request(5, 400, np.int64) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_take_no_column_sums_and_the_survivors_mean_from_their_rows(monkeypatch, dtype):
    """Rows longer than ``COLUMN_SUMS_MAX_BYTES``: the filter's own pass and a caller's presketch take no column sums
    (the sums' vector would leave L2), the survivors' mean is one read of their rows (``rows_mean``), the same bits
    either way and the survivors' float64 mean to the dtype's rounding; shorter rows keep the sums' downdate."""
    import flwr_byzantine.aggregators.rge as rge_mod
    from flwr_byzantine.aggregators.rge import RGE

    R, d = 30, 600
    rng = np.random.default_rng(5)
    G = rng.standard_normal((R, d)).astype(dtype)
    G[:5] += 40.0  # far rows: filtered out
    item = np.dtype(dtype).itemsize
    assert RGE(sketch_dim=64).sums_columns(d, dtype)
    assert not RGE(sketch_dim=64, column_sums=False).sums_columns(d, dtype)
    monkeypatch.setattr(rge_mod, "COLUMN_SUMS_MAX_BYTES", d * item - 1)
    assert not RGE(sketch_dim=64).sums_columns(d, dtype) and RGE(sketch_dim=64).sums_columns(d - 1, dtype)
    means, sketches = [], []
    real_mean, real_sketch = rge_mod.rows_mean, rge_mod.sketch_rows
    monkeypatch.setattr(rge_mod, "rows_mean", lambda *a: (means.append(1), real_mean(*a))[1])
    monkeypatch.setattr(rge_mod, "sketch_rows", lambda *a, **k: (sketches.append(k.get("col_sums")),
                                                                 real_sketch(*a, **k))[1])
    own = RGE(sketch_dim=64, seed=2).aggregate_rows(G, np.arange(R))
    assert sketches == [None] and len(means) == 1 and own.kept.tolist() == list(range(5, R))
    np.testing.assert_allclose(own.estimate, G[5:].astype(np.float64).mean(axis=0), rtol=0, atol=SUM_RTOL[dtype] * 10)
    handed = RGE(sketch_dim=64, seed=2)
    signs, Z = handed.presketch_request(R, d, dtype)
    assert Z.col_sums is None
    from flwr_byzantine.aggregators.sketch import sketch_buckets

    kernels.count_sketch(G, signs, *sketch_buckets(d, 64), Z.Y, Z.sq_norms, np.empty(0, dtype=dtype), 1 / np.sqrt(2.0))
    got = handed.aggregate_rows(G, np.arange(R), presketch=Z)
    assert len(sketches) == 1 and len(means) == 2  # no pass of its own; the survivors read once
    assert got.kept.tolist() == own.kept.tolist() and np.array_equal(got.estimate, own.estimate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_fast_rounds_take_the_filters_sketch_in_the_fold(monkeypatch, dtype):
    """Fused fast rounds whose filter runs sketch the memories in the fold (and the filter takes no pass of its own),
    with the unfused passes' results bit for bit; rows longer than ``rge.COLUMN_SUMS_MAX_BYTES`` take no column sums
    in either pass, and both give the survivors' mean from one read of the survivors (the same bits)."""
    from flwr_byzantine.aggregators import defence, sketch, streaming

    fused_calls, filter_passes = [], []
    real_fold, real_sketch = kernels.clip_fold_sketch_rows, sketch.sketch_rows
    monkeypatch.setattr(kernels, "clip_fold_sketch_rows", lambda *a: (fused_calls.append(a[-2].size), real_fold(*a)))
    import flwr_byzantine.aggregators.rge as rge_mod

    monkeypatch.setattr(rge_mod, "sketch_rows", lambda *a, **k: (filter_passes.append(1), real_sketch(*a, **k))[1])
    R, d = 24, 5000
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)  # the filter's rows too: a sketched filter
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)
    plain.fuse_passes = False
    for G, ids in _attacked_rounds(6, R, d):
        G = G.astype(dtype)
        n_fused, n_filter = len(fused_calls), len(filter_passes)
        a = fused.aggregate(G, client_ids=ids)
        fused_here, filter_here = len(fused_calls) - n_fused, len(filter_passes) - n_filter
        b = plain.aggregate(G, client_ids=ids)
        assert np.array_equal(a.estimate, b.estimate) and a.kept.tolist() == b.kept.tolist()
        spent = bool(a.info.get("budget_spent"))  # the filter does not run: nothing sketched for it
        assert (fused_here, filter_here) == ((0, 0) if spent else (1, 0))
    assert len(fused_calls) >= 3 and all(n == d for n in fused_calls)  # the column sums in the pass
    monkeypatch.setattr(rge_mod, "COLUMN_SUMS_MAX_BYTES", d * np.dtype(dtype).itemsize - 1)
    real_mean, means = streaming.rows_mean, []
    monkeypatch.setattr(rge_mod, "rows_mean", lambda *a: (means.append(1), real_mean(*a))[1])
    n_fused, own_passes, filtered = len(fused_calls), 0, 0
    for G, ids in _attacked_rounds(4, R, d, seed=1):
        n_filter = len(filter_passes)
        a = fused.aggregate(G.astype(dtype), client_ids=ids)
        own_passes += len(filter_passes) - n_filter
        filtered += not a.info.get("budget_spent") and a.kept.size < R
        b = plain.aggregate(G.astype(dtype), client_ids=ids)
        assert np.array_equal(a.estimate, b.estimate) and a.kept.tolist() == b.kept.tolist()
    assert len(fused_calls) - n_fused >= 2 and own_passes == 0
    assert all(n == 0 for n in fused_calls[n_fused:])  # no column sums in the fold's pass
    assert filtered >= 1 and len(means) >= 2 * filtered  # each side's survivors' mean from their rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_u", [False, True])
@pytest.mark.parametrize("n,d", [(5, 7), (12, kernels.KERNEL_TILE + 13), (40, 3 * kernels.KERNEL_TILE)])
def test_deviation_pass_gives_the_clipped_rows_distances_to_a_centre(dtype, with_u, n, d):
    """``reference_deviation_stats(centre=)``: ``||a||^2 + 2 f <a, e> + f^2 ||e||^2`` is the distance of the row
    clip_to_references writes with factor ``f`` (its centre pass) to the sums' tolerance, for any factor; the other
    statistics are those of the pass without the centre to the same tolerance."""
    from flwr_byzantine.aggregators.streaming import reference_deviation_stats

    rng = np.random.default_rng(n + d + with_u)
    G = rng.standard_normal((n + 2, d)).astype(dtype)
    T = (rng.standard_normal((n + 3, d)) * 1.5).astype(dtype)
    rows = np.sort(rng.choice(n + 2, n, replace=False))
    slots = rng.permutation(n + 3)[:n]
    centre = (rng.standard_normal(d) * 0.5).astype(dtype)
    u = rng.standard_normal(d)
    u = (u / np.linalg.norm(u)).astype(dtype) if with_u else None
    out = reference_deviation_stats(G, rows, T, slots, None, u, centre=centre)
    plain = reference_deviation_stats(G, rows, T, slots, None, u)
    assert len(out) == len(plain) + 2
    assert np.array_equal(out[0], plain[0])  # the drift
    for got, want in zip(out[1:len(plain)], plain[1:]):
        np.testing.assert_allclose(got, want, rtol=SUM_RTOL[dtype], atol=SUM_RTOL[dtype] * float(np.max(np.abs(want))))
    drift, sq, base, cross = out[0], out[1], out[-2], out[-1]
    for factors in (np.ones(n), rng.uniform(0.05, 1.0, n), np.zeros(n)):
        f = factors.astype(dtype).astype(np.float64)
        want = clip_to_references(np.empty((n + 2, d), dtype=dtype), G, rows, T.copy(), slots, drift, factors,
                                  centre=centre)
        scale = base + f * f * sq  # the terms' size: the tolerance of a difference of float32 sums
        assert np.all(np.abs(base + 2.0 * f * cross + f * f * sq - want) <= 4 * SUM_RTOL[dtype] * scale)


def test_deviation_pass_centre_sums_of_huge_rows_are_finite():
    """float32 rows whose squares overflow float32 lanes: the centre sums are summed again in float64 (finite)."""
    from flwr_byzantine.aggregators.streaming import reference_deviation_stats

    d = 2 * kernels.KERNEL_TILE + 3
    G = np.ones((3, d), dtype=np.float32)
    T = np.zeros((3, d), dtype=np.float32)
    G[1, 5] = np.float32(1e20)
    T[2, 700] = np.float32(3e38)
    centre = np.zeros(d, dtype=np.float32)
    for u in (None, np.full(d, 1 / np.sqrt(d), dtype=np.float32)):
        out = reference_deviation_stats(G, np.arange(3), T, np.arange(3), None, u, centre=centre)
        drift = out[0].astype(np.float64)
        A = (T.astype(np.float64) + drift) - 0.0
        E = (G.astype(np.float64) - T) - drift
        assert all(np.all(np.isfinite(x)) for x in out[1:])
        np.testing.assert_allclose(out[-2], np.einsum("ij,ij->i", A, A), rtol=1e-6)
        np.testing.assert_allclose(out[-1], np.einsum("ij,ij->i", A, E), rtol=1e-6, atol=1e-6 * np.abs(A).max() ** 2)


def test_deferred_clipping_is_the_into_table_clipping_once_finished():
    """``apply(into_table=True, defer=True)``: the references keep their old rows until the caller's pass; the
    clipping it describes (:meth:`deferred`), done by the caller for some rows and by :meth:`finish_clip` for the
    rest, leaves the table and the decisions of the plain ``into_table`` call bit for bit; :meth:`settle` finishes an
    unfinished clipping before the jump fixes; distances to a centre are the same algebraic ones in both."""
    from flwr_byzantine.aggregators.temporal import SelfReference

    rng = np.random.default_rng(9)
    R, d = 16, 700
    a, b = SelfReference(burn_in=0), SelfReference(burn_in=0)
    centres = rng.normal(size=(R, d)).astype(np.float32) * 3
    ids = list(range(R))
    centre = np.zeros(d, dtype=np.float32)
    for t in range(6):
        G = centres + rng.normal(size=(R, d)).astype(np.float32) * np.float32(0.3) + np.float32(0.1 * t)
        skip = [4] if t == 2 else []
        if t == 4:
            G[[1, 6]] *= -1.0  # two mature jumps
        _, ib = b.apply(G, ids, skip=skip, into_table=True, centre=centre)
        b.adopt([ids[r] for r in ib["new_rows"]], G[ib["new_rows"]])
        before = a.refs.rows.copy() if len(a.refs) else None
        Va, ia = a.apply(G, ids, skip=skip, into_table=True, centre=centre, defer=True)
        assert Va is None and ia["jumped"] == ib["jumped"] and ia["self_clipped"] == ib["self_clipped"]
        assert np.array_equal(ia["centre_sq"], ib["centre_sq"])
        plan = a.deferred()
        if t == 0:  # no references yet: nothing clipped, nothing deferred
            assert plan is None
        else:
            assert plan is not None and plan.rows.tolist() == [r for r in range(R)
                                                               if r not in skip and r not in ia["new_rows"]]
            assert np.array_equal(a.refs.rows[plan.slots], before[plan.slots])  # not written yet
            if t % 2:  # the caller clips the first half in its own pass (as the fold's self_clip does), the rest later
                half = plan.rows.size // 2
                clip_to_references(None, G, plan.rows[:half], a.refs.rows, plan.slots[:half], plan.drift,
                                   plan.factors[:half], store=True)
                a.finish_clip(plan.rows[:half])
            assert (a.deferred() is None) == bool(t % 2)
        a.adopt([ids[r] for r in ia["new_rows"]], G[ia["new_rows"]])
        a.settle()  # finishes what is left (even rounds), then the jump fixes
        b.settle()
        assert a.deferred() is None and a._pending is None
        assert sorted(a.refs.index) == sorted(b.refs.index)
        assert all(np.array_equal(a.refs.get([n]), b.refs.get([n])) for n in a.refs.index), t


def test_fused_fast_rounds_clip_the_rows_in_the_memories_fold(monkeypatch):
    """Fused fast rounds with a last estimate defer the self-reference's clipping to the memories' fold (no clipping
    pass of its own for the folded rows), with the unfused passes' results bit for bit."""
    from flwr_byzantine.aggregators import memory, streaming, temporal

    folds, clip_passes = [], []
    real_fold, real_clip = memory.ClientMomentum.fold_rows, streaming.clip_to_references

    def fold_spy(self, *a, **k):
        folds.append(k.get("self_clip") is not None)
        return real_fold(self, *a, **k)

    def clip_spy(V, G, rows, *a, **k):
        clip_passes.append(len(rows))
        return real_clip(V, G, rows, *a, **k)

    monkeypatch.setattr(memory.ClientMomentum, "fold_rows", fold_spy)
    monkeypatch.setattr(temporal, "clip_to_references", clip_spy)
    R, d = 24, 5000
    fused = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)
    plain = RobustDefence(eps_tilde=0.2, seed=0, fast_above=16 * d)
    plain.fuse_passes = False
    for t, (G, ids) in enumerate(_attacked_rounds(8, R, d)):
        n_folds, n_clips = len(folds), len(clip_passes)
        a = fused.aggregate(G, client_ids=ids)
        mine_folds, mine_clips = folds[n_folds:], clip_passes[n_clips:]
        b = plain.aggregate(G, client_ids=ids)
        assert np.array_equal(a.estimate, b.estimate) and a.kept.tolist() == b.kept.tolist()
        if t > 0:  # a last estimate: the clipping deferred to the fold, which clips every folded row
            assert mine_folds == [True]
            left_out = len(set(a.info["gross"]) | set(a.info.get("jumped", [])) | set(a.info.get("duplicates", [])))
            assert sum(mine_clips) <= left_out  # only rows the fold left out are clipped on their own
    assert any(folds)

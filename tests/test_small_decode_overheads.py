"""The small decode's Python-side shortcuts (issue 12, twenty-fourth landing): each one the value it replaces, bit for
bit, and each one falling back where it does not apply."""

import warnings

import numpy as np
import pytest

from flwr_byzantine.aggregators.defence import _rows_without
from flwr_byzantine.aggregators.rge import _blas_libraries, _blas_threads, _single_thread_blas
from flwr_byzantine.aggregators.streaming import MEDIAN_SORT_MAX, median_of

# np.median's own warnings on the NaN, infinite and empty cases compared below
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _numpy_median(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty array's mean
        return float(np.median(x))


def _same_float(a, b):
    return type(a) is float and np.array_equal(np.array(a), np.array(b), equal_nan=True)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 19, 20, 21, 40, MEDIAN_SORT_MAX, MEDIAN_SORT_MAX + 1])
def test_median_of_is_numpys_median(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        x = rng.normal(size=n) * 10.0 ** rng.uniform(-200, 200)
        cases = [x, np.round(x * 2) / 2, np.abs(x), x[::-1], x.astype(np.float32), np.full(n, 1e308)]
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[rng.integers(n)] = bad
            cases.append(y)
        for c in cases:
            assert _same_float(median_of(c), _numpy_median(c))


def test_median_of_defers_to_numpy_elsewhere():
    rng = np.random.default_rng(0)
    for x in (np.zeros(0), np.arange(7), rng.normal(size=(3, 5)), rng.normal(size=9).astype(np.float32),
              [3.0, 1.0, 2.0]):
        assert _same_float(median_of(x), _numpy_median(x))


def test_rows_without_is_setdiff_of_the_union():
    rng = np.random.default_rng(1)
    for _ in range(500):
        R = int(rng.integers(1, 40))
        excluded = [np.sort(rng.choice(R, size=int(rng.integers(0, R + 1)), replace=False)).astype(np.intp)
                    for _ in range(int(rng.integers(1, 4)))]
        union = excluded[0]
        for e in excluded[1:]:
            union = np.union1d(union, e)
        got, want = _rows_without(R, *excluded), np.setdiff1d(np.arange(R), union)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    np.testing.assert_array_equal(_rows_without(5, np.zeros(0, dtype=np.intp), []), np.arange(5))


def test_blas_limit_is_skipped_only_where_every_library_already_runs_that_many_threads(monkeypatch):
    import contextlib
    import types

    import flwr_byzantine.aggregators.rge as rge

    calls = []

    class Controller:
        def limit(self, limits, user_api):
            calls.append((limits, user_api))
            return contextlib.nullcontext("limited")

    libs = [types.SimpleNamespace(num_threads=1), types.SimpleNamespace(num_threads=1)]
    monkeypatch.setattr(rge, "_blas_libraries", lambda: tuple(libs))
    monkeypatch.setattr(rge, "_blas_controller", lambda: Controller())
    with _single_thread_blas() as ctx:
        assert ctx is None and calls == []  # every library at one thread: nothing entered
    with _blas_threads(2) as ctx:
        assert ctx == "limited" and calls == [(2, "blas")]
    libs[1].num_threads = 4
    with _blas_threads(1) as ctx:
        assert ctx == "limited" and calls[-1] == (1, "blas")
    with _blas_threads(None) as ctx:
        assert ctx is None and len(calls) == 2


def test_blas_limit_on_the_real_libraries_restores_their_setting():
    libs = _blas_libraries()
    if not libs:
        pytest.skip("no BLAS library found by threadpoolctl")
    before = [lib.num_threads for lib in libs]
    with _blas_threads(1):
        assert all(lib.num_threads == 1 for lib in libs)
    assert [lib.num_threads for lib in libs] == before


def _counting_default_rng(monkeypatch):
    made = []
    real = np.random.default_rng

    def counting(*a, **k):
        made.append(a)
        return real(*a, **k)

    monkeypatch.setattr(np.random, "default_rng", counting)
    return made


def test_a_stateless_small_decode_makes_no_generator(monkeypatch):
    """The default rule's five private generators are made on first use: building it and decoding a small round
    (no sketch, no drift sample, exact duplicate distances) reads no OS entropy; a large round makes the ones it uses."""
    from flwr_byzantine.aggregators import build_for_federation

    made = _counting_default_rng(monkeypatch)
    rng = np.random.RandomState(0)
    G = rng.normal(size=(20, 650)).astype(np.float32)
    G[:4] = -5.0 * G[4:8]
    rule = build_for_federation("rge", 20, 0.2)
    res = rule.aggregate(G)
    assert set(range(4)).isdisjoint(res.kept.tolist()) and res.kept.size >= 12
    assert made == []
    big = rng.normal(size=(40, 50_000)).astype(np.float32)
    build_for_federation("rge", 40, 0.2).aggregate(big)
    assert len(made) >= 1  # the fast round's sketches draw their signs


def test_private_generator_is_the_seeds_stream_and_takes_a_generator():
    """Under a seed the generator made on first read is ``default_rng(seed)``'s stream, also in a copy taken before
    that read; assigning a Generator sets it; assigning a seed again drops the generator made from the last one."""
    import copy
    import pickle

    from flwr_byzantine.aggregators.rge import RGE

    a = RGE(seed=11)
    twin = copy.deepcopy(a)
    pickled = pickle.loads(pickle.dumps(a))
    want = np.random.default_rng(11).bytes(16)
    assert a._rng.bytes(16) == want and twin._rng.bytes(16) == want and pickled._rng.bytes(16) == want
    assert a._rng.bytes(16) != want  # the stream advances
    given = np.random.default_rng(3)
    a._rng = given
    assert a._rng is given
    a._rng = 11
    assert a._rng.bytes(16) == want
    assert RGE()._rng.bytes(16) != RGE()._rng.bytes(16)  # no seed: fresh entropy for each rule

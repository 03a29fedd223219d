"""randk compression with a server-broadcast coordinate set (Data & Diggavi, Algorithm 2).

Pure parts (procedure ``randk-v1``): unbiasedness of ``(d/k) select_K``, uniformity of
``K_t`` over k-subsets, reproducibility across processes, validation.  Strategy parts
(``RobustSGD(compression=RandK(...))`` with fake messages, no simulation): the update
touches only ``K_t``, hostile replies are erasures, bytes are accounted for.

The statistical tests use fixed seeds (deterministic) and thresholds derived from the
estimator's variance; each one is also run on a deliberately wrong variant to show
that it *can* fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy import stats

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.compression import (
    RANDK_PROCEDURE,
    RandK,
    coordinate_digest,
    draw_coordinates,
    randk_compress,
    scatter,
)
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid

# ---------------------------------------------------------------------------------------
# statistics helpers (each returns a statistic and its acceptance threshold)
# ---------------------------------------------------------------------------------------


def unbiasedness_max_z(sampler, v: np.ndarray, k: int, rounds: int, scale: float | None = None) -> tuple[float, float]:
    """Largest |z| of the per-coordinate mean of ``scale * scatter(v[K_t])`` against ``v``.

    For an unbiased randk estimator each draw has mean ``v_j`` and variance
    ``v_j^2 (d/k - 1)`` per coordinate, so the mean over T rounds has standard
    error ``|v_j| sqrt((d/k - 1)/T)``.  Threshold: Bonferroni over the d
    coordinates at overall level 1e-4 (two-sided normal quantile).
    """
    d = v.size
    scale = d / k if scale is None else scale
    total = np.zeros(d)
    for t in range(rounds):
        idx = sampler(d, k, t)
        total += scatter(scale * v[idx], idx, d)
    mean = total / rounds
    se = np.abs(v) * np.sqrt((d / k - 1) / rounds)
    z = (mean - v) / se
    threshold = float(stats.norm.isf(1e-4 / (2 * d)))
    return float(np.abs(z).max()), threshold


def inclusion_chi2(sampler, d: int, k: int, rounds: int) -> tuple[float, float, float]:
    """Chi-square statistic of the per-coordinate inclusion counts against ``T k / d``.

    Counts are ``Binomial(T, p)`` marginally (p = k/d) with a fixed total ``T k``,
    so ``sum (c_j - Tp)^2 / (T p (1 - p))`` is approximately chi2 with d - 1
    degrees of freedom.  Returns the statistic and the two-sided 1e-4 bounds
    (too-regular samplers, e.g. round robin, fail the lower one).
    """
    counts = np.zeros(d)
    for t in range(rounds):
        counts[sampler(d, k, t)] += 1
    p = k / d
    stat = float(((counts - rounds * p) ** 2).sum() / (rounds * p * (1 - p)))
    return stat, float(stats.chi2.ppf(0.5e-4, d - 1)), float(stats.chi2.isf(0.5e-4, d - 1))


def subset_chi2(sampler, d: int, k: int, rounds: int) -> tuple[float, float]:
    """Pearson chi-square of the frequencies of all C(d, k) subsets (uniform over k-subsets)."""
    subsets = {s: i for i, s in enumerate(combinations(range(d), k))}
    counts = np.zeros(len(subsets))
    for t in range(rounds):
        counts[subsets[tuple(int(i) for i in sampler(d, k, t))]] += 1
    expected = rounds / len(subsets)
    stat = float(((counts - expected) ** 2).sum() / expected)
    return stat, float(stats.chi2.isf(1e-4, len(subsets) - 1))


def randk_v1(seed: int = 7):
    return lambda d, k, t: draw_coordinates(d, k, seed, t)


def skewed_sampler(d: int, k: int, t: int) -> np.ndarray:
    """Biased: coordinate j is chosen with probability growing in j (weighted, no replacement)."""
    rng = np.random.default_rng([99, t])
    w = np.linspace(1.0, 1.5, d)
    return np.sort(rng.choice(d, size=k, replace=False, p=w / w.sum()))


def round_robin(d: int, k: int, t: int) -> np.ndarray:
    """Too regular: deterministic sliding window (marginals exact, not random)."""
    return np.sort((np.arange(k) + t * k) % d)


def adjacent_block(d: int, k: int, t: int) -> np.ndarray:
    """Uniform marginals but only d of the C(d, k) subsets (a random cyclic block)."""
    start = np.random.default_rng([5, t]).integers(d)
    return np.sort((start + np.arange(k)) % d)


# ---------------------------------------------------------------------------------------
# unbiasedness and uniformity
# ---------------------------------------------------------------------------------------


def test_unbiased_exactly_over_all_subsets():
    """Averaging (d/k) scatter(v[K]) over every k-subset gives v exactly."""
    d, k = 7, 3
    v = np.random.default_rng(0).normal(size=d)
    subs = list(combinations(range(d), k))
    avg = sum(scatter(randk_compress(v, np.array(s)), np.array(s), d) for s in subs) / len(subs)
    np.testing.assert_allclose(avg, v, rtol=1e-12, atol=1e-12)


def test_unbiased_statistically_and_test_has_power():
    d, k, T = 40, 4, 6000
    v = np.random.default_rng(1).normal(size=d) + np.sign(np.random.default_rng(2).normal(size=d))
    z, thr = unbiasedness_max_z(randk_v1(), v, k, T)
    assert z < thr, (z, thr)
    # the same test rejects a wrongly scaled estimator (d/(k+1)) and a biased coordinate sampler
    z_bad, _ = unbiasedness_max_z(randk_v1(), v, k, T, scale=d / (k + 1))
    assert z_bad > thr, (z_bad, thr)
    z_skew, _ = unbiasedness_max_z(skewed_sampler, v, k, T)
    assert z_skew > thr, (z_skew, thr)


def test_inclusion_frequencies_uniform_and_test_has_power():
    d, k, T = 50, 5, 4000
    stat, lo, hi = inclusion_chi2(randk_v1(), d, k, T)
    assert lo < stat < hi, (stat, lo, hi)
    stat, lo, hi = inclusion_chi2(skewed_sampler, d, k, T)
    assert stat > hi, "a sampler favouring high indices must fail"
    stat, lo, hi = inclusion_chi2(round_robin, d, k, T)
    assert stat < lo, "a deterministic round robin is too regular and must fail"


def test_uniform_over_all_k_subsets_and_test_has_power():
    d, k, T = 6, 3, 4000  # 20 subsets, 200 expected draws each
    stat, thr = subset_chi2(randk_v1(), d, k, T)
    assert stat < thr, (stat, thr)
    # uniform marginals but only 6 of the 20 subsets: the marginal test cannot see it, this one does
    stat_block, _ = subset_chi2(adjacent_block, d, k, T)
    assert stat_block > thr


# ---------------------------------------------------------------------------------------
# determinism, reproducibility across processes, validation
# ---------------------------------------------------------------------------------------


def test_deterministic_sorted_unique_in_range_and_distinct_across_rounds():
    d, k = 1000, 10
    sets = [draw_coordinates(d, k, 3, r) for r in range(60)]
    for r, s in enumerate(sets):
        assert s.dtype == np.int64 and s.shape == (k,)
        assert np.all(np.diff(s) > 0) and s[0] >= 0 and s[-1] < d
        np.testing.assert_array_equal(s, draw_coordinates(d, k, 3, r))
    assert len({tuple(s) for s in sets}) == len(sets)
    assert len({coordinate_digest(s) for s in sets}) == len(sets)
    assert not np.array_equal(draw_coordinates(d, k, 3, 1), draw_coordinates(d, k, 4, 1))
    np.testing.assert_array_equal(draw_coordinates(9, 9, 0, 0), np.arange(9))


_CHILD = """
import json, sys
from flwr_byzantine.compression import draw_coordinates, coordinate_digest
cases = json.loads(sys.argv[1])
print(json.dumps([[draw_coordinates(*c).tolist(), coordinate_digest(draw_coordinates(*c))] for c in cases]))
"""


def _draw_in_subprocess(cases: list[tuple[int, int, int, int]]) -> list:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                         check=True, timeout=120, env={"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


def test_seed_and_index_forms_agree_across_processes():
    """The K_t a client regenerates from the seed (another process) equals the index-form broadcast."""
    arrays = ArrayRecord({"w": Array(np.zeros((20, 30), np.float32)), "b": Array(np.zeros(30, np.float32))})
    d = 630
    grid = FakeGrid(range(1, 4), None)
    cases, sent_indices = [], []
    for rnd in (1, 2, 17):
        seed_msg = list(RobustSGD(compression=RandK(fraction=0.1, seed=11, form="seed"))
                        .configure_train(rnd, arrays, ConfigRecord(), grid))[0]
        idx_msg = list(RobustSGD(compression=RandK(fraction=0.1, seed=11, form="indices"))
                       .configure_train(rnd, arrays, ConfigRecord(), grid))[0]
        cfg = seed_msg.content["config"]
        assert cfg["randk-procedure"] == RANDK_PROCEDURE and cfg["randk-d"] == d and cfg["randk-k"] == 63
        assert "coordinates" not in seed_msg.content.array_records and "randk-seed" not in idx_msg.content["config"]
        cases.append((cfg["randk-d"], cfg["randk-k"], cfg["randk-seed"], rnd))
        indices = idx_msg.content["coordinates"]["indices"].numpy()
        assert indices.dtype == np.int64
        assert idx_msg.content["config"]["randk-digest"] == cfg["randk-digest"] == coordinate_digest(indices)
        sent_indices.append(indices)
    cases += [(10**6, 1000, 2**40 + 3, 5), (50, 50, 0, 0), (1, 1, 0, 0)]
    child = _draw_in_subprocess(cases)
    for (d_, k_, s_, r_), (idx, digest) in zip(cases, child):
        here = draw_coordinates(d_, k_, s_, r_)
        np.testing.assert_array_equal(np.asarray(idx, dtype=np.int64), here)
        assert digest == coordinate_digest(here)
    for sent, (idx, _) in zip(sent_indices, child):
        np.testing.assert_array_equal(sent, np.asarray(idx))


@pytest.mark.parametrize("d, k, seed, rnd", [(10, 11, 0, 0), (10, 0, 0, 0), (10, -1, 0, 0), (10, 2, -1, 0),
                                              (10, 2, 0, -1)])
def test_draw_coordinates_rejects_bad_arguments(d, k, seed, rnd):
    with pytest.raises(ValueError):
        draw_coordinates(d, k, seed, rnd)


@pytest.mark.parametrize("kwargs", [{}, {"k": 3, "fraction": 0.5}, {"k": 0}, {"k": -2}, {"fraction": 0.0},
                                    {"fraction": 1.5}, {"fraction": -0.1}, {"k": 3, "form": "bits"}])
def test_randk_config_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RandK(**kwargs)


def test_k_for():
    assert RandK(fraction=0.1).k_for(1000) == 100
    assert RandK(fraction=0.1).k_for(1001) == 101  # ceil
    assert RandK(fraction=1e-9).k_for(1000) == 1  # at least one coordinate
    assert RandK(fraction=1.0).k_for(37) == 37
    assert RandK(k=50).k_for(1000) == 50
    assert RandK(k=5000).k_for(1000) == 1000  # clipped to d
    np.testing.assert_array_equal(RandK(k=5, seed=2).coordinates(100, 3), draw_coordinates(100, 5, 2, 3))


def test_compress_and_scatter():
    v = np.arange(10, dtype=np.float64)
    idx = np.array([1, 4, 9])
    np.testing.assert_allclose(randk_compress(v, idx), (10 / 3) * v[idx])
    np.testing.assert_allclose(randk_compress(v[None, :], idx)[0], (10 / 3) * v[idx])  # batched rows
    out = scatter(np.array([1.0, 2.0, 3.0]), idx, 10)
    assert out.shape == (10,) and out[[1, 4, 9]].tolist() == [1.0, 2.0, 3.0] and out.sum() == 6.0


# ---------------------------------------------------------------------------------------
# RobustSGD with RandK (fake Grid, fake replies)
# ---------------------------------------------------------------------------------------

SHAPES = {"w": (6, 10), "b": (10,)}
D = 70


def model_record(x: np.ndarray | None = None) -> ArrayRecord:
    x = np.zeros(D) if x is None else x
    return ArrayRecord({"w": Array(x[:60].reshape(6, 10).astype(np.float32)),
                        "b": Array(x[60:].astype(np.float32))})


def flat(rec: ArrayRecord) -> np.ndarray:
    return ArrayLayout.of(rec).flatten(rec)


def client_coords(msg: Message) -> np.ndarray:
    """What an honest client does with the broadcast: indices if given, else regenerate from the seed."""
    cfg = msg.content["config"]
    assert cfg["randk-procedure"] == RANDK_PROCEDURE
    if "coordinates" in msg.content.array_records:
        return msg.content["coordinates"]["indices"].numpy().astype(np.int64)
    return draw_coordinates(int(cfg["randk-d"]), int(cfg["randk-k"]), int(cfg["randk-seed"]),
                            int(cfg["server-round"]))


def values_reply(msg: Message, values: np.ndarray, **metrics) -> Message:
    cfg = msg.content["config"]
    m = {"server-round": int(cfg["server-round"]), "randk-digest": int(cfg["randk-digest"]),
         "train-loss": 1.0, **metrics}
    return Message(RecordDict({"gradient": ArrayRecord({"values": Array(np.asarray(values, np.float32))}),
                               "metrics": MetricRecord(m)}), reply_to=msg)


def honest(target: float = 1.0, noise: float = 0.0, seed: int = 0):
    """Clients of f(x) = 0.5 ||x - target||^2 replying (d/k) g[K_t]."""
    rng = np.random.default_rng(seed)

    def handler(msg: Message) -> Message:
        x = flat(msg.content["arrays"])
        idx = client_coords(msg)
        g = x - target + noise * rng.normal(size=x.size)
        return values_reply(msg, randk_compress(g, idx))

    return handler


def one_round(strategy: RobustSGD, grid: FakeGrid, rnd: int = 1, x0: np.ndarray | None = None):
    msgs = list(strategy.configure_train(rnd, model_record(x0), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return msgs, replies, arrays, metrics


@pytest.mark.parametrize("form", ["seed", "indices"])
def test_update_touches_only_k_t(form):
    x0 = np.random.default_rng(4).normal(size=D).astype(np.float32).astype(np.float64)
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, compression=RandK(k=7, seed=3, form=form))
    msgs, _, arrays, metrics = one_round(strategy, FakeGrid(range(1, 9), honest()), rnd=4, x0=x0)
    K = draw_coordinates(D, 7, 3, 4)
    x1 = flat(arrays)
    outside = np.setdiff1d(np.arange(D), K)
    np.testing.assert_array_equal(x1[outside], x0[outside])
    # gradient x - 1 scaled by d/k, step 0.5: x1[K] = x0[K] - 0.5 * (d/k) (x0[K] - 1)
    np.testing.assert_allclose(x1[K], x0[K] - 0.5 * (D / 7) * (x0[K] - 1.0), rtol=1e-5, atol=1e-5)
    assert metrics["applied"] == 1 and metrics["num-valid"] == 8


def test_update_with_projection_is_projected_sparse_step():
    x0 = np.full(D, 0.1)
    strategy = RobustSGD(aggregator=Mean(), learning_rate=1.0, projection_radius=1.0,
                         compression=RandK(k=7, seed=0))
    _, _, arrays, _ = one_round(strategy, FakeGrid(range(1, 5), honest(target=50.0)), rnd=2, x0=x0)
    K = draw_coordinates(D, 7, 0, 2)
    step = np.zeros(D)
    step[K] = (D / 7) * (np.float32(0.1) - 50.0)
    y = x0.astype(np.float32).astype(np.float64) - step
    expected = y / np.linalg.norm(y)  # Proj onto the unit ball
    x1 = flat(arrays)
    assert np.linalg.norm(x1) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(x1, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("aggregator", [
    RGE(),
    Mean(),
], ids=["rge", "mean"])
def test_identical_replies_give_x_minus_lr_scatter(aggregator):
    vals = np.random.default_rng(5).normal(size=7).astype(np.float32)
    x0 = np.random.default_rng(6).normal(size=D).astype(np.float32).astype(np.float64)
    strategy = RobustSGD(aggregator=aggregator, learning_rate=0.3, compression=RandK(k=7, seed=1))
    _, _, arrays, metrics = one_round(strategy, FakeGrid(range(1, 7), lambda m: values_reply(m, vals)), 1, x0)
    K = draw_coordinates(D, 7, 1, 1)
    np.testing.assert_allclose(flat(arrays), x0 - 0.3 * scatter(vals.astype(np.float64), K, D), rtol=1e-6,
                               atol=1e-6)
    assert metrics["num-kept"] == 6 and metrics["num-filtered"] == 0


def _other_round_digest_reply(msg: Message) -> Message:
    cfg = msg.content["config"]
    other = draw_coordinates(D, int(cfg["randk-k"]), 12345, int(cfg["server-round"]))  # a K_t of another run
    return values_reply(msg, np.zeros(other.size), **{"randk-digest": coordinate_digest(other)})


BAD_REPLIES = [
    (lambda m: values_reply(m, np.zeros(8)), "shape"),  # k + 1 values
    (lambda m: values_reply(m, np.zeros(6)), "shape"),  # k - 1 values
    (lambda m: values_reply(m, np.r_[np.zeros(6), np.nan]), "non-finite"),
    (lambda m: values_reply(m, np.r_[np.zeros(6), np.inf]), "non-finite"),
    (_other_round_digest_reply, "another coordinate set"),
    (lambda m: Message(RecordDict({"gradient": ArrayRecord({"values": Array(np.zeros(7, np.float32))}),
                                   "metrics": MetricRecord({"server-round": int(m.content["config"]["server-round"])})}),
                       reply_to=m), "without the 'randk-digest'"),
    (lambda m: values_reply(m, np.zeros(7), **{"server-round": 2}), "reply for round 2"),
    (lambda m: Message(RecordDict({"gradient": ArrayRecord({"w": Array(np.zeros((6, 10), np.float32)),
                                                          "b": Array(np.zeros(10, np.float32))}),
                                   "metrics": MetricRecord({"server-round": 3})}), reply_to=m), "keys"),
]


@pytest.mark.parametrize("form", ["seed", "indices"])
@pytest.mark.parametrize("make_bad, reason", BAD_REPLIES, ids=["long", "short", "nan", "inf", "digest", "no-digest",
                                                               "round", "uncompressed"])
def test_bad_compressed_replies_are_erasures(make_bad, reason, form):
    good = honest(target=1.0)
    grid = FakeGrid(range(1, 7), lambda m: make_bad(m) if m.metadata.dst_node_id == 4 else good(m))
    strategy = RobustSGD(aggregator=Mean(), learning_rate=0.5, compression=RandK(k=7, seed=9, form=form))
    _, _, arrays, metrics = one_round(strategy, grid, rnd=3)
    assert reason in strategy.history[-1].rejected[4], strategy.history[-1].rejected
    assert metrics["num-rejected"] == 1 and metrics["num-valid"] == 5 and metrics["applied"] == 1
    K = draw_coordinates(D, 7, 9, 3)
    expected = np.zeros(D)
    expected[K] = -0.5 * (D / 7) * (0.0 - 1.0)  # the honest step from x0 = 0, untouched by node 4
    np.testing.assert_allclose(flat(arrays), expected, rtol=1e-6)


def test_several_bad_replies_at_once_round_goes_on():
    good = honest(target=1.0)
    bad = {1: BAD_REPLIES[0][0], 2: BAD_REPLIES[2][0], 3: _other_round_digest_reply, 5: BAD_REPLIES[6][0]}
    grid = FakeGrid(range(1, 10), lambda m: bad[m.metadata.dst_node_id](m) if m.metadata.dst_node_id in bad
                    else good(m))
    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.5, compression=RandK(k=7, seed=9))
    _, _, arrays, metrics = one_round(strategy, grid, rnd=3)
    rej = strategy.history[-1].rejected
    assert set(rej) == {1, 2, 3, 5} and "coordinate set" in rej[3] and "round" in rej[5]
    assert metrics["applied"] == 1 and metrics["num-valid"] == 5
    assert sorted(strategy.history[-1].accepted) == [4, 6, 7, 8, 9]


def _ones_handler(msg: Message) -> Message:
    return values_reply(msg, np.ones(client_coords(msg).size))


def test_bytes_reported_and_seed_form_sends_less_down():
    R, k = 8, 35
    reports = {}
    for form in ("seed", "indices"):
        strategy = RobustSGD(aggregator=Mean(), compression=RandK(k=k, seed=0, form=form))
        msgs, replies, _, metrics = one_round(strategy, FakeGrid(range(1, R + 1), honest()))
        reports[form] = metrics
        payload = sum(len(a.data) for r in replies for a in r.content["gradient"].values())
        assert metrics["bytes-up"] == payload
        assert R * 4 * k <= metrics["bytes-up"] <= R * (4 * k + 256)  # k float32 (+ npy header) per client
    plain = RobustSGD(aggregator=Mean())
    grid = FakeGrid(range(1, R + 1), lambda m: Message(RecordDict({
        "gradient": ArrayRecord({"w": Array(np.zeros((6, 10), np.float32)), "b": Array(np.zeros(10, np.float32))}),
        "metrics": MetricRecord({"server-round": 1})}), reply_to=m))
    msgs = list(plain.configure_train(1, model_record(), ConfigRecord(), grid))
    _, m_plain = plain.aggregate_train(1, grid.send_and_receive(msgs))
    assert m_plain["bytes-up"] >= R * 4 * D
    assert reports["seed"]["bytes-up"] < 0.75 * m_plain["bytes-up"]
    assert reports["seed"]["bytes-down"] == m_plain["bytes-down"]  # the seed form adds only config scalars
    assert reports["indices"]["bytes-down"] - reports["seed"]["bytes-down"] >= R * 8 * k  # k int64 per client


def test_seed_form_downlink_far_smaller_for_a_large_model():
    """k = d/2: the int64 index array is as big as the float32 model, the seed is one integer."""
    R, d = 4, 20_000
    arrays = ArrayRecord({"w": Array(np.zeros(d, np.float32))})
    down = {}
    for form in ("seed", "indices"):
        strategy = RobustSGD(aggregator=Mean(), compression=RandK(fraction=0.5, seed=1, form=form))
        grid = FakeGrid(range(1, R + 1), _ones_handler)
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        _, metrics = strategy.aggregate_train(1, grid.send_and_receive(msgs))
        assert metrics["applied"] == 1
        down[form] = metrics["bytes-down"]
    extra = {f: down[f] - R * 4 * d for f in down}
    assert 0 <= extra["seed"] < R * 256 and extra["indices"] >= R * 8 * (d // 2)
    assert down["indices"] > 1.9 * down["seed"]


def test_uplink_shrinks_by_k_over_d_for_a_large_model():
    R, d, k = 4, 20_000, 200
    arrays = ArrayRecord({"w": Array(np.zeros(d, np.float32))})

    strategy = RobustSGD(aggregator=Mean(), compression=RandK(fraction=k / d, seed=1))
    grid = FakeGrid(range(1, R + 1), _ones_handler)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    _, metrics = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    ratio = metrics["bytes-up"] / (R * 4 * d)
    assert ratio == pytest.approx(k / d, rel=0.2)


def test_start_converges_with_compression_under_attack():
    """Algorithm 2 through Strategy.start: RGE + randk converges with 3/12 scaled-negative attackers; mean does not."""
    good = honest(target=1.0, noise=0.05, seed=3)

    def handler(msg):
        if msg.metadata.dst_node_id in (2, 5, 11):
            idx = client_coords(msg)
            g = flat(msg.content["arrays"]) - 1.0
            return values_reply(msg, -10.0 * randk_compress(g, idx))
        return good(msg)

    for agg, ok in ((RGE(), True), (Mean(), False)):
        strategy = RobustSGD(aggregator=agg, learning_rate=0.1, compression=RandK(fraction=0.2, seed=5))
        result = strategy.start(grid=FakeGrid(range(1, 13), handler), initial_arrays=model_record(),
                                num_rounds=60)
        err = float(np.abs(flat(result.arrays) - 1.0).max())
        assert (err < 0.1) == ok, (agg, err)
        if ok:  # attackers filtered while they matter; no honest client is ever filtered
            assert all(sorted(r.filtered) == [2, 5, 11] for r in strategy.history[:20])
            assert all(set(r.filtered) <= {2, 5, 11} for r in strategy.history)


def test_filtered_node_ids_exact_for_uint64_ids():
    """Flower node ids are uint64; the round report must name the filtered nodes exactly."""
    ids = [2**63 - 1001, 2**63 + 7, 2**64 - 3, 12345, 2**62 + 1, 2**63 + 999, 77, 2**64 - 999]
    bad = {ids[1], ids[2]}
    good = honest(target=1.0, noise=0.05, seed=8)

    def handler(msg):
        if msg.metadata.dst_node_id in bad:
            idx = client_coords(msg)
            return values_reply(msg, -50.0 * np.ones(idx.size))
        return good(msg)

    strategy = RobustSGD(aggregator=RGE(), learning_rate=0.1, compression=RandK(k=7, seed=2))
    one_round(strategy, FakeGrid(ids, handler))
    report = strategy.history[-1]
    assert set(report.filtered) == bad
    assert set(report.kept) == set(ids) - bad

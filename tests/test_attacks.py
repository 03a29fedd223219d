"""Tests of flwr_byzantine.attacks: each attack's defining property, determinism, torch in/out.

Uses only ``Mean`` and test-local aggregators, so it does not depend on the other robust rules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_byzantine.aggregators import AggregationResult, Aggregator, Mean
from flwr_byzantine.attacks import (
    ALIE,
    ATTACKS,
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    ArbitraryVector,
    DataAttack,
    DefenceAware,
    Erasure,
    GaussianNoise,
    InnerProductManipulation,
    LabelFlip,
    Mimic,
    MobileAdversary,
    RandomLabels,
    ScaledNegative,
    SignFlip,
    UpdateAttack,
    alie_z_max,
    make_attack,
)


def honest_rows(n: int = 12, d: int = 30, seed: int = 0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)).astype(dtype)


# ----------------------------------------------------------------- test-local aggregators


class NormFilter(Aggregator):
    """Keeps the rows whose Euclidean norm is at most ``threshold``."""

    name = "norm-filter"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def _aggregate(self, updates):
        x = updates.detach().double().numpy() if isinstance(updates, torch.Tensor) else np.asarray(updates, float)
        kept = np.flatnonzero(np.linalg.norm(x, axis=1) <= self.threshold)
        w = np.zeros(x.shape[0])
        w[kept] = 1.0 / max(kept.size, 1)
        return AggregationResult(estimate=w @ x, kept=kept, weights=w)


class MedianDistanceFilter(Aggregator):
    """Keeps the rows within ``factor`` times the median distance of the coordinate-wise median."""

    name = "median-distance-filter"

    def __init__(self, factor: float = 1.5) -> None:
        self.factor = factor

    def _aggregate(self, updates):
        x = updates.detach().double().numpy() if isinstance(updates, torch.Tensor) else np.asarray(updates, float)
        dist = np.linalg.norm(x - np.median(x, axis=0), axis=1)
        kept = np.flatnonzero(dist <= self.factor * np.median(dist))
        w = np.zeros(x.shape[0])
        w[kept] = 1.0 / kept.size
        return AggregationResult(estimate=w @ x, kept=kept, weights=w)


def all_byzantine_kept(agg: Aggregator, honest: np.ndarray, byz: np.ndarray) -> bool:
    res = agg.aggregate(np.concatenate([honest, byz]))
    return set(range(len(honest), len(honest) + len(byz))) <= set(res.kept.tolist())


# ----------------------------------------------------------------- simple update attacks


def test_alie_is_mu_minus_z_sigma_and_stays_within_z_std():
    H = honest_rows()
    out = ALIE(z=1.5).craft(H, 3)
    mu, sigma = H.mean(axis=0), H.std(axis=0)
    assert out.shape == (3, H.shape[1])
    np.testing.assert_allclose(out, np.tile(mu - 1.5 * sigma, (3, 1)), rtol=1e-12, atol=1e-12)
    assert np.all(np.abs(out - mu) <= 1.5 * sigma + 1e-12)
    assert np.all(out < mu)  # shifted down in every (non-constant) coordinate


def test_alie_z_max_rule_matches_hand_computation_n20_f4():
    # n = 20 workers, f = 4 Byzantine: s = floor(20/2 + 1) - 4 = 7, z = Phi^{-1}((20 - 7)/20) = Phi^{-1}(0.65)
    z = alie_z_max(20, 4)
    assert z == pytest.approx(0.38532046640756773, abs=1e-9)
    assert 0.5 + 0.5 * math.erf(z / math.sqrt(2)) == pytest.approx(0.65, abs=1e-12)
    H = honest_rows(n=16)
    out = ALIE().craft(H, 4)  # n = 16 honest + 4 Byzantine
    np.testing.assert_allclose(out[0], H.mean(axis=0) - z * H.std(axis=0), rtol=1e-12, atol=1e-12)
    # client-side estimate: only 2 honest rows known, but 20 workers in total
    out2 = ALIE(num_workers=20).craft(H[:2], 4)
    np.testing.assert_allclose(out2[0], H[:2].mean(axis=0) - z * H[:2].std(axis=0), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 10), st.integers(1, 6), st.floats(0.0, 3.0), st.integers(0, 10_000))
def test_alie_property(n, f, z, seed):
    H = honest_rows(n=n, d=7, seed=seed)
    out = ALIE(z=z).craft(H, f)
    assert out.shape == (f, 7)
    assert np.all(np.abs(out - H.mean(axis=0)) <= z * H.std(axis=0) + 1e-9)


def test_ipm_has_negative_inner_product_with_honest_mean():
    H = honest_rows()
    out = InnerProductManipulation(epsilon=0.1).craft(H, 2)
    mu = H.mean(axis=0)
    np.testing.assert_allclose(out, np.tile(-0.1 * mu, (2, 1)), rtol=1e-12)
    assert float(out[0] @ mu) < 0
    with pytest.raises(ValueError):
        InnerProductManipulation(epsilon=0.0)


def test_sign_flip_and_scaled_negative():
    H = honest_rows()
    mu = H.mean(axis=0)
    np.testing.assert_allclose(SignFlip().craft(H, 2), np.tile(-mu, (2, 1)), rtol=1e-12)
    np.testing.assert_allclose(ScaledNegative(scale=7.0).craft(H, 3), np.tile(-7.0 * mu, (3, 1)), rtol=1e-12)
    with pytest.raises(ValueError):
        ScaledNegative(scale=-1.0)


def test_orthogonal_bias_sits_at_the_honest_distance_off_the_step_in_one_direction():
    from flwr_byzantine.attacks import OrthogonalBias

    H = honest_rows(n=12, d=400)
    mu = H.mean(axis=0)
    r = float(np.median(np.linalg.norm(H - mu, axis=1)))
    a = OrthogonalBias(c=1.5, seed=3)
    out = a.craft(H, 4, round=7)
    assert out.shape == (4, 400) and out.dtype == H.dtype
    off = out - mu
    np.testing.assert_allclose(np.linalg.norm(off, axis=1), 1.5 * r, rtol=0.01)  # the noise is 5 % of r, spread
    e = a.direction(mu)
    assert abs(float(e @ mu)) < 1e-9 * np.linalg.norm(mu) and abs(np.linalg.norm(e) - 1.0) < 1e-12
    np.testing.assert_allclose(off.mean(axis=0) @ e, 1.5 * r, rtol=0.01)
    # the same direction for every colluder and round; each row's own noise
    other = OrthogonalBias(c=1.5, seed=9).craft(H, 4, round=8)
    np.testing.assert_allclose((other - mu) @ e, off @ e, rtol=0.02)
    assert not np.allclose(other, out)
    # against tilts the direction toward -mu: 45 degrees for against = 1
    tilted = OrthogonalBias(against=1.0).direction(mu)
    assert float(tilted @ mu) / np.linalg.norm(mu) == pytest.approx(-1.0 / math.sqrt(2.0))
    assert float(tilted @ e) == pytest.approx(1.0 / math.sqrt(2.0))
    # float32 and torch in, the same type out
    o32 = OrthogonalBias().craft(H.astype(np.float32), 2)
    assert o32.dtype == np.float32
    ot = OrthogonalBias().craft(torch.as_tensor(H), 2)
    assert isinstance(ot, torch.Tensor) and ot.dtype == torch.float64
    np.testing.assert_allclose(ot.numpy(), OrthogonalBias().craft(H, 2))
    assert make_attack("orthogonal", c=2.0).c == 2.0
    for bad in ({"c": -1.0}, {"noise": float("nan")}, {"direction_seed": -1}, {"against": "x"}):
        with pytest.raises(ValueError):
            OrthogonalBias(**bad)


def test_mimic_copies_the_max_projection_honest_row():
    rng = np.random.default_rng(3)
    d = 40
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    t = rng.uniform(-1.0, 1.0, size=10)
    t[6] = -4.0  # the most extreme worker along the principal direction (on the negative side)
    H = 2.0 + t[:, None] * u[None, :] * 5.0 + 0.05 * rng.normal(size=(10, d))
    C = H - H.mean(axis=0)
    top = np.linalg.svd(C, full_matrices=False)[2][0]
    expected = int(np.argmax(np.abs(C @ top)))
    assert expected == 6
    attack = Mimic()
    out = attack.craft(H, 3)
    assert attack.last_target == 6
    assert np.array_equal(out, np.tile(H[6], (3, 1)))
    assert any(np.array_equal(out[0], row) for row in H)
    # a fixed target is honoured, and out of range is an error
    assert np.array_equal(Mimic(target=2).craft(H, 1)[0], H[2])
    with pytest.raises(ValueError):
        Mimic(target=10).craft(H, 1)


def test_erasure_returns_none():
    H = honest_rows()
    assert Erasure().craft(H, 3) is None
    assert Erasure().craft(torch.as_tensor(H), 3, round=5) is None
    assert make_attack("erasure", seed=1).craft(H, 1) is None


def test_gaussian_noise_variants_and_seeding():
    H = honest_rows(d=4000)
    a = GaussianNoise(std=2.0, mean_shift=1.0, seed=5)
    out = a.craft(H, 3, round=1)
    assert out.shape == (3, 4000)
    assert abs(out.mean() - 1.0) < 0.05 and abs(out.std() - 2.0) < 0.05
    assert not np.array_equal(out[0], out[1])  # one independent row per worker
    np.testing.assert_array_equal(out, GaussianNoise(std=2.0, mean_shift=1.0, seed=5).craft(H, 3, round=1))
    assert not np.array_equal(out, a.craft(H, 3, round=2))
    assert not np.array_equal(out, GaussianNoise(std=2.0, mean_shift=1.0, seed=6).craft(H, 3, round=1))
    rel = GaussianNoise(std=0.5, relative=True, seed=5).craft(H, 2)
    resid = rel - H.mean(axis=0)
    assert abs(resid.mean()) < 0.05 and abs(resid.std() - 0.5) < 0.02


def test_arbitrary_vector_is_fixed_and_float32_safe():
    H = honest_rows(dtype=np.float32)
    a = ArbitraryVector(scale=1e6)
    out = a.craft(H, 2, round=0)
    assert out.dtype == np.float32 and np.all(out == np.float32(1e6))
    np.testing.assert_array_equal(out, a.craft(H, 2, round=9))
    huge = ArbitraryVector(scale=1e300).craft(H, 1)
    assert np.isfinite(huge).all() and huge[0, 0] == np.finfo(np.float32).max
    vec = np.arange(H.shape[1], dtype=float)
    np.testing.assert_array_equal(ArbitraryVector(value=vec).craft(H, 1)[0], vec.astype(np.float32))
    with pytest.raises(ValueError):
        ArbitraryVector(value=np.ones(3)).craft(H, 1)


def test_scaled_negative_float32_is_finite():
    H = np.full((4, 5), 3e38, dtype=np.float32)
    out = ScaledNegative(scale=10.0).craft(H, 2)
    assert out.dtype == np.float32 and np.isfinite(out).all() and np.all(out < 0)


def test_zero_byzantine_and_bad_inputs():
    H = honest_rows()
    for name in UPDATE_ATTACKS:
        out = make_attack(name).craft(H, 0)
        assert out is None if name == "erasure" else out.shape == (0, H.shape[1])
    with pytest.raises(ValueError):
        SignFlip().craft(H, -1)
    with pytest.raises(ValueError):
        SignFlip().craft(np.zeros((2, 3, 4)), 1)
    with pytest.raises(ValueError):
        SignFlip().craft(H, 1, round=-1)


# ------------------------------------------------------------------- defence-aware attack


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_defence_aware_hides_inside_a_norm_threshold(direction):
    H = honest_rows(n=10, d=25, seed=1)
    agg = NormFilter(threshold=1.2 * np.linalg.norm(H, axis=1).max())
    attack = DefenceAware(agg, direction=direction, tol=1e-3)
    out = attack.craft(H, 3)
    gamma = attack.last_gamma
    assert gamma > 0
    assert all_byzantine_kept(agg, H, out)
    np.testing.assert_allclose(out[0], attack.malicious(H, gamma), rtol=1e-12)
    # maximal up to the tolerance: gamma * (1 + tol) is rejected
    assert not all_byzantine_kept(agg, H, np.tile(attack.malicious(H, gamma * (1 + 1e-3)), (3, 1)))
    assert attack.accepts(H, 3, gamma) and not attack.accepts(H, 3, gamma * (1 + 1e-3))


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_defence_aware_hides_inside_a_distance_threshold(direction):
    H = honest_rows(n=15, d=20, seed=2)
    agg = MedianDistanceFilter(factor=1.5)
    attack = DefenceAware(agg, direction=direction, tol=1e-3)
    out = attack.craft(H, 4)
    gamma = attack.last_gamma
    assert gamma > 0
    assert all_byzantine_kept(agg, H, out)
    assert not all_byzantine_kept(agg, H, np.tile(attack.malicious(H, gamma * (1 + 1e-3)), (4, 1)))


def test_defence_aware_direction_vectors():
    H = honest_rows()
    mu = H.mean(axis=0)
    for direction, p in [("unit", -mu / np.linalg.norm(mu)), ("std", -H.std(axis=0)), ("sign", -np.sign(mu))]:
        np.testing.assert_allclose(DefenceAware(direction=direction).malicious(H, 2.0), mu + 2.0 * p, rtol=1e-12)


@pytest.mark.parametrize("search", ["min-max", "min-sum"])
@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_defence_aware_min_max_min_sum_criteria(search, direction):
    H = honest_rows(n=9, d=15, seed=4)
    D = ((H[:, None, :] - H[None, :, :]) ** 2).sum(axis=2)

    def holds(m: np.ndarray) -> bool:
        dm = ((H - m) ** 2).sum(axis=1)
        if search == "min-max":
            return dm.max() <= D.max() * (1 + 1e-9)
        return dm.sum() <= D.sum(axis=1).max() * (1 + 1e-9)

    attack = DefenceAware(None, direction=direction, search=search)
    out = attack.craft(H, 2)
    gamma = attack.last_gamma
    assert gamma > 0 and holds(out[0])
    assert not holds(attack.malicious(H, gamma * (1 + 1e-6)))


def test_defence_aware_against_mean_is_capped_and_torch_works():
    H = honest_rows(n=6, d=10)
    attack = DefenceAware(Mean(), gamma_init=1.0, gamma_max=1e4)
    attack.craft(H, 2)
    assert attack.last_gamma == 1e4 and attack.last_info["capped"]
    agg = NormFilter(threshold=1.2 * np.linalg.norm(H, axis=1).max())
    Ht = torch.as_tensor(H, dtype=torch.float32)
    a_np, a_t = DefenceAware(agg), DefenceAware(agg)
    out_t = a_t.craft(Ht, 2)
    out_np = a_np.craft(H.astype(np.float32), 2)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5)
    assert all_byzantine_kept(agg, H, out_t.double().numpy())
    with pytest.raises(ValueError):
        DefenceAware(direction="up")
    with pytest.raises(ValueError):
        DefenceAware(search="max")


def test_defence_aware_by_registry_name():
    attack = make_attack("defence-aware", aggregator="mean", gamma_max=10.0, seed=1)
    assert isinstance(attack.aggregator, Mean)
    attack.craft(honest_rows(), 1)
    assert attack.last_gamma <= 10.0


# ------------------------------------------------------------------- data poisoning


def test_label_flip():
    y = np.array([0, 1, 2, 3, 4, 9, 5], dtype=np.int64)
    X = np.ones((7, 3))
    X2, y2 = LabelFlip().poison(X, y, 10)
    assert X2 is X
    np.testing.assert_array_equal(y2, 9 - y)
    np.testing.assert_array_equal(y, [0, 1, 2, 3, 4, 9, 5])  # input untouched
    np.testing.assert_array_equal(LabelFlip().poison(X, y2, 10)[1], y)  # an involution
    # partial flipping: exactly half the samples, seeded
    yy = np.zeros(100, dtype=np.int32)
    _, half = LabelFlip(fraction=0.5, seed=3).poison(None, yy, 4)
    assert half.dtype == np.int32 and int((half == 3).sum()) == 50 and set(np.unique(half)) == {0, 3}
    np.testing.assert_array_equal(half, LabelFlip(fraction=0.5, seed=3).poison(None, yy, 4)[1])
    yt = torch.tensor([0, 1, 2])
    out = LabelFlip().poison(None, yt, 3)[1]
    assert isinstance(out, torch.Tensor) and out.tolist() == [2, 1, 0]
    with pytest.raises(ValueError):
        LabelFlip().poison(None, np.array([0, 5]), 3)


def test_random_labels():
    y = np.zeros(3000, dtype=np.int64)
    _, y1 = RandomLabels(seed=1).poison(None, y, 5)
    _, y1b = RandomLabels(seed=1).poison(None, y, 5)
    _, y2 = RandomLabels(seed=2).poison(None, y, 5)
    np.testing.assert_array_equal(y1, y1b)
    assert not np.array_equal(y1, y2)
    assert y1.min() >= 0 and y1.max() <= 4
    counts = np.bincount(y1, minlength=5)
    assert np.all(np.abs(counts - 600) < 120)  # roughly uniform
    _, part = RandomLabels(fraction=0.1, seed=1).poison(None, y, 5)
    assert int((part != 0).sum()) <= 300 and int((part != 0).sum()) > 150


# ------------------------------------------------------------------- mobile adversary


def test_mobile_adversary_changes_sets_reproducibly_within_budget():
    nodes = [int(x) for x in np.random.default_rng(0).integers(1, 2**62, size=20)]
    adv = MobileAdversary(num_byzantine=4, seed=7)
    sets = [adv.corrupt_set(r, nodes) for r in range(1, 31)]
    assert all(len(s) == 4 and s == sorted(s) and set(s) <= set(nodes) for s in sets)
    assert len({tuple(s) for s in sets}) >= 25  # a different set (almost) every round
    assert sets == [MobileAdversary(num_byzantine=4, seed=7).corrupt_set(r, nodes) for r in range(1, 31)]
    assert sets[0] == adv.corrupt_set(1, list(reversed(nodes)))  # depends on the id set, not its order
    assert sets != [MobileAdversary(num_byzantine=4, seed=8).corrupt_set(r, nodes) for r in range(1, 31)]
    rot = MobileAdversary(num_byzantine=3, seed=7, mode="rotate")
    rsets = [rot.corrupt_set(r, nodes) for r in range(12)]
    assert all(a != b for a, b in zip(rsets, rsets[1:]))
    static = MobileAdversary(num_byzantine=4, seed=7, mode="static")
    assert static.static and len({tuple(static.corrupt_set(r, nodes)) for r in range(10)}) == 1


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 50), st.sampled_from(["random", "rotate", "static"]))
def test_mobile_adversary_never_exceeds_budget(n, frac, rnd, mode):
    nodes = list(range(100, 100 + n))
    s = MobileAdversary(fraction=frac, seed=1, mode=mode).corrupt_set(rnd, nodes)
    assert len(s) <= math.floor(frac * n + 1e-9) and len(set(s)) == len(s) and set(s) <= set(nodes)
    assert len(MobileAdversary(num_byzantine=5, mode=mode).corrupt_set(rnd, nodes)) == min(5, n)


def test_mobile_adversary_validation():
    with pytest.raises(ValueError):
        MobileAdversary()
    with pytest.raises(ValueError):
        MobileAdversary(num_byzantine=2, fraction=0.1)
    with pytest.raises(ValueError):
        MobileAdversary(fraction=1.5)
    with pytest.raises(ValueError):
        MobileAdversary(num_byzantine=1, mode="sticky")


# ----------------------------------------------------------- registry, determinism, torch


def test_registry_names_and_errors():
    assert set(ATTACKS) == {
        "gaussian", "sign-flip", "scaled-negative", "alie", "ipm", "mimic", "erasure", "arbitrary",
        "defence-aware", "label-flip", "random-labels", "sleeper", "memory-aware", "min-max", "min-sum", "orthogonal",
    }
    assert set(DATA_ATTACKS) == {"label-flip", "random-labels"}
    assert all(issubclass(ATTACKS[n], UpdateAttack) for n in UPDATE_ATTACKS)
    assert all(issubclass(ATTACKS[n], DataAttack) for n in DATA_ATTACKS)
    with pytest.raises(ValueError, match="sign-flip"):
        make_attack("nope")
    with pytest.raises(ValueError, match="valid"):
        make_attack("alie", sigma=1.0)
    with pytest.raises(ValueError):
        make_attack("gaussian", std=-1.0)
    with pytest.raises(ValueError):
        make_attack("sign-flip", scale=3.0)
    # the parameters the ClientApp maps ``attack-scale`` to
    for name, param in {"gaussian": "std", "scaled-negative": "scale", "ipm": "epsilon", "alie": "z",
                        "arbitrary": "scale"}.items():
        assert getattr(make_attack(name, seed=3, **{param: 10.0}), param) == 10.0


@pytest.mark.parametrize("name", [n for n in sorted(ATTACKS) if n not in ("erasure", "label-flip", "random-labels")])
def test_determinism_and_torch_in_torch_out(name):
    H = honest_rows(n=8, d=12, seed=5, dtype=np.float32)
    out1 = make_attack(name, seed=11).craft(H, 3, round=4)
    out2 = make_attack(name, seed=11).craft(H, 3, round=4)
    np.testing.assert_array_equal(out1, out2)
    assert out1.dtype == np.float32 and out1.shape == (3, 12) and np.isfinite(out1).all()
    for dtype in (torch.float32, torch.float64):
        Ht = torch.as_tensor(H).to(dtype)
        out_t = make_attack(name, seed=11).craft(Ht, 3, round=4)
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == dtype and out_t.device == Ht.device
        assert tuple(out_t.shape) == (3, 12)
        ref = make_attack(name, seed=11).craft(H.astype(np.float64) if dtype == torch.float64 else H, 3, round=4)
        np.testing.assert_allclose(out_t.double().numpy(), ref, rtol=2e-5, atol=1e-5)
    assert not np.shares_memory(out1, H)


def test_client_side_single_row():
    """The ClientApp crafts from its own gradient: ``craft(flat[None, :], 1, round)``."""
    flat = honest_rows(n=1, d=9, dtype=np.float32)[0]
    for name in UPDATE_ATTACKS:
        out = make_attack(name, seed=2).craft(flat[None, :], 1, 3)
        if name == "erasure":
            assert out is None
        else:
            assert out.shape == (1, 9) and np.isfinite(out).all()
    np.testing.assert_allclose(make_attack("scaled-negative", scale=10.0).craft(flat, 1)[0], -10.0 * flat, rtol=1e-6)

"""The AGR-agnostic min-max / min-sum attacks (Shejwalkar & Houmansadr 2021, Eqs. 5-6): registry presets of
the defence-aware attack without a target rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_byzantine.attacks import DefenceAware, MinMax, MinSum, make_attack


def _rows(n: int = 16, d: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + 1.0


def _pairwise(H: np.ndarray) -> np.ndarray:
    return np.linalg.norm(H[:, None, :] - H[None, :, :], axis=2)


def _direction(H: np.ndarray, kind: str) -> np.ndarray:
    mu = H.mean(0)
    return {"std": -H.std(0), "unit": -mu / np.linalg.norm(mu), "sign": -np.sign(mu)}[kind]


@pytest.mark.parametrize("kind", ["std", "unit", "sign"])
def test_min_max_sits_on_its_bound(kind):
    H = _rows()
    atk = make_attack("min-max", direction=kind)
    out = atk.craft(H, 3, 1)
    assert out.shape == (3, H.shape[1]) and np.array_equal(out[0], out[2])
    gamma = atk.find_gamma(H, 3)
    p = _direction(H, kind)
    assert gamma > 0 and np.allclose(out[0], H.mean(0) + gamma * p)
    bound = _pairwise(H).max()
    assert np.linalg.norm(out[0] - H, axis=1).max() <= bound * (1 + 1e-9)
    # the largest such gamma: a little more breaks Eq. 5
    assert np.linalg.norm(H.mean(0) + gamma * 1.001 * p - H, axis=1).max() > bound


@pytest.mark.parametrize("kind", ["std", "unit", "sign"])
def test_min_sum_sits_on_its_bound(kind):
    H = _rows(seed=1)
    atk = make_attack("min-sum", direction=kind)
    out = atk.craft(H, 2, 1)
    gamma = atk.find_gamma(H, 2)
    p = _direction(H, kind)
    bound = (_pairwise(H) ** 2).sum(axis=1).max()
    assert (np.linalg.norm(out[0] - H, axis=1) ** 2).sum() <= bound * (1 + 1e-9)
    assert (np.linalg.norm(H.mean(0) + gamma * 1.001 * p - H, axis=1) ** 2).sum() > bound
    # min-sum is the tighter condition on these rows
    assert 0 < gamma < make_attack("min-max", direction=kind).find_gamma(H, 2)


def test_presets_are_the_defence_aware_criteria():
    H = _rows(seed=2)
    for name, cls in (("min-max", MinMax), ("min-sum", MinSum)):
        atk = make_attack(name)
        assert isinstance(atk, cls) and atk.direction == "std" and atk.search == name and atk.aggregator is None
        ref = DefenceAware(direction="std", search=name)
        assert np.array_equal(atk.craft(H, 2, 0), ref.craft(H, 2, 0))


def test_degenerate_rows_send_the_mean():
    H = np.ones((5, 8))  # no spread: no direction, no room
    assert np.allclose(make_attack("min-max").craft(H, 2, 0), 1.0)
    assert np.allclose(make_attack("min-sum").craft(H[:1] * 3.0, 2, 0), 3.0)  # one known row


def test_dtype_framework_and_determinism():
    H = _rows().astype(np.float32)
    a = make_attack("min-max").craft(H, 2, 4)
    assert a.dtype == np.float32 and np.array_equal(a, make_attack("min-max").craft(H, 2, 4))
    t = make_attack("min-sum").craft(torch.as_tensor(H), 2, 4)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert np.allclose(t.numpy(), make_attack("min-sum").craft(H, 2, 4), atol=1e-5)


def test_refuses_a_target_rule_or_the_other_criterion():
    with pytest.raises(ValueError, match="defence-aware"):
        make_attack("min-max", aggregator="krum")
    with pytest.raises(ValueError, match="min-sum criterion"):
        MinSum(search="min-max-ish")
    with pytest.raises(ValueError):
        make_attack("min-sum", direction="nope")

"""Numerics of the aggregators at the edges of float32: huge finite inputs, complex input."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_byzantine._backend import LARGE_ENERGY, check_matrix
from flwr_byzantine.aggregators import build_for_federation, make_aggregator

RULES = ["mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geomed", "cclip", "rge",
         "bucketing:cclip", "nnm:mean"]


def huge(R: int = 11, d: int = 6, seed: int = 0) -> np.ndarray:
    """Finite float32 rows with entries between 1.5e38 and 3e38 in magnitude, mixed signs."""
    rng = np.random.default_rng(seed)
    G = (rng.uniform(0.5, 1.0, size=(R, d)) * 3e38).astype(np.float32)
    G[:, ::2] *= -1
    assert np.isfinite(G).all()
    return G


@pytest.mark.parametrize("name", RULES)
def test_finite_float32_near_the_maximum_gives_a_finite_estimate(name):
    G = huge()
    res = build_for_federation(name, G.shape[0], 0.2).aggregate(G)
    est = np.asarray(res.estimate)
    assert est.dtype == np.float32 and est.shape == (G.shape[1],)
    assert np.isfinite(est).all(), est
    # every rule here returns a point within the coordinate-wise range of the inputs (up to rounding)
    assert (est >= G.min(axis=0) * 1.0001).all() and (est <= G.max(axis=0) * 1.0001).all()


def test_mean_of_huge_rows_is_the_float64_mean():
    G = huge()
    est = make_aggregator("mean").aggregate(G).estimate
    np.testing.assert_allclose(est, G.astype(np.float64).mean(axis=0).astype(np.float32), rtol=1e-6)


def test_torch_huge_input_gives_a_finite_estimate_in_the_input_dtype():
    import torch
    G = torch.as_tensor(huge())
    for name in ("mean", "median", "rge"):
        est = build_for_federation(name, G.shape[0], 0.2).aggregate(G).estimate
        assert est.dtype == torch.float32 and bool(torch.isfinite(est).all()), name


def test_ordinary_inputs_keep_their_dtype_and_are_not_copied():
    G = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    assert check_matrix(G, widen_large=True) is G
    assert make_aggregator("median").aggregate(G).estimate.dtype == np.float32
    big = np.full((2, 2), np.sqrt(LARGE_ENERGY), np.float32)
    assert check_matrix(big, widen_large=True).dtype == np.float64
    assert check_matrix(big).dtype == np.float32


def test_complex_input_is_refused_not_cut_to_its_real_part():
    G = np.ones((4, 3), np.complex128) * (1 + 2j)
    with pytest.raises(ValueError, match="complex"):
        make_aggregator("mean").aggregate(G)
    import torch
    with pytest.raises(ValueError, match="complex"):
        make_aggregator("mean").aggregate(torch.as_tensor(G))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_still_refused(bad):
    G = huge()
    G[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_aggregator("mean").aggregate(G)

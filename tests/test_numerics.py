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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["krum", "multi-krum"])
def test_krum_refuses_non_finite_input_without_a_screening_pass_of_its_own(bad, name):
    """Krum screens its input on the Gram matrix's trace (no pass of check_matrix): a NaN or Inf entry is refused as
    before, for numpy and torch rows, also among finite rows whose squares overflow float32."""
    import torch

    for G in (huge(), np.random.default_rng(2).normal(size=(11, 6)).astype(np.float32)):
        G[3, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            make_aggregator(name, num_byzantine=2).aggregate(G)
        with pytest.raises(ValueError, match="NaN or Inf"):
            make_aggregator(name, num_byzantine=2).aggregate(torch.as_tensor(G))


def test_krum_skips_the_screening_pass_and_picks_the_same_row(monkeypatch):
    """Krum's estimate is one of its input rows, unwidened, and the row that the scores of a float64 copy pick.  On
    ordinary rows no screening reduction runs (check_matrix checks the shape and dtype only); on rows near float32's
    maximum the Gram matrix's large trace hands them to check_matrix, which widens them."""
    from flwr_byzantine.aggregators import base, krum

    calls = []
    real = base.check_matrix

    def spy(updates, **kw):
        calls.append(kw.get("screen", True))
        return real(updates, **kw)

    monkeypatch.setattr(base, "check_matrix", spy)
    monkeypatch.setattr(krum, "check_matrix", spy)
    for G, screens in ((np.random.default_rng(3).normal(size=(11, 6)).astype(np.float32), [False]),
                       (huge(), [False, True])):
        calls.clear()
        res = make_aggregator("krum", num_byzantine=2).aggregate(G)
        est = np.asarray(res.estimate)
        assert est.dtype == np.float32
        assert np.array_equal(est, G[int(res.kept[0])])
        assert calls == screens
        ref = make_aggregator("krum", num_byzantine=2).aggregate(G.astype(np.float64))
        assert int(ref.kept[0]) == int(res.kept[0])

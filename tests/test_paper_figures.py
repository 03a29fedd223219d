"""benchmarks.paper_figures: the fits, the model constants, the SGD loop's node ids, and a --quick smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import paper_figures as pf
from benchmarks.randk import LinRegFederation, attack_rows, run_sgd
from flwr_byzantine.aggregators import AggregationResult, Mean


def test_batch_shape_fit_recovers_known_constants():
    s2b = [10.0 / b for b in (1, 4, 16, 64, 256)] * 2
    k2 = [0.01] * 5 + [1.0] * 5
    floor = [np.sqrt(2.0 * a + 3.0 * c) for a, c in zip(s2b, k2)]
    fit = pf.fit_batch_shape(s2b, k2, floor)
    assert fit["A"] == pytest.approx(2.0, rel=1e-6) and fit["B"] == pytest.approx(3.0, rel=1e-6)
    assert fit["max_rel_dev"] < 1e-6
    bent = list(floor)
    bent[0] *= 2.0  # a point off the shape shows up in the deviation
    assert pf.fit_batch_shape(s2b, k2, bent)["max_rel_dev"] > 0.1


def test_line_through_origin_fit():
    fit = pf.fit_line_through_origin([0.5, 1.0, 2.0, 4.0], [1.0, 2.0, 4.0, 8.0])
    assert fit["C"] == pytest.approx(2.0) and fit["loglog_slope"] == pytest.approx(1.0)
    flat = pf.fit_line_through_origin([0.5, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    assert flat["loglog_slope"] == pytest.approx(0.0, abs=1e-12) and flat["max_rel_dev"] > 1.0


def test_empirical_optimum_and_constants():
    synth = pf.make_model(5, 4, 50, kappa_mean=0.0, noise=0.0, seed=1)
    x = pf.empirical_optimum(synth)
    np.testing.assert_allclose(x, synth.x_star, atol=1e-5)  # noiseless, identical workers: exact fit
    c = pf.constants_at(synth, x)
    assert c["kappa"] < 1e-4 and c["sigma"] < 1e-4
    het = pf.make_model(5, 4, 50, kappa_mean=1.0, noise=0.5, seed=1)
    xh = pf.empirical_optimum(het)
    grad = np.mean([het.empirical_gradient(xh, r) for r in range(4)], axis=0)
    assert np.linalg.norm(grad) < 1e-4  # x* minimises F over all workers
    ch = pf.constants_at(het, xh)
    assert ch["kappa"] == pytest.approx(het.empirical_kappa(xh), rel=1e-4)
    assert ch["kappa"] > 0.5 and ch["sigma"] > 0.5


class _Recorder(Mean):
    def __init__(self) -> None:
        self.ids: list = []
        self.steps: list = []

    def aggregate(self, updates, client_ids=None) -> AggregationResult:
        self.ids.append(None if client_ids is None else list(client_ids))
        return super().aggregate(updates)

    def observe_step(self, delta) -> None:
        self.steps.append(np.asarray(delta))


@pytest.mark.parametrize("k", [6, 3])
def test_run_sgd_passes_node_ids_only_uncompressed(k):
    synth = pf.make_model(6, 5, 20, kappa_mean=0.1, noise=0.1, seed=0)
    fed = LinRegFederation(synth, [1, 2, 3, 4])
    agg = _Recorder()
    run_sgd(fed, synth.x_star, k=k, rounds=3, lr=0.1, batch=4, num_byzantine=1, attack="alie-zmax", seed=0,
            aggregator=agg)
    if k == 6:
        assert agg.ids == [[0, 1, 2, 3, 4]] * 3 and len(agg.steps) == 3
    else:
        assert agg.ids == [None] * 3 and not agg.steps


def test_randk_sign_flip_zeroes_the_mean_and_zmax_alie_is_small():
    honest = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32) + 1.0
    byz = attack_rows("sign-flip", honest, 4)
    np.testing.assert_allclose(np.concatenate([byz, honest]).mean(axis=0), 0.0, atol=1e-5)
    shift = honest.mean(axis=0) - attack_rows("alie-zmax", honest, 4)[0]
    z = shift / honest.std(axis=0, ddof=0)
    assert np.all((z > 0.2) & (z < 0.6))  # z_max for 4 of 20 is about 0.39, not the 1.5 of "alie"


def test_quick_run_writes_every_figure(tmp_path):
    payload = pf.main(["--quick", "--quiet", "--out", str(tmp_path)])
    res = payload["results"]
    assert set(res) == set(pf.FIGURES)
    for name in pf.FIGURES:
        assert (tmp_path / f"paper_quick_{name}.png").stat().st_size > 1000
    data = json.loads((tmp_path / "paper_figures_quick.json").read_text())
    assert data["command"].startswith("python -m benchmarks.paper_figures --quick")
    assert np.all(np.isfinite(res["batch"]["fits"]["oracle"]["floors"]))
    # the oracle (mean of the honest rows, no attack) floor falls with the mini-batch size
    floors = res["batch"]["fits"]["oracle"]["floors"]
    assert floors[0] > floors[2]
    md = (tmp_path / "paper_figures_quick.md").read_text()
    assert "Theorem 1" in md and "Theorem 5" in md and "Section 4" in md

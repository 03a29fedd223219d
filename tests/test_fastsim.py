"""The benchmark simulator (benchmarks/fastsim.py) computes what the Flower App computes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from benchmarks.fastsim import NumpyModel, SimConfig, simulate
from flwr_byzantine.aggregators import build_for_federation
from flwr_byzantine.models import build_model, loss_fn_for


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_numpy_gradients_equal_torch_autograd(name):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 64))
    y = rng.integers(0, 10, size=9)
    model = NumpyModel(name, 64, 10, seed=3)
    x = model.x0 + 0.05 * rng.normal(size=model.dim)
    g, loss = model.grad(x, X, y)
    tm = build_model(name, 64, 10, 3).double()
    start = 0
    for p in tm.parameters():
        p.data = torch.as_tensor(x[start:start + p.numel()].reshape(p.shape))
        start += p.numel()
    out = loss_fn_for("classification")(tm(torch.as_tensor(X)), torch.as_tensor(y))
    out.backward()
    g_torch = np.concatenate([p.grad.numpy().ravel() for p in tm.parameters()])
    np.testing.assert_allclose(g, g_torch, rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(float(out), rel=1e-10)
    Xb = rng.normal(size=(3, 9, 64))
    yb = rng.integers(0, 10, size=(3, 9))
    np.testing.assert_allclose(model.grad_batched(x, Xb, yb),
                               np.stack([model.grad(x, Xb[i], yb[i])[0] for i in range(3)]), atol=1e-12)


@pytest.mark.parametrize("attack", ["sign-flip", "label-flip", "erasure"])
def test_simulator_matches_the_flower_app_in_process(tmp_path, attack):
    """Same data, mini-batches, attacks and rule: the final accuracy of the in-process Flower run."""
    from benchmarks.inprocess import run_app

    logging.disable(logging.WARNING)
    try:
        overrides = {"num-server-rounds": 6, "num-malicious": 2, "attack": attack, "dirichlet-alpha": 0.5,
                     "aggregator": "mean", "output-dir": str(tmp_path), "seed": 5, "learning-rate": 0.5}
        flower = run_app(overrides, 8)
        cfg = SimConfig(alpha=0.5, num_nodes=8, num_malicious=2, attack=attack, rounds=6, learning_rate=0.5,
                        seed=5, eps_tilde=0.25)
        sim = simulate(cfg, build_for_federation("mean", 8, 0.25), "mean")
    finally:
        logging.disable(logging.NOTSET)
    assert sim.final_accuracy == pytest.approx(flower["final_accuracy"], abs=1.5 / 360)
    assert sim.info["malicious_partitions"] == flower["malicious_partitions"]


def test_simulator_reports_exclusions_by_node():
    cfg = SimConfig(alpha=1.0, num_nodes=10, num_malicious=2, attack="scaled-negative", rounds=4, seed=1,
                    eps_tilde=0.2)
    res = simulate(cfg, build_for_federation("rge", 10, 0.2), "rge")
    assert res.malicious_excluded_rate == 1.0  # -10x rows are removed every round
    assert res.honest_excluded_rate <= 0.1
    assert res.eval_rounds[-1] == 4


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_grad_batched_per_row_models_and_masked_batches(name):
    """One model per batch and padded batches of unequal size: row j is grad(W[j], its real examples)."""
    rng = np.random.default_rng(1)
    model = NumpyModel(name, 64, 10, seed=2)
    W = model.x0 + 0.05 * rng.normal(size=(3, model.dim))
    Xb = rng.normal(size=(3, 7, 64))
    yb = rng.integers(0, 10, size=(3, 7))
    sizes = [7, 4, 1]
    mask = (np.arange(7)[None, :] < np.array(sizes)[:, None]).astype(float)
    want = np.stack([model.grad(W[j], Xb[j, :sizes[j]], yb[j, :sizes[j]])[0] for j in range(3)])
    np.testing.assert_allclose(model.grad_batched(W, Xb, yb, mask), want, atol=1e-12)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_local_updates_equal_train_locally(name):
    """The vectorised local trainings are the App's train_locally (float32 there, float64 here)."""
    from benchmarks.fastsim import local_updates
    from flwr_byzantine.local_training import model_update, train_locally

    rng = np.random.default_rng(4)
    model = NumpyModel(name, 64, 10, seed=1)
    data = [(rng.normal(size=(n, 64)), rng.integers(0, 10, size=n)) for n in (50, 9, 23)]
    seeds = [[3, 0, 1], [3, 1, 1], [3, 2, 1, 7, 0]]
    kw = dict(local_epochs=2, local_steps=0, client_lr=0.1, batch_size=16)
    U = local_updates(model, model.x0, data, seeds, **kw)
    params = dict(zip(model.keys, model.unflatten(model.x0.astype(np.float32))))
    for j, ((X, y), sd) in enumerate(zip(data, seeds)):
        res = train_locally(name, params, X, y, seed=sd, **kw)
        u = model_update(params, res.weights)
        want = np.concatenate([u[k].ravel() for k in model.keys])
        np.testing.assert_allclose(U[j], want, rtol=1e-4, atol=1e-6)
    assert local_updates(model, model.x0, data[:1], seeds[:1], **{**kw, "local_epochs": 0, "local_steps": 1}).shape \
        == (1, model.dim)


@pytest.mark.parametrize("attack,eps", [("sign-flip", 0.25), ("label-flip", 0.25), ("erasure", 0.25),
                                        ("defence-aware", 0.25), ("defence-aware", 0.1)])
def test_local_mode_matches_the_flower_app_in_process(tmp_path, attack, eps):
    """client-mode='local' (ClientApp local training + RobustFedAvg): the simulator's final accuracy.

    Defence-aware at eps-tilde 0.1: the attackers simulate 1 Byzantine row of 2 and find updates of
    norm ~1e11, which the strategy's magnitude screen rejects (the simulator must screen too).
    """
    from benchmarks.inprocess import run_app
    from flwr_byzantine.config import RunConfig
    from server_app.server_app import build_aggregator

    logging.disable(logging.WARNING)
    try:
        overrides = {"client-mode": "local", "num-server-rounds": 6, "num-malicious": 2, "attack": attack,
                     "dirichlet-alpha": 0.5, "aggregator": "rge", "output-dir": str(tmp_path), "seed": 5,
                     "eps-tilde": eps, "local-epochs": 1, "client-lr": 0.2, "server-lr": 1.0}
        flower = run_app(overrides, 8)
        cfg = SimConfig(alpha=0.5, num_nodes=8, num_malicious=2, attack=attack, rounds=6, learning_rate=1.0,
                        seed=5, eps_tilde=eps, mode="local", local_epochs=1, client_lr=0.2)
        sim = simulate(cfg, build_aggregator(RunConfig.from_mapping(overrides), 8), "rge")
    finally:
        logging.disable(logging.NOTSET)
    assert sim.final_accuracy == pytest.approx(flower["final_accuracy"], abs=1.5 / 360)
    assert sim.info["malicious_partitions"] == flower["malicious_partitions"]


def test_screen_magnitudes_rejects_what_the_strategies_reject():
    from benchmarks.fastsim import screen_magnitudes

    G = np.ones((5, 3))
    G[1] *= 2e6  # 2e6 x the median norm
    G[2, 0] = np.nan
    G[3] *= 9e5  # under the 1e6 ratio
    assert screen_magnitudes(G).tolist() == [True, False, False, True, True]
    assert screen_magnitudes(G[:2]).tolist() == [True, True]  # fewer than 3 rows: no ratio guard

"""Local training (FedAvg's client step) in numpy: batches, SGD against torch, the update algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_byzantine.data import load_partition
from flwr_byzantine.local_training import apply_update, batch_schedule, model_update, train_locally
from flwr_byzantine.models import build_model, loss_fn_for


def test_epochs_visit_every_example_once_per_epoch():
    batches = batch_schedule(70, 32, local_epochs=2, local_steps=0, seed=[0, 3, 1])
    assert [len(b) for b in batches] == [32, 32, 6] * 2
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(70))
    assert not np.array_equal(batches[0], batches[3])  # a fresh permutation per epoch


def test_local_steps_run_through_epochs():
    batches = batch_schedule(10, 4, local_epochs=1, local_steps=5, seed=1)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    assert [b.tolist() for b in batches] == [b.tolist() for b in batch_schedule(10, 4, 0, 5, 1)]


@pytest.mark.parametrize("kw", [{"local_epochs": 0, "local_steps": 0}, {"batch_size": 0}, {"local_steps": -1}])
def test_bad_schedules_are_refused(kw):
    args = {"batch_size": 8, "local_epochs": 1, "local_steps": 0, **kw}
    with pytest.raises(ValueError):
        batch_schedule(10, args["batch_size"], args["local_epochs"], args["local_steps"], 0)


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_train_locally_equals_torch_sgd(model):
    X, y = load_partition("digits", 2, 10, 1.0, 0)
    net = build_model(model, 64, 10, seed=0)
    params = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    before = {k: v.copy() for k, v in params.items()}
    res = train_locally(model, params, X, y, local_epochs=2, client_lr=0.1, batch_size=16, seed=[0, 2, 5])
    # the same steps with torch autograd
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = loss_fn_for("classification")
    for idx in batch_schedule(len(y), 16, 2, 0, [0, 2, 5]):
        opt.zero_grad()
        loss_fn(net(torch.as_tensor(X[idx])), torch.as_tensor(y[idx])).backward()
        opt.step()
    for k, v in net.state_dict().items():
        np.testing.assert_allclose(res.weights[k], v.numpy(), rtol=1e-4, atol=1e-5)
        assert res.weights[k].dtype == np.float32
        np.testing.assert_array_equal(params[k], before[k])  # x_t untouched
    assert res.num_examples == len(y) and res.steps == 2 * int(np.ceil(len(y) / 16)) and res.loss > 0
    again = train_locally(model, params, X, y, local_epochs=2, client_lr=0.1, batch_size=16, seed=[0, 2, 5])
    assert all(np.array_equal(again.weights[k], res.weights[k]) for k in params)


def test_update_algebra():
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    w = {k: (v + 0.5).astype(np.float32) for k, v in x.items()}
    u = model_update(x, w)
    np.testing.assert_allclose(u["a"], -0.5, rtol=1e-6)
    back = apply_update(x, u)
    for k in x:
        assert back[k].dtype == np.float32
        np.testing.assert_allclose(back[k], w[k], rtol=1e-6)


def test_local_mode_attacker_reverses_its_estimated_update():
    """client-mode='local': a scaled-negative attacker replies x_t - u with u = -10 mean_j (x_t - w_j)."""
    from clients.client_app import local_training_weights
    from flwr_byzantine.attacks import ScaledNegative, make_attack
    from flwr_byzantine.config import RunConfig
    from flwr_byzantine.seeds import ESTIMATE_BATCHES

    cfg = RunConfig.from_mapping({"client-mode": "local", "local-epochs": 1, "client-lr": 0.2, "batch-size": 16})
    X, y = load_partition("digits", 1, 10, 1.0, 0)
    net = build_model("logreg", 64, 10, seed=0)
    x = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    honest, _ = local_training_weights(cfg, x, X, y, partition_id=1, server_round=3)
    ref = train_locally("logreg", x, X, y, local_epochs=1, client_lr=0.2, batch_size=16, seed=[0, 1, 3])
    assert all(np.array_equal(honest[k], ref.weights[k]) for k in x)

    bad, _ = local_training_weights(cfg, x, X, y, 1, 3, ScaledNegative(scale=10.0, seed=0), num_byzantine=2,
                                    row=1, num_estimates=3)
    updates = [model_update(x, train_locally("logreg", x, X, y, local_epochs=1, client_lr=0.2, batch_size=16,
                                             seed=[0, 1, 3, ESTIMATE_BATCHES, j]).weights) for j in range(3)]
    for k in x:
        expected = x[k] + 10.0 * np.mean([u[k] for u in updates], axis=0)
        np.testing.assert_allclose(bad[k], expected, rtol=1e-5, atol=1e-6)
    erased, _ = local_training_weights(cfg, x, X, y, 1, 3, make_attack("erasure"), 1, 0, num_estimates=2)
    assert erased is None

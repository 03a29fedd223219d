"""The numpy models of the lean ClientApp against torch autograd, and the ClientApp's process without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_byzantine import npmodels
from flwr_byzantine.models import build_model, loss_fn_for

ROOT = Path(__file__).resolve().parents[1]
CASES = [("logreg", 12, 5), ("mlp", 12, 5), ("linear", 12, 1), ("logreg", 64, 10)]


def _perturbed(name: str, d: int, c: int, seed: int = 3) -> torch.nn.Module:
    model = build_model(name, d, c, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the initialisation so every ReLU / class is exercised
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def _data(d: int, c: int, n: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int64) if c > 1 else rng.normal(size=n).astype(np.float32)
    return X, y


def _params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,d,c", CASES)
def test_gradient_and_loss_match_torch_autograd(name, d, c):
    model = _perturbed(name, d, c)
    X, y = _data(d, c)
    task = "regression" if c == 1 else "classification"
    loss_t = loss_fn_for(task)(model(torch.as_tensor(X)), torch.as_tensor(y))
    grads_t = torch.autograd.grad(loss_t, list(model.parameters()))
    names = [k for k, _ in model.named_parameters()]

    params = npmodels.load_params(name, d, c, _params(model))
    grads, loss = npmodels.loss_and_gradient(name, params, X, y)

    assert list(grads) == names  # the torch state-dict order, so the flat vector layout is the same
    assert loss == pytest.approx(float(loss_t), rel=1e-5, abs=1e-6)
    for key, g_t in zip(names, grads_t):
        assert grads[key].dtype == np.float32 and grads[key].shape == tuple(g_t.shape)
        np.testing.assert_allclose(grads[key], g_t.numpy(), rtol=1e-4, atol=1e-6)
    flat = np.concatenate([grads[k].ravel() for k in names])
    flat_t = torch.cat([g.reshape(-1) for g in grads_t]).numpy()
    assert np.linalg.norm(flat - flat_t) <= 1e-5 * max(np.linalg.norm(flat_t), 1.0)


@pytest.mark.parametrize("name,d,c", CASES)
def test_evaluate_matches_torch(name, d, c):
    model = _perturbed(name, d, c, seed=7)
    X, y = _data(d, c, n=60, seed=2)
    params = npmodels.load_params(name, d, c, _params(model))
    with torch.no_grad():
        out = model(torch.as_tensor(X))
        loss_t = float(loss_fn_for("regression" if c == 1 else "classification")(out, torch.as_tensor(y)))
    res = npmodels.evaluate(name, params, X, y)
    np.testing.assert_allclose(npmodels.forward(name, params, X), out.numpy(), rtol=1e-5, atol=1e-5)
    assert res["loss"] == pytest.approx(loss_t, rel=1e-5)
    if c > 1:
        assert res["accuracy"] == float((out.argmax(dim=1).numpy() == y).mean())
    else:
        assert "accuracy" not in res


def test_mlp_relu_gradient_is_zero_at_zero_like_torch():
    d, c = 3, 2
    params = {k: np.zeros(s, np.float32) for k, s in npmodels.param_shapes("mlp", d, c).items()}
    params["fc2.weight"][:] = 1.0
    X, y = np.zeros((4, d), np.float32), np.array([0, 1, 0, 1])
    grads, _ = npmodels.loss_and_gradient("mlp", params, X, y)
    assert not grads["fc1.bias"].any()  # pre-activation exactly 0: torch's relu' is 0 there


def test_load_params_is_strict():
    good = {k: np.zeros(s, np.float32) for k, s in npmodels.param_shapes("logreg", 4, 3).items()}
    assert npmodels.load_params("logreg", 4, 3, good)["linear.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="keys"):
        npmodels.load_params("logreg", 4, 3, {**good, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="keys"):
        npmodels.load_params("logreg", 4, 3, {"linear.weight": good["linear.weight"]})
    with pytest.raises(ValueError, match="shape"):
        npmodels.load_params("logreg", 4, 3, {**good, "linear.bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="dtype"):
        npmodels.load_params("logreg", 4, 3, {**good, "linear.bias": np.array(["a", "b", "c"])})
    with pytest.raises(ValueError, match="unknown model"):
        npmodels.param_shapes("cnn", 4, 3)


def test_param_shapes_are_the_torch_state_dict():
    for name, d, c in CASES:
        sd = build_model(name, d, c, seed=0).state_dict()
        assert npmodels.param_shapes(name, d, c) == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**31 + 5, 2**32 + 3])
@pytest.mark.parametrize("name,d,c", CASES + [("mlp", 784, 10), ("logreg", 3, 2), ("linear", 1000, 1)])
def test_init_params_are_torchs_default_initialisation_bit_for_bit(name, d, c, seed):
    """``x_0`` without torch equals ``torch.manual_seed(seed)`` + the torch module's own init."""
    from flwr_byzantine.models import MLP, LinearRegression, LogisticRegression

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = {"logreg": lambda: LogisticRegression(d, c), "mlp": lambda: MLP(d, c),
                  "linear": lambda: LinearRegression(d)}[name]()
    ref = _params(module)
    got = npmodels.init_params(name, d, c, seed)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    built = _params(build_model(name, d, c, seed))  # the torch model starts from the same x_0
    for k in ref:
        np.testing.assert_array_equal(built[k], ref[k], err_msg=k)
    other = npmodels.init_params(name, d, c, seed + 1)
    assert any(not np.array_equal(other[k], got[k]) for k in got)


_NO_TORCH_SCRIPT = r"""
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
import clients.client_app as ca
from flwr.supercore.task_identity import TaskIdentity
from flwr_byzantine import npmodels

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
shapes = npmodels.param_shapes("logreg", 64, 10)
rng = np.random.default_rng(0)
arrays = ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()})
out = {}
for label, node in (("honest", {}), ("attacker", {"malicious": "true", "attack": "alie"})):
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, "batch-size": 16})}),
                  dst_node_id=5, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 4, **node},
                  state=RecordDict(), run_config={"model": "logreg", "dataset": "digits", "num-malicious": 1})
    reply = ca.app(msg, ctx)
    assert not reply.has_error(), reply.error
    out[label] = {"gradient": "gradient" in reply.content.array_records, "torch": "torch" in sys.modules}
msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2})}),
              dst_node_id=5, message_type="evaluate")
reply = ca.app(msg, ctx)
out["evaluate"] = {"ok": not reply.has_error(), "torch": "torch" in sys.modules}
print(json.dumps(out))
"""


def test_client_app_train_and_evaluate_never_import_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"honest": {"gradient": True, "torch": False}, "attacker": {"gradient": True, "torch": False},
                   "evaluate": {"ok": True, "torch": False}}

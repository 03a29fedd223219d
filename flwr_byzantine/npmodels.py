"""Numpy forward pass, loss and gradient of the models of :mod:`flwr_byzantine.models` (no torch).

The ClientApp of a deployment runs in a fresh process for every message, so
importing torch (about 1 s and 300+ MB per process) would cost more than the
training step of a logistic regression.  This module computes, in float32 numpy,
exactly what the torch modules compute:

* ``"logreg"``: logits ``X W^T + b`` (parameters ``linear.weight (C, d)``, ``linear.bias (C,)``);
* ``"mlp"``: logits ``relu(X W1^T + b1) W2^T + b2`` (``fc1.*``, ``fc2.*``), with
  ``relu'(0) = 0`` as in torch;
* ``"linear"``: prediction ``X w^T + b`` of shape ``(n,)`` (``linear.weight (1, d)``, ``linear.bias (1,)``);

with the losses of :func:`flwr_byzantine.models.loss_fn_for` (mean softmax
cross-entropy; half mean squared error, the paper's Section 6 ``f(z, x) =
1/2 (<w, x> - y)^2``) and their gradients by the chain rule.  The gradient of a
mini-batch is ``(1/b) sum_{i in H} grad f(z_i, x_t)`` (Data & Diggavi,
Algorithm 1, line 5).  ``tests/test_npmodels.py`` checks every model against
torch autograd.  The initial model ``x_0`` comes from :func:`init_params` (numpy too,
so the ServerApp of the default App never imports torch either); the torch modules
of :func:`flwr_byzantine.models.build_model` load the same parameters.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: Model name -> its task (same names as :data:`flwr_byzantine.models.MODELS`).
MODEL_TASKS = {"logreg": "classification", "mlp": "classification", "linear": "regression"}

#: Hidden width of ``"mlp"`` (the default of :class:`flwr_byzantine.models.MLP`).
MLP_HIDDEN = 64

Params = dict[str, np.ndarray]


def param_shapes(name: str, num_features: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of model ``name``, in the torch module's order."""
    d, c = int(num_features), int(num_classes)
    if name == "logreg":
        return {"linear.weight": (c, d), "linear.bias": (c,)}
    if name == "mlp":
        h = MLP_HIDDEN
        return {"fc1.weight": (h, d), "fc1.bias": (h,), "fc2.weight": (c, h), "fc2.bias": (c,)}
    if name == "linear":
        return {"linear.weight": (1, d), "linear.bias": (1,)}
    raise ValueError(f"unknown model {name!r}; valid names: {list(MODEL_TASKS)}")


def _torch_uniform(bitgen: np.random.MT19937, size: int, bound: float) -> np.ndarray:
    """``size`` draws of ``torch.Tensor.uniform_(-bound, bound)`` (float32, CPU) from ``bitgen``'s stream.

    torch's CPU generator is a 32-bit Mersenne Twister; a float32 uniform takes the low
    24 bits of one output, ``u = (r & (2^24 - 1)) * 2^-24``, and returns
    ``u * (to - from) + from`` with ``from``/``to`` rounded to float32 and one rounding
    (a fused multiply-add; exact here in float64, since ``u * (to - from)`` has at most 48 bits).
    """
    raw = bitgen.random_raw(size).astype(np.uint64) & np.uint64((1 << 24) - 1)
    u = raw.astype(np.float64) * 2.0**-24
    lo, hi = np.float32(-bound), np.float32(bound)
    return (u * np.float64(hi - lo) + np.float64(lo)).astype(np.float32)


def init_params(name: str, num_features: int, num_classes: int, seed: int) -> Params:
    """The initial parameters ``x_0`` of model ``name``, deterministic in ``seed``.

    Every ``nn.Linear`` layer's default initialisation, in state-dict order: weight and bias
    uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (kaiming-uniform with ``a = sqrt(5)``),
    drawn from torch's CPU Mersenne Twister seeded with ``seed`` (numpy's legacy MT19937
    seeding is the same algorithm).  This is, bit for bit, what ``torch.manual_seed(seed)``
    followed by constructing the torch module gives (``tests/test_npmodels.py``), without
    importing torch.
    """
    shapes = param_shapes(name, num_features, num_classes)
    bitgen = np.random.MT19937()
    bitgen._legacy_seeding(int(seed) & 0xFFFFFFFF)  # torch's mt19937 takes the low 32 bits of the seed
    out: Params = {}
    fan_in = 1
    for key, shape in shapes.items():
        if key.endswith(".weight"):
            fan_in = shape[1]
            # torch.nn.init.kaiming_uniform_(a=sqrt(5)), with torch's float64 operations in its order
            gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
            bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
        else:
            bound = 1 / math.sqrt(fan_in)
        out[key] = _torch_uniform(bitgen, int(np.prod(shape)), bound).reshape(shape)
    return out


def load_params(name: str, num_features: int, num_classes: int, arrays: Mapping[str, np.ndarray]) -> Params:
    """``arrays`` as float32 parameters of model ``name``; like torch's ``load_state_dict(strict=True)``.

    Raises ``ValueError`` on missing or unexpected keys, a wrong shape or non-numeric data.
    """
    shapes = param_shapes(name, num_features, num_classes)
    if set(arrays) != set(shapes):
        raise ValueError(f"model {name!r} expects keys {sorted(shapes)}, got {sorted(arrays)}")
    out: Params = {}
    for key, shape in shapes.items():
        arr = np.asarray(arrays[key])
        if arr.shape != shape:
            raise ValueError(f"parameter {key!r}: expected shape {shape}, got {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"parameter {key!r}: expected numbers, got dtype {arr.dtype}")
        out[key] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def forward(name: str, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Model output: logits ``(n, C)`` for the classifiers, predictions ``(n,)`` for ``"linear"``."""
    X = np.asarray(X, dtype=np.float32)
    if name == "mlp":
        hidden = np.maximum(X @ params["fc1.weight"].T + params["fc1.bias"], 0.0)
        return hidden @ params["fc2.weight"].T + params["fc2.bias"]
    out = X @ params["linear.weight"].T + params["linear.bias"]
    return out[:, 0] if name == "linear" else out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def loss(name: str, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> float:
    """Mean loss of model ``name`` on ``(X, y)`` (cross-entropy or half MSE by the model's task)."""
    return _loss_from_output(name, forward(name, params, X), y)[0]


def _loss_from_output(name: str, out: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """``(mean loss, d loss / d output)``."""
    n = out.shape[0]
    if MODEL_TASKS[name] == "classification":
        labels = np.asarray(y).astype(np.int64).reshape(-1)
        logp = _log_softmax(out)
        value = -float(logp[np.arange(n), labels].mean(dtype=np.float32))
        dout = np.exp(logp)
        dout[np.arange(n), labels] -= 1.0
        return value, (dout / np.float32(n)).astype(np.float32, copy=False)
    resid = out - np.asarray(y, dtype=np.float32).reshape(-1)
    value = 0.5 * float(np.mean(resid * resid, dtype=np.float32))
    return value, (resid / np.float32(n)).astype(np.float32, copy=False)


def loss_and_gradient(name: str, params: Mapping[str, np.ndarray], X: np.ndarray,
                      y: np.ndarray) -> tuple[Params, float]:
    """``(gradient of the mean loss w.r.t. every parameter, mean loss)`` on ``(X, y)``, in float32."""
    X = np.asarray(X, dtype=np.float32)
    if name == "mlp":
        pre = X @ params["fc1.weight"].T + params["fc1.bias"]
        hidden = np.maximum(pre, 0.0)
        out = hidden @ params["fc2.weight"].T + params["fc2.bias"]
        value, dout = _loss_from_output(name, out, y)
        dhidden = (dout @ params["fc2.weight"]) * (pre > 0)
        grads = {"fc1.weight": dhidden.T @ X, "fc1.bias": dhidden.sum(axis=0),
                 "fc2.weight": dout.T @ hidden, "fc2.bias": dout.sum(axis=0)}
    else:
        out = forward(name, params, X)
        value, dout = _loss_from_output(name, out, y)
        dout2 = dout.reshape(-1, 1) if name == "linear" else dout
        grads = {"linear.weight": dout2.T @ X, "linear.bias": dout2.sum(axis=0)}
    return {k: np.asarray(grads[k], dtype=np.float32) for k in params}, value


def evaluate(name: str, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``{"loss"}`` (and ``"accuracy"`` for the classifiers) of model ``name`` on ``(X, y)``."""
    out = forward(name, params, X)
    metrics = {"loss": _loss_from_output(name, out, y)[0]}
    if MODEL_TASKS[name] == "classification":
        metrics["accuracy"] = float((out.argmax(axis=1) == np.asarray(y).reshape(-1)).mean())
    return metrics

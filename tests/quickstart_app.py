"""A FedAvg user's app, written the way Flower's quickstart-pytorch writes it (not adapted to this project).

The ClientApp trains locally for ``local-epochs`` epochs of plain SGD and replies with
its weights under ``"arrays"`` and a ``MetricRecord`` with ``train_loss`` and
``num-examples``; ``evaluate`` replies ``eval_loss``, ``eval_acc`` and ``num-examples``.
Digits (offline) replaces CIFAR-10 (no network here); the model is a small MLP.

:func:`reversed_updates` wraps that ClientApp into an attacker that replies
``x_t + scale * (x_t - w)`` (its model update reversed and scaled by ``scale``), the
honest training code unchanged.  :func:`server_app` builds a ServerApp that runs a
strategy and writes the central accuracy per round to ``out/result.json``
(used by the slow Ray test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_byzantine.data import load_partition, load_test_set

NUM_FEATURES, NUM_CLASSES = 64, 10
ALPHA = 1.0  # Dirichlet label skew of the partitions
SEED = 0


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(NUM_FEATURES, 32)
        self.fc2 = torch.nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def new_model() -> Net:
    torch.manual_seed(SEED)
    return Net()


def train(net, X, y, epochs, lr, batch_size=32, seed=0):
    xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
    return total / max(steps, 1)


def test(net, X, y):
    with torch.no_grad():
        out = net(torch.as_tensor(X))
        loss = float(torch.nn.functional.cross_entropy(out, torch.as_tensor(y)))
        acc = float((out.argmax(1).numpy() == y).mean())
    return loss, acc


def build_client_app(local_epochs: int = 2, lr: float = 0.1) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid, num = context.node_config["partition-id"], context.node_config["num-partitions"]
        X, y = load_partition("digits", pid, num, ALPHA, SEED)
        rnd = int(msg.content["config"]["server-round"])
        train_loss = train(model, X, y, local_epochs, lr, seed=1000 * rnd + pid)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": train_loss, "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid, num = context.node_config["partition-id"], context.node_config["num-partitions"]
        X, y = load_partition("digits", pid, num, ALPHA, SEED)
        loss, acc = test(model, X, y)
        content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    return app


def reversed_updates(app: ClientApp, attackers: set[int], scale: float = 10.0) -> ClientApp:
    """A ClientApp around ``app`` whose partitions in ``attackers`` reply x_t + scale (x_t - w) instead of w."""
    wrapped = ClientApp()

    @wrapped.train()
    def train_fn(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if context.node_config["partition-id"] not in attackers or reply.has_error():
            return reply
        x = msg.content["arrays"]
        w = reply.content["arrays"]
        bad = {}
        for k in x.keys():
            xv, wv = x[k].numpy(), w[k].numpy()
            bad[k] = Array(np.ascontiguousarray((xv + scale * (xv - wv)).astype(xv.dtype)))
        content = RecordDict({"arrays": ArrayRecord(bad), "metrics": reply.content["metrics"]})
        return Message(content=content, reply_to=msg)

    @wrapped.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        return app(msg, context)

    return wrapped


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    X, y = load_test_set("digits", SEED)
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = test(model, X, y)
    return MetricRecord({"loss": loss, "accuracy": acc})


def server_app(make_strategy, num_rounds: int, out: str | Path) -> ServerApp:
    """ServerApp running ``make_strategy()``; writes ``{round: central accuracy}`` to ``out/result.json``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_strategy()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model().state_dict()),
                                num_rounds=num_rounds, evaluate_fn=central_evaluate)
        acc = {int(r): float(m["accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(acc))

    return app


def final_accuracy(result) -> float:
    rounds = sorted(result.evaluate_metrics_serverapp)
    return float(result.evaluate_metrics_serverapp[rounds[-1]]["accuracy"])


__all__ = ["build_client_app", "central_evaluate", "final_accuracy", "new_model", "reversed_updates", "server_app"]

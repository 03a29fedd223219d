"""ClientApp of flwr-byzantine: one mini-batch gradient per round, honest or malicious.

Honest client (Algorithm 1): load x_t, sample a mini-batch of size b from the
local partition *without replacement* (seeded by run seed, partition id and
round), reply with the gradient ``(1/b) sum_{i in H} grad f(z_i, x_t)``.  With
randk compression (Algorithm 2) it replies with ``(d/k) * g[K_t]`` only.

Malicious client: chosen by node config (``malicious = true``, deployments) or
by run config (``num-malicious`` seeded partition ids, simulations); its attack
comes from node config ``attack`` or run config ``attack`` / ``attack-scale``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_byzantine.attacks import DataAttack, UpdateAttack, make_attack
from flwr_byzantine.compression.randk import RANDK_PROCEDURE, coordinate_digest, draw_coordinates
from flwr_byzantine.config import RunConfig
from flwr_byzantine.data import dataset_info, load_partition
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine.models import build_model, loss_fn_for

#: The attack parameter that run config ``attack-scale`` sets, per attack.
SCALE_PARAM = {"gaussian": "std", "scaled-negative": "scale", "ipm": "epsilon", "alie": "z", "arbitrary": "scale"}


def _node_attack(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> str | None:
    """Attack name for this node, or None if it is honest."""
    if "malicious" in node_config:
        flag = node_config["malicious"]
        malicious = flag if isinstance(flag, bool) else str(flag).lower() in ("1", "true", "yes")
    else:
        malicious = partition_id in malicious_partition_ids(num_partitions, cfg.num_malicious, cfg.seed)
    if not malicious:
        return None
    return str(node_config.get("attack", cfg.attack))


def build_attack(name: str, cfg: RunConfig, partition_id: int) -> UpdateAttack | DataAttack:
    """Instantiate the attack ``name`` with ``attack-scale`` mapped to its main parameter."""
    params: dict[str, Any] = {"seed": cfg.seed * 100_003 + partition_id}
    if name in SCALE_PARAM:
        params[SCALE_PARAM[name]] = cfg.attack_scale
    return make_attack(name, **params)


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node["partition-id"]), int(node["num-partitions"])


def _setup(msg: Message, context: Context, overrides: Mapping[str, Any] | None):
    cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
    pid, num = _partition(context)
    X, y = load_partition(cfg.dataset, pid, num, cfg.dirichlet_alpha, cfg.seed)
    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, info["num_features"], info["num_classes"], cfg.seed)
    state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return cfg, pid, num, X, y, info, model


def local_gradient(model: torch.nn.Module, loss_fn, X: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """Gradient of the mean loss on (X, y) with respect to every parameter of ``model``."""
    model.zero_grad(set_to_none=True)
    xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    loss = loss_fn(model(xt), yt)
    loss.backward()
    grads = {name: p.grad.detach().cpu().numpy().copy() for name, p in model.named_parameters()}
    return grads, float(loss.detach())


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated with ``overrides``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, pid, num, X, y, info, model = _setup(msg, context, overrides)
        config = msg.content["config"]
        server_round = int(config["server-round"])
        attack_name = _node_attack(cfg, context.node_config, pid, num)
        attack = build_attack(attack_name, cfg, pid) if attack_name else None
        if isinstance(attack, DataAttack):
            X, y = attack.poison(X, y, info["num_classes"])

        n = len(y)
        full = bool(config.get("full-batch", False))
        b = n if full else min(int(config.get("batch-size", cfg.batch_size)), n)
        rng = np.random.default_rng([cfg.seed, pid, server_round])
        idx = np.arange(n) if b == n else rng.choice(n, size=b, replace=False)  # without replacement
        grads, loss = local_gradient(model, loss_fn_for(info["task"]), X[idx], y[idx])
        keys = list(model.state_dict().keys())
        flat = np.concatenate([grads[k].ravel() for k in keys]).astype(np.float32)

        if isinstance(attack, UpdateAttack):
            crafted = attack.craft(flat[None, :], 1, server_round)
            if crafted is None:  # erasure: answer nothing useful
                raise RuntimeError("erasure attack: no gradient sent")
            flat = np.asarray(crafted, dtype=np.float32).reshape(-1)

        metrics: dict[str, Any] = {
            "num-examples": int(b), "train-loss": loss, "server-round": server_round, "partition-id": pid,
        }
        if "randk-procedure" in config:
            if config["randk-procedure"] != RANDK_PROCEDURE:
                raise ValueError(f"unsupported coordinate procedure {config['randk-procedure']!r}")
            d = int(config["randk-d"])
            if d != flat.size:
                raise ValueError(f"randk-d={d} does not match the model size {flat.size}")
            if "coordinates" in msg.content.array_records:
                coords = msg.content["coordinates"]["indices"].numpy().astype(np.int64)
            else:
                coords = draw_coordinates(d, int(config["randk-k"]), int(config["randk-seed"]), server_round)
            metrics["randk-digest"] = coordinate_digest(coords)
            values = (d / coords.size) * flat[coords]
            payload = ArrayRecord({"values": Array(values.astype(np.float32))})
        else:
            out, start = {}, 0
            for k in keys:
                shape = grads[k].shape
                size = int(np.prod(shape))
                out[k] = Array(flat[start : start + size].reshape(shape))
                start += size
            payload = ArrayRecord(out)
        return Message(RecordDict({"gradient": payload, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, pid, _num, X, y, info, model = _setup(msg, context, overrides)
        with torch.no_grad():
            out = model(torch.as_tensor(X))
            loss = float(loss_fn_for(info["task"])(out, torch.as_tensor(y)))
            metrics: dict[str, Any] = {"eval-loss": loss, "num-examples": int(len(y)), "partition-id": pid}
            if info["task"] == "classification":
                metrics["eval-accuracy"] = float((out.argmax(dim=1).numpy() == y).mean())
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()

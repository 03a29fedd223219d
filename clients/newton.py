"""The ClientApp's Newton methods (run config ``method`` ``comrade`` / ``giant``): one local Newton
direction (or gradient) per message.  ``clients/client_app.py:app`` calls :func:`newton_train` /
:func:`newton_evaluate` for those methods.

Honest client (COMRADE, Algorithm 1): load w_t, compute the local gradient g_i and Hessian H_i
of the regularised GLM on its own partition, reply with Q(p_i), p_i = H_i^{-1} g_i.  For GIANT
the server's config selects the phase: ``newton-phase = "gradient"`` (reply g_i) or
``"direction"`` with the broadcast g_t (reply Q(H_i^{-1} g_t)).  The compressor Q is the one
the server announces (``compression``, ``compression-k``), so the server can decode.

Data: partition ``partition-id`` of ``num-partitions`` (node config) of the data set named by
the run config (``newton-dataset``, see :class:`flwr_byzantine.config.NewtonConfig`), split exactly
as the ServerApp splits it.

Malicious client: chosen by node config ``malicious = true`` (deployments) or, in
simulations, by run config ``newton-num-malicious`` (a seeded set of partition ids); the attack
comes from node config ``newton-attack`` / ``newton-attack-scale`` or the run config keys of
the same names: any attack of the registry that Newton workers play
(:func:`flwr_byzantine.attacks.attack_names`: ``gaussian`` (noise of std ``scale`` added to the
update), ``scaled-negative`` (sends -scale * update), ``sign-flip``, ``label-flip``,
``random-labels``), seeded per client (:func:`flwr_byzantine.seeds.client_seed`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import node_partition
from flwr_byzantine.attacks import DataAttack, UpdateAttack, make_attack, run_attack_params
from flwr_byzantine.config import NewtonConfig
from flwr_byzantine.data.libsvm import federated_split, load_glm_dataset
from flwr_byzantine.federation import node_is_malicious
from flwr_byzantine.newton.compression import Compressor, Identity, ScaledSign, TopK
from flwr_byzantine.newton.objectives import make_objective
from flwr_byzantine.newton.worker import PHASE_DIRECTION, PHASE_GRADIENT, NewtonWorker
from flwr_byzantine.protocol import NEWTON_PROTOCOL, PHASE_IDS, check_protocol
from flwr_byzantine import seeds


@lru_cache(maxsize=8)
def _split_cached(dataset: str, seed: int, data_path: str, test_path: str, synthetic_n: int, synthetic_d: int,
                  num_partitions: int, partitioner: str, alpha: float, server_fraction: float):
    data = load_glm_dataset(dataset, seed, path=data_path, test_path=test_path,
                            synthetic_n=synthetic_n, synthetic_d=synthetic_d)
    parts, server_rows = federated_split(data, num_partitions, partitioner=partitioner, alpha=alpha,
                                         seed=seed, server_fraction=server_fraction)
    return data, parts, server_rows


def load_newton_partition(cfg: NewtonConfig, partition_id: int, num_partitions: int):
    """``(X_i, y_i)`` of partition ``partition_id`` (same split as the ServerApp's)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    data, parts, _ = _split_cached(cfg.dataset, cfg.seed, cfg.data_path, cfg.test_path, cfg.synthetic_n,
                                   cfg.synthetic_d, num_partitions, cfg.partitioner, cfg.dirichlet_alpha,
                                   cfg.server_data_fraction)
    rows = parts[partition_id]
    return data.X_train[rows], data.y_train[rows]


def node_attack(cfg: NewtonConfig, node_config: Mapping[str, Any], partition_id: int,
                num_partitions: int) -> UpdateAttack | DataAttack | None:
    """This node's attack (None: honest, unless node config or run config makes it Byzantine).

    Built from the registry with :func:`~flwr_byzantine.attacks.run_attack_params` for
    ``cfg.method`` and seeded per client, so each Byzantine worker draws its own noise.
    """
    if not node_is_malicious(node_config, partition_id, num_partitions, cfg.num_malicious, cfg.seed):
        return None
    name = str(node_config.get("newton-attack", cfg.attack))
    scale = float(node_config.get("newton-attack-scale", cfg.attack_scale))
    return make_attack(name, seed=seeds.client_seed(cfg.seed, partition_id),
                       **run_attack_params(name, scale, cfg.method))


def _compressor(config: Mapping[str, Any]) -> Compressor:
    name = str(config.get("compression", "none"))
    if name == "none":
        return Identity()
    if name == "topk":
        return TopK(k=int(config["compression-k"]))
    if name == "sign":
        return ScaledSign()
    raise ValueError(f"unsupported compression {name!r}")


def _flat_model(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in record.keys()])


def newton_train(msg: Message, context: Context, cfg: NewtonConfig) -> Message:
    """Reply to a Newton train message: Q(p_i) (direction phase) or g_i (GIANT's gradient phase)."""
    config = msg.content["config"]
    check_protocol(config, NEWTON_PROTOCOL)
    server_round = int(config["server-round"])
    phase = str(config.get("newton-phase", PHASE_DIRECTION))
    if phase not in PHASE_IDS:
        raise ValueError(f"unknown newton-phase {phase!r}")
    pid, num = node_partition(context)
    X, y = load_newton_partition(cfg, pid, num)
    attack = node_attack(cfg, context.node_config, pid, num)
    worker = NewtonWorker(X, y, cfg.objective, cfg.lam, attack=attack, compressor=_compressor(config),
                          cg_threshold=cfg.cg_threshold)
    w = _flat_model(msg.content["arrays"])
    if w.size != worker.d:
        raise ValueError(f"model has {w.size} parameters but the data has d = {worker.d}")
    if phase == PHASE_GRADIENT:
        reply = worker.gradient(w, server_round)
    else:
        g = None
        if "gradient" in msg.content.array_records:
            g = msg.content["gradient"]["g"].numpy().astype(np.float64)
        reply = worker.direction(w, g, server_round)
    metrics: dict[str, Any] = {
        "server-round": server_round, "phase-id": PHASE_IDS[phase], "partition-id": pid,
        "num-examples": int(worker.objective.n),
    }
    for key, val in reply.metrics.items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            metrics[key] = val
    payload = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in reply.payload.items()})
    return Message(RecordDict({"update": payload, "metrics": MetricRecord(metrics)}), reply_to=msg)


def newton_evaluate(msg: Message, context: Context, cfg: NewtonConfig) -> Message:
    """Reply to a Newton evaluate message: the local objective (and accuracy) at the broadcast w."""
    pid, num = node_partition(context)
    X, y = load_newton_partition(cfg, pid, num)
    obj = make_objective(cfg.objective, X, y, cfg.lam)
    w = _flat_model(msg.content["arrays"])
    metrics: dict[str, Any] = {"eval-loss": obj.value(w), "num-examples": int(obj.n), "partition-id": pid}
    if hasattr(obj, "accuracy"):
        metrics["eval-accuracy"] = obj.accuracy(w)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

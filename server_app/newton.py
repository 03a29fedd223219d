"""The ServerApp's Newton methods (run config ``method`` ``comrade`` / ``giant``): strategy wiring,
central evaluation and a results JSON.  ``server_app/server_app.py:app`` calls
:func:`run_newton_federation` for those methods.

Run config (see :class:`flwr_byzantine.config.NewtonConfig` for every key and default):
``method`` (``comrade`` or ``giant``), ``newton-beta``,
``newton-assumed-byzantine-fraction``, ``newton-compression``, ``newton-dataset``, ... .
``num-server-rounds`` counts Newton *iterations* (GIANT uses two communication rounds per
iteration; the results file reports the communication rounds actually used).

Central evaluation after every iteration: the federation's training objective
f(w_t) = (1/m) sum_i f_i(w_t), test loss and accuracy, and ||w_t - w*|| where w* is the exact
minimiser of that objective (computed here with scipy; a simulation diagnostic: the server re-creates the
offline data set, it never uses client replies for it).  With
``newton-server-data-fraction > 0`` the server keeps that fraction of the training rows (no
client holds them) and chooses the step by Armijo line search on them.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_byzantine.config import ConfigError, NewtonConfig
from flwr_byzantine.data.libsvm import federated_split, load_glm_dataset
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine.results import blame, safe_stem, write_json_atomic
from server_app.nodes import wait_for_nodes
from flwr_byzantine.newton.objectives import federated_objective, make_objective, minimise
from flwr_byzantine.strategies.comrade import Comrade, NewtonStrategyBase, make_evaluate_fn
from flwr_byzantine.strategies.giant import Giant


def build_newton_strategy(cfg: NewtonConfig, server_objective: Any = None, num_nodes: int = 2) -> NewtonStrategyBase:
    """``Comrade`` or ``Giant`` from the run config; every round waits for ``num_nodes`` nodes."""
    common: dict[str, Any] = {
        "min_available_nodes": max(2, num_nodes),
        "min_train_nodes": max(2, num_nodes),
        "assumed_byzantine_fraction": cfg.assumed_byzantine_fraction,
        "step_size": cfg.step_size,
        "server_objective": server_objective,
        "compression": cfg.compression,
        "topk_fraction": cfg.topk_fraction,
        "min_valid_replies": cfg.min_valid_replies,
        "max_direction_norm": cfg.max_direction_norm or None,
        "seed": cfg.seed,
    }
    if cfg.method == "giant":
        return Giant(beta=cfg.beta, **common)
    return Comrade(beta=cfg.beta, **common)


def run_newton_federation(grid: Grid, context: Context, cfg: NewtonConfig) -> dict[str, Any]:
    """Run the configured COMRADE / GIANT federation; returns (and writes) the results dict."""
    t0 = time.time()
    num_nodes = len(wait_for_nodes(grid, max(2, cfg.min_nodes)))
    if cfg.num_malicious > num_nodes:
        raise ConfigError(f"run config 'newton-num-malicious'={cfg.num_malicious} exceeds the "
                                f"{num_nodes} connected nodes")
    data = load_glm_dataset(cfg.dataset, cfg.seed, path=cfg.data_path, test_path=cfg.test_path,
                            synthetic_n=cfg.synthetic_n, synthetic_d=cfg.synthetic_d)
    parts, server_rows = federated_split(data, num_nodes, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                                         seed=cfg.seed, server_fraction=cfg.server_data_fraction)
    train_obj = federated_objective(cfg.objective, data.X_train, data.y_train, parts, cfg.lam)
    test_obj = make_objective(cfg.objective, data.X_test, data.y_test, cfg.lam)
    server_obj = (make_objective(cfg.objective, data.X_train[server_rows], data.y_train[server_rows], cfg.lam)
                  if server_rows.size else None)
    w_star = minimise(train_obj)
    d = train_obj.d
    strategy = build_newton_strategy(cfg, server_obj, num_nodes)
    malicious = malicious_partition_ids(num_nodes, cfg.num_malicious, cfg.seed)
    log(INFO, "newton: %s on %s (d=%d), %d nodes, beta=%.3g, attack=%s on partitions %s", cfg.method,
        cfg.dataset, d, num_nodes, cfg.beta, cfg.attack if malicious else "none", malicious)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(d, dtype=np.float64))}),
        num_rounds=cfg.num_server_rounds,
        evaluate_fn=make_evaluate_fn(train_obj, test_obj, w_star),
    )
    central = {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    rounds = sorted(central)
    reports = [r.as_dict() for r in strategy.history]
    blamed = blame(reports, num_nodes, "trimmed")
    last = central[rounds[-1]] if rounds else {}
    payload = {
        "run_id": int(getattr(context, "run_id", 0) or 0),
        "config": cfg.as_dict(),
        "method": cfg.method,
        "num_nodes": num_nodes,
        "num_features": d,
        "malicious_partitions": malicious,
        **blamed,
        "central": {str(r): central[r] for r in rounds},
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "final_dist_to_opt": last.get("dist-to-opt"),
        "communication_rounds": strategy.communication_rounds,
        "messages_sent": strategy.messages_sent,
        "rounds": reports,
        "total_bytes_up": int(sum(r["bytes_up"] for r in reports)),
        "total_bytes_down": int(sum(r["bytes_down"] for r in reports)),
        "final_w": [float(v) for v in (strategy.current_model if strategy.current_model is not None else [])],
        "wall_seconds": time.time() - t0,
    }
    stem = safe_stem("newton", cfg.method, cfg.attack if malicious else "clean", f"run{payload['run_id']}")
    path = Path(cfg.output_dir).expanduser().resolve() / f"{stem}.json"
    write_json_atomic(path, payload)
    log(INFO, "newton: final accuracy %s, ||w - w*|| %s, %d communication rounds; malicious partitions %s, "
        "trimmed nodes %s",
        payload["final_accuracy"], payload["final_dist_to_opt"], payload["communication_rounds"], malicious,
        blamed["trimmed_node_ids"])
    log(INFO, "newton: results written to %s", path)
    return payload

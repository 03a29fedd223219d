"""ServerApp of flwr-byzantine: RobustSGD or RobustFedAvg + central evaluation + results file, final model and plot.

The one ServerApp of the project (``[tool.flwr.app.components]``).  Run config ``method``
selects the training method: ``sgd`` (default, :func:`run_federation` below) or the
distributed Newton methods ``comrade`` / ``giant`` (:func:`server_app.newton.run_newton_federation`).
The whole run config is validated (:func:`flwr_byzantine.config.parse_run_config`) before
anything else, so an unknown method or a bad value fails the run with one message before round 1.

Run config ``client-mode``: ``"gradient"`` (default) serves clients that send one
mini-batch gradient per round with :class:`RobustSGD` (Algorithm 1); ``"local"``
serves clients that train locally (``local-epochs`` / ``local-steps`` of SGD with
``client-lr``) and reply with their weights, with :class:`RobustFedAvg` (server step
``server-lr``, ``server-momentum``).  The same aggregator decodes either kind of vector.

With run config ``checkpoint=true`` the server checkpoints its full state after
every completed round to ``<output-dir>/checkpoint/`` and, when started again
with the same run config and output-dir, resumes after the last completed round
(see :mod:`flwr_byzantine.checkpoint` and ``docs/deployment.md``).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.superlink.grid import HttpGrid

from flwr_byzantine.aggregators import Aggregator, build_for_federation
from flwr_byzantine.aggregators.defence import MODEL_UPDATE_OPTIONS
from flwr_byzantine.attacks import MobileAdversary, make_attack, run_attack_params
from flwr_byzantine.checkpoint import CheckpointError, Checkpointer
from flwr_byzantine.compression import RandK
from flwr_byzantine.config import NewtonConfig, RunConfig, check_federation, parse_run_config
from flwr_byzantine.data import dataset_info
from flwr_byzantine.data.cache import cached_test_set
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine import npmodels
from flwr_byzantine.results import blame, plot_run, safe_stem, write_json_atomic
from flwr_byzantine.strategies.omniscient import OmniscientAdversary
from flwr_byzantine.strategies.robust_base import RobustStrategy
from flwr_byzantine.strategies.robust_fedavg import RobustFedAvg
from flwr_byzantine.strategies.robust_sgd import RobustSGD
from flwr_byzantine.strategies.validation import REJECTION_KINDS
from server_app.nodes import wait_for_nodes
from server_app.prompt_grid import PromptGrid


def build_aggregator(cfg: RunConfig, num_nodes: int) -> Aggregator:
    """The configured aggregator for ``num_nodes`` clients (see :func:`build_for_federation`).

    With ``client-mode='local'`` the replies are model updates, not gradients: the default
    defence then runs without its history-of-gradients rules (``MODEL_UPDATE_OPTIONS``).
    """
    extra = dict(MODEL_UPDATE_OPTIONS) if cfg.client_mode == "local" and cfg.aggregator == "rge" else {}
    return build_for_federation(cfg.aggregator, num_nodes, cfg.eps_tilde, cfg.sigma0, **extra)


def build_omniscient_adversary(cfg: RunConfig, inner: RobustSGD) -> OmniscientAdversary:
    """Server-side worst-case adversary around ``inner``: ``num-malicious`` corrupt nodes per round."""
    params = run_attack_params(cfg.attack, cfg.attack_scale)
    if cfg.attack == "defence-aware":
        params["aggregator"] = inner.aggregator
    attack = make_attack(cfg.attack, seed=cfg.seed, **params)
    adversary = MobileAdversary(num_byzantine=cfg.num_malicious, seed=cfg.seed, mode=cfg.adversary_mode)
    return OmniscientAdversary(inner, attack, adversary)


def build_strategy(cfg: RunConfig, num_nodes: int) -> RobustStrategy:
    """RobustSGD (``client-mode='gradient'``) or RobustFedAvg (``'local'``) wired from the run config."""
    if cfg.client_mode == "local":
        return RobustFedAvg(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=0.0,  # the App evaluates centrally, as in gradient mode
            aggregator=build_aggregator(cfg, num_nodes),
            server_learning_rate=cfg.server_lr,
            server_momentum=cfg.server_momentum,
            min_valid_replies=cfg.min_valid_replies,
            max_invalid_rounds=cfg.max_invalid_rounds,
            max_update_norm=cfg.max_update_norm or None,
            seed=cfg.seed,
        )
    compression = None
    if cfg.compression == "randk":
        if cfg.k > 0:
            compression = RandK(k=cfg.k, seed=cfg.seed, form=cfg.coordinate_form)
        else:
            compression = RandK(fraction=cfg.k_fraction, seed=cfg.seed, form=cfg.coordinate_form)
    return RobustSGD(
        aggregator=build_aggregator(cfg, num_nodes),
        learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size,
        full_batch=cfg.full_batch,
        projection_radius=cfg.projection_radius,
        compression=compression,
        fraction_train=cfg.fraction_train,
        min_valid_replies=cfg.min_valid_replies,
        max_invalid_rounds=cfg.max_invalid_rounds,
        max_update_norm=cfg.max_update_norm or None,
        seed=cfg.seed,
    )


def central_evaluator(cfg: RunConfig):
    """``evaluate_fn(server_round, arrays) -> MetricRecord`` on the held-out test set.

    Loss (and accuracy for the classifiers) from :func:`flwr_byzantine.npmodels.evaluate`,
    the numpy forward pass of the model (no torch in the ServerApp's process); the test set
    is read through the data cache (:func:`flwr_byzantine.data.cache.cached_test_set`).
    """
    X, y = cached_test_set(cfg.dataset, cfg.seed)
    info = dataset_info(cfg.dataset)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = npmodels.load_params(cfg.model, info["num_features"], info["num_classes"],
                                      {k: a.numpy() for k, a in arrays.items()})
        return MetricRecord(npmodels.evaluate(cfg.model, params, X, y))

    return evaluate


def initial_arrays(cfg: RunConfig) -> ArrayRecord:
    """``x_0``: :func:`flwr_byzantine.npmodels.init_params` of the run's model, seeded by run config ``seed``."""
    info = dataset_info(cfg.dataset)
    params = npmodels.init_params(cfg.model, info["num_features"], info["num_classes"], cfg.seed)
    return ArrayRecord({k: Array(v) for k, v in params.items()})


#: Run-config keys that may differ between a checkpointed run and its resumption.
RESUMABLE_KEYS = ("checkpoint", "output-dir", "reply-timeout")


def checkpoint_identity(cfg: RunConfig) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumed: the run config minus :data:`RESUMABLE_KEYS`."""
    return {k: v for k, v in cfg.as_dict().items() if k not in RESUMABLE_KEYS}


def save_model(path: Path, arrays: ArrayRecord) -> None:
    """Write the model's arrays to ``path`` (``.npz``, one entry per key) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **{k: a.numpy() for k, a in arrays.items()})
    tmp.replace(path)


def run_federation(grid: Grid, context: Context, cfg: RunConfig) -> dict[str, Any]:
    """Run the configured federation on ``grid``; returns (and writes) the results dict."""
    t0 = time.time()
    nodes = wait_for_nodes(grid, 2)
    num_nodes = len(nodes)
    check_federation(cfg, num_nodes)
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    checkpointer = None
    if cfg.checkpoint:
        checkpointer = Checkpointer(out_dir / "checkpoint", checkpoint_identity(cfg))
        state = checkpointer.load()  # raises CheckpointMismatch on a different run config
        if state is not None:
            stored = state.meta.get("num_nodes", num_nodes)
            if isinstance(stored, bool) or not isinstance(stored, int) or stored < 1:
                raise CheckpointError(f"checkpoint meta 'num_nodes' must be a positive integer, got {stored!r}")
            if stored != num_nodes:
                log(WARNING, "checkpoint: %d nodes connected now, %d when the checkpoint was written; "
                    "building the aggregator for %d as before", num_nodes, stored, stored)
            num_nodes = stored
        checkpointer.meta = {"num_nodes": num_nodes}
    inner = strategy = build_strategy(cfg, num_nodes)
    evaluate = central_evaluator(cfg)
    omniscient = cfg.adversary == "omniscient" and cfg.num_malicious > 0
    if omniscient:
        strategy = build_omniscient_adversary(cfg, inner)
        malicious: list[int] = []  # clients are honest; the corrupt set moves per round (see results)
    else:
        malicious = malicious_partition_ids(num_nodes, cfg.num_malicious, cfg.seed)
    if cfg.num_malicious > num_nodes // 2:
        log(WARNING, "num-malicious=%d is more than half of the %d nodes", cfg.num_malicious, num_nodes)
    log(INFO, "flwr-byzantine: %d nodes, client-mode=%s (%s), aggregator=%s, attack=%s on partitions %s",
        num_nodes, cfg.client_mode, type(inner).__name__, cfg.aggregator, cfg.attack if malicious else "none",
        malicious)

    inner.track_undefended = True  # the plot's "plain mean, one step from the same model" curve
    start_kwargs: dict[str, Any] = {} if omniscient else {"checkpoint": checkpointer}
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(cfg),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.reply_timeout,  # per send_and_receive: late or missing replies are erasures
        evaluate_fn=evaluate,
        **start_kwargs,
    )
    central = {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    rounds = sorted(central)
    acc = [central[r].get("accuracy", float("nan")) for r in rounds]
    reports = [r.as_dict() for r in inner.history]
    blamed = blame(reports, num_nodes, "filtered")
    payload = {
        "run_id": int(getattr(context, "run_id", 0) or 0),
        "method": cfg.method,
        "config": cfg.as_dict(),
        "num_nodes": num_nodes,
        "malicious_partitions": malicious,
        **blamed,
        "central": {str(r): central[r] for r in rounds},
        "final_accuracy": acc[-1] if acc else None,
        "final_loss": central[rounds[-1]].get("loss") if rounds else None,
        "rounds": reports,
        "total_bytes_up": int(sum(r["bytes_up"] for r in reports)),
        "total_bytes_down": int(sum(r["bytes_down"] for r in reports)),
        "rejections": {kind: int(sum(r.get("rejection_counts", {}).get(kind, 0) for r in reports))
                       for kind in REJECTION_KINDS},
        "undefended_one_step": {str(r): m for r, m in sorted(strategy.undefended_metrics.items())},
        "resumed_from_round": inner.resumed_from,
        "wall_seconds": time.time() - t0,
    }
    if omniscient:
        corrupt = {str(adv.server_round): sorted(rep.partition_ids[n] for n in adv.corrupt if n in rep.partition_ids)
                   for adv, rep in zip(strategy.history, inner.history)}
        payload["corrupt_partitions_per_round"] = corrupt
    attacked = bool(malicious) or omniscient
    stem = safe_stem(cfg.aggregator, cfg.attack if attacked else "clean", f"run{payload['run_id']}")
    json_path = out_dir / f"{stem}.json"
    model_path = out_dir / f"{stem}-model.npz"
    save_model(model_path, result.arrays)
    payload["model_file"] = model_path.name
    plot_path = plot_run(payload, out_dir / f"{stem}.png",
                         f"{cfg.dataset}: {num_nodes} clients, {cfg.aggregator}, "
                         f"{cfg.attack if attacked else 'no attack'} ({len(malicious)} malicious)")
    payload["plot_file"] = plot_path.name
    write_json_atomic(json_path, payload)
    log(INFO, "flwr-byzantine: final accuracy %s; malicious partitions %s; filtered nodes %s "
        "(claimed partitions %s, ambiguous claims %s)", payload["final_accuracy"], malicious,
        blamed["filtered_node_ids"], blamed["filtered_partitions"], blamed["partition_claim_conflicts"])
    log(INFO, "flwr-byzantine: results written to %s, plot to %s", json_path, plot_path)
    return payload


def serve(grid: Grid, context: Context, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ServerApp's main: validate the whole run config (``context.run_config`` updated with
    ``overrides``) before round 1, then run its ``method``'s federation; returns the results dict.

    In a deployment (Flower's ``HttpGrid``) the Grid is wrapped in :class:`PromptGrid`, which
    pulls replies every second instead of every 3 s (a round ends sooner after its last reply).
    """
    cfg = parse_run_config(dict(context.run_config), overrides)
    if isinstance(grid, HttpGrid):  # a deployment: notice replies within 1 s, not Flower's 3 s
        grid = PromptGrid(grid)
    if isinstance(cfg, NewtonConfig):
        from server_app.newton import run_newton_federation  # scipy's minimiser: Newton runs only

        return run_newton_federation(grid, context, cfg)
    return run_federation(grid, context, cfg)


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, context, overrides)

    return app


app = build_server_app()

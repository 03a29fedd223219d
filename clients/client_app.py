"""ClientApp of flwr-byzantine: one mini-batch gradient per round, honest or malicious.

The one ClientApp of the project (``[tool.flwr.app.components]``): run config ``method``
``sgd`` (default) is served here; ``comrade`` / ``giant`` by :mod:`clients.newton` (one local
Newton direction or gradient per message; imported on first use, so an SGD client process never
loads it).  Each message is checked against its method's protocol tag, so a Newton message sent
to an SGD run (or the reverse) is answered with an error, never misread.

Honest client (Algorithm 1): load x_t, sample a mini-batch of size b from the
local partition *without replacement* (seeded by run seed, partition id and
round), reply with the gradient ``(1/b) sum_{i in H} grad f(z_i, x_t)``.  With
randk compression (Algorithm 2) it replies with ``(d/k) * g[K_t]`` only.

Malicious client: chosen by node config (``malicious = true``, deployments) or
by run config (``num-malicious`` seeded partition ids, simulations); its attack
comes from node config ``attack`` or run config ``attack`` / ``attack-scale``
(``attack-scale = 0`` keeps the attack's own default parameter).  What it does
depends on the kind of attack (see ``docs/attacks.md``):

* data poisoning (``label-flip``, ``random-labels``): poisons its own labels
  once, then behaves exactly like an honest client on the poisoned data;
* erasure: replies with a ``MetricRecord`` only, no ``"gradient"`` record, so
  the server screens it out as an erasure (no exception, no error reply);
* every other model-update attack (``sign-flip``, ``alie``, ``ipm``, ``mimic``,
  ``defence-aware``, ...): a client-side attacker cannot see the other clients'
  gradients, so it *estimates* the honest statistics from its own data.  It
  draws :data:`DEFAULT_ESTIMATE_BATCHES` (node config ``estimate-batches``
  overrides it) independent mini-batches of size b without replacement from its
  own partition (seeded by run seed, partition id, round and batch index; with
  ``full-batch`` the estimates are the gradients of disjoint random chunks of the
  partition instead, since b = n_r would make every estimate the same), stacks
  their gradients as the ``(n_est, d)`` matrix ``honest`` and calls
  ``attack.craft(honest, f, round)`` with ``f`` the number of colluders.  It
  sends row ``i`` of the result, ``i`` its rank among the colluders (simulation)
  or ``partition-id mod f`` (deployment).  The attack is seeded by the run seed
  only and called with the round, so colluders agree on every random choice
  (``gaussian`` gives each colluder its own row of one shared draw).
  ``defence-aware`` targets the run config's ``aggregator`` built as the ServerApp
  builds it (``build_for_federation``: ``eps-tilde``, ``sigma0``, the per-rule caps
  on f), simulated on the ``n_est`` estimates plus ``f'`` crafted rows, where ``f'``
  keeps the simulated Byzantine share at most ``eps-tilde``
  (:func:`simulated_byzantine_rows`).
  With randk the crafted vector is compressed exactly like an honest one.

When run config ``adversary`` is ``'omniscient'`` every client
is honest: the server-side :class:`~flwr_byzantine.strategies.omniscient.OmniscientAdversary`
plays the attackers.

With run config ``client-mode = "local"`` the client trains locally instead, as a
FedAvg client does (:func:`flwr_byzantine.local_training.train_locally`:
``local-epochs`` epochs, or ``local-steps`` steps, of SGD with ``client-lr`` and
mini-batches of ``batch-size``, seeded by run seed, partition id and round) and
replies with its weights under ``"arrays"`` plus ``num-examples`` (served by
``RobustFedAvg``).  A malicious client's model-update attack then acts on the
model update ``u = x_t - w``: its estimate rows are the updates of
``estimate-batches`` local trainings of its own data with independent batch
orders, and it replies with the weights ``x_t - u_crafted``.  Data attacks poison
the data and train honestly; an erasure replies without ``"arrays"``.

Lean process: a SuperNode starts a fresh ClientApp process for every message, so
this module never imports torch.  Gradients, losses and evaluation come from
:mod:`flwr_byzantine.npmodels` (float32 numpy, checked against torch autograd in
``tests/test_npmodels.py``); the aggregators (only the ``defence-aware`` attack
needs one) are imported on first use, and the partition comes from the on-disk
cache of :mod:`flwr_byzantine.data.cache` (no scikit-learn / ``datasets`` import
after the first round).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_byzantine import npmodels
from flwr_byzantine.attacks import ATTACKS, DataAttack, Erasure, UpdateAttack, make_attack, run_attack_params
from flwr_byzantine.protocol import GRADIENT_PROTOCOL, check_protocol
from flwr_byzantine.compression.randk import RANDK_PROCEDURE, coordinate_digest, draw_coordinates
from flwr_byzantine.config import NEWTON_METHODS, RunConfig, parse_run_config
from flwr_byzantine.data import dataset_info
from flwr_byzantine.data.cache import cached_partition
from flwr_byzantine.federation import malicious_partition_ids, node_is_malicious
from flwr_byzantine.local_training import apply_update, model_update, train_locally
from flwr_byzantine import seeds

#: Number of independent mini-batch gradients a colluding attacker draws from its own partition to
#: estimate the honest statistics (node config ``estimate-batches`` overrides it).
DEFAULT_ESTIMATE_BATCHES = 8

_ESTIMATE_SALT = seeds.ESTIMATE_BATCHES


def _node_attack(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> str | None:
    """Attack name for this node, or None if it is honest."""
    if cfg.adversary == "omniscient":
        return None  # the server-side omniscient adversary plays the attackers
    if not node_is_malicious(node_config, partition_id, num_partitions, cfg.num_malicious, cfg.seed):
        return None
    return str(node_config.get("attack", cfg.attack))


def colluders(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> tuple[int, int]:
    """``(f, i)``: how many clients collude and which crafted row this one sends.

    Simulation (no node config ``malicious``): ``f`` is the size of the seeded
    malicious set and ``i`` this partition's rank in it.  Deployment: ``f`` is run
    config ``num-malicious`` (clipped to ``[1, num-partitions]``) and ``i =
    partition-id mod f``.
    """
    if "malicious" not in node_config:
        ids = malicious_partition_ids(num_partitions, cfg.num_malicious, cfg.seed)
        if partition_id in ids:
            return len(ids), ids.index(partition_id)
    f = int(min(max(cfg.num_malicious, 1), max(num_partitions, 1)))
    return f, partition_id % f


def simulated_byzantine_rows(eps_tilde: float, num_estimates: int, num_byzantine: int) -> int:
    """Byzantine rows a defence-aware attacker adds to its ``num_estimates`` honest estimates.

    The simulated federation must have the Byzantine share the defence is configured
    for: the largest ``f' <= num_byzantine`` with ``f' / (num_estimates + f') <=
    eps_tilde``, at least 1.  (Adding all ``f`` colluders to 8 estimates simulated a
    33 % share; the gamma found there was so large that the real server screened the
    rows out, i.e. the attack degenerated into an erasure.)
    """
    eps = min(max(float(eps_tilde), 0.0), 0.5)
    cap = int(math.floor(eps * num_estimates / (1.0 - eps) + 1e-9))
    return max(1, min(int(num_byzantine), cap))


def _defence_aggregator(cfg: RunConfig, num_rows: int):
    """The run config's aggregator as the ServerApp builds it (:func:`build_for_federation`) for ``num_rows``."""
    from flwr_byzantine.aggregators import build_for_federation  # scipy.linalg: only this attack pays for it

    quiet = logging.getLogger("flwr_byzantine.aggregators")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the per-rule cap on f is the server's to report, not every attacker's
    try:
        return build_for_federation(cfg.aggregator, num_rows, cfg.eps_tilde, cfg.sigma0)
    finally:
        quiet.setLevel(level)


def build_attack(name: str, cfg: RunConfig, partition_id: int, num_partitions: int | None = None,
                 num_estimates: int = DEFAULT_ESTIMATE_BATCHES, num_byzantine: int = 1) -> UpdateAttack | DataAttack:
    """Instantiate the attack ``name`` for this client.

    ``attack-scale`` sets the attack's main parameter (the class's ``scale_param``; 0 keeps
    the attack's default, e.g. ALIE's ``z_max`` rule).  Model-update attacks are
    seeded by the run seed only (colluders agree); data attacks by run seed and
    partition id (each client poisons its own data independently).  ALIE's
    ``z_max`` counts ``num_partitions`` workers; ``defence-aware`` targets the run
    config's aggregator simulated on ``num_estimates + num_byzantine`` rows (pass
    ``num_byzantine`` = :func:`simulated_byzantine_rows`, as the ClientApp does).
    """
    params = run_attack_params(name, cfg.attack_scale)
    if name == "alie" and num_partitions is not None:
        params["num_workers"] = int(num_partitions)
    if name == "defence-aware":
        params["aggregator"] = _defence_aggregator(cfg, num_estimates + num_byzantine)
    cls = ATTACKS.get(name)
    data_attack = isinstance(cls, type) and issubclass(cls, DataAttack)
    seed = seeds.client_seed(cfg.seed, partition_id) if data_attack else cfg.seed
    return make_attack(name, seed=seed, **params)


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (every method's ClientApp)."""
    node = context.node_config
    return int(node["partition-id"]), int(node["num-partitions"])


def _setup(msg: Message, context: Context, cfg: RunConfig):
    pid, num = node_partition(context)
    X, y = cached_partition(cfg.dataset, pid, num, cfg.dirichlet_alpha, cfg.seed)
    info = dataset_info(cfg.dataset)
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    params = npmodels.load_params(cfg.model, info["num_features"], info["num_classes"], arrays)
    return cfg, pid, num, X, y, info, params


def local_gradient(model: str, params: Mapping[str, np.ndarray], X: np.ndarray,
                   y: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """Gradient of the mean loss on (X, y) with respect to every parameter of ``model`` (numpy)."""
    return npmodels.loss_and_gradient(model, params, X, y)


def minibatch_indices(n: int, b: int, seed: int, partition_id: int, server_round: int) -> np.ndarray:
    """The honest mini-batch of a round: ``b`` of ``n`` indices without replacement (all if ``b >= n``)."""
    if b >= n:
        return np.arange(n)
    return np.random.default_rng([seed, partition_id, server_round]).choice(n, size=b, replace=False)


def estimate_batches(n: int, b: int, num_batches: int, seed: int, partition_id: int, server_round: int,
                     full_batch: bool = False) -> list[np.ndarray]:
    """Index sets of an attacker's estimate batches (see the module docstring).

    ``num_batches`` independent draws of ``min(b, n)`` indices without replacement,
    batch ``j`` from ``default_rng([seed, partition_id, server_round, seeds.ESTIMATE_BATCHES, j])``;
    with ``full_batch`` (or ``b >= n``) ``min(num_batches, n)`` disjoint chunks of
    one seeded permutation of ``range(n)`` (so their sizes differ by at most one).
    """
    if n < 1 or num_batches < 1:
        raise ValueError(f"need n >= 1 and num_batches >= 1, got n={n}, num_batches={num_batches}")
    if full_batch or b >= n:
        perm = np.random.default_rng([seed, partition_id, server_round, _ESTIMATE_SALT]).permutation(n)
        return [np.sort(c) for c in np.array_split(perm, min(num_batches, n))]
    return [np.random.default_rng([seed, partition_id, server_round, _ESTIMATE_SALT, j]).choice(n, size=b, replace=False)
            for j in range(num_batches)]


def _flatten(grads: Mapping[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([grads[k].ravel() for k in keys]).astype(np.float32)


def _unflatten(flat: np.ndarray, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k, v in params.items():
        out[k] = flat[start : start + v.size].reshape(v.shape)
        start += v.size
    return out


def local_training_weights(cfg: RunConfig, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray,
                           partition_id: int, server_round: int, attack: UpdateAttack | None = None,
                           num_byzantine: int = 0, row: int = 0,
                           num_estimates: int = DEFAULT_ESTIMATE_BATCHES) -> tuple[dict[str, np.ndarray] | None, float]:
    """``(weights to reply, mean local loss)`` of a ``client-mode='local'`` client (weights None: erasure).

    Honest: :func:`train_locally` from x_t = ``params`` with seed ``[seed, partition id, round]``.
    With a model-update ``attack``: ``num_estimates`` local trainings with seeds
    ``[seed, partition id, round, ESTIMATE_BATCHES, j]`` give the estimate updates
    ``x_t - w_j``; the crafted update u (row ``row``) is sent as the weights ``x_t - u``.
    """
    kw = {"local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps, "client_lr": cfg.client_lr,
          "batch_size": cfg.batch_size}
    if attack is None:
        res = train_locally(cfg.model, params, X, y, seed=[cfg.seed, partition_id, server_round], **kw)
        return res.weights, res.loss
    keys = list(params)
    rows, losses = [], []
    for j in range(num_estimates):
        res = train_locally(cfg.model, params, X, y, seed=[cfg.seed, partition_id, server_round, _ESTIMATE_SALT, j],
                            **kw)
        rows.append(_flatten(model_update(params, res.weights), keys))
        losses.append(res.loss)
    crafted = attack.craft(np.stack(rows), num_byzantine, server_round)
    if crafted is None:
        return None, float(np.mean(losses))
    u = np.asarray(crafted, dtype=np.float64)[row % len(crafted)].reshape(-1)
    return apply_update(params, _unflatten(u, params)), float(np.mean(losses))


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated with ``overrides``."""
    app = ClientApp()

    def run_config(context: Context):
        # The ServerApp checked the aggregator name against the registry before round 1.
        return parse_run_config(dict(context.run_config), overrides, check_aggregator=False)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        if cfg.method in NEWTON_METHODS:
            from clients.newton import newton_train  # scipy: only Newton clients pay for it

            return newton_train(msg, context, cfg)
        return sgd_train(msg, context, cfg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        if cfg.method in NEWTON_METHODS:
            from clients.newton import newton_evaluate

            return newton_evaluate(msg, context, cfg)
        return sgd_evaluate(msg, context, cfg)

    return app


def sgd_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Reply to an SGD train message: a (possibly crafted) gradient, or local-training weights."""
    config = msg.content["config"]
    check_protocol(config, GRADIENT_PROTOCOL, required=False)  # RobustFedAvg (local mode) sends no tag
    cfg, pid, num, X, y, info, params = _setup(msg, context, cfg)
    server_round = int(config["server-round"])
    node = context.node_config
    attack_name = _node_attack(cfg, node, pid, num)
    num_est = int(node.get("estimate-batches", DEFAULT_ESTIMATE_BATCHES))
    if num_est < 1:
        raise ValueError(f"node config 'estimate-batches' must be >= 1, got {num_est}")
    f, row = colluders(cfg, node, pid, num) if attack_name else (0, 0)
    if attack_name == "defence-aware":
        f = simulated_byzantine_rows(cfg.eps_tilde, num_est, f)
    attack = build_attack(attack_name, cfg, pid, num, num_est, f) if attack_name else None
    metrics: dict[str, Any] = {"server-round": server_round, "partition-id": pid}
    if isinstance(attack, Erasure):  # erasure: a reply without any gradient, screened out by the server
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if isinstance(attack, DataAttack):
        X, y = attack.poison(X, y, info["num_classes"])

    if cfg.client_mode == "local":
        update_attack = attack if isinstance(attack, UpdateAttack) else None
        weights, loss = local_training_weights(cfg, params, X, y, pid, server_round, update_attack, f, row, num_est)
        if weights is None:  # an attack that erases in this round
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        metrics.update({"num-examples": int(len(y)), "train-loss": loss})
        payload = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
        return Message(RecordDict({"arrays": payload, "metrics": MetricRecord(metrics)}), reply_to=msg)

    n = len(y)
    full = bool(config.get("full-batch", False))
    b = n if full else min(int(config.get("batch-size", cfg.batch_size)), n)
    keys = list(params)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if isinstance(attack, UpdateAttack):
        batches = estimate_batches(n, b, num_est, cfg.seed, pid, server_round, full_batch=full)
        rows, losses = [], []
        for idx in batches:
            grads, loss_j = local_gradient(cfg.model, params, X[idx], y[idx])
            rows.append(_flatten(grads, keys))
            losses.append(loss_j)
        crafted = attack.craft(np.stack(rows), f, server_round)
        if crafted is None:  # an attack that erases in this round
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        flat = np.asarray(crafted, dtype=np.float32)[row % len(crafted)].reshape(-1)
        loss = float(np.mean(losses))
    else:
        idx = minibatch_indices(n, b, cfg.seed, pid, server_round)  # without replacement
        grads, loss = local_gradient(cfg.model, params, X[idx], y[idx])
        flat = _flatten(grads, keys)

    metrics.update({"num-examples": int(b), "train-loss": loss})
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
            size = int(np.prod(shapes[k]))
            out[k] = Array(np.ascontiguousarray(flat[start : start + size].reshape(shapes[k])))
            start += size
        payload = ArrayRecord(out)
    return Message(RecordDict({"gradient": payload, "metrics": MetricRecord(metrics)}), reply_to=msg)


def sgd_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Reply to an SGD evaluate message: loss (and accuracy) of the broadcast model on the local data."""
    cfg, pid, _num, X, y, _info, params = _setup(msg, context, cfg)
    result = npmodels.evaluate(cfg.model, params, X, y)
    metrics: dict[str, Any] = {"eval-loss": result["loss"], "num-examples": int(len(y)), "partition-id": pid}
    if "accuracy" in result:
        metrics["eval-accuracy"] = result["accuracy"]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


app = build_client_app()

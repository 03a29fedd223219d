"""Vectorised federation simulator for the robustness grid (no Flower messages, same math).

A round of the Flower App (``clients/client_app.py`` + ``RobustSGD``) costs ~50 ms of
message plumbing in-process; the robustness grid of issue 10 has thousands of
200-round federations, so it runs them here instead.  Everything that decides a number
is the App's own code:

* data: :func:`flwr_byzantine.data.load_partition` / ``load_test_set`` (same Dirichlet
  partitions, same test split);
* the initial model: :func:`flwr_byzantine.models.build_model` (same seed, same layout);
* the honest mini-batch of every client and round: ``clients.client_app.minibatch_indices``;
  the attackers' estimate batches: ``clients.client_app.estimate_batches``; the attack
  objects: ``clients.client_app.build_attack`` (client side) or the omniscient
  adversary's ``attack.craft(honest rows, f, round)`` (server side, static or mobile
  corrupt set from :class:`~flwr_byzantine.attacks.MobileAdversary`);
* the server: ``aggregator.aggregate(G, client_ids=node ids)`` then
  ``x <- x - lr * estimate``, as ``RobustSGD`` does (node ids are stable per client,
  so stateful defences see what they would see in a deployment).

``SimConfig(mode="local")`` runs the App's other protocol, ``client-mode='local'`` served
by ``RobustFedAvg``: each client runs :func:`flwr_byzantine.local_training.train_locally`'s
SGD (same batch schedule; :func:`local_updates` runs all the round's trainings at
once) and replies with the model update ``x_t - w_i``, on which the attacks act.  Local
mode also applies the strategies' magnitude screen of the replies (:func:`screen_magnitudes`;
``SimConfig.screen``), which the gradient-mode grid of issue 10 ran without.

Only the gradient arithmetic differs: numpy float64 closed forms of the logistic
regression and one-hidden-layer MLP gradients instead of torch autograd in float32.
``tests/test_fastsim.py`` checks them against torch and the whole federation against
the in-process Flower path.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NODE_ID_OFFSET = 1000  # node id of partition p is NODE_ID_OFFSET + p (not equal to the partition id on purpose)


# ------------------------------------------------------------------ models (numpy)

class NumpyModel:
    """Flat-parameter numpy view of ``build_model(name, ...)``: loss, gradient and accuracy.

    The flat vector follows the torch ``state_dict`` order (``linear.weight, linear.bias`` for
    ``logreg``; ``fc1.weight, fc1.bias, fc2.weight, fc2.bias`` for ``mlp``), so it is exactly
    the vector ``RobustSGD`` aggregates.
    """

    def __init__(self, name: str, num_features: int, num_classes: int, seed: int) -> None:
        from flwr_byzantine.models import build_model

        torch_model = build_model(name, num_features, num_classes, seed)
        state = torch_model.state_dict()
        self.name = name
        self.keys = list(state.keys())
        self.shapes = [tuple(v.shape) for v in state.values()]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.x0 = np.concatenate([v.detach().numpy().astype(np.float64).ravel() for v in state.values()])
        self.num_classes = num_classes

    @property
    def dim(self) -> int:
        return int(self.x0.size)

    def unflatten(self, x: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            out.append(x[start:start + size].reshape(shape))
            start += size
        return out

    def _logits(self, x: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, tuple]:
        p = self.unflatten(x)
        if self.name == "logreg":
            W, b = p
            return X @ W.T + b, ()
        W1, b1, W2, b2 = p
        h = X @ W1.T + b1
        a = np.maximum(h, 0.0)
        return a @ W2.T + b2, (h, a)

    def grad(self, x: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """Gradient of the mean softmax cross-entropy on ``(X, y)`` at ``x`` and the loss."""
        logits, cache = self._logits(x, X)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        prob = e / s
        n = X.shape[0]
        idx = np.arange(n)
        loss = float(np.mean(np.log(s[:, 0]) - z[idx, y]))
        G = prob
        G[idx, y] -= 1.0
        G /= n
        if self.name == "logreg":
            return np.concatenate([(G.T @ X).ravel(), G.sum(axis=0)]), loss
        h, a = cache
        W2 = self.unflatten(x)[2]
        dW2 = G.T @ a
        dh = (G @ W2) * (h > 0)
        return np.concatenate([(dh.T @ X).ravel(), dh.sum(axis=0), dW2.ravel(), G.sum(axis=0)]), loss

    def grad_batched(self, x: np.ndarray, Xb: np.ndarray, yb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """:meth:`grad` of ``m`` batches at once: ``Xb (m, b, p)``, ``yb (m, b)`` -> ``(m, d)``.

        ``x`` is one parameter vector ``(d,)`` or one per batch ``(m, d)`` (local training
        runs many models at once).  ``mask (m, b)`` (0/1) marks the real examples of
        padded batches of unequal size: row ``j``'s gradient is the mean over its
        ``mask[j].sum()`` real examples (the padding contributes nothing).
        """
        p = self._unflatten_any(x)
        m, n, _ = Xb.shape
        if self.name == "logreg":
            W, bias = p
            logits = Xb @ np.swapaxes(W, -1, -2) + bias[..., None, :]
        else:
            W1, b1, W2, b2 = p
            h = Xb @ np.swapaxes(W1, -1, -2) + b1[..., None, :]
            a = np.maximum(h, 0.0)
            logits = a @ np.swapaxes(W2, -1, -2) + b2[..., None, :]
        z = logits - logits.max(axis=2, keepdims=True)
        e = np.exp(z)
        G = e / e.sum(axis=2, keepdims=True)
        G[np.arange(m)[:, None], np.arange(n)[None, :], yb] -= 1.0
        if mask is None:
            G /= n
        else:
            mask = np.asarray(mask, dtype=np.float64)
            G *= (mask / mask.sum(axis=1, keepdims=True))[:, :, None]
        if self.name == "logreg":
            return np.concatenate([np.einsum("mbc,mbp->mcp", G, Xb).reshape(m, -1), G.sum(axis=1)], axis=1)
        dW2 = np.einsum("mbc,mbh->mch", G, a)
        dh = (G @ W2) * (h > 0)
        return np.concatenate([np.einsum("mbh,mbp->mhp", dh, Xb).reshape(m, -1), dh.sum(axis=1),
                               dW2.reshape(m, -1), G.sum(axis=1)], axis=1)

    def _unflatten_any(self, x: np.ndarray) -> list[np.ndarray]:
        """:meth:`unflatten` of one vector ``(d,)`` or of each row of ``(m, d)`` (arrays ``(m, *shape)``)."""
        if x.ndim == 1:
            return self.unflatten(x)
        out, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            out.append(x[:, start:start + size].reshape((x.shape[0], *shape)))
            start += size
        return out

    def accuracy(self, x: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        logits, _ = self._logits(x, X)
        return float(np.mean(np.argmax(logits, axis=1) == y))


# ------------------------------------------------------------------ local training (client-mode 'local')

def local_updates(model: NumpyModel, x: np.ndarray, data: list[tuple[np.ndarray, np.ndarray]],
                  seeds: list[list[int]], *, local_epochs: int, local_steps: int, client_lr: float,
                  batch_size: int) -> np.ndarray:
    """Model updates ``x - w_j`` of ``len(data)`` local trainings from ``x``, vectorised over the trainings.

    Training ``j`` is :func:`flwr_byzantine.local_training.train_locally` on ``data[j]``
    with seed ``seeds[j]``: the same batch schedule
    (:func:`~flwr_byzantine.local_training.batch_schedule`) and the same SGD steps
    ``w <- w - client_lr * mean-batch gradient``, in float64.  Step ``s`` of every
    training that has one runs as one :meth:`NumpyModel.grad_batched` call (batches of
    unequal size are padded and masked).
    """
    from flwr_byzantine.local_training import batch_schedule

    m = len(data)
    schedules = [batch_schedule(len(y), batch_size, local_epochs, local_steps, sd) for (_, y), sd in zip(data, seeds)]
    W = np.tile(x, (m, 1))
    nsteps = np.array([len(s) for s in schedules])
    p = data[0][0].shape[1] if m else 0
    for step in range(int(nsteps.max()) if m else 0):
        active = np.flatnonzero(nsteps > step)
        bmax = max(len(schedules[j][step]) for j in active)
        Xb = np.zeros((active.size, bmax, p))
        yb = np.zeros((active.size, bmax), dtype=np.int64)
        mask = np.zeros((active.size, bmax))
        for r, j in enumerate(active):
            idx = schedules[j][step]
            X, y = data[j]
            Xb[r, :idx.size], yb[r, :idx.size], mask[r, :idx.size] = X[idx], y[idx], 1.0
        W[active] -= client_lr * model.grad_batched(W[active], Xb, yb, mask)
    return x[None, :] - W


# ------------------------------------------------------------------ one federation

@dataclass
class SimConfig:
    """One federation of the grid (the run-config values the App would get)."""

    dataset: str = "digits"
    alpha: float = 1.0
    model: str = "logreg"
    num_nodes: int = 20
    num_malicious: int = 4
    attack: str = "none"  # "none": clean; "erasure": the honest-only oracle
    adversary: str = "client"  # "client" | "omniscient"
    adversary_mode: str = "static"  # omniscient only: "static" | "rotate"
    attack_scale: float = 0.0
    eps_tilde: float = 0.2
    rounds: int = 60
    learning_rate: float = 0.5
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 10
    estimate_batches: int = 8
    #: ``"gradient"``: one mini-batch gradient per client and round (``RobustSGD``); ``"local"``: every
    #: client trains locally and replies with ``x_t - w_i`` (``client-mode='local'``, ``RobustFedAvg``);
    #: ``learning_rate`` is then the server's step ``server-lr``
    mode: str = "gradient"
    #: local mode: ``local-epochs`` / ``local-steps`` / ``client-lr`` (None: the App's run-config defaults)
    local_epochs: int | None = None
    local_steps: int | None = None
    client_lr: float | None = None
    #: the strategies' magnitude screen of the replies (:func:`screen_magnitudes`); None: in local mode only
    #: (the gradient-mode grid of issue 10 ran without it)
    screen: bool | None = None


@dataclass
class SimResult:
    final_accuracy: float
    accuracy: list[float]
    eval_rounds: list[int]
    honest_excluded_rate: float
    malicious_excluded_rate: float
    seconds: float
    decode_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _run_config(cfg: SimConfig, aggregator_name: str) -> Any:
    from flwr_byzantine.config import RunConfig

    return RunConfig.from_mapping({
        "seed": cfg.seed, "dataset": cfg.dataset, "dirichlet-alpha": cfg.alpha, "model": cfg.model,
        "batch-size": cfg.batch_size, "learning-rate": cfg.learning_rate,
        "aggregator": aggregator_name, "eps-tilde": min(cfg.eps_tilde, 0.25),
        "num-malicious": cfg.num_malicious,
        # the run config only validates here; the attack objects are built by name below (the App's run
        # config refuses attacks that need model history, which this simulator provides)
        "attack": cfg.attack if cfg.attack not in ("none", "memory-aware") else "sign-flip",
        "attack-scale": cfg.attack_scale,
        **({"client-mode": "local",
            **{k: v for k, v in (("local-epochs", cfg.local_epochs), ("local-steps", cfg.local_steps),
                                 ("client-lr", cfg.client_lr)) if v is not None}}
           if cfg.mode == "local" else {}),
    })


_DATA_CACHE: dict[tuple, Any] = {}


def _data(cfg: SimConfig):
    from flwr_byzantine.data import dataset_info, load_partition, load_test_set

    key = (cfg.dataset, cfg.alpha, cfg.num_nodes, cfg.seed)
    if key not in _DATA_CACHE:
        parts = [load_partition(cfg.dataset, p, cfg.num_nodes, cfg.alpha, cfg.seed) for p in range(cfg.num_nodes)]
        parts = [(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)) for X, y in parts]
        Xt, yt = load_test_set(cfg.dataset, cfg.seed)
        _DATA_CACHE[key] = (parts, (np.asarray(Xt, dtype=np.float64), np.asarray(yt, dtype=np.int64)),
                            dataset_info(cfg.dataset))
    return _DATA_CACHE[key]


def simulate(cfg: SimConfig, aggregator: Any, aggregator_name: str = "mean", progress: Any = None) -> SimResult:
    """Run one federation; ``aggregator`` is the server's rule (an ``Aggregator``), used as ``RobustSGD`` uses it.

    ``aggregator_name`` is the run config's ``aggregator`` (what the client-side defence-aware
    attack simulates).  ``cfg.attack == "erasure"`` gives the honest-only oracle (the
    malicious clients send nothing), ``"none"`` a clean federation.

    ``cfg.mode == "local"`` is the App's ``client-mode='local'`` served by ``RobustFedAvg``
    (server momentum 0): each honest client replies with the update ``x_t - w_i`` of its
    local training (seed ``[seed, partition, round]``); a client-side attacker crafts from
    the updates of ``estimate_batches`` local trainings of its own data (seeds ``[seed,
    partition, round, ESTIMATE_BATCHES, j]``) and, for ``defence-aware``, simulates
    :func:`~clients.client_app.simulated_byzantine_rows` Byzantine rows, as
    ``local_training_weights`` and the ClientApp do; the omniscient adversary crafts from the
    honest updates (the App refuses it in local mode: its server-side adversary sees weights);
    the server steps ``x <- x - learning_rate * aggregate(updates)``.  Pass the aggregator
    ``server_app.build_aggregator`` builds for local mode (the default defence without its
    gradient evidence).
    """
    from clients.client_app import build_attack, estimate_batches, minibatch_indices, simulated_byzantine_rows
    from flwr_byzantine import seeds
    from flwr_byzantine.attacks import ATTACKS, DataAttack, MobileAdversary
    from flwr_byzantine.federation import malicious_partition_ids

    if cfg.mode not in ("gradient", "local"):
        raise ValueError(f"mode must be 'gradient' or 'local', got {cfg.mode!r}")
    local_mode = cfg.mode == "local"
    screen = local_mode if cfg.screen is None else bool(cfg.screen)
    t_start = time.perf_counter()
    parts, (Xt, yt), info = _data(cfg)
    rc = _run_config(cfg, aggregator_name)
    model = NumpyModel(cfg.model, info["num_features"], info["num_classes"], cfg.seed)
    R = cfg.num_nodes
    f = 0 if cfg.attack == "none" else int(cfg.num_malicious)
    malicious = malicious_partition_ids(R, f, cfg.seed) if f else []
    attack_cls = ATTACKS.get(cfg.attack)
    data_attack = isinstance(attack_cls, type) and issubclass(attack_cls, DataAttack)
    omniscient = cfg.adversary == "omniscient" and f > 0 and not data_attack and cfg.attack != "erasure"
    node_ids = [NODE_ID_OFFSET + p for p in range(R)]

    # per-partition data (data attacks poison once, as the client does)
    local = []
    for p, (X, y) in enumerate(parts):
        if data_attack and p in malicious:
            atk = build_attack(cfg.attack, rc, p, R)
            X, y = atk.poison(X, y, info["num_classes"])
            X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)
        local.append((X, y))

    client_attacks: dict[int, Any] = {}
    f_client = f
    if f and not omniscient and not data_attack and cfg.attack not in ("none",):
        # local mode sizes the defence-aware attacker's simulated Byzantine rows as the ClientApp does
        f_client = (simulated_byzantine_rows(rc.eps_tilde, cfg.estimate_batches, f)
                    if local_mode and cfg.attack == "defence-aware" else f)
        for rank, p in enumerate(malicious):
            if cfg.attack != "erasure":
                client_attacks[p] = (rank, build_attack(cfg.attack, rc, p, R, cfg.estimate_batches, f_client))
    omni_attack = None
    mobile = None
    if omniscient:
        omni_attack = build_attack(cfg.attack, rc, 0, R, num_estimates=R - f, num_byzantine=f)
        if cfg.adversary_mode != "static":
            mobile = MobileAdversary(num_byzantine=f, seed=cfg.seed, mode=cfg.adversary_mode)

    x = model.x0.copy()
    accs, eval_rounds = [], []
    honest_rounds = honest_excl = mal_rounds = mal_excl = 0
    decode_total = 0.0
    applied = 0
    for t in range(1, cfg.rounds + 1):
        rows, ids, corrupt_now = [], [], set()
        if omniscient:
            corrupt_now = set(malicious) if mobile is None else {
                n - NODE_ID_OFFSET for n in mobile.corrupt_set(t, node_ids)}
        if local_mode:  # every local training of the round (honest replies, attackers' estimates) at once
            jobs: list[tuple[int, int]] = []  # (partition, estimate index or -1)
            for p in range(R):
                if cfg.attack == "erasure" and p in malicious:
                    continue
                jobs += [(p, j) for j in range(cfg.estimate_batches)] if p in client_attacks else [(p, -1)]
            U = local_updates(model, x, [local[p] for p, _ in jobs],
                              [[cfg.seed, p, t] if j < 0 else [cfg.seed, p, t, seeds.ESTIMATE_BATCHES, j]
                               for p, j in jobs],
                              local_epochs=rc.local_epochs, local_steps=rc.local_steps, client_lr=rc.client_lr,
                              batch_size=cfg.batch_size)
            rows_of: dict[int, list[int]] = {}
            for i, (p, _) in enumerate(jobs):
                rows_of.setdefault(p, []).append(i)
        for p, (X, y) in enumerate(local):
            n = len(y)
            b = min(cfg.batch_size, n)
            if p in client_attacks or (cfg.attack == "erasure" and p in malicious):
                if cfg.attack == "erasure":
                    continue
                rank, atk = client_attacks[p]
                if hasattr(atk, "aim_at") and getattr(aggregator, "evidence", None) is not None:
                    atk.aim_at(aggregator.evidence)  # knows the rule: attacked at its (last round's) levels
                if hasattr(atk, "observe_model"):
                    atk.observe_model(x)
                if local_mode:
                    est = U[rows_of[p]]
                else:
                    batches = estimate_batches(n, b, cfg.estimate_batches, cfg.seed, p, t)
                    if len({len(i) for i in batches}) == 1:
                        idx = np.stack(batches)
                        est = model.grad_batched(x, X[idx], y[idx])
                    else:
                        est = np.stack([model.grad(x, X[i], y[i])[0] for i in batches])
                crafted = atk.craft(est, f_client, t)
                if crafted is None:
                    continue
                vec = np.asarray(crafted, dtype=np.float64)[rank % len(crafted)].reshape(-1)
            elif local_mode:
                vec = U[rows_of[p][0]]
            else:
                idx = minibatch_indices(n, b, cfg.seed, p, t)
                vec = model.grad(x, X[idx], y[idx])[0]
            rows.append(vec)
            ids.append(NODE_ID_OFFSET + p)
        G = np.stack(rows)
        if omni_attack is not None and corrupt_now:
            pos = [i for i, nid in enumerate(ids) if nid - NODE_ID_OFFSET in corrupt_now]
            honest_pos = [i for i in range(len(ids)) if i not in pos]
            if hasattr(omni_attack, "observe_model"):
                omni_attack.observe_model(x)
            if hasattr(omni_attack, "aggregator") and getattr(omni_attack, "aggregator", None) is not None:
                omni_attack.aggregator = _attacker_copy(aggregator)
                omni_attack.client_ids = [ids[i] for i in honest_pos] + [ids[i] for i in pos]
            crafted = omni_attack.craft(G[honest_pos], len(pos), t)
            if crafted is None:
                G = G[honest_pos]
                ids = [ids[i] for i in honest_pos]
            else:
                crafted = np.asarray(crafted, dtype=np.float64)
                for j, i in enumerate(pos):
                    G[i] = crafted[j % len(crafted)]
        bad_now = corrupt_now if omniscient else set(malicious if cfg.attack not in ("none", "erasure") else [])
        replied = list(ids)
        if screen:
            ok = screen_magnitudes(G)
            G, ids = G[ok], [nid for nid, keep in zip(ids, ok) if keep]
        t0 = time.perf_counter()
        res = aggregate(aggregator, G, ids)
        decode_total += time.perf_counter() - t0
        est = np.asarray(res.estimate, dtype=np.float64)
        if np.all(np.isfinite(est)):
            x = x - cfg.learning_rate * est
            applied += 1
        kept = set(int(ids[i]) for i in np.asarray(res.kept).tolist())
        for nid in replied:  # a screened-out reply counts as excluded
            p = nid - NODE_ID_OFFSET
            if p in bad_now:
                mal_rounds += 1
                mal_excl += nid not in kept
            else:
                honest_rounds += 1
                honest_excl += nid not in kept
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            accs.append(model.accuracy(x, Xt, yt))
            eval_rounds.append(t)
        if progress is not None:
            progress(t)
    return SimResult(
        final_accuracy=accs[-1], accuracy=accs, eval_rounds=eval_rounds,
        honest_excluded_rate=honest_excl / max(honest_rounds, 1),
        malicious_excluded_rate=mal_excl / max(mal_rounds, 1) if mal_rounds else float("nan"),
        seconds=time.perf_counter() - t_start, decode_seconds=decode_total,
        info={"applied_rounds": applied, "malicious_partitions": malicious},
    )


def screen_magnitudes(G: np.ndarray) -> np.ndarray:
    """Rows the strategies' reply screen lets through (``strategies.validation``, default ``ReplyPolicy``).

    Rejected: non-finite rows, rows with an entry above ``max_abs_value`` (the float32 maximum),
    and rows whose norm exceeds ``max_norm_ratio`` (1e6) times the round's lower median non-zero
    norm (:func:`~flwr_byzantine.strategies.validation.norm_ratio_outliers`).  Returns a boolean mask.
    """
    from flwr_byzantine.strategies.validation import ReplyPolicy, norm_ratio_outliers

    policy = ReplyPolicy()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(G).all(axis=1) & (np.abs(G).max(axis=1, initial=0.0) <= policy.max_abs_value)
    if policy.max_norm_ratio:
        idx = np.flatnonzero(ok)
        _, _, absurd = norm_ratio_outliers(list(G[idx]), policy.max_norm_ratio)
        ok[idx[absurd]] = False
    return ok


def aggregate(aggregator: Any, G: np.ndarray, ids: list[int]):
    """``aggregator.aggregate(G, client_ids=ids)`` for rules whose ``aggregate`` takes node ids, else ``aggregate(G)``.

    Decided from the signature, not by catching a ``TypeError``: a ``TypeError`` raised inside a rule that takes ids
    must surface, not rerun the round without ids (statelessly)."""
    if "client_ids" in inspect.signature(aggregator.aggregate).parameters:
        return aggregator.aggregate(G, client_ids=ids)
    return aggregator.aggregate(G)


def _attacker_copy(aggregator: Any) -> Any:
    """What an omniscient defence-aware attacker simulates: a copy of the server's rule and state."""
    return copy.deepcopy(aggregator)

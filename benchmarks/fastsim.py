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

Only the gradient arithmetic differs: numpy float64 closed forms of the logistic
regression and one-hidden-layer MLP gradients instead of torch autograd in float32.
``tests/test_fastsim.py`` checks them against torch and the whole federation against
the in-process Flower path.
"""

from __future__ import annotations

import copy
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

    def grad_batched(self, x: np.ndarray, Xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
        """:meth:`grad` of ``m`` equal-size batches at once: ``Xb (m, b, p)``, ``yb (m, b)`` -> ``(m, d)``."""
        p = self.unflatten(x)
        m, n, _ = Xb.shape
        if self.name == "logreg":
            W, bias = p
            logits = Xb @ W.T + bias
        else:
            W1, b1, W2, b2 = p
            h = Xb @ W1.T + b1
            a = np.maximum(h, 0.0)
            logits = a @ W2.T + b2
        z = logits - logits.max(axis=2, keepdims=True)
        e = np.exp(z)
        G = e / e.sum(axis=2, keepdims=True)
        G[np.arange(m)[:, None], np.arange(n)[None, :], yb] -= 1.0
        G /= n
        if self.name == "logreg":
            return np.concatenate([np.einsum("mbc,mbp->mcp", G, Xb).reshape(m, -1), G.sum(axis=1)], axis=1)
        dW2 = np.einsum("mbc,mbh->mch", G, a)
        dh = (G @ W2) * (h > 0)
        return np.concatenate([np.einsum("mbh,mbp->mhp", dh, Xb).reshape(m, -1), dh.sum(axis=1),
                               dW2.reshape(m, -1), G.sum(axis=1)], axis=1)

    def accuracy(self, x: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        logits, _ = self._logits(x, X)
        return float(np.mean(np.argmax(logits, axis=1) == y))


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
    """
    from clients.client_app import build_attack, estimate_batches, minibatch_indices
    from flwr_byzantine.attacks import ATTACKS, DataAttack, MobileAdversary
    from flwr_byzantine.federation import malicious_partition_ids

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
    if f and not omniscient and not data_attack and cfg.attack not in ("none",):
        for rank, p in enumerate(malicious):
            if cfg.attack != "erasure":
                client_attacks[p] = (rank, build_attack(cfg.attack, rc, p, R, cfg.estimate_batches, f))
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
        for p, (X, y) in enumerate(local):
            n = len(y)
            b = min(cfg.batch_size, n)
            if p in client_attacks or (cfg.attack == "erasure" and p in malicious):
                if cfg.attack == "erasure":
                    continue
                rank, atk = client_attacks[p]
                if hasattr(atk, "observe_model"):
                    atk.observe_model(x)
                batches = estimate_batches(n, b, cfg.estimate_batches, cfg.seed, p, t)
                if len({len(i) for i in batches}) == 1:
                    idx = np.stack(batches)
                    est = model.grad_batched(x, X[idx], y[idx])
                else:
                    est = np.stack([model.grad(x, X[i], y[i])[0] for i in batches])
                crafted = atk.craft(est, f, t)
                if crafted is None:
                    continue
                vec = np.asarray(crafted, dtype=np.float64)[rank % len(crafted)].reshape(-1)
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
            crafted = omni_attack.craft(G[honest_pos], len(pos), t)
            if crafted is None:
                G = G[honest_pos]
                ids = [ids[i] for i in honest_pos]
            else:
                crafted = np.asarray(crafted, dtype=np.float64)
                for j, i in enumerate(pos):
                    G[i] = crafted[j % len(crafted)]
        bad_now = corrupt_now if omniscient else set(malicious if cfg.attack not in ("none", "erasure") else [])
        t0 = time.perf_counter()
        res = aggregate(aggregator, G, ids)
        decode_total += time.perf_counter() - t0
        est = np.asarray(res.estimate, dtype=np.float64)
        if np.all(np.isfinite(est)):
            x = x - cfg.learning_rate * est
            applied += 1
        kept = set(int(ids[i]) for i in np.asarray(res.kept).tolist())
        for nid in ids:
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


def aggregate(aggregator: Any, G: np.ndarray, ids: list[int]):
    """``aggregator.aggregate(G, client_ids=ids)`` for rules that take node ids, else ``aggregate(G)``."""
    try:
        return aggregator.aggregate(G, client_ids=ids)
    except TypeError:
        return aggregator.aggregate(G)


def _attacker_copy(aggregator: Any) -> Any:
    """What an omniscient defence-aware attacker simulates: a copy of the server's rule and state."""
    return copy.deepcopy(aggregator)

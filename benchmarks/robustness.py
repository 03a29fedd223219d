"""Robustness benchmark: aggregators x attacks x Byzantine fraction x heterogeneity x seeds.

One command::

    python -m benchmarks.robustness            # the default configuration (see below)
    python -m benchmarks.robustness --quick    # CI smoke size (a few minutes)
    python -m benchmarks.robustness --full     # the full grid (hours; see docs/benchmarks.md)
    python -m benchmarks.robustness --resume   # continue an interrupted grid (skips runs in the JSONL)
    python -m benchmarks.robustness --adversary omniscient --resume   # the same grid, server-side omniscient attackers
    python -m benchmarks.robustness --report-only   # rebuild tables and plots from the JSONL

Every run goes through the same code path as a Flower run: the real ClientApp
(``clients.client_app.build_client_app``) on every virtual node of an
:class:`~benchmarks.inprocess.InProcessGrid` (no Ray; a seeded run gives exactly
the final accuracy of ``python -m server_app.simulate``), and on the server the
ServerApp's own pieces: ``build_strategy`` (RobustSGD with the run config's
aggregator), ``central_evaluator`` and ``strategy.start``.  Malicious clients are
the run config's ``num-malicious = round(eps * R)`` seeded partition ids, attacking
with run config ``attack`` as the ClientApp implements it.

Rules (``--aggregators``):

* ours, through ``RobustSGD``: ``rge``, ``mean`` (FedAvg's rule under attack),
  ``median``, ``trimmed-mean``, ``krum``, ``multi-krum``, ``bulyan``, ``geomed``,
  ``cclip``, ``bucketing:<inner>`` and ``nnm:<inner>`` (pre-aggregation wrappers of
  another rule; the clients' run config names the inner rule, which is what the
  client-side defence-aware attack then targets; the omniscient one targets the
  wrapper itself).  Not in the default grid: ``rge-x<k>``, RGE with the stopping
  threshold ``k R sigma0_hat^2`` instead of Algorithm 3's ``4 R sigma0^2`` (a
  diagnostic of the threshold constant).  Peers are told the true number of Byzantine
  clients ``f = num-malicious`` (``eps-tilde = eps``);
* Flower's own rules, ``flwr.serverapp.strategy``: ``flwr-fedmedian``,
  ``flwr-fedtrimmedavg`` (``beta = eps``), ``flwr-krum``, ``flwr-multikrum``
  (``num_nodes_to_select = R - f``), ``flwr-bulyan`` (``num_malicious_nodes = f``).
  They average *models*: :class:`ModelReplyAdapter` turns each gradient reply ``g``
  into the model ``x_t - lr * g`` (with the client's ``num-examples``), i.e. FedAvg
  with one local SGD step, which equals applying the rule to the gradients.
* references, in the same grid (per heterogeneity level and seed, not per attack):
  ``clean-fedavg`` (mean, no attacker) and ``oracle`` (mean over the honest clients
  only: the malicious clients are erased, attack ``erasure``), what a perfect filter gives.

Attacks (``--attacks``): ``gaussian``, ``sign-flip``, ``scaled-negative``, ``alie``,
``ipm``, ``mimic``, ``label-flip``, ``random-labels``, ``defence-aware``, each with
its own default parameter (run config ``attack-scale = 0``; ``--attack-scale``
overrides).  ``--adversary omniscient`` replaces the client-side model-update
attackers by the server-side :class:`~flwr_byzantine.strategies.omniscient.OmniscientAdversary`
(colluders that see every honest gradient of the round, the papers' worst case);
data-poisoning attacks stay client-side.

Datasets (``--datasets``): ``digits`` (offline; heterogeneity = Dirichlet ``--alphas``)
and the Section 6 synthetic model ``synthetic-logreg`` / ``synthetic-linreg``
(heterogeneity = ``--kappas``).  Classification is scored by final test accuracy
(higher is better), regression by final test loss (lower is better).

Outputs in ``--out`` (default ``benchmarks/results``): ``robustness.jsonl`` (one line
per run, appended as runs finish; a rerun appends and the last line of a run wins,
so several grids can share the file), ``robustness.md`` (final accuracy mean +- std over
seeds per rule and attack, the worst case per rule, per dataset / eps /
heterogeneity), ``robustness_curves_<dataset>_<eps>_<het>.png`` (accuracy versus
rounds, one panel per attack) and ``robustness_worst.png`` (worst case per rule).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ("ipm", "mimic", "alie", "defence-aware", "scaled-negative", "sign-flip", "gaussian", "label-flip",
           "random-labels")
OUR_RULES = ("rge", "mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geomed", "cclip",
             "bucketing:cclip", "nnm:cclip")
FLOWER_RULES = ("flwr-fedmedian", "flwr-fedtrimmedavg", "flwr-krum", "flwr-multikrum", "flwr-bulyan")
REFERENCES = ("clean-fedavg", "oracle")
ALL_RULES = OUR_RULES + FLOWER_RULES

#: Our rule computing what each Flower rule computes (the rule the clients' defence-aware attack simulates).
FLOWER_EQUIVALENT = {"flwr-fedmedian": "median", "flwr-fedtrimmedavg": "trimmed-mean", "flwr-krum": "krum",
                     "flwr-multikrum": "multi-krum", "flwr-bulyan": "bulyan"}
#: Run-config aggregators ``RunConfig`` accepts directly (others are wrappers built here).
_CONFIG_RULES = ("rge", "mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geomed", "cclip")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
JSONL_NAME = "robustness.jsonl"


# ------------------------------------------------------------------ grid

@dataclass(frozen=True)
class RunSpec:
    """One federation of the grid."""

    dataset: str
    het: float  # Dirichlet alpha (digits) or kappa (synthetic)
    eps: float
    aggregator: str
    attack: str  # "none" for clean-fedavg, "erasure" for oracle
    seed: int
    rounds: int
    num_nodes: int
    adversary: str = "client"
    learning_rate: float = 0.5
    batch_size: int = 32
    attack_scale: float = 0.0
    model: str = "logreg"

    @property
    def synthetic(self) -> bool:
        return self.dataset.startswith("synthetic")

    @property
    def het_label(self) -> str:
        return f"{'kappa' if self.synthetic else 'alpha'}={self.het:g}"

    @property
    def num_malicious(self) -> int:
        if self.aggregator == "clean-fedavg":
            return 0
        return int(round(self.eps * self.num_nodes))

    def key(self) -> str:
        """Identity of the run in the JSONL (everything that changes the result)."""
        return "|".join(str(v) for v in (
            self.dataset, self.het_label, f"eps={self.eps:g}", self.aggregator, self.attack, f"seed={self.seed}",
            f"T={self.rounds}", f"R={self.num_nodes}", self.adversary, f"lr={self.learning_rate:g}",
            f"b={self.batch_size}", f"scale={self.attack_scale:g}", self.model))

    def dataset_name(self) -> str:
        """The run config's ``dataset`` (synthetic names carry kappa)."""
        if self.synthetic:
            base, _, spec = self.dataset.partition(":")
            extra = [s for s in spec.split(",") if s and not s.startswith("kappa=")]
            return f"{base}:" + ",".join([f"kappa={self.het:g}", *extra])
        return self.dataset


def _priority(seq: Iterable[str], item: str) -> int:
    seq = list(seq)
    return seq.index(item) if item in seq else len(seq)


def build_grid(datasets: list[str], alphas: list[float], kappas: list[float], epss: list[float],
               aggregators: list[str], attacks: list[str], seeds: list[int], rounds: int, num_nodes: int,
               adversary: str = "client", learning_rate: float = 0.5, batch_size: int = 32,
               attack_scale: float = 0.0, references: bool = True, model: str | None = None) -> list[RunSpec]:
    """All runs, in priority order (references and the first heterogeneity level / attack / rule first)."""
    specs: list[RunSpec] = []
    for ds in datasets:
        synthetic = ds.startswith("synthetic")
        hets = kappas if synthetic else alphas
        mdl = model or ("linear" if ds.startswith("synthetic-linreg") else "logreg")
        for het in hets:
            for eps in epss:
                for seed in seeds:
                    common = dict(dataset=ds, het=float(het), eps=float(eps), seed=int(seed), rounds=int(rounds),
                                  num_nodes=int(num_nodes), adversary=adversary, learning_rate=float(learning_rate),
                                  batch_size=int(batch_size), attack_scale=float(attack_scale), model=mdl)
                    if references:
                        specs.append(RunSpec(aggregator="clean-fedavg", attack="none", **common))
                        specs.append(RunSpec(aggregator="oracle", attack="erasure", **common))
                    for agg in aggregators:
                        for att in attacks:
                            specs.append(RunSpec(aggregator=agg, attack=att, **common))
    order = {id(s): i for i, s in enumerate(specs)}
    het_order = {ds: (kappas if ds.startswith("synthetic") else alphas) for ds in datasets}

    def rank(s: RunSpec) -> tuple:
        return (_priority(datasets, s.dataset), _priority([str(h) for h in het_order[s.dataset]], str(s.het)),
                _priority([str(e) for e in epss], str(s.eps)), s.aggregator not in REFERENCES,
                _priority(attacks, s.attack), _priority(["rge", *aggregators], s.aggregator), s.seed, order[id(s)])

    return sorted(specs, key=rank)


# ------------------------------------------------------------------ one run

def _quiet_logs() -> dict[str, int]:
    """Silence per-round logging; returns the previous levels for :func:`_restore_logs`."""
    previous = {}
    for name in ("flwr", "flwr_byzantine", "ray"):
        previous[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.ERROR)
    return previous


def _restore_logs(previous: dict[str, int]) -> None:
    for name, level in previous.items():
        logging.getLogger(name).setLevel(level)


def server_aggregator(name: str, num_nodes: int, f: int, eps_tilde: float):
    """Our aggregator ``name`` as the server builds it (``bucketing:<inner>``, ``nnm:<inner>``, ``rge-x<k>``).

    ``rge-x<k>`` is RGE with ``threshold_factor=k`` (Algorithm 3 uses 4): not in the default grid,
    it measures how the threshold constant trades robustness against dropping honest clients.
    ``f`` is implied by ``eps_tilde`` (``floor(eps_tilde * num_nodes)``, as in the ServerApp).
    """
    from flwr_byzantine.aggregators import build_for_federation

    if name.startswith("rge-x"):
        return build_for_federation("rge", num_nodes, eps_tilde, threshold_factor=float(name[len("rge-x"):]))
    return build_for_federation(name, num_nodes, eps_tilde)


def flower_strategy(name: str, num_nodes: int, f: int, eps: float):
    """Flower's own robust rule ``name`` (``flwr-...``) for ``num_nodes`` nodes and ``f`` Byzantine."""
    from flwr.serverapp import strategy as fs

    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                  min_available_nodes=num_nodes)
    if name == "flwr-fedmedian":
        return fs.FedMedian(**common)
    if name == "flwr-fedtrimmedavg":
        return fs.FedTrimmedAvg(beta=float(eps), **common)
    if name == "flwr-krum":
        return fs.Krum(num_malicious_nodes=f, **common)
    if name == "flwr-multikrum":
        return fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(num_nodes - f, 1), **common)
    if name == "flwr-bulyan":
        return fs.Bulyan(num_malicious_nodes=f, **common)
    raise ValueError(f"unknown Flower rule {name!r}; valid: {list(FLOWER_RULES)}")


class _NoCollect:
    """Stand-in for the ``gc`` module whose ``collect`` does nothing (everything else is ``gc``'s)."""

    @staticmethod
    def collect(*_args: Any, **_kwargs: Any) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        import gc

        return getattr(gc, name)


class without_flower_gc:  # noqa: N801  # a context manager used like a function
    """Skip the ``gc.collect()`` Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` runs per record.

    Flower's ``Bulyan`` (and anything else that unpacks replies with ``keep_input=False``)
    forces a full garbage collection for every reply, ~0.3 s each in a process that has
    torch and the data loaded: 60 rounds x 20 replies turn a 5 s run into minutes.
    The collection frees memory only; skipping it changes no number.
    """

    def __enter__(self) -> None:
        import flwr.app.message.arrayrecord as ar

        self._module = ar
        self._saved = ar.gc
        ar.gc = _NoCollect()  # type: ignore[assignment]

    def __exit__(self, *exc: Any) -> None:
        self._module.gc = self._saved


def _model_reply_adapter_cls():
    from flwr.serverapp.strategy import Strategy

    from benchmarks.inprocess import GradientToModel

    class ModelReplyAdapter(Strategy):
        """Lets a Flower model-averaging strategy drive the gradient ClientApp (FedAvg with one SGD step).

        ``aggregate_train`` turns every gradient reply into ``x_t - lr * g``
        (:class:`~benchmarks.inprocess.GradientToModel`, ``x_t`` from the message sent to
        that node) before the wrapped strategy aggregates; everything else is delegated.
        """

        def __init__(self, strategy: Strategy, learning_rate: float) -> None:
            self.strategy = strategy
            self.transform = GradientToModel(learning_rate)
            self._sent: dict[int, Any] = {}

        def summary(self) -> None:
            self.strategy.summary()

        def configure_train(self, server_round, arrays, config, grid):
            msgs = list(self.strategy.configure_train(server_round, arrays, config, grid))
            self._sent = {int(m.metadata.dst_node_id): m for m in msgs}
            return msgs

        def aggregate_train(self, server_round, replies):
            out = []
            for reply in replies:
                sent = self._sent.get(int(reply.metadata.src_node_id))
                if sent is None:
                    continue
                model_reply = self.transform(sent, reply)
                if model_reply is not None:
                    out.append(model_reply)
            with without_flower_gc():
                return self.strategy.aggregate_train(server_round, out)

        def configure_evaluate(self, server_round, arrays, config, grid):
            return self.strategy.configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            return self.strategy.aggregate_evaluate(server_round, replies)

    return ModelReplyAdapter


class FixedCorruptSet:
    """Static adversary for :class:`OmniscientAdversary`: the nodes of the run's malicious partition ids.

    The same partitions the client-side attackers (and the oracle's erasures) use,
    so the omniscient and client-side grids corrupt the same data.
    """

    def __init__(self, grid: Any, partitions: Iterable[int]) -> None:
        self.partitions = sorted(int(p) for p in partitions)
        self._grid = grid

    def corrupt_set(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        bad = set(self.partitions)
        return sorted(n for n in node_ids if self._grid.partition_of.get(int(n)) in bad)

    def __repr__(self) -> str:
        return f"FixedCorruptSet(partitions={self.partitions})"


def run_config_for(spec: RunSpec) -> dict[str, Any]:
    """The run-config overrides of ``spec`` (what ``flwr run --run-config`` would get)."""
    if spec.aggregator in ("clean-fedavg", "oracle"):
        agg = "mean"
    elif spec.aggregator.startswith("flwr-"):  # the clients' defence-aware attack targets the matching rule
        agg = FLOWER_EQUIVALENT[spec.aggregator]
    elif spec.aggregator in _CONFIG_RULES:
        agg = spec.aggregator
    elif spec.aggregator.startswith("rge-x"):
        agg = "rge"
    else:
        agg = spec.aggregator.partition(":")[2] or "mean"
    return {
        "num-server-rounds": spec.rounds,
        "seed": spec.seed,
        "dataset": spec.dataset_name(),
        "dirichlet-alpha": 1.0 if spec.synthetic else spec.het,
        "model": spec.model,
        "batch-size": spec.batch_size,
        "learning-rate": spec.learning_rate,
        "aggregator": agg,
        "eps-tilde": min(max(spec.eps, 0.0), 0.25),
        "num-malicious": spec.num_malicious,
        "attack": "erasure" if spec.aggregator == "oracle" else ("sign-flip" if spec.attack == "none" else spec.attack),
        "attack-scale": spec.attack_scale,
    }


def execute(spec: RunSpec) -> dict[str, Any]:
    """Run one federation in-process; returns its JSONL record."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from benchmarks.inprocess import InProcessGrid, seed_flower_sampling
    from clients.client_app import build_attack, build_client_app
    from flwr_byzantine.attacks import ATTACKS, DataAttack
    from flwr_byzantine.config import RunConfig
    from flwr_byzantine.data import dataset_info
    from flwr_byzantine.federation import malicious_partition_ids
    from flwr_byzantine.models import build_model
    from server_app.server_app import build_strategy, central_evaluator

    torch.set_num_threads(1)
    t0 = time.time()
    overrides = run_config_for(spec)
    cfg = RunConfig.from_mapping(overrides)
    R, f = spec.num_nodes, spec.num_malicious
    attack_cls = ATTACKS.get(spec.attack)
    omniscient = (spec.adversary == "omniscient" and spec.aggregator not in REFERENCES and f > 0
                  and not (isinstance(attack_cls, type) and issubclass(attack_cls, DataAttack)))
    client_overrides = dict(overrides)
    if omniscient:  # every client honest; the server-side wrapper plays the attackers
        client_overrides["num-malicious"] = 0
    grid = InProcessGrid(build_client_app(client_overrides), R, {}, seed=spec.seed)
    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, info["num_features"], info["num_classes"], cfg.seed)
    evaluate = central_evaluator(cfg)

    robust = None
    if spec.aggregator.startswith("flwr-"):
        strategy = _model_reply_adapter_cls()(flower_strategy(spec.aggregator, R, f, spec.eps), cfg.learning_rate)
    else:
        robust = build_strategy(cfg, R)
        if spec.aggregator not in _CONFIG_RULES and spec.aggregator not in REFERENCES:
            robust.aggregator = server_aggregator(spec.aggregator, R, f, cfg.eps_tilde)
        strategy = robust
    malicious = malicious_partition_ids(R, f, spec.seed)
    if omniscient:
        from flwr_byzantine.strategies.omniscient import OmniscientAdversary

        attack = build_attack(spec.attack, cfg, 0, R, num_estimates=R - f, num_byzantine=f)
        if spec.attack == "defence-aware" and robust is not None and spec.aggregator not in _CONFIG_RULES:
            # the omniscient attacker simulates the server's exact rule (wrappers, rge-x), not the run config's
            attack.aggregator = server_aggregator(spec.aggregator, R, f, cfg.eps_tilde)
        strategy = OmniscientAdversary(strategy, attack, FixedCorruptSet(grid, malicious))
    seed_flower_sampling(spec.seed)
    train_config = ConfigRecord({"batch-size": cfg.batch_size, "full-batch": cfg.full_batch})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds,
                            train_config=train_config, evaluate_fn=evaluate)
    central = {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    rounds = sorted(central)
    acc = [float(central[r].get("accuracy", float("nan"))) for r in rounds]
    loss = [float(central[r].get("loss", float("nan"))) for r in rounds]
    rec: dict[str, Any] = {"key": spec.key(), **asdict(spec), "het_label": spec.het_label,
                           "num_malicious": f, "run_config": overrides,
                           "final_accuracy": acc[-1] if acc else None, "final_loss": loss[-1] if loss else None,
                           "accuracy": [round(a, 6) for a in acc], "loss": [float(f"{v:.6g}") for v in loss],
                           "wall_seconds": round(time.time() - t0, 3)}
    if omniscient:
        rec["corrupt_partitions"] = sorted({grid.partition_of[n] for r in strategy.history for n in r.corrupt})
    else:
        rec["malicious_partitions"] = malicious
    if robust is not None and robust.history:
        bad = set(rec.get("corrupt_partitions", malicious))
        caught, false_pos, decode = [], [], []
        for r in robust.history:
            filtered = {r.partition_ids.get(n) for n in r.filtered}
            filtered |= {grid.partition_of.get(n) for n in r.filtered}
            filtered.discard(None)
            if bad:
                caught.append(len(filtered & bad) / len(bad))
            false_pos.append(len(filtered - bad) / max(R - len(bad), 1))
            decode.append(r.decode_seconds)
        rec["filtered_malicious_rate"] = float(np.mean(caught)) if caught else None
        rec["filtered_honest_rate"] = float(np.mean(false_pos))
        rec["rejected_per_round"] = float(np.mean([len(r.rejected) for r in robust.history]))  # screened out
        rec["decode_ms_mean"] = 1e3 * float(np.mean(decode))
    return rec


def _execute_safe(spec: RunSpec) -> dict[str, Any]:
    previous = _quiet_logs()  # restored afterwards: callers in the same process keep their logging
    try:
        return execute(spec)
    except Exception as exc:  # pylint: disable=broad-except  # one failed run must not stop the grid
        import traceback

        return {"key": spec.key(), **asdict(spec), "het_label": spec.het_label, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5)}
    finally:
        _restore_logs(previous)


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _quiet_logs()


# ------------------------------------------------------------------ report

def load_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL records (the last record of a key wins; unreadable lines are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out[rec["key"]] = rec
    return list(out.values())


def _score(rec: Mapping[str, Any]) -> float | None:
    """Final accuracy (classification) or final loss (regression); ``None`` for failed runs."""
    if rec.get("error"):
        return None
    val = rec.get("final_loss") if rec["dataset"].startswith("synthetic-linreg") else rec.get("final_accuracy")
    if val is None:
        return None
    val = float(val)
    return val if math.isfinite(val) else (float("inf") if rec["dataset"].startswith("synthetic-linreg") else 0.0)


def _fmt(vals: list[float], pct: bool) -> str:
    if not vals:
        return "-"
    m, s = float(np.mean(vals)), float(np.std(vals))
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.3g} ± {s:.2g}"


def summarise(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (dataset, adversary, eps, het): scores[rule][attack] = list over seeds, plus reference scores."""
    groups: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        score = _score(rec)
        if score is None:
            continue
        gkey = (rec["dataset"], rec.get("adversary", "client"), float(rec["eps"]), rec["het_label"],
                int(rec["rounds"]), int(rec["num_nodes"]))
        g = groups.setdefault(gkey, {"scores": defaultdict(lambda: defaultdict(list)), "curves": defaultdict(
            lambda: defaultdict(list))})
        g["scores"][rec["aggregator"]][rec["attack"]].append(score)
        if rec.get("accuracy"):
            g["curves"][rec["aggregator"]][rec["attack"]].append(rec["accuracy"])
    return groups


def _rule_order(rules: Iterable[str]) -> list[str]:
    order = list(REFERENCES) + list(ALL_RULES)
    return sorted(rules, key=lambda r: (_priority(order, r), r))


def worst_cases(group: Mapping[str, Any], higher_better: bool) -> dict[str, tuple[float, str, int]]:
    """rule -> (worst mean score over attacks, that attack, number of attacks seen)."""
    out = {}
    for rule, by_attack in group["scores"].items():
        if rule in REFERENCES:
            continue
        means = {a: float(np.mean(v)) for a, v in by_attack.items() if v}
        if not means:
            continue
        att = min(means, key=means.get) if higher_better else max(means, key=means.get)
        out[rule] = (means[att], att, len(means))
    return out


def render_markdown(records: list[dict[str, Any]], meta: Mapping[str, Any] | None = None) -> str:
    """The markdown report (tables per dataset / adversary / eps / heterogeneity)."""
    groups = summarise(records)
    lines = ["# Robustness benchmark", ""]
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    ok = [r for r in records if not r.get("error")]
    if ok:
        lines += [f"{len(ok)} runs in `{JSONL_NAME}`; sum of the per-run wall times {sum(r.get('wall_seconds', 0) for r in ok) / 60:.0f} min "
                  f"(mean {np.mean([r.get('wall_seconds', 0) for r in ok]):.1f} s per run).", ""]
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += [f"**{len(failed)} run(s) failed** (see `error` in the JSONL), e.g. `{failed[0]['key']}`: "
                  f"{failed[0]['error']}", ""]
    summary_rows = []
    for gkey in sorted(groups):
        ds, adv, eps, het, T, R = gkey
        g = groups[gkey]
        higher = not ds.startswith("synthetic-linreg")
        pct = higher
        metric = "final test accuracy (%)" if higher else "final test loss"
        attacks = [a for a in ATTACKS if any(a in g["scores"][r] for r in g["scores"])]
        attacks += sorted({a for r in g["scores"] for a in g["scores"][r]} - set(attacks) - {"none", "erasure"})
        seeds = sorted({len(v) for r in g["scores"] for v in g["scores"][r].values()})
        lines += [f"## {ds}, {het}, eps={eps:g} (R={R}, {T} rounds, {adv} adversary)", "",
                  f"{metric}, mean ± std over seeds (runs per cell: {', '.join(map(str, seeds))}); "
                  f"worst = the lowest per-attack mean{'' if higher else ' (highest loss)'}.", ""]
        refs = {r: g["scores"][r] for r in REFERENCES if r in g["scores"]}
        oracle = float(np.mean(refs["oracle"]["erasure"])) if "oracle" in refs else None
        for r, by in refs.items():
            vals = next(iter(by.values()))
            lines.append(f"- reference **{r}**: {_fmt(vals, pct)}")
        lines.append("")
        lines.append("| rule | " + " | ".join(attacks) + " | worst (attack) |" + (" worst - oracle |" if oracle is not None else ""))
        lines.append("|---" * (len(attacks) + 2 + (oracle is not None)) + "|")
        worst = worst_cases(g, higher)
        for rule in _rule_order(r for r in g["scores"] if r not in REFERENCES):
            cells = [_fmt(g["scores"][rule].get(a, []), pct) for a in attacks]
            w = worst.get(rule)
            wcell = "-" if w is None else (f"{100 * w[0]:.1f} ({w[1]})" if pct else f"{w[0]:.3g} ({w[1]})")
            if w is not None and w[2] < len(attacks):
                wcell += f" [{w[2]}/{len(attacks)} attacks]"
            name = f"**{rule}**" if rule == "rge" else (f"{rule} (diagnostic)" if rule.startswith("rge-x") else rule)
            row = f"| {name} | " + " | ".join(cells) + f" | {wcell} |"
            if oracle is not None:
                row += " - |" if w is None else (f" {100 * (w[0] - oracle):+.1f} |" if pct else f" {w[0] - oracle:+.3g} |")
            lines.append(row)
        lines.append("")
        if worst and oracle is not None and "rge" in worst and higher:
            peers = {r: v for r, v in worst.items() if r not in ("rge", "mean") and not r.startswith("rge-x")}
            best_peer = max(peers, key=lambda r: peers[r][0]) if peers else None
            rge_w = worst["rge"][0]
            ok_oracle = rge_w >= oracle - 0.02
            ok_peers = best_peer is None or rge_w > peers[best_peer][0]
            lines.append(
                "Target (RGE worst case within 2 points of the oracle and above every peer's worst case; peers exclude "
                "the plain mean and the rge-x diagnostics): "
                f"RGE worst {100 * rge_w:.1f} vs oracle {100 * oracle:.1f} "
                f"({'met' if ok_oracle else 'missed'}); best peer worst case "
                + (f"{best_peer} {100 * peers[best_peer][0]:.1f} ({'RGE above' if ok_peers else 'RGE not above'})"
                   if best_peer else "n/a") + ".")
            lines.append("")
            summary_rows.append((ds, het, eps, adv, rge_w, oracle, best_peer, peers[best_peer][0] if best_peer else None))
    if summary_rows:
        lines += ["## Summary: RGE worst case vs oracle vs best peer", "",
                  "| dataset | heterogeneity | eps | adversary | RGE worst | oracle | best peer (its worst) |",
                  "|---|---|---|---|---|---|---|"]
        for ds, het, eps, adv, rw, orc, bp, bw in summary_rows:
            lines.append(f"| {ds} | {het} | {eps:g} | {adv} | {100 * rw:.1f} | {100 * orc:.1f} | "
                         + (f"{bp} ({100 * bw:.1f})" if bp else "-") + " |")
        lines.append("")
    return "\n".join(lines)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def plot_curves(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``robustness_curves_<dataset>_<adversary>_eps<eps>_<het>.png``: accuracy vs rounds, a panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for gkey, g in sorted(summarise(records).items()):
        ds, adv, eps, het, T, R = gkey
        if ds.startswith("synthetic-linreg"):
            continue
        attacks = [a for a in ATTACKS if any(a in g["curves"][r] for r in g["curves"])]
        if not attacks:
            continue
        ncol = min(3, len(attacks))
        nrow = math.ceil(len(attacks) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False, sharey=True)
        rules = _rule_order(r for r in g["curves"] if r not in REFERENCES)
        palette = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i not in (6, 7)]  # no red but RGE's
        colors = {r: palette[i % len(palette)] for i, r in enumerate(x for x in rules if x != "rge")}
        colors["rge"] = "tab:red"
        for ax, att in zip(axes.flat, attacks):
            for ref, style in (("clean-fedavg", ":"), ("oracle", "--")):
                curves = next(iter(g["curves"].get(ref, {}).values()), None)
                if curves:
                    ax.plot(np.mean(np.array(curves), axis=0), style, color="k", lw=1.5, label=ref)
            for rule in rules:
                curves = g["curves"][rule].get(att)
                if curves:
                    ax.plot(np.mean(np.array(curves), axis=0), color=colors[rule], lw=2.6 if rule == "rge" else 1.0,
                            ls="--" if rule.startswith("flwr-") else "-", zorder=5 if rule == "rge" else 2,
                            label=rule)
            ax.set_title(att)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(attacks):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
        fig.suptitle(f"{ds}, {het}, eps={eps:g}, R={R}, {adv} adversary (mean over seeds; RGE thick red, "
                     "Flower's rules dashed)")
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 7), 1, 0.97))
        path = out_dir / _safe(f"robustness_curves_{ds}_{adv}_eps{eps:g}_{het}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_worst(records: list[dict[str, Any]], path: Path) -> Path | None:
    """``robustness_worst.png``: worst case over attacks per rule, a bar group per (dataset, het, eps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: g for k, g in sorted(summarise(records).items()) if not k[0].startswith("synthetic-linreg")}
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.4 * len(groups)), squeeze=False)
    for ax, (gkey, g) in zip(axes[:, 0], groups.items()):
        ds, adv, eps, het, T, R = gkey
        worst = worst_cases(g, True)
        rules = _rule_order(worst)
        vals = [100 * worst[r][0] for r in rules]
        colors = ["tab:red" if r == "rge" else "tab:green" if r.startswith("flwr-") else
                  "tab:gray" if r.startswith("rge-x") else "tab:blue" for r in rules]
        ax.bar(range(len(rules)), vals, color=colors)
        for i, (v, r) in enumerate(zip(vals, rules)):
            inside = v > 25
            ax.text(i, v - 1.5 if inside else v + 1.0, f"{v:.0f}\n{worst[r][1]}", ha="center",
                    va="top" if inside else "bottom", fontsize=6, color="white" if inside else "black")
        ax.set_xticks(range(len(rules)), rules, rotation=35, ha="right", fontsize=8)
        for ref, style in (("oracle", "--"), ("clean-fedavg", ":")):
            if ref in g["scores"]:
                ax.axhline(100 * float(np.mean(next(iter(g["scores"][ref].values())))), ls=style, color="k", label=ref)
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_title(f"{ds}, {het}, eps={eps:g}, {adv} adversary (red: RGE, green: Flower's rules, "
                     "grey: diagnostics; label: worst attack)", fontsize=10)
        ax.set_ylim(0, 100)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild ``robustness.md`` and the plots from ``robustness.jsonl`` in ``out_dir``."""
    records = load_records(out_dir / JSONL_NAME)
    md = render_markdown(records, meta)
    (out_dir / "robustness.md").write_text(md + "\n")
    curves = plot_curves(records, out_dir)
    worst = plot_worst(records, out_dir / "robustness_worst.png")
    return {"markdown": out_dir / "robustness.md", "curves": curves, "worst": worst, "records": len(records)}


# ------------------------------------------------------------------ CLI

QUICK = dict(datasets=["digits"], alphas=[0.3], kappas=[1.0], eps=[0.2], aggregators=["rge", "trimmed-mean",
             "flwr-krum"], attacks=["ipm", "alie"], seeds=[0], rounds=5, num_nodes=10)
DEFAULT = dict(datasets=["digits"], alphas=[0.3, 1.0], kappas=[1.0], eps=[0.2], aggregators=list(ALL_RULES),
               attacks=list(ATTACKS), seeds=[0, 1, 2, 3], rounds=60, num_nodes=20)
FULL = dict(datasets=["digits", "synthetic-logreg"], alphas=[0.1, 0.3, 1.0], kappas=[0.5, 2.0], eps=[0.1, 0.2],
            aggregators=list(ALL_RULES), attacks=list(ATTACKS), seeds=[0, 1, 2, 3, 4], rounds=60, num_nodes=20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI smoke size")
    size.add_argument("--full", action="store_true", help="the full grid (hours)")
    p.add_argument("--datasets", nargs="+", help="digits, synthetic-logreg, synthetic-linreg[:d=..,n=..]")
    p.add_argument("--alphas", nargs="+", type=float, help="Dirichlet alphas (digits)")
    p.add_argument("--kappas", nargs="+", type=float, help="heterogeneity kappa (synthetic datasets)")
    p.add_argument("--eps", nargs="+", type=float, help="Byzantine fractions (num-malicious = round(eps R))")
    p.add_argument("--aggregators", nargs="+", help=f"rules; default all: {' '.join(ALL_RULES)}")
    p.add_argument("--attacks", nargs="+", help=f"default all: {' '.join(ATTACKS)}")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--learning-rate", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--attack-scale", type=float, default=0.0, help="run config attack-scale (0: each attack's default)")
    p.add_argument("--adversary", choices=("client", "omniscient"), default="client")
    p.add_argument("--no-references", action="store_true", help="skip clean-fedavg and oracle")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--resume", action="store_true", help="skip runs whose key is already in the JSONL")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop starting new runs after this (0: no limit)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the JSONL")
    p.add_argument("--dry-run", action="store_true", help="print the number of runs and exit")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> list[RunSpec]:
    base = QUICK if args.quick else FULL if args.full else DEFAULT
    pick = lambda name, key=None: getattr(args, name) if getattr(args, name) is not None else base[key or name]  # noqa: E731
    aggs = pick("aggregators")
    for a in aggs:
        wrapper = a.partition(":")[0] in ("bucketing", "nnm") and a.partition(":")[2] in _CONFIG_RULES
        scaled = a.startswith("rge-x") and _is_positive_number(a[len("rge-x"):])
        if a not in ALL_RULES and not wrapper and not scaled:
            raise SystemExit(f"unknown aggregator {a!r}; valid: {list(ALL_RULES)} (or bucketing:/nnm:<rule>, "
                             "rge-x<threshold factor>)")
    from flwr_byzantine.attacks import ATTACKS as REGISTRY

    for a in pick("attacks"):
        if a not in REGISTRY:
            raise SystemExit(f"unknown attack {a!r}; valid: {sorted(REGISTRY)}")
    return build_grid(pick("datasets"), pick("alphas"), pick("kappas"), pick("eps"), aggs, pick("attacks"),
                      pick("seeds"), pick("rounds"), pick("num_nodes"), adversary=args.adversary,
                      learning_rate=args.learning_rate, batch_size=args.batch_size, attack_scale=args.attack_scale,
                      references=not args.no_references)


def _is_positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / JSONL_NAME
    specs = grid_from_args(args)
    meta = {"command": "python -m benchmarks.robustness " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    if args.dry_run:
        print(json.dumps({"runs": len(specs)}))
        return 0
    if not args.report_only:
        # Without --resume every run of the grid is redone; its new line supersedes the old one (last line of a
        # key wins), and records of other grids in the same JSONL are kept.
        done = {r["key"] for r in load_records(jsonl) if not r.get("error")} if args.resume else set()
        todo = [s for s in specs if s.key() not in done]
        t_start = time.time()
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="robustness", unit="run", disable=args.no_progress, dynamic_ncols=True)
        stopped = False
        finished = [0]

        def record(rec: dict[str, Any]) -> None:
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            finished[0] += 1
            bar.update(1)
            acc = rec.get("final_accuracy")
            bar.set_postfix_str(f"{rec['aggregator']}/{rec['attack']}: "
                                + ("ERROR" if rec.get("error") else f"{acc:.3f}" if acc is not None else "-"))

        def over_time() -> bool:
            return args.max_minutes > 0 and time.time() - t_start > 60 * args.max_minutes

        if args.workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(args.workers, initializer=_worker_init, maxtasksperchild=50) as pool:
                pending = iter(todo)
                results = []
                for spec in pending:  # submit lazily so --max-minutes can stop cleanly
                    results.append(pool.apply_async(_execute_safe, (spec,)))
                    while sum(not r.ready() for r in results) >= 2 * args.workers:
                        time.sleep(0.2)
                        for r in [r for r in results if r.ready()]:
                            record(r.get())
                            results.remove(r)
                    if over_time():
                        stopped = True
                        break
                for r in results:
                    record(r.get())
        else:
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            for spec in todo:  # _execute_safe silences and restores logging per run
                if over_time():
                    stopped = True
                    break
                record(_execute_safe(spec))
        bar.close()
        elapsed = time.time() - t_start
        meta["last invocation"] = f"{finished[0]} runs in {elapsed / 60:.1f} min" + (
            " (stopped by --max-minutes; continue with --resume)" if stopped else "")
    rep = write_report(out, meta)
    print(rep["markdown"].read_text())
    print(json.dumps({"jsonl": str(jsonl), "markdown": str(rep["markdown"]), "records": rep["records"],
                      "plots": [str(p) for p in rep["curves"]] + ([str(rep["worst"])] if rep["worst"] else [])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

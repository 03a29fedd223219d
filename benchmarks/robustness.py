"""Robustness benchmark: the default defence against every peer, attack, model and heterogeneity level.

One command (resumable: finished runs are kept in the JSONL and skipped)::

    python -m benchmarks.robustness                 # the full grid of issue 10 (see GRID below)
    python -m benchmarks.robustness --quick         # a CI-sized smoke grid (seconds)
    python -m benchmarks.robustness --max-minutes 60 --workers 2   # stop after an hour; rerun to continue
    python -m benchmarks.robustness --report-only   # rebuild tables and plots from the JSONL

Every federation runs in :mod:`benchmarks.fastsim` (the App's data, model
initialisation, mini-batches, attack objects and aggregators, without the Flower
message plumbing; ``tests/test_fastsim.py`` checks it against the in-process Flower
path).  Settings: digits, R = 20 clients, 4 of them Byzantine (eps = 0.2; ``--num-nodes`` / ``--num-malicious``
for other sizes, e.g. 5 of 20, the quarter the defence is built for, into their own folder), Dirichlet
alpha in {0.3, 1.0}; logistic regression (60 rounds, lr 0.5) and an MLP with one hidden
layer of 64 (200 rounds, lr 0.3); mini-batch 32; >= 4 seeds.

Adversaries (``--attacks``):

* client side (each attacker crafts from its own data, ``clients/client_app.py``):
  ``sign-flip``, ``label-flip``, ``random-labels``, ``alie``, ``ipm``, ``mimic``,
  ``gaussian``, ``scaled-negative``, ``defence-aware`` (the run config's rule simulated
  on ``estimate-batches`` + f rows), ``sleeper`` (honest, then sign-flip from half the
  rounds on), ``memory-aware`` (sign-flip whenever the default defence's evidence
  rule lets it, honest otherwise), ``min-max`` and ``min-sum`` (Shejwalkar & Houmansadr 2021,
  "partial knowledge": from the attacker's own estimates);
* omniscient (server side, sees every honest vector of the round): ``omni:<attack>``
  with a static corrupt set, ``omni-rotate:<attack>`` with a mobile one
  (:class:`~flwr_byzantine.attacks.MobileAdversary`, ``rotate``); its ``defence-aware``
  simulates a copy of the server's exact rule and state.

Rules (``--rules``): ``rge`` (the default defence), ``rge-paper`` (Algorithm 3 as
published), the peers (``cclip``, ``nnm:cclip``, ``multi-krum``, ``trimmed-mean``,
``median``, ``geomed``, ``krum``, ``bulyan``, ``bucketing:cclip``), the same peers with
worker momentum ``wm:<peer>`` (beta 0.9, the momentum kept per node as the default
defence keeps it), ablations ``rge/no-<component>`` (in the first model and alpha only).  Peers are
told the true f.  The omniscient ``defence-aware`` attacker also knows the round's node ids: it simulates
a rule keyed by node id (the default defence's memory, the ``wm:`` peers' momenta) with them.
References per setting and seed: ``oracle`` (mean of the honest clients; the
attackers erased) and ``clean-fedavg`` (mean, no attacker).

Outputs in ``--out`` (default ``benchmarks/results``): ``robustness.jsonl`` (one line per
run), ``robustness.json`` (the summary), ``robustness.md`` (tables), ``robustness_worst.png``
and ``robustness_curves_<setting>.png``.

``--mode local`` (issue 11) runs the App's other protocol, ``client-mode='local'``:
every client trains locally (the App's ``local-epochs`` / ``local-steps`` / ``client-lr``
defaults) and replies with the model update ``x_t - w_i``; the attacks act on that update
(client side: crafted from ``estimate-batches`` local trainings of the attacker's own
data; omniscient: from the honest updates); the server decodes the updates as
``RobustFedAvg`` does (``server_app.build_aggregator``: the default defence without its
gradient evidence; the peers as they are) and steps ``x <- x - server-lr * estimate``.
Its default grid is :data:`LOCAL_GRID` (with the probe ``rge/evidence``: the default
defence keeping the evidence it uses in gradient mode); its files are ``robustness_local.*`` (own JSONL,
so the two modes never share a resume file), and ``robustness_local.md`` puts every
cell next to the gradient-mode cell of the same rule, attack, setting and seeds
(read from ``robustness.jsonl``)::

    python -m benchmarks.robustness --mode local             # LOCAL_GRID
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
JSONL_NAME = "robustness.jsonl"

CLIENT_ATTACKS = ("sign-flip", "label-flip", "random-labels", "alie", "ipm", "mimic", "gaussian", "scaled-negative",
                  "defence-aware", "sleeper", "memory-aware", "min-max", "min-sum")
OMNI_ATTACKS = ("omni:alie", "omni:ipm", "omni:sign-flip", "omni:defence-aware", "omni:min-max", "omni:min-sum",
                "omni-rotate:alie", "omni-rotate:ipm", "omni-rotate:sign-flip", "omni-rotate:defence-aware")
ATTACKS = CLIENT_ATTACKS + OMNI_ATTACKS
PEERS = ("cclip", "nnm:cclip", "multi-krum", "trimmed-mean", "median", "geomed")
MOMENTUM_PEERS = ("wm:cclip", "wm:nnm:cclip", "wm:multi-krum", "wm:trimmed-mean")
ABLATIONS = ("rge/evidence-last-replies", "rge/no-step-trim", "rge/step-trim-both", "rge/fold-dropped", "rge/mixing", "rge/evidence-floor-0.01", "rge/evidence-floor-0.1", "rge/no-evidence", "rge/evidence-level-0", "rge/no-relative-level", "rge/level-all-nodes",
             "rge/no-skip-anomalies", "rge/no-self-ref",
             "rge/no-jump", "rge/jump-median", "rge/no-burn-in", "rge/no-gross", "rge/no-clip", "rge/threshold-4", "rge/no-momentum",
             "rge/momentum", "rge/momentum-0.5",
             "rge/no-spend-budget", "rge/no-duplicates")
RULES = ("rge", "rge-paper", *PEERS, *MOMENTUM_PEERS, "mean")
REFERENCES = ("oracle", "clean-fedavg")
MODELS = {"logreg": dict(rounds=60, learning_rate=0.5), "mlp": dict(rounds=200, learning_rate=0.3)}
GRID = dict(models=("logreg", "mlp"), alphas=(0.3, 1.0), seeds=(0, 1, 2, 3), attacks=ATTACKS, rules=RULES,
            ablations=ABLATIONS, ablation_attacks=("sign-flip", "label-flip", "alie", "ipm", "defence-aware",
                                                   "sleeper", "memory-aware", "omni:defence-aware",
                                                   "omni-rotate:alie", "omni-rotate:defence-aware",
                                                   "omni-rotate:sign-flip", "none"))
#: Local mode (``--mode local``): the server step is the App's ``server-lr`` default; the clients' local
#: training uses the App's ``local-epochs`` / ``local-steps`` / ``client-lr`` defaults (see :func:`local_defaults`).
LOCAL_ATTACKS = ("sign-flip", "label-flip", "alie", "ipm", "gaussian", "scaled-negative", "defence-aware", "omni:alie")
LOCAL_RULES = ("rge", "cclip", "multi-krum", "trimmed-mean", "median", "mean")
#: ``rge/evidence``: the default defence with the evidence it has in gradient mode (local-SGD updates of a
#: convex loss are monotone too: x - w(x) with w a composition of nonexpansive SGD steps, lr <= 2/L)
LOCAL_GRID = dict(models=("logreg", "mlp"), alphas=(0.3, 1.0), seeds=(0, 1, 2, 3), attacks=LOCAL_ATTACKS,
                  rules=(*LOCAL_RULES, "rge/evidence"), ablations=(), ablation_attacks=())
MODES = ("gradient", "local")
QUICK = dict(models=("logreg",), alphas=(0.3,), seeds=(0,), attacks=("sign-flip", "alie"), rules=("rge", "cclip"),
             ablations=("rge/no-evidence",), ablation_attacks=("sign-flip",), rounds=8)


# ------------------------------------------------------------------ rules

def local_defaults() -> dict[str, Any]:
    """The App's run-config defaults of ``client-mode='local'``: local epochs / steps, client and server lr."""
    from flwr_byzantine.config import RunConfig

    cfg = RunConfig.from_mapping({"client-mode": "local"})
    return {"local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps, "client_lr": cfg.client_lr,
            "server_lr": cfg.server_lr}


def build_rule(name: str, num_nodes: int, f: int, mode: str = "gradient"):
    """``(aggregator, run-config aggregator name)`` of rule ``name`` for ``num_nodes`` nodes, ``f`` Byzantine.

    ``mode='local'``: the default defence (and its ablations) without the gradient-monotonicity
    evidence, as ``server_app.build_aggregator`` builds it for ``client-mode='local'``.
    """
    from flwr_byzantine.aggregators import build_for_federation
    from flwr_byzantine.aggregators.defence import RobustDefence

    eps = f / num_nodes
    if name in ("mean", "oracle", "clean-fedavg"):
        return build_for_federation("mean", num_nodes, eps), "mean"
    if name == "rge" or name.startswith("rge/"):
        kw: dict[str, Any] = {}
        variant = name.partition("/")[2]
        if variant == "momentum":  # per-node worker momentum 0.9 (with its input clipping) instead of the default
            kw = dict(momentum=0.9)
        elif variant == "no-momentum":  # no per-node worker momentum (the filter sees the raw replies)
            kw = dict(momentum=0.0)
        elif variant == "no-mixing":  # no nearest-neighbour mixing (NNM) of the survivors
            kw = dict(mixing=False)
        elif variant == "mixing":  # nearest-neighbour mixing (NNM) of the survivors before the clipping
            kw = dict(mixing=True)
        elif variant.startswith("evidence-floor-"):  # the evidence's population floor, e.g. rge/evidence-floor-0.1
            kw = dict(evidence_floor=float(variant.rpartition("-")[2]))
        elif variant == "no-evidence":
            kw = dict(evidence=False)
        elif variant == "evidence":  # local mode: keep the gradient-monotonicity evidence (off by default there)
            kw = dict(evidence=True)
        elif variant == "no-self-ref":
            kw = dict(self_clip_scale=None)
        elif variant == "no-jump":
            kw = dict(jump_factor=None)
        elif variant == "no-gross":
            kw = dict(gross_factor=None)
        elif variant == "no-clip":
            kw = dict(clip_scale=None)
        elif variant.startswith("momentum-"):  # per-node worker momentum of another beta, e.g. rge/momentum-0.5
            kw = dict(momentum=float(variant.rpartition("-")[2]))
        elif variant.startswith("evidence-level-"):  # exclusion level of the evidence: Z < -level
            kw = dict(z_exclude=float(variant.rpartition("-")[2]))
        elif variant == "no-skip-anomalies":  # the evidence scores every reply, not winsorised
            kw = dict(skip_anomalies=False, score_clip=None)
        elif variant == "no-relative-level":  # the evidence's level is -z_exclude in every round
            kw = dict(evidence_relative=None)
        elif variant == "level-all-nodes":  # the relative level from every eligible node, suspects too (the 19th landing)
            kw = dict(evidence_relative_above=False)
        elif variant == "jump-median":  # a jump judged against the round's median change alone (the seventeenth landing)
            kw = dict(jump_own_scale=False)
        elif variant == "no-burn-in":  # a jumped node's reference follows only the drift, from its first round
            kw = dict(reference_burn_in=0)
        elif variant == "threshold-4":
            kw = dict(threshold_factor=4.0)
        elif variant == "no-spend-budget":  # filter, mix and clip even when floor(eps R) rows are already left out
            kw = dict(spend_budget=False)
        elif variant == "step-trim-both":  # the trimmed component along the step either way (the tenth landing's)
            kw = dict(step_trim="both")
        elif variant == "no-step-trim":  # the clipped estimate without the trimmed component along the filter's estimate
            kw = dict(step_trim=False)
        elif variant == "fold-dropped":  # jumps and copies clipped into their nodes' memories (the ninth landing)
            kw = dict(fold_dropped=True)
        elif variant == "no-duplicates":  # copies of one message each get a vote (what colluders adding noise get)
            kw = dict(duplicate_tol=None)
        elif variant == "evidence-last-replies":  # the evidence on the change from the raw last reply (a stored table)
            kw = dict(evidence_from_reference=False)
        elif variant:
            raise ValueError(f"unknown ablation {name!r}")
        if mode == "local":
            # what the App runs for model updates (server_app.build_aggregator): no history-of-gradients rules
            from flwr_byzantine.aggregators.defence import MODEL_UPDATE_OPTIONS

            kw = {**MODEL_UPDATE_OPTIONS, **kw}
        return RobustDefence(eps_tilde=min(eps, 0.25), **kw), "rge"
    if name.startswith("wm:"):
        inner, cfg_name = build_rule(name[3:], num_nodes, f, mode)
        return WorkerMomentum(inner), cfg_name
    return build_for_federation(name, num_nodes, eps), name


class WorkerMomentum:
    """A peer rule on per-node momenta ``m_i <- 0.9 m_i + 0.1 g_i`` (worker momentum kept by the server)."""

    def __init__(self, inner: Any, beta: float = 0.9) -> None:
        from flwr_byzantine.aggregators.memory import ClientMomentum

        self.inner, self.memory = inner, ClientMomentum(beta)

    def aggregate(self, G: np.ndarray, client_ids: list[int] | None = None):
        M = self.memory.update(G, client_ids) if client_ids is not None else G
        return self.inner.aggregate(M)


# ------------------------------------------------------------------ grid

@dataclass(frozen=True)
class Spec:
    """One federation."""

    model: str
    alpha: float
    rule: str
    attack: str
    seed: int
    rounds: int
    learning_rate: float
    num_nodes: int = 20
    num_malicious: int = 4
    #: ``"gradient"`` (RobustSGD) or ``"local"`` (local training, RobustFedAvg; ``learning_rate`` is the server's)
    mode: str = "gradient"
    #: local mode only: the clients' local training (None in gradient mode)
    local_epochs: int | None = None
    local_steps: int | None = None
    client_lr: float | None = None

    def key(self) -> str:
        """Resume key; gradient-mode keys are those of the grid before local mode existed."""
        key = "|".join(str(v) for v in (self.model, f"alpha={self.alpha:g}", self.rule, self.attack,
                                         f"seed={self.seed}", f"T={self.rounds}", f"lr={self.learning_rate:g}",
                                         f"R={self.num_nodes}", f"f={self.num_malicious}"))
        if self.mode == "gradient":
            return key
        return key + f"|mode={self.mode}|E={self.local_epochs}|S={self.local_steps}|clr={self.client_lr:g}"

    def record(self) -> dict[str, Any]:
        """The spec's fields for its JSONL record (the local-training fields only in local mode)."""
        rec = asdict(self)
        if self.mode == "gradient":
            for k in ("mode", "local_epochs", "local_steps", "client_lr"):
                rec.pop(k)
        return rec

    @property
    def setting(self) -> str:
        return f"{self.model}, alpha={self.alpha:g}"


#: Run order: references and the default defence in every setting first, so a partial grid is useful.
PRIORITY = ("oracle", "clean-fedavg", "rge", "cclip", "wm:cclip", "nnm:cclip", "rge-paper", *ABLATIONS,
            "wm:nnm:cclip", "multi-krum", "trimmed-mean", "median", "geomed", "mean", "wm:multi-krum",
            "wm:trimmed-mean")


def build_grid(models, alphas, seeds, attacks, rules, ablations=(), ablation_attacks=(), rounds=None,
               mode: str = "gradient", local: dict[str, Any] | None = None, num_nodes: int = 20,
               num_malicious: int = 4) -> list[Spec]:
    """All runs, ordered by :data:`PRIORITY` across settings (then setting, seed, attack).

    ``num_nodes`` / ``num_malicious``: the federation's size and its Byzantine nodes (the grid's 20 and 4, eps = 0.2).

    ``mode='local'``: the models' round counts; server lr and local training from
    :func:`local_defaults`, updated with ``local`` (keys ``local_epochs``, ``local_steps``,
    ``client_lr``, ``server_lr``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    specs: list[Spec] = []
    local = {**local_defaults(), **(local or {})} if mode == "local" else None
    for model in models:
        T = int(rounds or MODELS[model]["rounds"])
        lr = MODELS[model]["learning_rate"] if local is None else local["server_lr"]
        for alpha in alphas:
            common: dict[str, Any] = dict(model=model, alpha=float(alpha), rounds=T, learning_rate=lr,
                                          num_nodes=int(num_nodes), num_malicious=int(num_malicious))
            if local is not None:
                common.update(mode="local", local_epochs=local["local_epochs"], local_steps=local["local_steps"],
                              client_lr=local["client_lr"])
            for seed in seeds:
                specs.append(Spec(rule="oracle", attack="erasure", seed=seed, **common))
                specs.append(Spec(rule="clean-fedavg", attack="none", seed=seed, **common))
                for rule in rules:
                    for att in ("none", *attacks):
                        if rule == "mean" and att == "none":
                            continue
                        specs.append(Spec(rule=rule, attack=att, seed=seed, **common))
                for rule in ablations if (model, float(alpha)) == (models[0], float(alphas[0])) else ():
                    for att in ablation_attacks:
                        specs.append(Spec(rule=rule, attack=att, seed=seed, **common))
    prio = {r: i for i, r in enumerate(PRIORITY)}
    return sorted(specs, key=lambda s: (prio.get(s.rule, len(prio)), s.seed, s.model != "logreg", s.alpha))


def execute(spec: Spec) -> dict[str, Any]:
    """Run one federation (fastsim); returns its JSONL record."""
    from benchmarks.fastsim import SimConfig, simulate

    attack, adversary, mode = spec.attack, "client", "static"
    if attack.startswith("omni"):
        prefix, _, attack = attack.partition(":")
        adversary, mode = "omniscient", ("rotate" if prefix == "omni-rotate" else "static")
    scale = 0.0
    if attack == "sleeper":
        scale = float(spec.rounds // 2)
    agg, cfg_name = build_rule(spec.rule, spec.num_nodes, spec.num_malicious, spec.mode)
    cfg = SimConfig(alpha=spec.alpha, model=spec.model, num_nodes=spec.num_nodes, num_malicious=spec.num_malicious,
                    attack=attack, adversary=adversary, adversary_mode=mode, attack_scale=scale,
                    eps_tilde=spec.num_malicious / spec.num_nodes, rounds=spec.rounds,
                    learning_rate=spec.learning_rate, seed=spec.seed, eval_every=max(spec.rounds // 20, 1),
                    mode=spec.mode, local_epochs=spec.local_epochs, local_steps=spec.local_steps,
                    client_lr=spec.client_lr)
    res = simulate(cfg, agg, cfg_name)
    return {"key": spec.key(), **spec.record(), "final_accuracy": res.final_accuracy,
            "accuracy": [round(a, 5) for a in res.accuracy], "eval_rounds": res.eval_rounds,
            "honest_excluded_rate": res.honest_excluded_rate, "malicious_excluded_rate": res.malicious_excluded_rate,
            "seconds": round(res.seconds, 3), "decode_seconds": round(res.decode_seconds, 3)}


def _execute_safe(spec: Spec) -> dict[str, Any]:
    logging.disable(logging.WARNING)
    try:
        return execute(spec)
    except Exception as exc:  # pylint: disable=broad-except  # one failed run must not stop the grid
        import traceback

        return {"key": spec.key(), **spec.record(), "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=6)}


def load_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL records (the last record of a key wins; unreadable lines are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                out[rec["key"]] = rec
    return list(out.values())


def jsonl_name(mode: str = "gradient") -> str:
    """The resume file of ``mode``: ``robustness.jsonl`` (gradient) or ``robustness_local.jsonl``."""
    return JSONL_NAME if mode == "gradient" else f"robustness_{mode}.jsonl"


def run_grid(specs: list[Spec], out: Path, workers: int = 1, max_minutes: float | None = None,
             progress: bool = True, mode: str = "gradient") -> int:
    """Run the specs not yet in the mode's JSONL (:func:`jsonl_name`); returns how many ran."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / jsonl_name(mode)
    done = {r["key"] for r in load_records(path) if not r.get("error")}
    todo = [s for s in specs if s.key() not in done]
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="robustness grid", unit="run")
    n = 0
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers, maxtasksperchild=200)
    results = pool.imap_unordered(_execute_safe, todo, chunksize=1) if pool else map(_execute_safe, todo)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for rec in results:  # appended as runs finish: an interrupted grid resumes from here
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                n += 1
                if bar:
                    bar.update()
                if deadline and time.time() > deadline:
                    break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if bar:
        bar.close()
    return n


# ------------------------------------------------------------------ report

def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: mean/std accuracy per rule and attack, worst cases, targets, exclusion rates."""
    cells: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for rec in records:
        if rec.get("error"):
            continue
        setting = f"{rec['model']}, alpha={rec['alpha']:g}"
        cells[setting][rec["rule"]][rec["attack"]].append(rec)
    summary: dict[str, Any] = {}
    for setting, rules in cells.items():
        ref = {}
        for r in REFERENCES:
            accs = [x["final_accuracy"] for recs in rules.get(r, {}).values() for x in recs]
            ref[r] = 100 * float(np.mean(accs)) if accs else None
        table: dict[str, Any] = {}
        for rule, atts in rules.items():
            if rule in REFERENCES:
                continue
            row = {}
            for att, recs in atts.items():
                accs = [100 * x["final_accuracy"] for x in recs]
                row[att] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs),
                            "honest_excluded": float(np.mean([x["honest_excluded_rate"] for x in recs])),
                            "malicious_excluded": float(np.nanmean([x["malicious_excluded_rate"] for x in recs]))
                            if any(x["malicious_excluded_rate"] == x["malicious_excluded_rate"] for x in recs)
                            else None}
            attacked = {a: v for a, v in row.items() if a != "none"}
            worst = min(attacked.items(), key=lambda kv: kv[1]["mean"]) if attacked else None
            table[rule] = {"attacks": row, "worst": None if worst is None else
                           {"attack": worst[0], "mean": worst[1]["mean"]}}
        summary[setting] = {"references": ref, "rules": table}
        d = table.get("rge")
        if d and d["worst"] and ref.get("oracle") is not None:
            peers = {r: v["worst"]["mean"] for r, v in table.items()
                     if v["worst"] and r not in ("rge", "mean") and not r.startswith("rge/")
                     and set(v["attacks"]) >= set(d["attacks"])}
            best_peer = max(peers.items(), key=lambda kv: kv[1]) if peers else None
            clean = d["attacks"].get("none", {}).get("mean")
            summary[setting]["targets"] = {
                "worst_minus_oracle": d["worst"]["mean"] - ref["oracle"],
                "worst_within_2_of_oracle": d["worst"]["mean"] >= ref["oracle"] - 2.0,
                "best_peer": None if best_peer is None else {"rule": best_peer[0], "worst": best_peer[1]},
                "above_every_peer": best_peer is None or d["worst"]["mean"] > best_peer[1],
                "clean_minus_fedavg": None if clean is None or ref.get("clean-fedavg") is None
                else clean - ref["clean-fedavg"],
                "clean_honest_excluded": d["attacks"].get("none", {}).get("honest_excluded"),
            }
    return summary


def _md(summary: dict[str, Any], command: str, n_runs: int, seconds: float,
        title: str = "# Robustness benchmark (issue 10)", sizes: str = "") -> str:
    lines = [title, "", f"- command: `{command}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"1 BLAS thread per worker", f"- {n_runs} runs; sum of per-run times {seconds / 60:.0f} min",
             *([f"- federation: {sizes}"] if sizes else []),
             "- final test accuracy (%), mean over seeds; worst = lowest per-attack mean; "
             "`excl` = share of honest client-rounds excluded with no attack", ""]
    for setting in sorted(summary):
        s = summary[setting]
        ref = s["references"]
        lines += [f"## {setting}", "",
                  f"- oracle (mean of the honest clients): {ref.get('oracle') or float('nan'):.1f}; "
                  f"clean FedAvg: {ref.get('clean-fedavg') or float('nan'):.1f}"]
        t = s.get("targets")
        if t:
            bp = t["best_peer"]
            lines.append(f"- default defence: worst - oracle = {t['worst_minus_oracle']:+.1f} "
                         f"({'met' if t['worst_within_2_of_oracle'] else 'MISSED'}: >= -2); "
                         f"best peer worst case {bp['rule'] if bp else '-'} {bp['worst'] if bp else float('nan'):.1f} "
                         f"({'above' if t['above_every_peer'] else 'NOT above'}); clean - FedAvg = "
                         f"{(t['clean_minus_fedavg'] if t['clean_minus_fedavg'] is not None else float('nan')):+.1f}; "
                         f"honest client-rounds excluded with no attack: "
                         f"{100 * (t['clean_honest_excluded'] or 0):.2f} %")
        attacks = [a for a in ("none", *ATTACKS) if any(a in v["attacks"] for v in s["rules"].values())]
        lines += ["", "| rule | " + " | ".join(attacks) + " | worst (attack) | worst - oracle |",
                  "|---" * (len(attacks) + 3) + "|"]
        order = [r for r in ("rge", "rge-paper", *PEERS, *MOMENTUM_PEERS, "mean", *ABLATIONS) if r in s["rules"]]
        order += [r for r in s["rules"] if r not in order]
        for rule in order:
            v = s["rules"][rule]
            cells = []
            for a in attacks:
                c = v["attacks"].get(a)
                if c is None:
                    cells.append("")
                elif a == "none":
                    cells.append(f"{c['mean']:.1f} (excl {100 * c['honest_excluded']:.1f}%)")
                else:
                    cells.append(f"{c['mean']:.1f}")
            w = v["worst"]
            wtxt = f"{w['mean']:.1f} ({w['attack']})" if w else ""
            gap = f"{w['mean'] - ref['oracle']:+.1f}" if w and ref.get("oracle") is not None else ""
            label = f"**{rule}**" if rule == "rge" else rule
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {wtxt} | {gap} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _plots(summary: dict[str, Any], records: list[dict[str, Any]], out: Path, stem: str = "robustness") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    settings = sorted(summary)
    if not settings:
        return paths
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 5.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        s = summary[setting]
        # ablations run on a subset of the attacks: their "worst" is not comparable, so not drawn here
        rules = [r for r in ("rge", "rge-paper", *PEERS, *MOMENTUM_PEERS) if r in s["rules"]
                 and s["rules"][r]["worst"]]
        if stem != "robustness" and "rge" in s["rules"]:  # local mode: probes run on every attack of the default
            full = set(s["rules"]["rge"]["attacks"])
            rules += [r for r in sorted(s["rules"]) if r.startswith("rge/") and s["rules"][r]["worst"]
                      and set(s["rules"][r]["attacks"]) >= full]
        vals = [s["rules"][r]["worst"]["mean"] for r in rules]
        colors = ["tab:red" if r == "rge" else "tab:orange" if r.startswith("rge") else "tab:blue" for r in rules]
        ax.barh(range(len(rules)), vals, color=colors)
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        ax.invert_yaxis()
        if s["references"].get("oracle") is not None:
            ax.axvline(s["references"]["oracle"], color="k", ls="--", lw=1, label="oracle")
            ax.axvline(s["references"]["oracle"] - 2, color="k", ls=":", lw=1, label="oracle - 2")
        ax.set_xlim(max(0, min(vals + [50]) - 5), 100)
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("worst-case final accuracy over attacks (%)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"python -m benchmarks.robustness{' --mode local' if stem.endswith('_local') else ''}: "
                 "worst case per rule", fontsize=10)
    fig.tight_layout()
    p = out / f"{stem}_worst.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # curves: default defence vs the best peer on the default's three worst attacks
    for setting in settings:
        s = summary[setting]
        if "rge" not in s["rules"]:
            continue
        t = s.get("targets") or {}
        peer = (t.get("best_peer") or {}).get("rule")
        atts = sorted((a for a in s["rules"]["rge"]["attacks"] if a != "none"),
                      key=lambda a: s["rules"]["rge"]["attacks"][a]["mean"])[:3]
        if not atts:
            continue
        fig, axes = plt.subplots(1, len(atts), figsize=(4.6 * len(atts), 3.6), squeeze=False)
        for ax, att in zip(axes[0], atts):
            for rule, color in (("rge", "tab:red"), ("rge-paper", "tab:orange"), (peer, "tab:blue"),
                                ("oracle", "k"), ("mean", "tab:gray")):
                if rule is None:
                    continue
                want = "erasure" if rule == "oracle" else att
                curves = [r["accuracy"] for r in records if not r.get("error") and r["rule"] == rule
                          and r["attack"] == want and f"{r['model']}, alpha={r['alpha']:g}" == setting]
                if curves:
                    rounds = next(r["eval_rounds"] for r in records if not r.get("error") and r["rule"] == rule
                                  and r["attack"] == want and f"{r['model']}, alpha={r['alpha']:g}" == setting)
                    ax.plot(rounds, 100 * np.mean(np.array(curves), axis=0), color=color, label=rule,
                            ls="--" if rule == "oracle" else "-")
            ax.set_title(f"{setting}: {att}", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("test accuracy (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{stem}_curves_{setting.replace(', ', '_').replace('=', '')}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def compare_modes(gradient: list[dict[str, Any]], local: list[dict[str, Any]]) -> dict[str, Any]:
    """Local-training mode next to gradient mode: per setting, rule and attack, the mean final accuracy (%).

    Only the seeds, rules and attacks of the local runs count, so both columns average the
    same federations' settings.  ``worst``: the lowest per-attack mean over the attacks the
    local run has (``complete`` False when gradient mode lacks some of them).
    """
    seeds: dict[str, set[int]] = defaultdict(set)
    for rec in local:
        if not rec.get("error"):
            seeds[f"{rec['model']}, alpha={rec['alpha']:g}"].add(int(rec["seed"]))
    cells: dict[str, Any] = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for mode, recs in (("gradient", gradient), ("local", local)):
        for rec in recs:
            setting = f"{rec['model']}, alpha={rec['alpha']:g}"
            if rec.get("error") or int(rec["seed"]) not in seeds.get(setting, ()):
                continue
            cells[setting][rec["rule"]][rec["attack"]][mode].append(100 * rec["final_accuracy"])
    out: dict[str, Any] = {}
    for setting, rules in cells.items():
        local_rules = {r for r, atts in rules.items() if any(v["local"] for v in atts.values())}
        table: dict[str, Any] = {}
        for rule in local_rules:
            atts = rules[rule]
            row = {a: {m: (float(np.mean(v[m])) if v[m] else None) for m in ("gradient", "local")}
                   | {"n": {m: len(v[m]) for m in ("gradient", "local")}} for a, v in atts.items() if v["local"]}
            worst = {}
            attacked = [a for a in row if a not in ("none", "erasure")]
            for m in ("gradient", "local"):
                have = [a for a in attacked if row[a][m] is not None]
                w = min(have, key=lambda a: row[a][m]) if have else None
                worst[m] = None if w is None else {"attack": w, "mean": row[w][m], "complete": len(have) == len(attacked)}
            table[rule] = {"attacks": row, "worst": worst}
        out[setting] = {"seeds": sorted(seeds[setting]), "rules": table}
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _compare_md(comparison: dict[str, Any]) -> str:
    lines = ["## Local-training mode next to gradient mode", "",
             "Each cell: gradient mode / local mode, final test accuracy (%), mean over the same seeds "
             "(gradient-mode cells from `robustness.jsonl`; `-`: not run there yet). worst = lowest per-attack "
             "mean (`*`: some attacks missing in that mode).", ""]
    for setting in sorted(comparison):
        c = comparison[setting]
        attacks = [a for a in ("none", *ATTACKS) if any(a in v["attacks"] for v in c["rules"].values())]
        lines += [f"### {setting} (seeds {', '.join(map(str, c['seeds']))})", "",
                  "| rule | " + " | ".join(attacks) + " | worst (attack) |", "|---" * (len(attacks) + 2) + "|"]
        order = [r for r in (*REFERENCES, "rge", "rge-paper", *PEERS, *MOMENTUM_PEERS, "mean") if r in c["rules"]]
        order += sorted(r for r in c["rules"] if r not in order)
        for rule in order:
            v = c["rules"][rule]
            if rule in REFERENCES:
                (cell,) = v["attacks"].values()
                lines.append(f"| {rule} | " + f"{_pct(cell['gradient'])} / {_pct(cell['local'])}" +
                             " |" * len(attacks) + " |")
                continue
            cells = [f"{_pct(v['attacks'][a]['gradient'])} / {_pct(v['attacks'][a]['local'])}" if a in v["attacks"]
                     else "" for a in attacks]
            w = v["worst"]
            wt = " / ".join("-" if w[m] is None else f"{w[m]['mean']:.1f}{'' if w[m]['complete'] else '*'} "
                            f"({w[m]['attack']})" for m in ("gradient", "local"))
            label = f"**{rule}**" if rule == "rge" else rule
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {wt} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def report(out: Path, command: str, mode: str = "gradient") -> dict[str, Any]:
    """Tables and plots of ``mode``'s JSONL; local mode adds :func:`compare_modes` against gradient mode."""
    records = load_records(out / jsonl_name(mode))
    summary = summarise(records)
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    stem = jsonl_name(mode).removesuffix(".jsonl")
    payload: dict[str, Any] = {"command": command, "summary": summary}
    sizes = "; ".join(f"R = {n} clients, {f} of them Byzantine (eps = {f / n:.2g})" for n, f in sorted(
        {(int(r["num_nodes"]), int(r["num_malicious"])) for r in records if "num_nodes" in r}))
    md = _md(summary, command, len(records), seconds, sizes=sizes) if mode == "gradient" else _md(
        summary, command, len(records), seconds, sizes=sizes,
        title="# Robustness benchmark, local-training mode (issue 11)\n\n- clients train locally: " + "; ".join(sorted(
            {f"local-epochs {r['local_epochs']}, local-steps {r['local_steps']}, client-lr {r['client_lr']:g}, "
             f"server-lr {r['learning_rate']:g}" for r in records})))
    if mode == "local":
        payload["local_vs_gradient"] = comparison = compare_modes(load_records(out / JSONL_NAME), records)
        md += "\n" + _compare_md(comparison)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(md)
    _plots(summary, records, out, stem)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke grid")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--alphas", nargs="+", type=float)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--attacks", nargs="+")
    ap.add_argument("--rules", nargs="+")
    ap.add_argument("--rounds", type=int, help="override the models' round counts (smoke tests)")
    ap.add_argument("--ablation-attacks", nargs="+")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--mode", choices=MODES, default="gradient",
                    help="gradient: RobustSGD clients (default grid); local: clients train locally, RobustFedAvg "
                         "(LOCAL_GRID, robustness_local.* files)")
    for flag, typ in (("--local-epochs", int), ("--local-steps", int), ("--client-lr", float), ("--server-lr", float)):
        ap.add_argument(flag, type=typ, help="local mode: override the App's default (use another --out: the "
                                             "tables average every run of a setting in the JSONL)")
    ap.add_argument("--num-nodes", type=int, default=20, help="clients per federation (the grid's 20)")
    ap.add_argument("--num-malicious", type=int, default=4,
                    help="Byzantine clients among them (the grid's 4, eps = 0.2); other sizes than 20 / 4 write to "
                         "benchmarks/results/robustness_R<n>_f<f>/ unless --out is given")
    args = ap.parse_args(argv)
    if args.num_nodes < 3 or not 0 <= args.num_malicious < args.num_nodes / 2:
        ap.error(f"need --num-nodes >= 3 and 0 <= --num-malicious < num-nodes / 2, got {args.num_nodes} and "
                 f"{args.num_malicious}")
    sized = (args.num_nodes, args.num_malicious) != (20, 4)
    if sized and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT / f"robustness_R{args.num_nodes}_f{args.num_malicious}"
    other = sorted({(r.get("num_nodes"), r.get("num_malicious")) for r in load_records(args.out / jsonl_name(args.mode))}
                   - {(args.num_nodes, args.num_malicious)})
    if other:  # the tables average every run of a setting: one federation size per results folder
        ap.error(f"{args.out / jsonl_name(args.mode)} holds federations of other sizes (R, f) {other}: "
                 f"use another --out for --num-nodes {args.num_nodes} --num-malicious {args.num_malicious}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = "python -m benchmarks.robustness " + " ".join(argv if argv is not None else sys.argv[1:])
    grid = dict(QUICK if args.quick else GRID if args.mode == "gradient" else LOCAL_GRID)
    for key in ("models", "alphas", "seeds", "attacks", "rules", "ablation_attacks"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    if args.no_ablation:
        grid["ablations"] = ()
    if args.rounds:
        grid["rounds"] = args.rounds
    if not args.report_only:
        local = {k: getattr(args, k) for k in ("local_epochs", "local_steps", "client_lr", "server_lr")
                 if getattr(args, k) is not None}
        specs = build_grid(**grid, mode=args.mode, local=local, num_nodes=args.num_nodes,
                           num_malicious=args.num_malicious)
        ran = run_grid(specs, args.out, workers=args.workers, max_minutes=args.max_minutes,
                       progress=not args.no_progress, mode=args.mode)
        print(f"ran {ran} of {len(specs)} runs (the rest were already in {args.out / jsonl_name(args.mode)})")
    summary = report(args.out, command, args.mode)
    for setting, s in sorted(summary.items()):
        t = s.get("targets")
        if t:
            print(f"{setting}: default worst - oracle {t['worst_minus_oracle']:+.1f}; "
                  f"above every peer: {t['above_every_peer']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Agreement of the default defence's fast passes with its exact passes on the robustness benchmark's rounds.

One command::

    nice -n 5 python -m benchmarks.fast_passes_agreement [--models logreg] [--seeds 0] [--attacks ...]

In rounds of at least ``fast_above`` entries (2^20; issue 12) :class:`~flwr_byzantine.aggregators.RobustDefence`
screens gross outliers on a server-private CountSketch of the rows (length 2048) and takes the
self-reference drift from 31 nodes drawn at random.  The robustness benchmark's rounds (R = 20, d = 650)
are far below that size, so its decisions are the exact passes' by construction; this replay measures what
the fast passes *would* decide on those rounds: the federation (``benchmarks/fastsim.py``, the grid's models,
attacks and heterogeneity) is driven by the exact default defence, and in every round a copy of its state
runs the same round with the fast passes forced on (the filter kept exact, so only the two passes differ),
with a sketch far shorter relative to the rows than at d = 1e6 (``--sketch-dims``, default 128 and 256 of
650 coordinates) and a drift from fewer nodes (``--drift-rows``, default 9 and 15 of about 20).  Reported:
the fraction of rounds whose kept set (and gross, jumped, suspected rows) equals the exact rule's, and the
estimates' relative difference.  Writes ``fast_passes_agreement.json`` and ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.decode_time import DEFAULT_OUT

DECISIONS = ("gross", "jumped", "suspected")


class Twins:
    """The exact rule (its output drives the federation) and, every round, fast-pass copies of its state."""

    def __init__(self, rule: Any, configs: list[tuple[int, int]], seed: int) -> None:
        self.rule, self.configs, self.seed = rule, configs, seed
        self.rounds = 0
        self.records: list[dict[str, Any]] = []

    @property
    def evidence(self):  # the memory-aware attacker aims at the rule's evidence levels
        return self.rule.evidence

    def __deepcopy__(self, memo):  # what an omniscient defence-aware attacker simulates: the server's rule
        return copy.deepcopy(self.rule, memo)

    def aggregate(self, G, client_ids=None):
        twins = []
        for sketch_dim, drift_rows in self.configs:
            twin = copy.deepcopy(self.rule)
            twin.fast_above, twin.screen_sketch_dim, twin.drift_rows = 1, sketch_dim, drift_rows
            twin.filter_for = lambda R, d, _t=twin: _t.filter  # the exact filter: only the passes differ
            twin._pass_rng = np.random.default_rng([self.seed, self.rounds, sketch_dim, drift_rows])
            twins.append(twin)
        exact = self.rule.aggregate(G, client_ids=client_ids)
        rec: dict[str, Any] = {"round": self.rounds}
        for (sketch_dim, drift_rows), twin in zip(self.configs, twins):
            fast = twin.aggregate(G, client_ids=client_ids)
            ea, eb = np.asarray(fast.estimate, dtype=np.float64), np.asarray(exact.estimate, dtype=np.float64)
            rec[f"{sketch_dim}/{drift_rows}"] = {
                "kept": bool(np.array_equal(fast.kept, exact.kept)),
                **{k: fast.info.get(k) == exact.info.get(k) for k in DECISIONS},
                "sampled": fast.info.get("drift_rows") is not None,
                "rel_diff": float(np.linalg.norm(ea - eb) / max(np.linalg.norm(eb), 1e-300)),
            }
        self.records.append(rec)
        self.rounds += 1
        return exact


def run_one(model: str, alpha: float, seed: int, attack: str, configs: list[tuple[int, int]],
            rounds: int | None) -> dict[str, Any]:
    from benchmarks.fastsim import SimConfig, simulate
    from benchmarks.robustness import MODELS, build_rule

    adversary, mode = "client", "static"
    if attack.startswith("omni"):
        prefix, _, attack = attack.partition(":")
        adversary, mode = "omniscient", ("rotate" if prefix == "omni-rotate" else "static")
        attack_label = f"{prefix}:{attack}"
    else:
        attack_label = attack
    rule, name = build_rule("rge", 20, 4)
    twins = Twins(rule, configs, seed)
    n_rounds = rounds or MODELS[model]["rounds"]
    cfg = SimConfig(alpha=alpha, model=model, num_nodes=20, num_malicious=4, attack=attack, adversary=adversary,
                    adversary_mode=mode, eps_tilde=0.2, rounds=n_rounds,
                    learning_rate=MODELS[model]["learning_rate"], seed=seed, eval_every=n_rounds)
    simulate(cfg, twins, name)
    out: dict[str, Any] = {"model": model, "alpha": alpha, "seed": seed, "attack": attack_label,
                           "rounds": twins.rounds}
    for sketch_dim, drift_rows in configs:
        key = f"{sketch_dim}/{drift_rows}"
        recs = [r[key] for r in twins.records]
        out[key] = {"kept_agree": sum(r["kept"] for r in recs), "rounds": len(recs),
                    **{f"{k}_agree": sum(r[k] for r in recs) for k in DECISIONS},
                    "rel_diff_median": float(np.median([r["rel_diff"] for r in recs])),
                    "rel_diff_max": float(np.max([r["rel_diff"] for r in recs]))}
    return out


def plot(payload: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["runs"]
    labels = [f"{r['model']} a={r['alpha']} {r['attack']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(rows))))
    y = np.arange(len(rows))
    for k, key in enumerate(payload["configs"]):
        vals = [100.0 * r[key]["kept_agree"] / max(r[key]["rounds"], 1) for r in rows]
        ax.barh(y + 0.4 * k, vals, height=0.4, label=f"sketch {key.split('/')[0]}, drift from {key.split('/')[1]} nodes")
    ax.set_yticks(y + 0.2, labels, fontsize=6)
    ax.set_xlim(80, 100.5)
    ax.axvline(99, color="k", lw=0.8, ls="--")
    ax.set_xlabel("rounds with the exact passes' kept set (%)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("fast passes vs exact, robustness benchmark rounds (R = 20, d = 650)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from benchmarks.robustness import ATTACKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["logreg"])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.3, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--attacks", nargs="+", default=["none", *ATTACKS])
    p.add_argument("--sketch-dims", nargs="+", type=int, default=[128, 256])
    p.add_argument("--drift-rows", nargs="+", type=int, default=[9, 15])
    p.add_argument("--rounds", type=int, default=None, help="rounds per federation (default: the grid's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if len(args.sketch_dims) != len(args.drift_rows):
        p.error("--sketch-dims and --drift-rows pair up: give as many of each")
    from threadpoolctl import threadpool_limits

    configs = list(zip(args.sketch_dims, args.drift_rows))
    runs = []
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        for model in args.models:
            for alpha in args.alphas:
                for seed in args.seeds:
                    for attack in args.attacks:
                        r = run_one(model, alpha, seed, attack, configs, args.rounds)
                        runs.append(r)
                        print(f"{model} alpha={alpha} seed={seed} {attack}: " + "; ".join(
                            f"{k}: kept {r[k]['kept_agree']}/{r[k]['rounds']}, gross {r[k]['gross_agree']}, "
                            f"jumped {r[k]['jumped_agree']}, suspected {r[k]['suspected_agree']}, "
                            f"est. rel. diff median {r[k]['rel_diff_median']:.1e}"
                            for k in (f"{s}/{m}" for s, m in configs)), flush=True)
    keys = [f"{s}/{m}" for s, m in configs]
    summary = {}
    for key in keys:
        tot = sum(r[key]["rounds"] for r in runs)
        summary[key] = {"rounds": tot, "kept_identical_fraction": sum(r[key]["kept_agree"] for r in runs) / tot,
                        **{f"{k}_identical_fraction": sum(r[key][f"{k}_agree"] for r in runs) / tot for k in DECISIONS},
                        "rel_diff_median": float(np.median([r[key]["rel_diff_median"] for r in runs]))}
        print(f"{key}: kept identical in {100 * summary[key]['kept_identical_fraction']:.2f} % of {tot} rounds")
    command = "python -m benchmarks.fast_passes_agreement " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": command.strip(), "blas_threads": 1, "seconds": time.perf_counter() - t0,
               "configs": keys, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_passes_agreement.json").write_text(json.dumps(payload, indent=1))
    plot(payload, args.out / "fast_passes_agreement.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The filter's decisions before and after the compiled saddle solver, on the robustness benchmark's rounds.

One command::

    nice -n 5 python -m benchmarks.saddle_before_after [--ref d8f0382] [--rounds 30] [--quick]

The package as of git commit ``--ref`` (default ``d8f0382``: the numpy saddle solver, before the
compiled one) is imported next to the working tree's (:func:`benchmarks.defence_before_after.import_old`).
Federations of :mod:`benchmarks.fastsim` (digits, 20 nodes, 4 malicious; logistic regression and the
MLP, Dirichlet alpha 0.3 and 1.0, attacks ``none``, ``sign-flip``, ``alie``, ``ipm``, ``scaled-negative``
and ``defence-aware``, seeds 0 and 1) run with the current rule; in every round the old rule (its own
instance and memory) aggregates the same rows.  Rules: the default defence (registry ``rge``,
``RobustDefence``, called with node ids), the paper's RGE (``rge-paper``) and the default defence's
filter alone (``rge-filter``: RGE with the stopping constant 1.5, which runs the most saddle solves).
Per rule: the rounds whose kept sets are identical, the largest relative difference of the estimates
(``||new - old|| / ||old||``), the rounds in which the filter ran saddle-solver iterations (the
default defence skips its filter once the budget is spent; a first solve that certifies the stop
runs none) and those with the same iteration count in both.  Writes ``saddle_before_after.json``
and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.decode_time import DEFAULT_OUT
from benchmarks.defence_before_after import import_old

MODELS = ("logreg", "mlp")
ALPHAS = (0.3, 1.0)
ATTACKS = ("none", "sign-flip", "alie", "ipm", "scaled-negative", "defence-aware")
SEEDS = (0, 1)
RULES = ("rge", "rge-paper", "rge-filter")


class SideBySide:
    """The current rule drives the federation; the old one aggregates the same rows next to it."""

    def __init__(self, new: Any, old: Any) -> None:
        self.new, self.old = new, old
        self.rounds: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:  # what an attacker reads off the server's rule (its evidence, ...)
        if name in ("new", "old", "rounds"):
            raise AttributeError(name)
        return getattr(self.new, name)

    def __deepcopy__(self, memo: dict) -> Any:  # an omniscient defence-aware attacker simulates the server's rule
        return copy.deepcopy(self.new, memo)

    def aggregate(self, G: np.ndarray, client_ids: list[int] | None = None) -> Any:
        from benchmarks.fastsim import aggregate

        ids = list(range(G.shape[0])) if client_ids is None else client_ids
        a = aggregate(self.new, G, ids)
        b = aggregate(self.old, G, ids)
        ea, eb = np.asarray(a.estimate, dtype=np.float64), np.asarray(b.estimate, dtype=np.float64)
        self.rounds.append({"same_kept": bool(np.array_equal(a.kept, b.kept)),
                            "solver_iterations": [int(r.info.get("solver_iterations", 0)) for r in (a, b)],
                            "kept_new": a.kept.tolist(), "kept_old": b.kept.tolist(),
                            "estimate_rel_diff": float(np.linalg.norm(ea - eb) / max(np.linalg.norm(eb), 1e-300))})
        return a


def build(pkg: Any, rule: str) -> Any:
    """The rule as :func:`benchmarks.robustness.build_rule` builds it (20 nodes, 4 Byzantine), from package ``pkg``;
    ``rge-filter``: the default defence's filter alone (Algorithm 3 with its stopping constant 1.5, no memory)."""
    if rule == "rge":
        return pkg.RobustDefence(eps_tilde=0.2)
    if rule == "rge-filter":
        return pkg.RGE(eps_tilde=0.2, threshold_factor=1.5)
    return pkg.build_for_federation(rule, 20, 0.2)


def run(old: Any, rules: tuple[str, ...], models: tuple[str, ...], alphas: tuple[float, ...],
        attacks: tuple[str, ...], seeds: tuple[int, ...], rounds: int) -> dict[str, Any]:
    import flwr_byzantine.aggregators as new
    from benchmarks.fastsim import SimConfig, simulate

    out: dict[str, Any] = {}
    for rule in rules:
        cases = []
        for model in models:
            for alpha in alphas:
                for attack in attacks:
                    for seed in seeds:
                        pair = SideBySide(build(new, rule), build(old, rule))
                        cfg = SimConfig(alpha=alpha, model=model, num_nodes=20, num_malicious=4, attack=attack,
                                        eps_tilde=0.2, rounds=rounds, learning_rate=0.5 if model == "logreg" else 0.3,
                                        seed=seed, eval_every=rounds)
                        t0 = time.perf_counter()
                        simulate(cfg, pair, "rge")
                        diff = [i for i, r in enumerate(pair.rounds) if not r["same_kept"]]
                        its = [r["solver_iterations"] for r in pair.rounds]
                        cases.append({"model": model, "alpha": alpha, "attack": attack, "seed": seed,
                                      "rounds": len(pair.rounds), "same_kept_rounds": len(pair.rounds) - len(diff),
                                      "differing_rounds": [{"round": i, "kept_new": pair.rounds[i]["kept_new"],
                                                            "kept_old": pair.rounds[i]["kept_old"]} for i in diff],
                                      "max_estimate_rel_diff": max(r["estimate_rel_diff"] for r in pair.rounds),
                                      "solved_rounds": sum(new_it > 0 for new_it, _ in its),
                                      "same_iterations_rounds": sum(new_it == old_it for new_it, old_it in its),
                                      "seconds": time.perf_counter() - t0})
                        print(f"{rule} {model} alpha={alpha} {attack} seed={seed}: "
                              f"{cases[-1]['same_kept_rounds']}/{cases[-1]['rounds']} same kept, "
                              f"max estimate rel diff {cases[-1]['max_estimate_rel_diff']:.1e}", flush=True)
        out[rule] = {"cases": cases, "rounds": sum(c["rounds"] for c in cases),
                     "same_kept_rounds": sum(c["same_kept_rounds"] for c in cases),
                     "solved_rounds": sum(c["solved_rounds"] for c in cases),
                     "same_iterations_rounds": sum(c["same_iterations_rounds"] for c in cases),
                     "max_estimate_rel_diff": max(c["max_estimate_rel_diff"] for c in cases)}
    return out


def report(res: dict[str, Any], command: str, ref: str) -> str:
    L = ["# Saddle solver before/after: the filter's decisions on fastsim federations", "",
         f"Command: `{command}`", "",
         f"Old: the package at commit `{ref}`; new: this tree. Every round of each federation (driven by the new "
         "rule) is aggregated by both.", "",
         "| rule | federations | rounds | rounds with saddle iterations | kept sets identical | "
         "same solver iterations | max relative estimate difference |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for rule, r in res.items():
        L.append(f"| {rule} | {len(r['cases'])} | {r['rounds']} | {r['solved_rounds']} | {r['same_kept_rounds']} "
                 f"({100.0 * r['same_kept_rounds'] / max(r['rounds'], 1):.2f} %) | {r['same_iterations_rounds']} | "
                 f"{r['max_estimate_rel_diff']:.1e} |")
    L += ["", "| rule | model | alpha | attack | seed | identical / rounds | rounds with iterations | "
          "max rel. estimate diff |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for rule, r in res.items():
        for c in r["cases"]:
            L.append(f"| {rule} | {c['model']} | {c['alpha']} | {c['attack']} | {c['seed']} | "
                     f"{c['same_kept_rounds']} / {c['rounds']} | {c['solved_rounds']} | "
                     f"{c['max_estimate_rel_diff']:.1e} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="d8f0382", help="git commit of the 'before' implementation")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="logreg, alpha 0.3, sign-flip and alie, seed 0, 5 rounds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    grid = ((MODELS[:1], ALPHAS[:1], ("sign-flip", "alie"), SEEDS[:1], 5) if args.quick
            else (MODELS, ALPHAS, ATTACKS, SEEDS, args.rounds))
    from threadpoolctl import threadpool_limits

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1):
        old = import_old(args.ref, root, Path(tmp))
        res = run(old, RULES, *grid)
    command = ("python -m benchmarks.saddle_before_after " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "saddle_before_after.json").write_text(json.dumps({"command": command, "ref": args.ref,
                                                                   "rules": res}, indent=1))
    text = report(res, command, args.ref)
    (args.out / "saddle_before_after.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""COMRADE vs GIANT benchmark (Ghosh, Maity & Mazumdar, NeurIPS 2020): ``python -m benchmarks.comrade``.

Runs in-process (no Flower, no Ray) with the exact worker / server code the Flower strategies
and ClientApp execute (:class:`flwr_byzantine.newton.NewtonWorker`,
:func:`flwr_byzantine.newton.newton_step`), and writes

* ``benchmarks/results/comrade.json``: every number below, per seed;
* ``benchmarks/results/comrade.md``: the printed tables;
* ``benchmarks/results/comrade_accuracy.png``: test accuracy per iteration under attack;
* ``benchmarks/results/comrade_convergence.png``: ||w_t - w*|| (log scale) per iteration and
  per communication round;

and prints markdown tables:

1. COMRADE (beta = 0.25) accuracy with 10 / 15 / 20 % Byzantine workers (Gaussian-noise and
   random-labels attacks, the paper's Figure 3), next to non-robust COMRADE (beta = 0) under the
   same attack and GIANT without attack;
2. linear-quadratic convergence of ||w_t - w*|| on a strongly convex problem;
3. communication rounds to reach a tolerance, COMRADE (1 round / iteration) vs GIANT (2);
4. COMRADE's error floor against the local sample size (Theorem 1's additive term).

Data: the scikit-learn digits made binary (real data, d = 65) and an a9a-shaped synthetic
logistic problem (32,560 training rows, d = 123, like a9a).  If the LIBSVM files a9a / a9a.t
/ w5a / w5a.t are in ``$FLWR_BYZANTINE_LIBSVM_DIR`` they are benchmarked too (nothing is
downloaded).  ``--quick`` runs one seed and fewer iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flwr_byzantine.data.libsvm import (  # noqa: E402
    GLMDataset,
    federated_split,
    load_glm_dataset,
    make_synthetic_logistic,
)
from flwr_byzantine.attacks import make_attack, run_attack_params  # noqa: E402
from flwr_byzantine.federation import malicious_partition_ids  # noqa: E402
from flwr_byzantine.newton import (  # noqa: E402
    NewtonWorker,
    TopK,
    federated_objective,
    make_objective,
    minimise,
    run_comrade,
    run_giant,
)

RESULTS = Path(__file__).resolve().parent / "results"
NUM_WORKERS = 20
FRACTIONS = (0.10, 0.15, 0.20)
ATTACKS = ("gaussian", "random-labels")
BETA = 0.25
GAUSSIAN_STD = 3.0


def datasets() -> dict[str, tuple[GLMDataset, float]]:
    """name -> (data, lambda)."""
    out = {
        "digits": (load_glm_dataset("digits", seed=0), 1e-2),
        "synthetic-a9a-shape": (make_synthetic_logistic(40_700, 123, seed=0, signal=4.0), 1e-3),
    }
    libsvm_dir = os.environ.get("FLWR_BYZANTINE_LIBSVM_DIR", "")
    for name in ("a9a", "w5a"):
        train, test = Path(libsvm_dir, name), Path(libsvm_dir, f"{name}.t")
        if libsvm_dir and train.is_file() and test.is_file():
            out[name] = (load_glm_dataset("libsvm", path=str(train), test_path=str(test)), 1e-3)
    return out


class Problem:
    """A federated GLM problem: partitions, reference objective, w*, test objective."""

    def __init__(self, data: GLMDataset, lam: float, m: int = NUM_WORKERS, seed: int = 0) -> None:
        self.data, self.lam, self.m = data, lam, m
        self.parts, _ = federated_split(data, m, seed=seed)
        self.fed = federated_objective("logistic", data.X_train, data.y_train, self.parts, lam)
        self.test = make_objective("logistic", data.X_test, data.y_test, lam)
        self.w_star = minimise(self.fed)
        self.f_star = self.fed.value(self.w_star)
        self.d = self.fed.d

    def workers(self, attacks: dict[int, Any] | None = None, compressor=None) -> list[NewtonWorker]:
        attacks = attacks or {}
        return [NewtonWorker(self.data.X_train[p], self.data.y_train[p], "logistic", self.lam,
                             attack=attacks.get(i), compressor=compressor) for i, p in enumerate(self.parts)]

    def run(self, method: str, iterations: int, beta: float = 0.0, attacks=None, compressor=None):
        fn = run_comrade if method == "comrade" else run_giant
        kwargs = {"reference": self.fed, "w_star": self.w_star, "test": self.test}
        _, hist = fn(self.workers(attacks, compressor), np.zeros(self.d), iterations, beta, **kwargs)
        for rec in hist:
            rec["rel_dist"] = rec["dist"] / np.linalg.norm(self.w_star)
            rec["subopt"] = max(rec["loss"] - self.f_star, 0.0)
        return hist


def attackers(m: int, fraction: float, attack: str, seed: int) -> dict[int, Any]:
    """Registry attacks (as a Newton client builds them) for a seeded ``fraction`` of the ``m`` workers."""
    ids = malicious_partition_ids(m, int(round(fraction * m)), seed)
    return {i: make_attack(attack, seed=1000 * seed + i, **run_attack_params(attack, GAUSSIAN_STD, "comrade"))
            for i in ids}


# ------------------------------------------------------------------------- experiment 1
def accuracy_experiment(problems: dict[str, Problem], iterations: int, seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pb in problems.items():
        giant = pb.run("giant", iterations)
        clean = pb.run("comrade", iterations, BETA)
        entry: dict[str, Any] = {
            "optimum_test_accuracy": pb.test.accuracy(pb.w_star),
            "giant_clean": [h["test_accuracy"] for h in giant],
            "comrade_clean_beta": [h["test_accuracy"] for h in clean],
            "attacks": {},
        }
        for attack in ATTACKS:
            for frac in FRACTIONS:
                runs = {"robust": [], "nonrobust": [], "detected": []}
                for seed in seeds:
                    att = attackers(pb.m, frac, attack, seed)
                    rob = pb.run("comrade", iterations, BETA, att)
                    non = pb.run("comrade", iterations, 0.0, att)
                    runs["robust"].append([h["test_accuracy"] for h in rob])
                    runs["nonrobust"].append([h["test_accuracy"] for h in non])
                    # share of Byzantine workers trimmed over the last half of the iterations
                    late = rob[1 + iterations // 2:]
                    hits = sum(len(set(h["trimmed"]) & set(att)) for h in late)
                    runs["detected"].append(hits / max(1, len(att) * len(late)))
                entry["attacks"][f"{attack}@{frac:.2f}"] = runs
        out[name] = entry
    return out


# ------------------------------------------------------------------------- experiment 2
def convergence_experiment(pb: Problem, iterations: int) -> dict[str, Any]:
    att = attackers(pb.m, 0.20, "gaussian", 0)
    curves = {
        "GIANT (beta=0)": pb.run("giant", iterations),
        "COMRADE (beta=0)": pb.run("comrade", iterations, 0.0),
        f"COMRADE (beta={BETA})": pb.run("comrade", iterations, BETA),
        f"COMRADE (beta={BETA}), 20% Gaussian": pb.run("comrade", iterations, BETA, att),
        "COMRADE (beta=0), 20% Gaussian": pb.run("comrade", iterations, 0.0, att),
        f"COMRADE (beta={BETA}), top-k rho=0.5": pb.run("comrade", iterations, BETA, compressor=TopK(fraction=0.5)),
    }
    return {label: [{k: h[k] for k in ("iteration", "comm_rounds", "dist", "rel_dist", "subopt", "bytes_up",
                                       "test_accuracy")} for h in hist] for label, hist in curves.items()}


def rates(hist: list[dict[str, Any]]) -> list[dict[str, float]]:
    """e_{t+1}/e_t (linear rate) and e_{t+1}/e_t^2 (quadratic constant) along a run."""
    e = [h["dist"] for h in hist]
    return [{"t": t, "e": e[t], "ratio": e[t + 1] / e[t], "quad": e[t + 1] / e[t] ** 2}
            for t in range(len(e) - 1) if e[t] > 0]


# ------------------------------------------------------------------------- experiment 3
REL_TOLS = (1e-1, 5e-2, 2e-2, 1e-2, 1e-3, 1e-6)
SUBOPT_TOLS = (1e-2, 3e-3, 1e-3, 1e-4, 1e-6)
FLOOR_WORKERS = (5, 10, 20, 40, 80)


def first_round(hist, key, tol):
    for h in hist:
        if h[key] <= tol:
            return int(h["comm_rounds"]), int(h["iteration"]), int(h["bytes_up"])
    return None


def rounds_experiment(problems: dict[str, Problem], iterations: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pb in problems.items():
        comrade = pb.run("comrade", iterations, 0.0)
        comrade_b = pb.run("comrade", iterations, BETA)
        giant = pb.run("giant", iterations)
        out[name] = {
            "floor_rel_dist_comrade": comrade[-1]["rel_dist"],
            "floor_subopt_comrade": comrade[-1]["subopt"],
            "rows": [{"tol": tol,
                      "comrade": first_round(comrade, "rel_dist", tol),
                      "comrade_beta": first_round(comrade_b, "rel_dist", tol),
                      "giant": first_round(giant, "rel_dist", tol)} for tol in REL_TOLS],
            "subopt_rows": [{"tol": tol,
                             "comrade": first_round(comrade, "subopt", tol),
                             "comrade_beta": first_round(comrade_b, "subopt", tol),
                             "giant": first_round(giant, "subopt", tol)} for tol in SUBOPT_TOLS],
        }
    return out


# ------------------------------------------------------------------------- experiment 4
def floor_experiment(data: GLMDataset, lam: float, iterations: int) -> list[dict[str, Any]]:
    """COMRADE's error floor against the local sample size s = n/m (Theorem 1: eps ~ 1/sqrt(s))."""
    rows = []
    for m in FLOOR_WORKERS:
        pb = Problem(data, lam, m=m)
        hist = pb.run("comrade", iterations, 0.0)
        s = int(np.mean([p.size for p in pb.parts]))
        rows.append({"m": m, "s": s, "floor_dist": hist[-1]["dist"], "floor_rel_dist": hist[-1]["rel_dist"],
                     "floor_subopt": hist[-1]["subopt"], "floor_times_sqrt_s": hist[-1]["dist"] * np.sqrt(s)})
    return rows


# ------------------------------------------------------------------------- output
def _fmt(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.3f}" if a.size == 1 else f"{a.mean():.3f} ± {a.std():.3f}"


def _cell(x) -> str:
    return "not reached" if x is None else f"{x[0]} ({x[1]} it.)"


def print_tables(res: dict[str, Any]) -> str:
    lines = []
    lines.append(f"### 1. Final test accuracy under attack ({NUM_WORKERS} workers, "
                 f"{res['config']['iterations']} iterations, mean ± std over seeds {res['config']['seeds']})\n")
    lines.append(f"| data | attack | Byzantine | COMRADE beta={BETA} | COMRADE beta=0 (non-robust) | "
                 "Byzantine trimmed | GIANT, no attack | w* accuracy |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, entry in res["accuracy"].items():
        for key, runs in entry["attacks"].items():
            attack, frac = key.split("@")
            lines.append(f"| {name} | {attack} | {float(frac):.0%} | {_fmt([r[-1] for r in runs['robust']])} | "
                         f"{_fmt([r[-1] for r in runs['nonrobust']])} | {_fmt(runs['detected'])} | "
                         f"{entry['giant_clean'][-1]:.3f} | {entry['optimum_test_accuracy']:.3f} |")
    conv = res["convergence"]
    lines.append(f"\n### 2. ‖w_t − w*‖ per iteration ({res['convergence_problem']}, lambda="
                 f"{res['convergence_lambda']:g})\n")
    labels = list(conv["curves"])
    lines.append("| t | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    for t in range(len(conv["curves"][labels[0]])):
        lines.append(f"| {t} | " + " | ".join(f"{conv['curves'][lb][t]['dist']:.2e}" for lb in labels) + " |")
    lines.append("\nContraction e_{t+1}/e_t (GIANT | COMRADE beta=0): " + "; ".join(
        f"t={g['t']}: {g['ratio']:.3g} | {c['ratio']:.3g}"
        for g, c in zip(conv["rates"]["GIANT (beta=0)"][:6], conv["rates"]["COMRADE (beta=0)"][:6])))
    lines.append("\n### 3a. Communication rounds to reach ‖w_t − w*‖ ≤ tol · ‖w*‖ (clean)\n")
    lines.append(f"| data | tol | COMRADE beta=0 | COMRADE beta={BETA} | GIANT | COMRADE floor (rel. dist) |")
    lines.append("|---|---|---|---|---|---|")
    for name, entry in res["rounds"].items():
        for row in entry["rows"]:
            lines.append(f"| {name} | {row['tol']:g} | {_cell(row['comrade'])} | {_cell(row['comrade_beta'])} | "
                         f"{_cell(row['giant'])} | {entry['floor_rel_dist_comrade']:.2e} |")
    lines.append("\n### 3b. Communication rounds to reach f(w_t) − f(w*) ≤ tol (clean)\n")
    lines.append(f"| data | tol | COMRADE beta=0 | COMRADE beta={BETA} | GIANT | COMRADE floor (f − f*) |")
    lines.append("|---|---|---|---|---|---|")
    for name, entry in res["rounds"].items():
        for row in entry["subopt_rows"]:
            lines.append(f"| {name} | {row['tol']:g} | {_cell(row['comrade'])} | {_cell(row['comrade_beta'])} | "
                         f"{_cell(row['giant'])} | {entry['floor_subopt_comrade']:.2e} |")
    lines.append(f"\n### 4. COMRADE error floor vs local sample size s ({res['convergence_problem']}, beta=0, clean)\n")
    lines.append("| workers m | rows per worker s | floor ‖w − w*‖ | floor / ‖w*‖ | floor f − f* | floor × sqrt(s) |")
    lines.append("|---|---|---|---|---|---|")
    for row in res["floor"]:
        lines.append(f"| {row['m']} | {row['s']} | {row['floor_dist']:.3e} | {row['floor_rel_dist']:.2e} | "
                     f"{row['floor_subopt']:.2e} | {row['floor_times_sqrt_s']:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


def plot_accuracy(res: dict[str, Any], path: Path) -> None:
    names = list(res["accuracy"])
    fig, axes = plt.subplots(len(names), len(ATTACKS), figsize=(5 * len(ATTACKS), 3.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        entry = res["accuracy"][name]
        for c, attack in enumerate(ATTACKS):
            ax = axes[r][c]
            for frac in FRACTIONS:
                runs = np.asarray(entry["attacks"][f"{attack}@{frac:.2f}"]["robust"])
                ax.plot(runs.mean(axis=0), marker=".", label=f"COMRADE, {frac:.0%} Byzantine")
            non = np.asarray(entry["attacks"][f"{attack}@{FRACTIONS[-1]:.2f}"]["nonrobust"])
            ax.plot(non.mean(axis=0), ls=":", color="grey", label=f"beta=0, {FRACTIONS[-1]:.0%} Byzantine")
            ax.plot(entry["giant_clean"], ls="--", color="black", label="GIANT, no attack")
            ax.set_title(f"{name}: {attack} attack")
            ax.set_xlabel("iteration")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            lo = min(0.5, float(np.min(non)) - 0.02)
            ax.set_ylim(max(0.0, lo), 1.0)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(res: dict[str, Any], path: Path) -> None:
    curves = res["convergence"]["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in curves.items():
        e = np.maximum([h["dist"] for h in hist], 1e-16)
        axes[0].semilogy([h["iteration"] for h in hist], e, marker=".", label=label)
        axes[1].semilogy([h["comm_rounds"] for h in hist], e, marker=".", label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("communication rounds")
    for ax in axes:
        ax.set_ylabel("||w_t - w*||")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"{res['convergence_problem']}: distance to the minimiser")
    axes[1].set_title("same, against communication rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer iterations")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    t0 = time.time()
    iterations = 6 if args.quick else 12
    seeds = [0] if args.quick else [0, 1, 2]
    problems = {name: Problem(data, lam) for name, (data, lam) in datasets().items()}
    conv_name = "synthetic-a9a-shape"
    conv_pb = problems[conv_name]
    conv_iters = 8 if args.quick else 14
    curves = convergence_experiment(conv_pb, conv_iters)
    res: dict[str, Any] = {
        "paper": "Ghosh, Maity, Mazumdar: Distributed Newton Can Communicate Less and Resist Byzantine Workers "
                 "(NeurIPS 2020)",
        "config": {"num_workers": NUM_WORKERS, "beta": BETA, "fractions": list(FRACTIONS), "attacks": list(ATTACKS),
                   "gaussian_std": GAUSSIAN_STD, "iterations": iterations, "seeds": seeds, "step_size": 1.0,
                   "partition": "uniform row sampling", "quick": bool(args.quick)},
        "problems": {name: {"n_train": int(pb.data.X_train.shape[0]), "n_test": int(pb.data.X_test.shape[0]),
                            "d": pb.d, "lambda": pb.lam, "w_star_norm": float(np.linalg.norm(pb.w_star)),
                            "optimum_test_accuracy": pb.test.accuracy(pb.w_star)} for name, pb in problems.items()},
        "accuracy": accuracy_experiment(problems, iterations, seeds),
        "convergence_problem": conv_name,
        "convergence_lambda": conv_pb.lam,
        "convergence": {"curves": curves, "rates": {k: rates(v) for k, v in curves.items()}},
        "rounds": rounds_experiment(problems, 2 * iterations),
        "floor": floor_experiment(conv_pb.data, conv_pb.lam, 10),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    res["markdown"] = print_tables(res)
    plot_accuracy(res, args.out / "comrade_accuracy.png")
    plot_convergence(res, args.out / "comrade_convergence.png")
    res["wall_seconds"] = time.time() - t0
    with open(args.out / "comrade.json", "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1, default=float)
    (args.out / "comrade.md").write_text(
        "# COMRADE vs GIANT (`python -m benchmarks.comrade" + (" --quick" if args.quick else "") + "`)\n\n"
        + res["markdown"] + f"\n\nWall time: {res['wall_seconds']:.1f} s.\n", encoding="utf-8")
    print(f"\nwrote {args.out / 'comrade.json'}, comrade.md, comrade_accuracy.png, comrade_convergence.png "
          f"in {res['wall_seconds']:.1f} s")
    return res


if __name__ == "__main__":
    main()

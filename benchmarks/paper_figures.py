"""The claims of Data & Diggavi (arXiv 2005.07866) as figures, on the Section 6 synthetic model.

One command::

    python -m benchmarks.paper_figures [--quick] [--only batch kappa randk dimension] [--out DIR]

Everything runs in-process (no Flower) on the linear-regression instance of Section 6
(:class:`~flwr_byzantine.data.synthetic.SyntheticHeterogeneous`), whose heterogeneity
``kappa_mean`` is a knob, with the SGD loop of :func:`benchmarks.randk.run_sgd` (Algorithm 1
for ``k = d``, Algorithm 2 for ``k < d``; Byzantine rows crafted each round from the honest
rows by :func:`benchmarks.randk.attack_rows`) and the mean-estimation trials of
:func:`benchmarks.mean_estimation.run`.  Two rules throughout: ``rge-paper`` (Algorithm 3
unchanged, stopping at ``4 R sigma0^2``) and ``rge``, the default defence
(:class:`~flwr_byzantine.aggregators.RobustDefence` with its defaults; it gets ``client_ids``
and ``observe_step`` in uncompressed rounds, as in RobustSGD, for its state across rounds).

Floors.  ``x*`` is the minimiser of the theorems' objective ``F = (1/R) sum_r F_r`` over *all*
``R`` workers' samples (closed form), and a run's floor is the root mean square of
``||x_t - x*||`` over its last quarter of rounds (Theorems 1, 2, 5 bound ``E||x_T - x*||^2``).
The constants of eqs. (18), (19) are measured at ``x*`` on the drawn data:
``kappa^2 = max_r ||grad F_r(x*) - grad F(x*)||^2`` and
``sigma^2 = max_r mean_i ||grad f_{r,i}(x*) - grad F_r(x*)||^2``.

Figures (each writes ``paper_<name>.png``; all numbers go to ``paper_figures.json`` and
``paper_figures.md``):

1. ``batch`` (Theorem 1): floor vs mini-batch ``b`` at two ``kappa_mean`` under ALIE, with the
   theorem's shape ``floor^2 = A sigma^2 / b + B kappa^2`` fitted (two non-negative constants
   per rule, over both ``kappa``) and drawn beside the measurements; the attack-free mean of
   the honest rows is drawn for reference.
2. ``kappa`` (Theorem 2): full-batch floor vs the measured ``kappa`` under ALIE, with the
   theorem's ``floor = C kappa`` fitted through the origin and the log-log slope.
3. ``randk`` (Theorem 5): floor vs ``k`` under sign-flip and ALIE.  Each run lasts
   ``rounds * d / k`` rounds (the randk step is ``eta k / d``, so it needs ``d / k`` times more
   rounds); the floor a fixed ``rounds``-round run reports (what ``benchmarks.randk`` measured)
   is read off the same run, which is where the old sign-flip gap came from.
4. ``dimension`` (Section 4, Theorem 3): one-round robust mean estimation error vs ``d`` under
   ALIE and IPM (:func:`benchmarks.mean_estimation.run`, ``R`` rows, ``N(mu, I_d)`` honest),
   for both RGE rules and the peers, as a ratio to Theorem 3's bound shape
   ``sqrt(eps) (1 + sqrt(d / n_honest))`` (``sigma0 sqrt(eps)`` with ``sigma0`` the spectral norm
   of the honest sample covariance), drawn with the smallest constant that bounds ``rge-paper``.

Sizes are small on purpose (two shared CPU cores): see ``--help`` and the page
``docs/paper_claims.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
FIGURES = ("batch", "kappa", "randk", "dimension")
RGE_RULES = ("rge-paper", "rge")
PEERS = ("mean", "cclip", "median", "trimmed-mean", "geomed")
COLORS = {"rge-paper": "tab:blue", "rge": "tab:red", "mean": "0.4", "cclip": "tab:green", "median": "tab:purple",
          "trimmed-mean": "tab:brown", "geomed": "tab:orange", "oracle": "k"}


# ------------------------------------------------------------------ the model and its constants


def make_model(d: int, R: int, n: int, kappa_mean: float, noise: float, seed: int):
    """Section 6's linear-regression model (``SyntheticHeterogeneous``, ``task="linreg"``)."""
    from flwr_byzantine.data.synthetic import SyntheticHeterogeneous

    return SyntheticHeterogeneous(d, R, n, kappa_mean=kappa_mean, noise_std=noise, task="linreg", seed=seed)


def empirical_optimum(synth: Any) -> np.ndarray:
    """``x* = argmin_x (1/R) sum_r (1/(2 n_r)) ||X_r x - y_r||^2``: the theorems' ``x*`` (all R workers)."""
    d = synth.d
    A, c = np.zeros((d, d)), np.zeros(d)
    for r in range(synth.num_workers):
        X, y = synth.worker_data(r)
        X, y = X.astype(np.float64), y.astype(np.float64)
        A += X.T @ X / len(y)
        c += X.T @ y / len(y)
    return np.linalg.solve(A, c)


def constants_at(synth: Any, x: np.ndarray) -> dict[str, float]:
    """``kappa`` of eq. (18) and ``sigma`` of eq. (19) at ``x`` (max over workers), on the drawn samples."""
    grads, var = [], []
    for r in range(synth.num_workers):
        X, y = synth.worker_data(r)
        X, y = X.astype(np.float64), y.astype(np.float64)
        per = X * (X @ x - y)[:, None]  # per-sample gradients
        g = per.mean(axis=0)
        grads.append(g)
        var.append(float(np.mean(np.sum((per - g) ** 2, axis=1))))
    G = np.stack(grads)
    kap = np.linalg.norm(G - G.mean(axis=0), axis=1)
    return {"kappa": float(kap.max()), "kappa_mean_measured": float(kap.mean()), "sigma": float(math.sqrt(max(var)))}


def sgd_floor(synth: Any, x_star: np.ndarray, rule: str, *, eps: float, batch: int, attack: str, rounds: int,
              lr: float, seed: int, k: int | None = None, early: int | None = None) -> dict[str, Any]:
    """One run of :func:`benchmarks.randk.run_sgd` with the registry rule ``rule``; its floor and diagnostics.

    Workers ``0 .. f-1`` are Byzantine (``f = round(eps R)``; none when ``attack == "none"``), the
    others honest.  ``rule == "oracle"`` is the plain mean of the honest rows with no attack.
    ``early``: also report the floor a run of only ``early`` rounds would have measured.
    """
    from flwr_byzantine.aggregators import build_for_federation

    from .randk import LinRegFederation, run_sgd

    R, d = synth.num_workers, synth.d
    if rule == "oracle":
        rule_name, attack, nb = "mean", "none", int(round(eps * R))
    else:
        rule_name, nb = rule, (0 if attack == "none" else int(round(eps * R)))
    fed = LinRegFederation(synth, list(range(nb, R)))
    agg = build_for_federation(rule_name, R if rule != "oracle" else R - nb, eps)
    k = d if k is None else k
    t0 = time.perf_counter()
    out = run_sgd(fed, x_star, k=k, rounds=rounds, lr=lr, batch=batch, num_byzantine=nb, attack=attack,
                  seed=seed, aggregator=agg)
    errs = np.asarray(out["errors"], dtype=np.float64)
    res = {"rule": rule, "attack": attack, "batch": batch, "k": k, "rounds": rounds, "lr": lr, "seed": seed,
           "floor": _tail_rms(errs), "final": float(errs[-1]),
           "byzantine_filtered_per_round": out["filtered_byzantine_per_round"],
           "honest_filtered_per_round": out["filtered_honest_per_round"],
           "seconds": time.perf_counter() - t0}
    if early is not None:
        res["early_rounds"] = early
        res["early_floor"] = _tail_rms(errs[: early + 1])
    return res


def _tail_rms(errs: np.ndarray) -> float:
    """Root mean square of the last quarter of an error curve (inf if it diverged)."""
    tail = errs[-max((len(errs) - 1) // 4, 1):]
    return float(np.sqrt(np.mean(tail ** 2))) if np.all(np.isfinite(tail)) else float("inf")


def _median_floor(runs: list[dict[str, Any]], key: str = "floor") -> float:
    return float(np.median([r[key] for r in runs]))


# ------------------------------------------------------------------ fits


def fit_batch_shape(sig2_over_b: list[float], kappa2: list[float], floor: list[float]) -> dict[str, Any]:
    """Non-negative least squares of ``floor^2 = A sigma^2/b + B kappa^2`` in relative error (Theorem 1's shape)."""
    from scipy.optimize import nnls

    y = np.asarray(floor, dtype=np.float64) ** 2
    M = np.column_stack([sig2_over_b, kappa2]) / y[:, None]  # relative: every point weighs the same
    (A, B), _ = nnls(M, np.ones_like(y))
    pred = np.sqrt(A * np.asarray(sig2_over_b) + B * np.asarray(kappa2))
    ratio = pred / np.asarray(floor)
    return {"A": float(A), "B": float(B), "predicted": pred.tolist(),
            "max_rel_dev": float(np.max(np.abs(ratio - 1.0))), "median_rel_dev": float(np.median(np.abs(ratio - 1.0)))}


def fit_line_through_origin(x: list[float], y: list[float]) -> dict[str, Any]:
    """``y = C x`` by least squares in log space (geometric mean of y/x), and the free log-log slope."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = (x > 0) & (y > 0) & np.isfinite(y)
    C = float(np.exp(np.mean(np.log(y[ok] / x[ok])))) if ok.any() else float("nan")
    slope = float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    dev = np.abs(C * x[ok] / y[ok] - 1.0)
    return {"C": C, "loglog_slope": slope, "max_rel_dev": float(dev.max()) if ok.any() else float("nan")}


# ------------------------------------------------------------------ figures


def fig_batch(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Theorem 1: floor vs mini-batch size at two kappa, both RGE rules, with the fitted theorem shape."""
    out: dict[str, Any] = {"config": cfg, "models": {}, "runs": []}
    for kappa in cfg["kappas"]:
        synth = make_model(cfg["d"], cfg["R"], cfg["n"], kappa, cfg["noise"], cfg["seed"])
        x_star = empirical_optimum(synth)
        out["models"][str(kappa)] = constants_at(synth, x_star)
        for rule in (*RGE_RULES, "oracle"):
            for b in cfg["batches"]:
                runs = [sgd_floor(synth, x_star, rule, eps=cfg["eps"], batch=b, attack=cfg["attack"],
                                  rounds=cfg["rounds"], lr=cfg["lr"], seed=cfg["seed"] * 100 + s)
                        for s in range(cfg["seeds"] if rule != "oracle" else 1)]
                for r in runs:
                    r["kappa_mean"] = kappa
                out["runs"] += runs
                log(f"  batch: kappa_mean={kappa:g} {rule:>9} b={b:>4}: floor {_median_floor(runs):.4f} "
                    f"(byz/honest filtered per round {np.mean([r['byzantine_filtered_per_round'] for r in runs]):.2f}/"
                    f"{np.mean([r['honest_filtered_per_round'] for r in runs]):.2f}, "
                    f"{sum(r['seconds'] for r in runs):.1f} s)")
    out["fits"] = {}
    for rule in (*RGE_RULES, "oracle"):
        pts = [(out["models"][str(kap)], b, _median_floor([r for r in out["runs"] if r["rule"] == rule
                                                           and r["kappa_mean"] == kap and r["batch"] == b]))
               for kap in cfg["kappas"] for b in cfg["batches"]]
        fit = fit_batch_shape([m["sigma"] ** 2 / b for m, b, _ in pts], [m["kappa"] ** 2 for m, _, _ in pts],
                              [f for _, _, f in pts])
        fit["floors"] = [f for _, _, f in pts]
        out["fits"][rule] = fit
    return out


def fig_kappa(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Theorem 2: full-batch floor vs the measured kappa, both RGE rules."""
    out: dict[str, Any] = {"config": cfg, "models": {}, "runs": []}
    for kappa in cfg["kappas"]:
        synth = make_model(cfg["d"], cfg["R"], cfg["n"], kappa, cfg["noise"], cfg["seed"])
        x_star = empirical_optimum(synth)
        out["models"][str(kappa)] = constants_at(synth, x_star)
        for rule in RGE_RULES:
            runs = [sgd_floor(synth, x_star, rule, eps=cfg["eps"], batch=cfg["n"], attack=cfg["attack"],
                              rounds=cfg["rounds"], lr=cfg["lr"], seed=cfg["seed"] * 100 + s)
                    for s in range(cfg["seeds"])]
            for r in runs:
                r["kappa_mean"] = kappa
            out["runs"] += runs
            log(f"  kappa: kappa_mean={kappa:g} (kappa={out['models'][str(kappa)]['kappa']:.3f}) {rule:>9}: "
                f"floor {_median_floor(runs):.4f} ({sum(r['seconds'] for r in runs):.1f} s)")
    out["fits"] = {}
    for rule in RGE_RULES:
        ks = [out["models"][str(k)]["kappa"] for k in cfg["kappas"]]
        fl = [_median_floor([r for r in out["runs"] if r["rule"] == rule and r["kappa_mean"] == k]) for k in cfg["kappas"]]
        out["fits"][rule] = {**fit_line_through_origin(ks, fl), "kappa": ks, "floors": fl}
    return out


def fig_randk(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Theorem 5: floor vs k under sign-flip and ALIE; rounds scaled by d/k, fixed-round floor read off too."""
    synth = make_model(cfg["d"], cfg["R"], cfg["n"], cfg["kappa_mean"], cfg["noise"], cfg["seed"])
    x_star = empirical_optimum(synth)
    k_free = int(math.ceil((1 - cfg["eps"]) * cfg["R"]))
    out: dict[str, Any] = {"config": cfg, "k_free": k_free, "model": constants_at(synth, x_star), "runs": []}
    for attack in cfg["attacks"]:
        for rule in RGE_RULES:
            for k in cfg["ks"]:
                rounds = int(math.ceil(cfg["rounds"] * cfg["d"] / k))
                runs = [sgd_floor(synth, x_star, rule, eps=cfg["eps"], batch=cfg["batch"], attack=attack,
                                  rounds=rounds, lr=cfg["lr"] * k / cfg["d"], seed=cfg["seed"] * 100 + s, k=k,
                                  early=cfg["rounds"])
                        for s in range(cfg["seeds"])]
                out["runs"] += runs
                log(f"  randk: {attack:>9} {rule:>9} k={k:>4} ({rounds} rounds): floor {_median_floor(runs):.4f}, "
                    f"after {cfg['rounds']} rounds {_median_floor(runs, 'early_floor'):.4f} "
                    f"(byz filtered per round {np.mean([r['byzantine_filtered_per_round'] for r in runs]):.2f}, "
                    f"{sum(r['seconds'] for r in runs):.1f} s)")
    return out


def fig_dimension(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Section 4 / Theorem 3: one-round estimation error vs d (``benchmarks.mean_estimation.run``)."""
    from .mean_estimation import run

    t0 = time.perf_counter()
    payload = run(cfg["dims"], cfg["R"], cfg["eps"], list(cfg["rules"]), list(cfg["attacks"]), cfg["trials"],
                  cfg["seed"], progress=False)
    n_h = payload["config"]["num_honest"]
    # Theorem 3: ||g_hat - g_S|| = O(sigma0 sqrt(eps)), sigma0^2 >= lambda_max of the honest sample covariance,
    # which for N(mu, I_d) rows is about (1 + sqrt(d / n_h))^2: flat for d << n_h, sqrt(d / n_h) beyond.
    bound = [math.sqrt(cfg["eps"]) * (1.0 + math.sqrt(d / n_h)) for d in cfg["dims"]]
    ratios: dict[str, dict[str, Any]] = {}
    for attack in cfg["attacks"]:
        ratios[attack] = {}
        for rule in cfg["rules"]:
            errs = payload["summary"][attack][rule]["median_error"]
            r = [e / b for e, b in zip(errs, bound)]
            ratios[attack][rule] = {"ratio": r, "max_ratio": float(max(r)), "slope_vs_d": payload["summary"][attack][rule]["slope"]}
        log(f"  dimension: {attack}: " + ", ".join(
            f"{r} {payload['summary'][attack][r]['median_error'][0]:.3g}->{payload['summary'][attack][r]['median_error'][-1]:.3g}"
            for r in cfg["rules"]) + f" ({time.perf_counter() - t0:.1f} s so far)")
    return {"config": cfg, "num_honest": n_h, "theorem3_bound_shape": bound, "ratio_to_bound": ratios,
            "summary": payload["summary"], "seconds_per_rule": payload["seconds_per_rule"]}


# ------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_batch(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    cfg = res["config"]
    bs = cfg["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, rule in zip(axes, RGE_RULES):
        fit = res["fits"][rule]
        for i, kap in enumerate(cfg["kappas"]):
            sl = slice(i * len(bs), (i + 1) * len(bs))
            ls = "-" if i == 0 else "-."
            ax.loglog(bs, fit["floors"][sl], "o" + ls, color=COLORS[rule], label=f"measured, kappa_mean={kap:g}")
            ax.loglog(bs, fit["predicted"][sl], "--", color="0.5", lw=1.2,
                      label=f"Thm 1 shape sqrt(A s^2/b + B k^2), kappa_mean={kap:g}")
            ora = res["fits"]["oracle"]["floors"][sl]
            ax.loglog(bs, ora, ":", color="k", lw=1, label=f"no attack, mean of honest, kappa_mean={kap:g}" if i == 0 else
                      None)
        ax.set_title(f"{rule} under {cfg['attack']} (eps={cfg['eps']}); fit: A={fit['A']:.3g}, B={fit['B']:.3g}, "
                     f"max dev {100 * fit['max_rel_dev']:.0f}%", fontsize=8)
        ax.set_xlabel("mini-batch size b")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("floor: rms ||x_t - x*|| (last quarter)")
    fig.suptitle(f"Theorem 1: SGD floor vs b (Section 6 linreg, d={cfg['d']}, R={cfg['R']}, n={cfg['n']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kappa(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    cfg = res["config"]
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for rule in RGE_RULES:
        fit = res["fits"][rule]
        ks = np.asarray(fit["kappa"])
        ax.loglog(ks, fit["floors"], "o-", color=COLORS[rule],
                  label=f"{rule}: log-log slope {fit['loglog_slope']:.2f}")
        ax.loglog(ks, fit["C"] * ks, "--", color=COLORS[rule], lw=1, alpha=0.6,
                  label=f"Thm 2: {fit['C']:.3g} kappa (max dev {100 * fit['max_rel_dev']:.0f}%)")
    ax.set_xlabel("kappa of eq. (18), measured at x*")
    ax.set_ylabel("full-batch floor ||x_t - x*||")
    ax.set_title(f"Theorem 2: full batch (b=n={cfg['n']}), {cfg['attack']}, eps={cfg['eps']}, d={cfg['d']}, R={cfg['R']}",
                 fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_randk(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    cfg = res["config"]
    fig, axes = plt.subplots(1, len(cfg["attacks"]), figsize=(5.4 * len(cfg["attacks"]), 4.2), squeeze=False)
    for ax, attack in zip(axes[0], cfg["attacks"]):
        for rule in RGE_RULES:
            rs = [r for r in res["runs"] if r["attack"] == attack and r["rule"] == rule]
            ks = sorted({r["k"] for r in rs})
            fl = [_median_floor([r for r in rs if r["k"] == k]) for k in ks]
            early = [_median_floor([r for r in rs if r["k"] == k], "early_floor") for k in ks]
            ax.semilogx(ks, fl, "o-", color=COLORS[rule], label=f"{rule}, {cfg['rounds']} d/k rounds")
            ax.semilogx(ks, early, "x:", color=COLORS[rule], label=f"{rule}, fixed {cfg['rounds']} rounds")
        ax.axvline(res["k_free"], color="k", lw=0.8, ls="--", label="k = (1-eps)R")
        ax.set_xticks(cfg["ks"], [str(k) for k in cfg["ks"]])
        ax.minorticks_off()
        ax.set_title(f"{attack}: d={cfg['d']}, R={cfg['R']}, b={cfg['batch']}, kappa_mean={cfg['kappa_mean']}",
                     fontsize=8)
        ax.set_xlabel("k (coordinates per round; k = d: uncompressed)")
        ax.set_ylabel("floor ||x_t - x*||")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("Theorem 5: randk floor vs k", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dimension(res: dict[str, Any], path: Path) -> None:
    from .mean_estimation import PLOT_FLOOR

    plt = _plt()
    cfg = res["config"]
    dims = np.asarray(cfg["dims"], dtype=float)
    fig, axes = plt.subplots(1, len(cfg["attacks"]), figsize=(5.6 * len(cfg["attacks"]), 4.4), squeeze=False)
    for ax, attack in zip(axes[0], cfg["attacks"]):
        for rule in cfg["rules"]:
            s = res["summary"][attack][rule]
            errs = [max(e, PLOT_FLOOR) for e in s["median_error"]]
            rge = rule in RGE_RULES
            ax.loglog(dims, errs, "o-", color=COLORS.get(rule), lw=2.2 if rge else 1.0,
                      label=f"{rule} (slope {s['slope']:.2f})")
        C = res["ratio_to_bound"][attack]["rge-paper"]["max_ratio"]
        ax.loglog(dims, C * np.asarray(res["theorem3_bound_shape"]), "--", color=COLORS["rge-paper"], lw=1,
                  label=f"Thm 3 bound shape C sqrt(eps)(1+sqrt(d/n_h)), C={C:.2g}")
        ax.set_title(f"{attack}: R={cfg['R']}, eps={cfg['eps']}, one round (no memory); exact 0 drawn at {PLOT_FLOOR:g}",
                     fontsize=8)
        ax.set_xlabel("dimension d")
        ax.set_ylabel("||g_hat - mean(honest)||")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle("Section 4: error vs dimension", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ report


def render_markdown(results: dict[str, Any], command: str) -> str:
    """Tables of every figure's numbers (the page docs/paper_claims.md interprets them)."""
    lines = ["# The paper's claims as figures (numbers)", "", f"Command: `{command}`", ""]
    if "batch" in results:
        res = results["batch"]
        cfg = res["config"]
        lines += ["## Theorem 1: floor vs b", "",
                  "Measured constants at x*: " + "; ".join(
                      f"kappa_mean={k}: kappa={m['kappa']:.3f}, sigma={m['sigma']:.2f}" for k, m in res["models"].items()),
                  "", "| rule | kappa_mean | " + " | ".join(f"b={b}" for b in cfg["batches"]) + " | fit A, B | max dev |",
                  "|---|---|" + "---|" * len(cfg["batches"]) + "---|---|"]
        for rule in (*RGE_RULES, "oracle"):
            fit = res["fits"][rule]
            for i, kap in enumerate(cfg["kappas"]):
                sl = slice(i * len(cfg["batches"]), (i + 1) * len(cfg["batches"]))
                cells = [f"{f:.4f} ({p:.4f})" for f, p in zip(fit["floors"][sl], fit["predicted"][sl])]
                lines.append(f"| {rule} | {kap} | " + " | ".join(cells) + f" | {fit['A']:.3g}, {fit['B']:.3g} | "
                             f"{100 * fit['max_rel_dev']:.0f}% |")
        lines += ["", "Cells: measured floor (fitted shape). oracle = mean of the honest rows, no attack.", ""]
    if "kappa" in results:
        res = results["kappa"]
        lines += ["## Theorem 2: full-batch floor vs kappa", "",
                  "| rule | " + " | ".join(f"kappa={m['kappa']:.3f}" for m in res["models"].values())
                  + " | C | log-log slope | max dev |", "|---|" + "---|" * (len(res["models"]) + 3)]
        for rule in RGE_RULES:
            fit = res["fits"][rule]
            lines.append(f"| {rule} | " + " | ".join(f"{f:.4f}" for f in fit["floors"])
                         + f" | {fit['C']:.3g} | {fit['loglog_slope']:.2f} | {100 * fit['max_rel_dev']:.0f}% |")
        lines.append("")
    if "randk" in results:
        res = results["randk"]
        cfg = res["config"]
        lines += ["## Theorem 5: randk floor vs k", "", f"k_free = (1-eps)R = {res['k_free']}.", "",
                  "| attack | rule | k | rounds | floor | floor after " + str(cfg["rounds"]) + " rounds | "
                  "Byzantine filtered / round |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in _grouped(res["runs"]):
            lines.append(f"| {r['attack']} | {r['rule']} | {r['k']} | {r['rounds']} | {r['floor']:.4f} | "
                         f"{r['early_floor']:.4f} | {r['byz']:.2f} |")
        lines.append("")
    if "dimension" in results:
        res = results["dimension"]
        cfg = res["config"]
        for attack in cfg["attacks"]:
            lines += [f"## Section 4: error vs d, {attack}", "",
                      "| rule | " + " | ".join(f"d={d}" for d in cfg["dims"]) + " | slope vs d | max error / bound |",
                      "|---|" + "---|" * (len(cfg["dims"]) + 2)]
            for rule in cfg["rules"]:
                s = res["summary"][attack][rule]
                lines.append(f"| {rule} | " + " | ".join(f"{e:.3g}" for e in s["median_error"]) + f" | {s['slope']:.2f} | "
                             f"{res['ratio_to_bound'][attack][rule]['max_ratio']:.2f} |")
            lines += ["", f"bound = sqrt(eps) (1 + sqrt(d / n_h)), n_h = {res['num_honest']} honest rows: Theorem 3's "
                      "sigma0 sqrt(eps) with sigma0 the honest sample covariance's spectral norm, constant 1.", ""]
    return "\n".join(lines)


def _grouped(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["attack"], r["rule"], r["k"]), []).append(r)
    return [{"attack": a, "rule": rule, "k": k, "rounds": rs[0]["rounds"], "floor": _median_floor(rs),
             "early_floor": _median_floor(rs, "early_floor"),
             "byz": float(np.mean([r["byzantine_filtered_per_round"] for r in rs]))}
            for (a, rule, k), rs in groups.items()]


# ------------------------------------------------------------------ main


def configs(quick: bool, seed: int) -> dict[str, dict[str, Any]]:
    """Sizes of every figure: the full run (a few CPU-minutes) or ``--quick`` (seconds)."""
    if quick:
        return {
            "batch": {"d": 10, "R": 10, "n": 256, "noise": 0.5, "eps": 0.2, "attack": "alie-zmax", "kappas": [0.1, 1.0],
                      "batches": [1, 16, 256], "rounds": 30, "lr": 0.1, "seeds": 1, "seed": seed},
            "kappa": {"d": 10, "R": 10, "n": 100, "noise": 0.5, "eps": 0.2, "attack": "alie-zmax",
                      "kappas": [0.1, 1.0], "rounds": 30, "lr": 0.3, "seeds": 1, "seed": seed},
            "randk": {"d": 20, "R": 10, "n": 100, "noise": 0.5, "eps": 0.2, "kappa_mean": 0.3, "batch": 10,
                      "ks": [20, 8], "rounds": 40, "lr": 0.2, "attacks": ["sign-flip", "alie"], "seeds": 1,
                      "seed": seed},
            "dimension": {"dims": [10, 50], "R": 20, "eps": 0.2, "trials": 1, "attacks": ["alie", "ipm"],
                          "rules": [*RGE_RULES, *PEERS], "seed": seed},
        }
    return {
        "batch": {"d": 20, "R": 20, "n": 1000, "noise": 0.5, "eps": 0.2, "attack": "alie-zmax", "kappas": [0.1, 1.0],
                  "batches": [1, 4, 16, 64, 256], "rounds": 300, "lr": 0.1, "seeds": 2, "seed": seed},
        "kappa": {"d": 20, "R": 20, "n": 1000, "noise": 0.5, "eps": 0.2, "attack": "alie-zmax",
                  "kappas": [0.0, 0.1, 0.3, 1.0, 3.0], "rounds": 150, "lr": 0.3, "seeds": 1, "seed": seed},
        "randk": {"d": 50, "R": 20, "n": 500, "noise": 0.5, "eps": 0.2, "kappa_mean": 0.3, "batch": 50,
                  "ks": [50, 32, 16, 8], "rounds": 400, "lr": 0.2, "attacks": ["sign-flip", "alie"], "seeds": 1,
                  "seed": seed},
        "dimension": {"dims": [10, 30, 100, 300, 1000, 3000, 10000], "R": 100, "eps": 0.2, "trials": 2,
                      "attacks": ["alie", "ipm"], "rules": [*RGE_RULES, *PEERS], "seed": seed},
    }


FIGURE_FUNCS = {"batch": (fig_batch, plot_batch), "kappa": (fig_kappa, plot_kappa),
                "randk": (fig_randk, plot_randk), "dimension": (fig_dimension, plot_dimension)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes (seconds)")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    cfgs = configs(args.quick, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python -m benchmarks.paper_figures " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    t_all, c_all = time.perf_counter(), time.process_time()
    results: dict[str, Any] = {}
    stem = "paper_figures" + ("_quick" if args.quick else "")
    for name in args.only:
        func, plot = FIGURE_FUNCS[name]
        t0, c0 = time.perf_counter(), time.process_time()
        log(f"[{name}]")
        results[name] = func(cfgs[name], log)
        results[name]["wall_seconds"] = time.perf_counter() - t0
        results[name]["cpu_seconds"] = time.process_time() - c0
        png = args.out / f"{'paper_quick' if args.quick else 'paper'}_{name}.png"
        plot(results[name], png)
        results[name]["plot"] = png.name
    payload = {"command": command, "results": results, "wall_seconds": time.perf_counter() - t_all,
               "cpu_seconds": time.process_time() - c_all,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    md = render_markdown(results, command) + (f"\nWall time {payload['wall_seconds']:.0f} s, CPU time "
                                              f"{payload['cpu_seconds']:.0f} s ({payload['machine']}).\n")
    (args.out / f"{stem}.md").write_text(md)
    log(md)
    return payload


if __name__ == "__main__":
    main()

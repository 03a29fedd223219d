"""Robust mean estimation benchmark (Data & Diggavi, Section 4): error versus dimension.

One command::

    python -m benchmarks.mean_estimation [--quick] [--out DIR]

Pure aggregator calls, no Flower.  In every trial ``n_h = R - f`` honest vectors are
drawn from ``N(mu, I_d)`` (``||mu|| = 10`` in a random direction, fixed per trial:
a "gradient" whose norm does not grow with ``d``), ``f = eps R`` Byzantine vectors
are crafted from them, the ``R`` rows are shuffled and every rule estimates the
mean.  The error is ``||g_hat - mean(honest)||`` (the honest sample mean: what a
perfect filter returns).  Attacks (``--attacks``):

* ``alie`` -- :class:`~flwr_byzantine.attacks.ALIE` (``mu_hat - z sigma_hat`` per
  coordinate, ``z`` by the paper's ``z_max`` rule for ``n = R`` workers);
* ``ipm`` -- :class:`~flwr_byzantine.attacks.InnerProductManipulation` (``-0.1 mu_hat``);
* ``annulus`` -- the Section 4 construction that separates the two families: every
  outlier lies on the honest annulus (``||b_i - mu|| ~ sqrt(d)``, like an honest
  point, so no distance test sees it) but all are shifted the same way:
  ``b_i = mu_hat + (xi_i + sqrt(d) u) / sqrt(2)`` with ``xi_i ~ N(0, I_d)`` and
  ``u = (1, ..., 1) / sqrt(d)``: every coordinate is shifted by ``1/sqrt(2)``
  standard deviation, so coordinate-wise rules (median, trimmed mean) and
  distance-based selections (Krum, geometric median) are biased by ``Theta(sqrt(d))``,
  while the common shift is a variance excess of order ``eps d`` along ``u`` that a
  spectral filter (RGE) detects, leaving a dimension-free error;
* ``gaussian-far`` -- :class:`~flwr_byzantine.attacks.GaussianNoise` (``relative=True``,
  ``std=10``): the honest mean plus large isotropic noise.

Rules: every aggregator of :mod:`flwr_byzantine.aggregators` (``rge`` with
``eps_tilde = eps`` and automatic ``sigma0``; peers told ``f``), plus ``bucketing:cclip``
and ``nnm:cclip``.  Flower's own rules compute the same functions as ``median``,
``trimmed-mean`` (``beta = eps``), ``krum``, ``multi-krum`` and ``bulyan`` on these
vectors, so they are not repeated here.

Reported per rule and attack: the median error over ``--trials`` trials for each
``d`` and the least-squares slope of ``log(error)`` versus ``log(d)``: about 0 means
dimension-free, about 0.5 means the error grows like ``sqrt(d)``.

Defaults: ``d`` in {1e2, 1e3, 1e4, 1e5}, ``R = 100`` (``--num-nodes``), eps = 0.2,
3 trials; ``--quick``: ``d`` in {1e2, 1e3}, ``R = 20``, 1 trial.

Outputs in ``--out`` (default ``benchmarks/results``): ``mean_estimation.json``,
``mean_estimation.md`` (also printed) and ``mean_estimation.png`` (log-log plot, a
panel per attack); ``--tag T`` names them ``mean_estimation_T.*``.
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
from typing import Any

import numpy as np

RULES = ("rge", "rge-paper", "mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geomed", "cclip",
         "bucketing:cclip", "nnm:cclip")
ATTACKS = ("alie", "ipm", "annulus", "gaussian-far")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MU_NORM = 10.0


def build_rule(name: str, num_nodes: int, f: int, eps_tilde: float, sigma0: float | None = None):
    """Aggregator ``name`` for ``num_nodes`` rows with assumed fraction ``eps_tilde`` (as the ServerApp builds it).

    ``f`` is the benchmark's true number of Byzantine rows; the rules assume ``floor(eps_tilde * R)``,
    which equals it for the fractions used here.
    """
    from flwr_byzantine.aggregators import build_for_federation

    return build_for_federation(name, num_nodes, eps_tilde, sigma0)


def craft(attack: str, honest: np.ndarray, f: int, rng: np.random.Generator, num_nodes: int) -> np.ndarray:
    """The ``(f, d)`` Byzantine rows of ``attack`` (see the module docstring)."""
    from flwr_byzantine.attacks import make_attack

    d = honest.shape[1]
    if attack == "alie":
        return make_attack("alie", num_workers=num_nodes).craft(honest, f)
    if attack == "ipm":
        return make_attack("ipm").craft(honest, f)
    if attack == "gaussian-far":
        return make_attack("gaussian", std=10.0, relative=True, seed=int(rng.integers(2**31))).craft(honest, f)
    if attack == "annulus":
        u = np.ones(d) / math.sqrt(d)
        xi = rng.standard_normal((f, d))
        return honest.mean(axis=0)[None, :] + (xi + math.sqrt(d) * u[None, :]) / math.sqrt(2.0)
    raise ValueError(f"unknown attack {attack!r}; valid: {list(ATTACKS)}")


#: Errors below ``EXACT_REL * sqrt(d)`` are floating-point rounding: the rule returned the honest mean exactly.
EXACT_REL = 1e-9
#: Where exact (zero) errors are drawn on the log-log plot.
PLOT_FLOOR = 1e-3


def is_exact(d: int, err: float) -> bool:
    """Whether ``err`` is zero up to rounding (the rule removed exactly the Byzantine rows)."""
    return err < EXACT_REL * math.sqrt(d)


def fit_slope(dims: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) on log(d) over the non-exact points (nan if fewer than two)."""
    pts = [(math.log(d), math.log(e)) for d, e in zip(dims, errors)
           if e > 0 and math.isfinite(e) and not is_exact(d, e)]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def run(dims: list[int], num_nodes: int, eps: float, rules: list[str], attacks: list[str], trials: int,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The benchmark; returns the JSON payload."""
    f = int(round(eps * num_nodes))
    n_h = num_nodes - f
    errors: dict[str, dict[str, dict[str, list[float]]]] = {a: {r: {} for r in rules} for a in attacks}
    seconds: dict[str, dict[str, float]] = {r: {} for r in rules}
    total = len(dims) * len(attacks) * trials
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="mean estimation", unit="trial", disable=not progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    for d in dims:
        for ai, attack in enumerate(attacks):
            for t in range(trials):
                rng = np.random.default_rng([seed, d, ai, t])
                direction = rng.standard_normal(d)
                mu = MU_NORM * direction / np.linalg.norm(direction)
                honest = mu[None, :] + rng.standard_normal((n_h, d))
                byz = np.asarray(craft(attack, honest, f, rng, num_nodes), dtype=np.float64)
                G = np.concatenate([honest, byz], axis=0)[rng.permutation(num_nodes)]
                target = honest.mean(axis=0)
                for rule in rules:
                    agg = build_rule(rule, num_nodes, f, eps)
                    t0 = time.perf_counter()
                    est = np.asarray(agg.aggregate(G).estimate, dtype=np.float64)
                    seconds[rule][str(d)] = seconds[rule].get(str(d), 0.0) + time.perf_counter() - t0
                    errors[attack][rule].setdefault(str(d), []).append(float(np.linalg.norm(est - target)))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    summary: dict[str, dict[str, Any]] = {}
    for attack in attacks:
        summary[attack] = {}
        for rule in rules:
            med = [float(np.median(errors[attack][rule][str(d)])) for d in dims]
            exact = [is_exact(d, e) for d, e in zip(dims, med)]
            summary[attack][rule] = {"median_error": med, "slope": fit_slope(dims, med), "exact": exact}
    return {
        "config": {"dims": dims, "num_nodes": num_nodes, "eps": eps, "num_byzantine": f, "num_honest": n_h,
                   "trials": trials, "seed": seed, "mu_norm": MU_NORM, "rules": rules, "attacks": attacks},
        "errors": errors,
        "summary": summary,
        "seconds_per_rule": {r: {d: v / (len(attacks) * trials) for d, v in s.items()} for r, s in seconds.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def render_markdown(payload: dict[str, Any], command: str = "") -> str:
    """Markdown tables: median error per d and the fitted slope, a table per attack."""
    cfg = payload["config"]
    dims = cfg["dims"]
    lines = ["# Robust mean estimation: error versus dimension", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"R = {cfg['num_nodes']} rows, f = {cfg['num_byzantine']} Byzantine (eps = {cfg['eps']}), honest rows "
              f"N(mu, I_d) with ||mu|| = {cfg['mu_norm']:g}; error = ||g_hat - mean(honest)||, median over "
              f"{cfg['trials']} trial(s). Slope: least-squares fit of log(error) on log(d) "
              "(0: dimension-free, 0.5: grows like sqrt(d)). For reference sqrt(d) = "
              + ", ".join(f"{math.sqrt(d):.0f}" for d in dims) + ".", ""]
    for attack, by_rule in payload["summary"].items():
        lines += [f"## {attack}", "", "| rule | " + " | ".join(f"d={d:g}" for d in dims) + " | slope |",
                  "|---" * (len(dims) + 2) + "|"]
        for rule, s in by_rule.items():
            name = f"**{rule}**" if rule == "rge" else rule
            cells = ["0 (exact)" if is_exact(d, e) else f"{e:.3g}" for d, e in zip(dims, s["median_error"])]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_slope_text(dims, s)} |")
        lines.append("")
    lines += ["## Slopes (all attacks)", "", "| rule | " + " | ".join(payload["summary"]) + " | max |",
              "|---" * (len(payload["summary"]) + 2) + "|"]
    rules = cfg["rules"]
    for rule in rules:
        entries = [payload["summary"][a][rule] for a in payload["summary"]]
        slopes = [e["slope"] for e in entries]
        name = f"**{rule}**" if rule == "rge" else rule
        finite = [x for x in slopes if math.isfinite(x)]
        worst = f"{max(finite):.2f}" if finite else "-"
        lines.append(f"| {name} | " + " | ".join(_slope_text(dims, e) for e in entries) + f" | {worst} |")
    lines += ["", "0 (exact): the error is floating-point rounding, i.e. the rule removed exactly the Byzantine "
              "rows and returned the honest mean. Slopes are fitted on the non-exact points only.", ""]
    return "\n".join(lines)


def _slope_text(dims: list[int], s: dict[str, Any]) -> str:
    exact = s.get("exact") or [is_exact(d, e) for d, e in zip(dims, s["median_error"])]
    if all(exact):
        return "exact at every d"
    txt = "-" if not math.isfinite(s["slope"]) else f"{s['slope']:.2f}"
    if any(exact):
        first = next(d for d, x in zip(dims, exact) if x)
        txt += f" (exact from d={first:g})" if all(exact[dims.index(first):]) else " (exact at some d)"
    return txt


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Log-log plot of the median error versus d, a panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = payload["config"]
    dims = cfg["dims"]
    attacks = list(payload["summary"])
    ncol = min(2, len(attacks))
    nrow = math.ceil(len(attacks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.4 * nrow), squeeze=False)
    palette = [c for c in plt.get_cmap("tab20").colors if c not in (plt.get_cmap("tab20").colors[6:8])]
    for ax, attack in zip(axes.flat, attacks):
        items = sorted(payload["summary"][attack].items(), key=lambda kv: kv[0] == "rge")  # RGE drawn last, on top
        for i, (rule, s) in enumerate(items):
            errs = [PLOT_FLOOR if is_exact(d, e) else e for d, e in zip(dims, s["median_error"])]
            rge = rule == "rge"
            ax.loglog(dims, errs, marker="o", color="tab:red" if rge else palette[i % len(palette)],
                      lw=2.6 if rge else 1.1, ls="--" if rge else "-", zorder=3 if rge else 2,
                      label=f"{rule} ({_slope_text(dims, s)})")
        ref = np.sqrt(np.array(dims, dtype=float))
        firsts = [s["median_error"][0] for s in payload["summary"][attack].values() if not is_exact(dims[0], s["median_error"][0])]
        if firsts:
            ax.loglog(dims, ref / ref[0] * min(firsts), "k:", lw=1, label="~ sqrt(d)")
        ax.set_title(f"{attack} (R={cfg['num_nodes']}, f={cfg['num_byzantine']}; exact 0 drawn at {PLOT_FLOOR:g})",
                     fontsize=9)
        ax.set_xlabel("dimension d")
        ax.set_ylabel("||g_hat - mean(honest)||")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2, title="rule (slope)", title_fontsize=7)
    for ax in axes.flat[len(attacks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke size: d in {1e2, 1e3}, R=20, 1 trial")
    p.add_argument("--dims", nargs="+", type=int)
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--trials", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tag", default="", help="suffix of the output names, e.g. R50 -> mean_estimation_R50.*")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = args.dims or ([100, 1000] if args.quick else [100, 1000, 10_000, 100_000])
    num_nodes = args.num_nodes or (20 if args.quick else 100)
    trials = args.trials or (1 if args.quick else 3)
    for a in args.attacks:
        if a not in ATTACKS:
            raise SystemExit(f"unknown attack {a!r}; valid: {list(ATTACKS)}")
    t0 = time.time()
    payload = run(dims, num_nodes, args.eps, list(args.rules), list(args.attacks), trials, args.seed,
                  progress=not args.no_progress)
    payload["wall_seconds"] = time.time() - t0
    command = "python -m benchmarks.mean_estimation " + " ".join(sys.argv[1:] if argv is None else argv)
    payload["command"] = command.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "mean_estimation" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    md = render_markdown(payload, payload["command"]) + f"\nWall time: {payload['wall_seconds']:.0f} s.\n"
    (args.out / f"{stem}.md").write_text(md)
    plot(payload, args.out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""RGE decode time versus the plain mean (Data & Diggavi, Algorithm 3).

One command::

    python -m benchmarks.rge_decode [--quick] [--out DIR]

For every ``R`` in {20, 100} and ``d`` in {1e4, 1e6} (``--quick``: R in {10, 20}, d in
{1e3, 1e4}) the script builds a float32 ``R x d`` matrix of honest gradients
``N(0, I_d)`` and times, in the same process and on the same matrix,

* the plain mean ``np.mean(G, axis=0)`` (median of ``--mean-repeats`` >= 5 runs), and
* the full RGE decode ``RGE().aggregate(G)`` (automatic sigma_0; median of
  ``--rge-repeats`` >= 3 runs): input validation, the centred Gram product
  (O(d R^2), the only pass over ``d`` besides the final mean) and the filter loop in
  ``R x R`` space.  Its split into ``gram_seconds`` and ``filter_seconds`` comes from
  the aggregator's own diagnostics.

Two scenarios per size:

* ``clean``: all rows honest (RGE solves one saddle problem, or none, and stops);
* ``shift``: 20 % Byzantine rows that collude on a consistent shift ``2 sigma u`` in a
  random unit direction ``u``, on top of honest-looking noise, where
  ``sigma^2 = E||g_r - grad F||^2 = d`` is the honest spread of the paper's (3); this
  moves the plain mean by ``0.4 sigma`` and makes RGE iterate (it drops them).

Every timing is preceded by one untimed warm-up call.  The target checked (and
reported, not asserted) is: full RGE at ``R = 100, d = 1e6`` within 15x the plain
mean.  ``--blas-threads N`` limits the BLAS/OpenMP pools for the whole run (on an
oversubscribed machine multi-threaded BLAS on the small ``R x R`` matrices of the filter
can be an order of magnitude slower than one thread); the JSON records the limit and the
pools seen at start.  Besides the medians, the minima are reported (the least
load-disturbed runs).  Outputs under ``--out`` (default ``benchmarks/results``): ``rge_decode.json``
(machine info, per-case timings and diagnostics) and ``rge_decode.png``; the markdown
table is printed.  Timings depend on the machine, its BLAS threads and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flwr_byzantine.aggregators import RGE

TARGET_RATIO = 15.0
TARGET_CASE = (100, 1_000_000)


def machine_info() -> dict[str, Any]:
    """CPU count, library versions and BLAS threading of this process."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")}
            for p in threadpool_info()
        ]
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        info["blas"] = None
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg_at_start"] = fh.read().split()[:3]
    except OSError:
        info["loadavg_at_start"] = None
    return info


def make_round(R: int, d: int, scenario: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ``(R, d)`` gradients of one round and the mask of Byzantine rows."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((R, d), dtype=np.float32)
    bad = np.zeros(R, dtype=bool)
    if scenario == "shift":
        nb = int(round(0.2 * R))
        u = rng.standard_normal(d)
        u *= 2.0 * np.sqrt(d) / np.linalg.norm(u)  # 2 sigma, sigma^2 = E||g - mean||^2 = d
        G[:nb] += u.astype(np.float32)
        bad[:nb] = True
    elif scenario != "clean":
        raise ValueError(f"unknown scenario {scenario!r}")
    return G, bad


def _time(fn, repeats: int) -> tuple[list[float], Any]:
    """One untimed warm-up call (page faults, BLAS threads, caches), then ``repeats`` timed calls."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def run_case(R: int, d: int, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    G, bad = make_round(R, d, scenario, seed=args.seed + R + d)
    times_mean, mean = _time(lambda: np.mean(G, axis=0), args.mean_repeats)
    agg = RGE(eps_tilde=0.25)
    results: list[Any] = []

    def rge_once():
        res = agg.aggregate(G)
        results.append(res)
        return res

    times_rge, res = _time(rge_once, args.rge_repeats)
    t_mean, t_rge = statistics.median(times_mean), statistics.median(times_rge)
    timed = results[1:]  # drop the warm-up call
    kept = np.zeros(R, dtype=bool)
    kept[res.kept] = True
    honest_mean = G[~bad].astype(np.float64).mean(axis=0)
    return {
        "R": R,
        "d": d,
        "scenario": scenario,
        "byzantine": int(bad.sum()),
        "seconds_mean": t_mean,
        "seconds_rge": t_rge,
        "ratio": t_rge / t_mean,
        # minima: the least load-disturbed runs (on a shared machine the medians are inflated)
        "seconds_mean_min": min(times_mean),
        "seconds_rge_min": min(times_rge),
        "ratio_min": min(times_rge) / min(times_mean),
        "times_mean": times_mean,
        "times_rge": times_rge,
        "gram_seconds": statistics.median(r.info["gram_seconds"] for r in timed),
        "filter_seconds": statistics.median(r.info["filter_seconds"] for r in timed),
        "rge_iterations": int(res.iterations),
        "solver_iterations": int(res.info["solver_iterations"]),
        "kept": int(res.kept.size),
        "byzantine_kept": int(np.sum(kept & bad)),
        "honest_dropped": int(np.sum(~kept & ~bad)),
        "err_rge": float(np.linalg.norm(res.estimate.astype(np.float64) - honest_mean)),
        "err_mean": float(np.linalg.norm(mean.astype(np.float64) - honest_mean)),
        "mean_repeats": args.mean_repeats,
        "rge_repeats": args.rge_repeats,
    }


def markdown_table(cases: list[dict[str, Any]]) -> str:
    """One row per case: medians, the ratio of medians and of minima; ``err`` = distance of
    the estimate to the honest rows' mean."""
    head = ("| R | d | scenario | mean (s) | RGE (s) | ratio | ratio of minima | gram (s) | filter (s) | RGE iters "
            "| kept | Byz kept | err RGE | err mean |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        lines.append(
            f"| {c['R']} | {c['d']:.0e} | {c['scenario']} | {c['seconds_mean']:.3g} | {c['seconds_rge']:.3g} "
            f"| {c['ratio']:.1f} | {c['ratio_min']:.1f} | {c['gram_seconds']:.3g} | {c['filter_seconds']:.3g} | {c['rge_iterations']} "
            f"| {c['kept']}/{c['R']} | {c['byzantine_kept']}/{c['byzantine']} | {c['err_rge']:.3g} | {c['err_mean']:.3g} |"
        )
    return "\n".join(lines)


def plot(cases: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"R={c['R']}\nd={c['d']:.0e}\n{c['scenario']}" for c in cases]
    x = np.arange(len(cases))
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 4.5))
    ax.bar(x - w, [c["seconds_mean"] for c in cases], w, label="plain mean")
    ax.bar(x, [c["gram_seconds"] for c in cases], w, label="RGE: centred Gram")
    ax.bar(x, [c["filter_seconds"] for c in cases], w, bottom=[c["gram_seconds"] for c in cases],
           label="RGE: filter (R x R)")
    ax.bar(x + w, [c["seconds_rge"] for c in cases], w, label="RGE total (median)", color="0.4")
    for xi, c in zip(x, cases):
        ax.annotate(f"{c['ratio']:.1f}x", (xi + w, c["seconds_rge"]), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("seconds per decode (log)")
    ax.set_title("RGE decode vs plain mean (float32, annotated: RGE / mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rge_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (R in {10, 20}, d in {1e3, 1e4})")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--R", type=int, nargs="+", default=None, help="default 20 100 (10 20 with --quick)")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="default 1e4 1e6 (1e3 1e4 with --quick)")
    ap.add_argument("--scenarios", nargs="+", default=["clean", "shift"], choices=["clean", "shift"])
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit BLAS/OpenMP threads for the whole run (threadpoolctl); default: leave as is")
    ap.add_argument("--mean-repeats", type=int, default=7)
    ap.add_argument("--rge-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.R is None:
        args.R = [10, 20] if args.quick else [20, 100]
    if args.dims is None:
        args.dims = [1_000, 10_000] if args.quick else [10_000, 1_000_000]
    if args.mean_repeats < 5 or args.rge_repeats < 3:
        ap.error("need --mean-repeats >= 5 and --rge-repeats >= 3")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.blas_threads):
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "rge_decode",
        "machine": machine_info(),
        "settings": {"quick": args.quick, "seed": args.seed, "blas_threads_limit": args.blas_threads,
                     "dtype": "float32", "eps_tilde": 0.25,
                     "sigma0": "auto", "byzantine_fraction": 0.2, "shift": "2 sigma, sigma^2 = d"},
        "cases": [],
    }
    for d in args.dims:
        for R in args.R:
            for scenario in args.scenarios:
                case = run_case(R, d, scenario, args)
                report["cases"].append(case)
                print(f"R={R:4d} d={d:.0e} {scenario:6s} mean {case['seconds_mean']:.3g}s "
                      f"RGE {case['seconds_rge']:.3g}s ratio {case['ratio']:.1f}", file=sys.stderr, flush=True)
    report["machine"]["loadavg_at_end"] = machine_info()["loadavg_at_start"]
    target = [c for c in report["cases"] if (c["R"], c["d"]) == TARGET_CASE]
    report["target"] = {
        "case": {"R": TARGET_CASE[0], "d": TARGET_CASE[1]},
        "max_ratio": TARGET_RATIO,
        "ratios": {c["scenario"]: c["ratio"] for c in target},
        "ratios_of_minima": {c["scenario"]: c["ratio_min"] for c in target},
        "met": all(c["ratio"] <= TARGET_RATIO for c in target) if target else None,
    }
    (args.out / "rge_decode.json").write_text(json.dumps(report, indent=2))
    plot(report["cases"], args.out / "rge_decode.png")
    print(markdown_table(report["cases"]))
    if target:
        print(f"\nTarget: full RGE at R={TARGET_CASE[0]}, d={TARGET_CASE[1]:.0e} within {TARGET_RATIO:g}x "
              f"the plain mean: {'met' if report['target']['met'] else 'NOT met'} "
              + ", ".join(f"{k} {v:.1f}x" for k, v in report["target"]["ratios"].items())
              + " (ratio of minima: "
              + ", ".join(f"{k} {v:.1f}x" for k, v in report["target"]["ratios_of_minima"].items()) + ")")
    return report


if __name__ == "__main__":
    main()

"""Decode-time benchmark: every aggregation rule as a ratio to the plain mean, in the same run.

One command::

    python -m benchmarks.decode_time [--quick] [--out DIR]

For every ``R`` in {20, 100} and ``d`` in {1e4, 1e6} (``--quick``: R in {10, 20},
d in {1e3, 1e4}) one float32 ``R x d`` round is built: honest rows ``N(0, I_d)`` and
``f = eps R`` Byzantine rows (eps = 0.2) colluding on a common shift ``2 sqrt(d) u``
(``u`` a random unit vector; the honest spread is ``E||g - mean||^2 = d``), the
attacked case in which filters iterate.  Then, in the same process and on the same
matrix, it times:

* the plain mean, ``Mean().aggregate(G)`` (our interface: input validation + mean),
  the denominator of every ratio; ``np.mean(G, axis=0)`` is recorded too;
* every rule of :mod:`flwr_byzantine.aggregators` (``rge`` with ``eps_tilde = eps`` and
  automatic sigma_0; peers told ``f``; ``bucketing:cclip``, ``nnm:cclip``), a fresh
  instance per call (centred clipping and bucketing are stateful);
* Flower's own rules (``--no-flower`` skips them): ``aggregate_train`` of
  ``flwr.serverapp.strategy`` ``FedMedian``, ``FedTrimmedAvg`` (``beta = eps``), ``Krum``,
  ``MultiKrum``, ``Bulyan`` and, as their own baseline, ``FedAvg`` on ``R`` model
  replies (one float32 array each, ``num-examples`` 32).  The replies are rebuilt
  before every call, untimed (Flower's median, trimmed mean and Bulyan consume them).
  Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (used by its Bulyan)
  calls ``gc.collect()`` once per reply; those collections are skipped
  (:class:`benchmarks.robustness.without_flower_gc`), so the timings measure the rule,
  not the size of the interpreter's heap (with torch loaded each collection costs
  about 0.3 s on the benchmark machine: R of them per round).

Each time is the median of ``--repeats`` calls (the mean: of at least 5), after one
untimed warm-up call for ``d <= 1e5`` (none at ``d = 1e6``, where a call is long
enough).  ``--blas-threads`` limits BLAS/OpenMP threads (default 1: the machine
is usually shared).  Outputs in ``--out`` (default ``benchmarks/results``):
``decode_time.json``, ``decode_time.md`` (also printed) and ``decode_time.png``.
Timings depend on the machine and its load; ratios taken in the same run are the
comparable quantity.
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
from typing import Any, Callable

import numpy as np

RULES = ("rge", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geomed", "cclip", "bucketing:cclip",
         "nnm:cclip")
FLOWER = ("flwr-fedavg", "flwr-fedmedian", "flwr-fedtrimmedavg", "flwr-krum", "flwr-multikrum", "flwr-bulyan")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def make_round(R: int, d: int, eps: float, seed: int) -> tuple[np.ndarray, int]:
    """Float32 ``(R, d)`` round with ``f = round(eps R)`` shifted Byzantine rows first; returns ``(G, f)``."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((R, d), dtype=np.float32)
    f = int(round(eps * R))
    u = rng.standard_normal(d)
    u *= 2.0 * np.sqrt(d) / np.linalg.norm(u)
    G[:f] += u.astype(np.float32)
    return G, f


def _time(fn: Callable[[], Any], repeats: int, warmup: bool, setup: Callable[[], Any] | None = None) -> list[float]:
    """``repeats`` timed calls of ``fn(setup())`` (or ``fn()``), after an optional untimed warm-up call."""
    def once() -> float:
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()  # type: ignore[call-arg]
        return time.perf_counter() - t0

    if warmup:
        once()
    return [once() for _ in range(repeats)]


def flower_rule(name: str, R: int, f: int, eps: float):
    """Flower's strategy ``name`` configured for ``R`` replies with ``f`` Byzantine."""
    from flwr.serverapp import strategy as fs

    if name == "flwr-fedavg":
        return fs.FedAvg(fraction_evaluate=0.0)
    if name == "flwr-fedmedian":
        return fs.FedMedian(fraction_evaluate=0.0)
    if name == "flwr-fedtrimmedavg":
        return fs.FedTrimmedAvg(beta=eps, fraction_evaluate=0.0)
    if name == "flwr-krum":
        return fs.Krum(num_malicious_nodes=f, fraction_evaluate=0.0)
    if name == "flwr-multikrum":
        return fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=R - f, fraction_evaluate=0.0)
    if name == "flwr-bulyan":
        return fs.Bulyan(num_malicious_nodes=f, fraction_evaluate=0.0)
    raise ValueError(f"unknown Flower rule {name!r}")


def model_replies(G: np.ndarray) -> list[Any]:
    """One Flower reply Message per row: ``{"arrays": ArrayRecord({"w": row}), "metrics": num-examples}``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from benchmarks.inprocess import set_server_identity

    set_server_identity()
    out = []
    for i, row in enumerate(G):
        ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=i + 1,
                      message_type=MessageType.TRAIN, group_id="1")
        ins.metadata.__dict__["_message_id"] = f"m{i}"
        out.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(row)}),
                                       "metrics": MetricRecord({"num-examples": 32})}), reply_to=ins))
    return out


def run_case(R: int, d: int, eps: float, rules: list[str], flower: list[str], repeats: int,
             seed: int) -> dict[str, Any]:
    """Time every rule on one ``(R, d)`` round."""

    from flwr_byzantine.aggregators import Mean

    from benchmarks.mean_estimation import build_rule
    from benchmarks.robustness import without_flower_gc

    G, f = make_round(R, d, eps, seed + R + d)
    warm = d <= 100_000
    t_mean = statistics.median(_time(lambda: Mean().aggregate(G), max(repeats, 5), True))
    t_np = statistics.median(_time(lambda: np.mean(G, axis=0), max(repeats, 5), True))
    rows: dict[str, dict[str, Any]] = {}
    for rule in rules:
        kept: list[Any] = []

        def call(rule: str = rule) -> None:
            res = build_rule(rule, R, f, eps).aggregate(G)
            kept.append(res.kept)

        try:
            times = _time(call, repeats, warm)
        except ValueError as exc:  # e.g. Bulyan needs R >= 4f + 3
            rows[rule] = {"seconds": None, "ratio_to_mean": None, "error": str(exc)}
            continue
        byz_kept = int(np.sum(np.asarray(kept[-1]) < f)) if kept else None
        rows[rule] = {"seconds": statistics.median(times), "all_seconds": times,
                      "ratio_to_mean": statistics.median(times) / t_mean, "byzantine_kept": byz_kept}
    t_fedavg = None
    for name in flower:
        strategy = flower_rule(name, R, f, eps)
        def agg_call(replies: list[Any], s: Any = strategy) -> None:
            with without_flower_gc():
                s.aggregate_train(1, replies)

        times = _time(agg_call, repeats, warm, setup=lambda: model_replies(G))
        rows[name] = {"seconds": statistics.median(times), "all_seconds": times,
                      "ratio_to_mean": statistics.median(times) / t_mean}
        if name == "flwr-bulyan" and R < 4 * f + 3:
            rows[name]["note"] = "skipped aggregation (needs R >= 4f + 3)"
        if name == "flwr-fedavg":
            t_fedavg = rows[name]["seconds"]
    if t_fedavg:
        for name in flower:
            rows[name]["ratio_to_flwr_fedavg"] = rows[name]["seconds"] / t_fedavg
    return {"R": R, "d": d, "f": f, "mean_seconds": t_mean, "np_mean_seconds": t_np, "rules": rows}


def render_markdown(payload: dict[str, Any]) -> str:
    """Table: rows = rules, columns = (R, d): median time and ratio to the plain mean."""
    cases = payload["cases"]
    cols = [f"R={c['R']}, d={c['d']:.0e}" for c in cases]
    lines = ["# Decode time: every rule as a ratio to the plain mean (same run)", "",
             f"Command: `{payload['command']}`", "",
             f"float32 rounds, eps = {payload['config']['eps']} (f = eps R Byzantine rows on a common 2 sqrt(d) shift); "
             f"median of {payload['config']['repeats']} calls; BLAS threads: {payload['config']['blas_threads']}; "
             f"machine: {payload['machine']} (shared, loaded). Cell: ratio to `Mean().aggregate` "
             "(absolute time in parentheses). Flower's rules: `aggregate_train` on R model replies; the last "
             "column group repeats their ratio to Flower's own FedAvg.", "",
             "| rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| mean (seconds) | " + " | ".join(f"{c['mean_seconds'] * 1e3:.2f} ms" for c in cases) + " |")
    names = list(cases[0]["rules"]) if cases else []
    for name in names:
        cells = []
        for c in cases:
            r = c["rules"][name]
            if r.get("seconds") is None:
                cells.append("n/a")
            else:
                cells.append(f"{r['ratio_to_mean']:.1f}x ({_fmt_s(r['seconds'])})" + (" (skipped)" if r.get("note") else ""))
        label = f"**{name}**" if name == "rge" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    flower = [n for n in names if n.startswith("flwr-")]
    if flower and all("ratio_to_flwr_fedavg" in cases[0]["rules"][n] for n in flower):
        lines += ["", "Flower's rules relative to Flower's FedAvg `aggregate_train` (same replies):", "",
                  "| rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n in flower:
            lines.append(f"| {n} | " + " | ".join(f"{c['rules'][n]['ratio_to_flwr_fedavg']:.1f}x" for c in cases) + " |")
    lines += ["", "Byzantine rows kept by our rules (of f): " + "; ".join(
        f"R={c['R']}, d={c['d']:.0e}: " + ", ".join(
            f"{n}={c['rules'][n]['byzantine_kept']}" for n in names if c["rules"][n].get("byzantine_kept") is not None)
        for c in cases), ""]
    return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Grouped bars of the ratio to the plain mean (log scale), a group per rule, a bar per (R, d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = payload["cases"]
    names = list(cases[0]["rules"])
    width = 0.8 / max(len(cases), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(names) + 2), 4.6))
    for j, c in enumerate(cases):
        vals = [c["rules"][n]["ratio_to_mean"] or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + (j - (len(cases) - 1) / 2) * width, vals, width,
               label=f"R={c['R']}, d={c['d']:.0e}")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("decode time / plain mean")
    ax.set_title("Decode time relative to the plain mean (same run, float32)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="R in {12, 20}, d in {1e3, 1e4}")
    p.add_argument("--num-nodes", nargs="+", type=int)
    p.add_argument("--dims", nargs="+", type=int)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--no-flower", action="store_true", help="skip Flower's strategies")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limiter = None
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=args.blas_threads)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    try:
        import torch

        torch.set_num_threads(args.blas_threads)
    except ImportError:  # pragma: no cover
        pass
    Rs = args.num_nodes or ([12, 20] if args.quick else [20, 100])
    dims = args.dims or ([1000, 10_000] if args.quick else [10_000, 1_000_000])
    flower = [] if args.no_flower else list(FLOWER)
    t0 = time.time()
    cases = []
    try:
        from tqdm import tqdm

        it = tqdm([(R, d) for R in Rs for d in dims], desc="decode time", unit="case")
    except ImportError:  # pragma: no cover
        it = [(R, d) for R in Rs for d in dims]
    for R, d in it:
        cases.append(run_case(R, d, args.eps, list(args.rules), flower, args.repeats, args.seed))
    payload = {
        "command": ("python -m benchmarks.decode_time " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "config": {"num_nodes": Rs, "dims": dims, "eps": args.eps, "repeats": args.repeats,
                   "blas_threads": args.blas_threads, "seed": args.seed, "dtype": "float32"},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "cases": cases,
        "wall_seconds": time.time() - t0,
    }
    if limiter is not None:
        limiter.unregister() if hasattr(limiter, "unregister") else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_time.json").write_text(json.dumps(payload, indent=1))
    md = render_markdown(payload) + f"\nWall time: {payload['wall_seconds']:.0f} s.\n"
    (args.out / "decode_time.md").write_text(md)
    plot(payload, args.out / "decode_time.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

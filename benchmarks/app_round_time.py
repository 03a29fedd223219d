"""A round of the App in-process with the default defence against a round with the plain mean.

One command::

    nice -n 5 python -m benchmarks.app_round_time [--short 5] [--long 25] [--repeats 3]

The App's default federation (digits, logistic regression, 20 nodes, 4 of them sending ``-10x``
their own honest gradient estimate: ``attack='scaled-negative'``, ``attack-scale=10``) runs in one process on
:func:`benchmarks.inprocess.run_app` (the real ServerApp and ClientApp logic, without Ray) with
``aggregator='rge'`` (the default defence) and ``aggregator='mean'``, alternating.  A round's cost
is ``(T(long) - T(short)) / (long - short)`` for runs of ``--long`` and ``--short`` rounds, so the
runs' fixed costs (data, model, the final evaluation) cancel; CPU time (``time.process_time``:
what the round costs, without the waits of the message loop) and wall time, medians over
``--repeats``.  1 BLAS thread.  Writes ``app_round_time.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.decode_time import DEFAULT_OUT

AGGREGATORS = ("mean", "rge")


def run(rounds: int, aggregator: str, out_dir: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one in-process App run."""
    from benchmarks.inprocess import run_app

    t0, c0 = time.perf_counter(), time.process_time()
    run_app({"aggregator": aggregator, "num-server-rounds": rounds, "output-dir": out_dir}, 20)
    return time.perf_counter() - t0, time.process_time() - c0


def measure(short: int, long: int, repeats: int) -> dict[str, Any]:
    per_round: dict[str, dict[str, list[float]]] = {a: {"wall": [], "cpu": []} for a in AGGREGATORS}
    with tempfile.TemporaryDirectory() as tmp:
        for agg in AGGREGATORS:  # warm-up: imports, data cache, compiled kernels
            run(2, agg, tmp)
        for _ in range(repeats):
            for agg in AGGREGATORS:
                w1, c1 = run(short, agg, tmp)
                w2, c2 = run(long, agg, tmp)
                per_round[agg]["wall"].append((w2 - w1) / (long - short))
                per_round[agg]["cpu"].append((c2 - c1) / (long - short))
    med = {a: {k: statistics.median(v) for k, v in d.items()} for a, d in per_round.items()}
    return {"per_round_seconds": per_round, "median_per_round_seconds": med,
            "ratio_cpu": med["rge"]["cpu"] / med["mean"]["cpu"], "ratio_wall": med["rge"]["wall"] / med["mean"]["wall"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--long", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must exceed --short")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        res = measure(args.short, args.long, args.repeats)
    command = ("python -m benchmarks.app_round_time " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "app_round_time.json").write_text(json.dumps({"command": command, "blas_threads": 1, **res}, indent=1))
    m = res["median_per_round_seconds"]
    print(f"mean: {1e3 * m['mean']['cpu']:.1f} ms CPU / {1e3 * m['mean']['wall']:.1f} ms wall per round; "
          f"rge: {1e3 * m['rge']['cpu']:.1f} ms CPU / {1e3 * m['rge']['wall']:.1f} ms wall; "
          f"ratio {res['ratio_cpu']:.2f}x CPU, {res['ratio_wall']:.2f}x wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

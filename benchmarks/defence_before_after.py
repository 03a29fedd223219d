"""The default defence's decode before and after the issue-12 memory path, side by side in one process.

One command::

    nice -n 5 python -m benchmarks.defence_before_after [--ref dd1561d] [--repeats 7] [--quick]
        [--sizes 20,100000 100,1000000 ...] [--name defence_before_after] [--no-ids] [--attack far|alie]

The package as of git commit ``--ref`` (default ``dd1561d``: the float64 memory path with per-row
tables) is extracted with ``git archive`` into a temporary directory and imported under another
name next to the working tree's package.  Both defences (``build_for_federation('rge', R, 0.2)``,
called with node ids) see :data:`~benchmarks.decode_time.DEFENCE_WARM` rounds first, then every
timed round is interleaved: ``np.mean(G, axis=0)``, the old defence, the new one (median of
``--repeats``; 1 BLAS thread).  ``--no-ids``: both called without node ids (the defence as a plain
aggregator: no memory, no self-reference; rounds of ``--attack``, far or ALIE-like).  ``--digits``: the App's size
instead, the digits rounds of ``decode_time``'s small section, CPU time per decode.  Writes ``<--name>.json`` and ``.png`` (default
``defence_before_after``) into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.decode_time import DEFAULT_OUT, DEFENCE_WARM, make_round

SIZES = [(20, 100_000), (100, 100_000), (100, 1_000_000)]
QUICK_SIZES = [(20, 10_000), (40, 20_000)]


def import_old(ref: str, root: Path, into: Path) -> Any:
    """``flwr_byzantine.aggregators`` as of ``ref``, imported as ``fb_old.aggregators``."""
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "flwr_byzantine"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "flwr_byzantine").rename(into / "fb_old")
    sys.path.insert(0, str(into))
    return importlib.import_module("fb_old.aggregators")


def measure(old: Any, sizes: list[tuple[int, int]], repeats: int, seed: int, with_ids: bool = True,
            attack: str = "far") -> list[dict[str, Any]]:
    from flwr_byzantine.aggregators import build_for_federation

    out = []
    for R, d in sizes:
        rounds = [make_round(R, d, 0.2, seed + R + k, attack)[0] for k in range(2)]
        ids = list(range(10_000, 10_000 + R)) if with_ids else None
        rules = {"before": old.build_for_federation("rge", R, 0.2), "after": build_for_federation("rge", R, 0.2, seed=seed)}
        for rule in rules.values():
            for k in range(DEFENCE_WARM):
                rule.aggregate(rounds[k % 2], client_ids=ids)
        times: dict[str, list[float]] = {k: [] for k in rules}
        kept: dict[str, list[int]] = {}
        refs = []
        for k in range(max(repeats, 5)):
            G = rounds[(DEFENCE_WARM + k) % 2]  # the two rounds keep alternating (a repeat: every change 0)
            t0 = time.perf_counter()
            np.mean(G, axis=0)
            refs.append(time.perf_counter() - t0)
            for name, rule in rules.items():
                t0 = time.perf_counter()
                res = rule.aggregate(G, client_ids=ids)
                times[name].append(time.perf_counter() - t0)
                kept[name] = sorted(int(i) for i in res.kept)
        ref = statistics.median(refs)
        row = {"R": R, "d": d, "node_ids": with_ids, "attack": attack, "np_mean_seconds": ref,
               "same_kept_last_round": kept["before"] == kept["after"]}
        for name, ts in times.items():
            row[name] = {"seconds": statistics.median(ts), "ratio": statistics.median(ts) / ref, "all_seconds": ts}
        row["speedup"] = row["before"]["seconds"] / row["after"]["seconds"]
        print(f"R={R} d={d:.0e}: before {row['before']['ratio']:.1f}x, after {row['after']['ratio']:.1f}x "
              f"np.mean ({row['speedup']:.1f}x faster)", flush=True)
        out.append(row)
        del rounds, rules
    return out


def measure_digits(old: Any, repeats: int, with_ids: bool, quick: bool = False) -> list[dict[str, Any]]:
    """The App's size: the 20 digits rounds of ``decode_time``'s small section (R = 20, d = 650, 4 attackers
    sending ``-5x`` a peer's gradient), each decoded ``repeats`` times by both defences, interleaved, CPU time
    (``time.process_time``: the decode's own cost on a shared machine).  One row: the median over the rounds of
    each round's median, and in how many rounds the two kept the same rows (``quick``: two of the rounds)."""
    from benchmarks.decode_time import digits_rounds
    from flwr_byzantine.aggregators import build_for_federation

    rounds = digits_rounds(alphas=(1.0,), seeds=(0,), steps=(0, 10)) if quick else digits_rounds()
    R, d = rounds[0].shape
    ids = list(range(10_000, 10_000 + R)) if with_ids else None
    makers = {"before": lambda: old.build_for_federation("rge", R, 0.2),
              "after": lambda: build_for_federation("rge", R, 0.2)}
    rules = {name: make() for name, make in makers.items()} if with_ids else {}  # with ids: one rule and its memory
    per_round: dict[str, list[float]] = {k: [] for k in makers}
    refs, same = [], 0
    for G in rounds:
        times: dict[str, list[float]] = {k: [] for k in makers}
        kept: dict[str, list[int]] = {}
        for _ in range(max(repeats, 5)):
            t0 = time.process_time()
            np.mean(G, axis=0)
            refs.append(time.process_time() - t0)
            for name, make in makers.items():
                rule = rules[name] if with_ids else make()
                t0 = time.process_time()
                res = rule.aggregate(G, client_ids=ids)
                times[name].append(time.process_time() - t0)
                kept[name] = sorted(int(i) for i in res.kept)
        for name, ts in times.items():
            per_round[name].append(statistics.median(ts))
        same += kept["before"] == kept["after"]
    ref = statistics.median(refs)
    row: dict[str, Any] = {"R": R, "d": d, "node_ids": with_ids, "attack": "digits -5x", "np_mean_seconds": ref,
                           "rounds": len(rounds), "same_kept_rounds": same, "clock": "process_time"}
    for name, ts in per_round.items():
        row[name] = {"seconds": statistics.median(ts), "ratio": statistics.median(ts) / ref, "per_round_seconds": ts}
    row["speedup"] = row["before"]["seconds"] / row["after"]["seconds"]
    print(f"digits R={R} d={d}: before {1e3 * row['before']['seconds']:.2f} ms, after "
          f"{1e3 * row['after']['seconds']:.2f} ms CPU a decode ({row['speedup']:.2f}x faster); same kept rows in "
          f"{same} of {len(rounds)} rounds", flush=True)
    return [row]


def plot(rows: list[dict[str, Any]], path: Path, labels: tuple[str, str], with_ids: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["before"]["ratio"] for r in rows], 0.4, label=labels[0])
    ax.bar(x + 0.2, [r["after"]["ratio"] for r in rows], 0.4, label=labels[1])
    ax.set_xticks(x, [f"R={r['R']}, d={r['d']:.0e}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode time / np.mean(G, axis=0)")
    ax.set_title(("Default defence with node ids (warm memory)" if with_ids else "Default defence without node ids")
                 + ", same process, 1 BLAS thread", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="dd1561d", help="git commit of the 'before' implementation")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--sizes", nargs="+", default=None, help="R,d pairs (default: 20,100000 100,100000 100,1000000)")
    p.add_argument("--name", default="defence_before_after", help="stem of the JSON and PNG written into --out")
    p.add_argument("--no-ids", action="store_true", help="call both defences without node ids")
    p.add_argument("--attack", choices=("far", "alie"), default="far", help="the rounds' attackers")
    p.add_argument("--digits", action="store_true",
                   help="instead of --sizes: the App's size, decode_time's 20 digits rounds (R = 20, d = 650)")
    args = p.parse_args(argv)
    sizes = (QUICK_SIZES if args.quick else SIZES) if args.sizes is None else \
        [(int(r), int(float(d))) for r, d in (s.split(",") for s in args.sizes)]
    from threadpoolctl import threadpool_limits

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp, threadpool_limits(limits=1):
        old = import_old(args.ref, root, Path(tmp))
        rows = (measure_digits(old, args.repeats, with_ids=not args.no_ids, quick=args.quick) if args.digits else
                measure(old, sizes, args.repeats, args.seed, with_ids=not args.no_ids, attack=args.attack))
    command = "python -m benchmarks.defence_before_after " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"command": command.strip(), "ref": args.ref, "blas_threads": 1, "dtype": "float32", "node_ids": not args.no_ids,
         "rows": rows}, indent=1))
    labels = (("before (float64 copies, per-row tables)", "after (input dtype, tiled passes)")
              if args.ref == "dd1561d" else (f"before (commit {args.ref})", "after (this tree)"))
    plot(rows, args.out / f"{args.name}.png", labels, with_ids=not args.no_ids)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

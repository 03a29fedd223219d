"""What the defence's compiled loops cost on their first use: a fresh install's first decodes, then the next process's.

One command::

    python -m benchmarks.first_use [--out benchmarks/results] [--repeats 1]

The default defence's inner loops are compiled by numba on their first call and cached on disk (``cache=True``:
next to the modules, in ``__pycache__``, or under ``NUMBA_CACHE_DIR``).  This script runs, in fresh Python processes
with an empty cache directory of their own (``NUMBA_CACHE_DIR``), then again in fresh processes on the cache the
first ones wrote:

* ``app``: the App's round (R = 20, d = 650, 4 attackers sending ``-5x`` their rows, the default defence,
  ``build_for_federation``);
* ``large``: then two large rounds (R = 100, d = 1e5 float32, node ids, 20 far attackers: the fast passes; the
  second clips against the references the first set).

and reports each call's seconds (wall, in the child process, the import excluded), the processes' total
seconds, and how many of the package's compiled signatures each process compiled and loaded from the cache.
Writes ``first_use.json`` and ``first_use.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.decode_time import DEFAULT_OUT

_CHILD = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from flwr_byzantine.aggregators import build_for_federation
out = {"import_seconds": time.perf_counter() - t0}
rng = np.random.default_rng(0)
G = rng.standard_normal((20, 650))
G[:4] *= -5.0
t = time.perf_counter()
res = build_for_federation("rge", 20, 0.2, seed=0).aggregate(G)
out["app_seconds"] = time.perf_counter() - t
out["app_kept"] = len(res.kept)
R, d = 100, 100_000
G = rng.standard_normal((R, d), dtype=np.float32)
G[:20] = 30.0 * rng.standard_normal((20, d), dtype=np.float32)
rule = build_for_federation("rge", R, 0.2, seed=0)
ids = list(range(10_000, 10_000 + R))
out["large_seconds"] = 0.0
for k in range(2):  # the second round clips against the references the first one set
    t = time.perf_counter()
    res = rule.aggregate(G, client_ids=ids)
    out["large_seconds"] += time.perf_counter() - t
    out[f"large_round{k + 1}_seconds"] = time.perf_counter() - t
out["large_attackers_removed"] = bool(np.all(np.asarray(res.kept) >= 20))
import importlib, pkgutil, numba
import flwr_byzantine.aggregators as agg
compiled = loaded = 0  # the package's cached kernels: signatures compiled here / loaded from the cache
for info in pkgutil.iter_modules(agg.__path__):
    mod = importlib.import_module(f"flwr_byzantine.aggregators.{info.name}")
    for f in vars(mod).values():
        if isinstance(f, numba.core.registry.CPUDispatcher) and f.__module__ == mod.__name__:
            compiled += sum(f.stats.cache_misses.values())
            loaded += sum(f.stats.cache_hits.values())
out["signatures_compiled"], out["signatures_loaded"] = compiled, loaded
print(json.dumps(out))
"""


def _child(cache: str) -> dict[str, Any]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_seconds"] = time.perf_counter() - t
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--repeats", type=int, default=1, help="cold/warm pairs (each with a new empty cache)")
    args = ap.parse_args(argv)
    rows = []
    for k in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            cold = _child(cache)
            warm = _child(cache)
        rows.append({"repeat": k, "cold": cold, "warm": warm})
        print(f"first use: app {cold['app_seconds']:.1f} s, large {cold['large_seconds']:.1f} s "
              f"(process {cold['process_seconds']:.1f} s); from the cache: app {warm['app_seconds']:.2f} s, "
              f"large {warm['large_seconds']:.2f} s (process {warm['process_seconds']:.1f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m benchmarks.first_use " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": _cpu(), "rows": rows}
    (out / "first_use.json").write_text(json.dumps(result, indent=1))
    _plot(rows, out / "first_use.png")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["app_seconds", "large_seconds", "process_seconds"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for j, phase in enumerate(("cold", "warm")):
        vals = [min(r[phase][k] for r in rows) for k in keys]
        label = "empty cache" if phase == "cold" else "from the cache"
        ax.bar([i + 0.4 * j for i in range(len(keys))], vals, width=0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(keys))], ["App round", "R=100, d=1e5", "whole process"])
    ax.set_ylabel("seconds")
    ax.set_title("The compiled loops' first use")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

"""The command line shared by the profiles that run at a few ``(R, d)`` sizes with 1 BLAS thread
(:mod:`benchmarks.defence_passes`, :mod:`benchmarks.defence_floor`): ``--sizes R,d ...``, a repeat count,
``--seed``, ``--out``; writes ``<name>.json`` with the command, the thread count, the dtype and the rows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.decode_time import DEFAULT_OUT


def sized_main(name: str, doc: str | None, sizes: list[tuple[int, int]], repeats: tuple[str, int, int],
               measure: Callable[[list[tuple[int, int]], int, int], list[dict[str, Any]]],
               argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``measure(sizes, count, seed)`` under 1 BLAS thread; ``repeats`` is
    ``(flag, default, minimum)`` of the count.  Writes ``<--out>/<name>.json``; returns 0."""
    flag, default, minimum = repeats
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=None, help="R,d pairs")
    p.add_argument(flag, type=int, default=default, dest="count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    chosen = sizes if args.sizes is None else [(int(r), int(float(d))) for r, d in (s.split(",") for s in args.sizes)]
    with threadpool_limits(limits=1):
        rows = measure(chosen, max(args.count, minimum), args.seed)
    command = f"python -m benchmarks.{name} " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(
        {"command": command.strip(), "blas_threads": 1, "dtype": "float32", "rows": rows}, indent=1))
    return 0

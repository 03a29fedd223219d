"""Where the default defence's decode goes: each pass's time in units of ``np.mean(G, axis=0)``.

One command::

    nice -n 5 python -m benchmarks.defence_passes [--sizes 20,100000 100,1000000 1000,100000] [--calls 5]

``build_for_federation('rge', R, 0.2)`` called with node ids on the ``far`` rounds of
:mod:`benchmarks.decode_time`'s ``defence`` section, after :data:`~benchmarks.decode_time.DEFENCE_WARM`
rounds; every pass of :meth:`~flwr_byzantine.aggregators.RobustDefence._run` is wrapped in a timer
(the gross screen's median and distances, the self-reference's drift and deviations, its clipping, the
references' store, the evidence pass, the worker momentum's fold, the duplicates, the filter, the mixing and clipping), ``--calls`` calls are timed,
each next to a call of ``np.mean`` (1 BLAS thread, float32); a pass's figure is its median over the calls.  Writes ``defence_passes.json`` into ``--out``.
A profile, not a benchmark of its own: the wrappers add a little, and the passes sum to the total within
about 10 %.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from benchmarks._sized import sized_main
from benchmarks.decode_time import DEFENCE_WARM, make_round

SIZES = [(20, 100_000), (100, 1_000_000), (1000, 100_000)]


def _wrappers() -> list[tuple[Any, str, str]]:
    from flwr_byzantine.aggregators import defence, memory, temporal
    from flwr_byzantine.aggregators.rge import RGE

    return [(defence, "sketch_rows", "gross screen: sketch of the rows (large rounds)"),
            (defence, "column_median", "gross screen: coordinate-wise median"),
            (defence, "row_sq_norms_to", "gross screen: distances"),
            (temporal, "reference_deviation_stats", "self-reference: drift (coordinate-wise median) and deviations"),
            (temporal, "clip_to_references", "self-reference: clipping"),
            (memory._RowTable, "put", "references' and memories' store"),
            (memory.MonotonicityEvidence, "observe", "monotonicity evidence pass"),
            (memory.ClientMomentum, "fold_rows", "worker momentum: input clipping and fold into the memories (fused: and the filter's sketch of them)"),
            (defence, "duplicate_rows", "duplicates (distances on the screen's sketch)"),
            (RGE, "aggregate_rows", "filter (sketch or Gram, solver)"),
            (defence, "mix_and_clip", "mixing: exact Gram of the survivors, weighted sum")]


def measure(sizes: list[tuple[int, int]], calls: int, seed: int) -> list[dict[str, Any]]:
    from flwr_byzantine.aggregators import build_for_federation

    acc: dict[str, float] = {}
    saved = []
    for obj, name, label in _wrappers():
        fn = getattr(obj, name)
        saved.append((obj, name, fn))

        def timed(*a: Any, _fn: Callable = fn, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)
    out = []
    try:
        for R, d in sizes:
            rounds = [make_round(R, d, 0.2, seed + R + k, "far")[0] for k in range(2)]
            ids = list(range(10_000, 10_000 + R))
            rule = build_for_federation("rge", R, 0.2, seed=seed)
            for k in range(DEFENCE_WARM):
                rule.aggregate(rounds[k % 2], client_ids=ids)
            refs, tot, per_call = [], [], []
            for k in range(calls):
                G = rounds[(DEFENCE_WARM + k) % 2]  # the two rounds keep alternating (a repeat: every change 0)
                t0 = time.perf_counter()
                np.mean(G, axis=0)
                refs.append(time.perf_counter() - t0)
                acc.clear()
                t0 = time.perf_counter()
                rule.aggregate(G, client_ids=ids)
                tot.append(time.perf_counter() - t0)
                per_call.append(dict(acc))
            ref = statistics.median(refs)
            # each pass's median over the calls (a one-off, e.g. the first round that needs the memories' buffer and
            # faults its pages in, does not set it)
            passes = {k: statistics.median(c.get(k, 0.0) for c in per_call) / ref for k in set().union(*per_call)}
            row = {"R": R, "d": d, "np_mean_seconds": ref, "defence_ratio": statistics.median(tot) / ref,
                   "passes": dict(sorted(passes.items(), key=lambda kv: -kv[1]))}
            print(f"R={R} d={d:.0e}: defence {row['defence_ratio']:.1f}x np.mean; "
                  + "; ".join(f"{k} {v:.1f}x" for k, v in row["passes"].items()), flush=True)
            out.append(row)
            del rounds, rule
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return out


def main(argv: list[str] | None = None) -> int:
    return sized_main("defence_passes", __doc__, SIZES, ("--calls", 5, 1), measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())

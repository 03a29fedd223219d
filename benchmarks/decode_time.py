"""Decode-time benchmark: every rule as a ratio to ``np.mean(G, axis=0)`` measured in the same process.

One command::

    nice -n 5 python -m benchmarks.decode_time [--quick] [--device cpu|cuda] [--out DIR]

Every time is the median of ``--repeats`` (>= 5) calls, interleaved with as many calls of
``np.mean(G, axis=0)`` on the same float32 matrix (the denominator of every ratio), with
the BLAS/OpenMP pools limited to ``--blas-threads`` (default 1) for the whole process
(except in the ``threads`` section).  Sections (``--sections``, default all):

* ``grid``: every rule of :mod:`flwr_byzantine.aggregators` at R in {20, 100}, d in {1e4, 1e5}
  (f = 0.2 R Byzantine rows on a common ``2 sqrt(d)`` shift), and for each peer the *best
  numpy formulation of the same rule* (partition on contiguous transposed blocks, one
  ``G @ G.T``, ...) timed alongside: the ``vs best`` column.  ``--flower`` adds Flower's
  strategies (``aggregate_train`` on R replies).
* ``small``: the App's size, R = 20, d = 650: digits logistic-regression mini-batch gradients
  of 20 Dirichlet(alpha) clients at several points of a training run, 4 of which are replaced
  by ``-5x`` another client's gradient; RGE's milliseconds per decode (median and 90th
  percentile over the rounds).
* ``large``: R = 100, d = 1e6, 20 attackers, far (``2 sqrt(d)`` shift) and ALIE-like (a
  cluster 0.5 std off the honest mean): ``Mean``, the registry's default ``rge``, the paper's
  RGE (exact) and ``rge-fast`` (sketched Gram, spectral steps above 64 points, stopping
  constant 1.5); attackers removed / honest dropped.
* ``xlarge``: R = 1000, d = 1e5, 200 attackers, same two attacks, the registry's default and ``rge-fast`` (the exact
  Gram alone is O(d R^2) = 1e11 flops).
* ``randk``: RGE on the uncompressed ``R x d`` round against the ``R x d/100`` randk round
  (R = 100, d = 1e6, the randk benchmark's colluding attack).
* ``threads``: RGE (exact and fast, and the process setting ``blas_threads=None``) with the
  process limited to 1 and to 2 BLAS threads.
* ``agreement``: kept sets of ``rge-fast``'s sketched filter against the exact filter (same
  rule, exact Gram) over attacks x seeds at R = 100, d = 1e5.
* ``defence``: the default defence (registry ``rge``, :class:`~flwr_byzantine.aggregators.RobustDefence`)
  *with node ids*, its per-node memory warm (:data:`DEFENCE_WARM` rounds first; two rounds of the
  same nodes alternate), at R in {20, 100, 1000} x d in {1e4, 1e5, 1e6} (not R = 1000, d = 1e6: 12 GB
  with its memory), f = 0.2 R far attackers; next to it the RGE filter it runs, alone, on the same
  rounds (:meth:`~flwr_byzantine.aggregators.RobustDefence.filter_for`: the exact filter, or the fast one); and
  the default defence on *clean* rounds of the same size (no attacker: the common case, where nothing is
  removed and every row is clipped and averaged), with a memory of its own, warmed the same way.

A run with a subset of ``--sections`` replaces those sections in an existing
``decode_time.json`` (the report is rebuilt from the merged results).
``--device cuda`` runs the rules on CUDA tensors (the denominator is then ``torch.mean``).
Outputs in ``--out`` (default ``benchmarks/results``): ``decode_time.json``,
``decode_time.md`` (also printed), ``decode_time.png`` and ``decode_time_defence.png``.  Timings depend on the machine
and its load; the ratios taken in the same run are the comparable quantity.
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
SECTIONS = ("grid", "small", "large", "xlarge", "randk", "threads", "agreement", "defence")
#: Rounds the default defence sees before it is timed (its evidence needs 5 scored rounds).
DEFENCE_WARM = 7
#: (R, d) of the ``defence`` section (``--quick``: the first list).
DEFENCE_SIZES = ([(20, 10_000), (100, 20_000)],
                 [(R, d) for R in (20, 100, 1000) for d in (10_000, 100_000, 1_000_000) if R * d <= 100_000_000])
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: The fast RGE configuration measured here (sketched Gram, spectral steps for large R, calibrated stop).
FAST = {"sketch_dim": 2048, "spectral_above": 64, "threshold_factor": 1.5}


def rge_fast(eps: float, R: int, seed: int = 0, **extra: Any):
    """RGE with :data:`FAST` (sketch length 1024 from R = 500 on: its R x R Gram stays cheap)."""
    from flwr_byzantine.aggregators import RGE

    params = dict(FAST) | extra
    if R >= 500:
        params["sketch_dim"] = 1024
    return RGE(eps_tilde=min(eps, 0.25), seed=seed, **params)


def make_round(R: int, d: int, eps: float, seed: int, kind: str = "far") -> tuple[np.ndarray, int]:
    """Float32 ``(R, d)`` round with ``f = round(eps R)`` Byzantine rows first; returns ``(G, f)``.

    ``far``: honest ``N(0, I)``, Byzantine shifted by a common ``2 sqrt(d) u``.  ``alie``: the
    Byzantine rows are the honest mean minus 0.5 honest standard deviations per coordinate,
    plus ``0.1 N(0, I)`` (a tight cluster).
    """
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((R, d), dtype=np.float32)
    f = int(round(eps * R))
    if kind == "far":
        u = rng.standard_normal(d)
        u *= 2.0 * np.sqrt(d) / np.linalg.norm(u)
        G[:f] += u.astype(np.float32)
    elif kind == "alie":
        H = G[f:]
        target = H.mean(axis=0) - 0.5 * H.std(axis=0)
        G[:f] = target + 0.1 * rng.standard_normal((f, d), dtype=np.float32)
    else:
        raise ValueError(f"unknown attack kind {kind!r}")
    return G, f


class Timer:
    """Interleaves every timed call with a call of the reference mean on the same matrix."""

    def __init__(self, G: Any, repeats: int) -> None:
        self.G = G
        self.repeats = max(int(repeats), 5)
        from flwr_byzantine._backend import is_torch

        if is_torch(G):
            import torch

            self.ref = lambda: torch.mean(G, dim=0)
            self.sync = (lambda: torch.cuda.synchronize()) if G.device.type == "cuda" else (lambda: None)
        else:
            self.ref = lambda: np.mean(G, axis=0)
            self.sync = lambda: None
        self.ref_times: list[float] = []

    def _once(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def time(self, fn: Callable[[], Any], warmup: bool = True, repeats: int | None = None) -> dict[str, Any]:
        """Median seconds of ``fn`` and its ratio to the median reference time (both over the same loop)."""
        if warmup:
            fn()
        ts, refs, out = [], [], None
        for _ in range(repeats or self.repeats):
            refs.append(self._once(self.ref)[0])
            t, out = self._once(fn)
            ts.append(t)
        self.ref_times += refs
        med, ref = statistics.median(ts), statistics.median(refs)
        return {"seconds": med, "all_seconds": ts, "ratio": med / ref, "ref_seconds": ref, "result": out}


def _kept_stats(res: Any, f: int, R: int) -> dict[str, int]:
    kept = np.asarray(res.kept)
    return {"byzantine_kept": int(np.sum(kept < f)), "honest_dropped": int((R - f) - np.sum(kept >= f))}


def _device(G: np.ndarray, device: str) -> Any:
    if device == "cpu":
        return G
    import torch

    return torch.as_tensor(G, device=device)


# ---------------------------------------------------------------------------------------------- best numpy


def best_numpy(name: str, G: np.ndarray, f: int) -> Callable[[], Any] | None:
    """The fastest plain-numpy formulation we know of rule ``name`` (no diagnostics), or None."""
    R, d = G.shape
    step = max(1, (1 << 22) // R)

    def windowed(b: int) -> np.ndarray:
        out = np.empty(d, G.dtype)
        kth = [b] if R - 2 * b == 1 else [b, R - b - 1]
        for s in range(0, d, step):
            P = np.partition(np.ascontiguousarray(G[:, s : s + step].T), kth, axis=1)
            out[s : s + step] = P[:, b : R - b].mean(axis=1)
        return out

    def sq_dist() -> np.ndarray:
        K = (G @ G.T).astype(np.float64)
        n = np.diag(K)
        D = n[:, None] + n[None, :] - 2.0 * K
        np.fill_diagonal(D, np.inf)
        return D

    def krum_scores(D: np.ndarray, k: int) -> np.ndarray:
        return np.sort(D, axis=1)[:, :k].sum(axis=1)

    if name == "median":
        return lambda: windowed((R - 1) // 2)
    if name == "trimmed-mean":
        return lambda: windowed(f)
    if name == "krum":
        return lambda: G[int(np.argmin(krum_scores(sq_dist(), R - f - 2)))].copy()
    if name == "multi-krum":
        return lambda: G[np.sort(np.argsort(krum_scores(sq_dist(), R - f - 2))[: R - f])].mean(axis=0)
    if name == "cclip":
        def cclip() -> np.ndarray:
            v = windowed((R - 1) // 2)
            for _ in range(3):
                diff = G - v
                dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
                tau = np.median(dist)
                a = (np.minimum(1.0, tau / np.maximum(dist, 1e-30)) / R).astype(G.dtype)
                v = (1 - a.sum()) * v + a @ G
            return v
        return cclip
    if name == "bulyan" and R >= 4 * f + 3:
        def bulyan() -> np.ndarray:
            D = sq_dist()
            theta, beta = R - 2 * f, R - 4 * f
            rem, sel = list(range(R)), []
            while len(sel) < theta:
                if len(rem) == 1:
                    sel.append(rem.pop())
                    continue
                k = min(max(len(rem) - f - 2, 1), len(rem) - 1)
                sel.append(rem.pop(int(np.argmin(krum_scores(D[np.ix_(rem, rem)], k)))))
            S = G[np.sort(sel)]
            out = np.empty(d, G.dtype)
            for s in range(0, d, step):
                V = np.sort(np.ascontiguousarray(S[:, s : s + step].T), axis=1)
                m = 0.5 * (V[:, (theta - 1) // 2] + V[:, theta // 2])
                idx = np.argsort(np.abs(V - m[:, None]), axis=1)[:, :beta]
                out[s : s + step] = np.take_along_axis(V, idx, axis=1).mean(axis=1)
            return out
        return bulyan
    return None


# ---------------------------------------------------------------------------------------------- sections


def section_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flwr_byzantine.aggregators import Mean, build_for_federation

    Rs = [12, 20] if args.quick else [20, 100]
    dims = [1000, 10_000] if args.quick else [10_000, 100_000]
    cases = []
    for R in Rs:
        for d in dims:
            G, f = make_round(R, d, args.eps, args.seed + R + d)
            X = _device(G, args.device)
            timer = Timer(X, args.repeats)
            rows: dict[str, dict[str, Any]] = {"mean": _strip(timer.time(lambda: Mean().aggregate(X)))}
            for rule in args.rules:
                try:
                    t = timer.time(lambda rule=rule: build_for_federation(rule, R, args.eps).aggregate(X))
                except ValueError as exc:  # e.g. Bulyan needs R >= 4f + 3
                    rows[rule] = {"seconds": None, "ratio": None, "error": str(exc)}
                    continue
                row = _strip(t) | _kept_stats(t["result"], f, R)
                best = best_numpy(rule, G, f) if args.device == "cpu" else None
                if best is not None:
                    b = timer.time(best)
                    row["best_numpy_seconds"] = b["seconds"]
                    row["vs_best_numpy"] = t["seconds"] / b["seconds"]
                rows[rule] = row
            for name in (FLOWER if args.flower else ()):
                rows[name] = _strip(flower_time(name, G, f, args.eps, timer))
            cases.append({"R": R, "d": d, "f": f, "np_mean_seconds": statistics.median(timer.ref_times),
                          "rules": rows})
            print(f"grid R={R} d={d}: done", flush=True)
    return cases


def flower_time(name: str, G: np.ndarray, f: int, eps: float, timer: Timer) -> dict[str, Any]:
    """``aggregate_train`` of Flower's strategy ``name`` on R fresh model replies (rebuilt untimed)."""
    from flwr.serverapp import strategy as fs

    from benchmarks.inprocess import set_server_identity
    from benchmarks.robustness import without_flower_gc
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    R = G.shape[0]
    strategy = {
        "flwr-fedavg": lambda: fs.FedAvg(fraction_evaluate=0.0),
        "flwr-fedmedian": lambda: fs.FedMedian(fraction_evaluate=0.0),
        "flwr-fedtrimmedavg": lambda: fs.FedTrimmedAvg(beta=eps, fraction_evaluate=0.0),
        "flwr-krum": lambda: fs.Krum(num_malicious_nodes=f, fraction_evaluate=0.0),
        "flwr-multikrum": lambda: fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=R - f, fraction_evaluate=0.0),
        "flwr-bulyan": lambda: fs.Bulyan(num_malicious_nodes=f, fraction_evaluate=0.0),
    }[name]()
    set_server_identity()

    def replies() -> list[Any]:
        out = []
        for i, row in enumerate(G):
            ins = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=i + 1,
                          message_type=MessageType.TRAIN, group_id="1")
            ins.metadata.__dict__["_message_id"] = f"m{i}"
            out.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(row)}),
                                           "metrics": MetricRecord({"num-examples": 32})}), reply_to=ins))
        return out

    ts, refs = [], []
    for _ in range(timer.repeats):
        rep = replies()
        refs.append(timer._once(timer.ref)[0])
        with without_flower_gc():
            ts.append(timer._once(lambda: strategy.aggregate_train(1, rep))[0])
    med, ref = statistics.median(ts), statistics.median(refs)
    return {"seconds": med, "all_seconds": ts, "ratio": med / ref, "ref_seconds": ref}


def digits_rounds(R: int = 20, nb: int = 4, alphas=(0.3, 1.0), seeds=(0, 1), steps=(0, 3, 10, 30, 60),
                  batch: int = 32) -> list[np.ndarray]:
    """float32 ``(R, 650)`` rounds: logistic-regression mini-batch gradients of R digits clients along a
    training run (the mean of the honest ones, step 0.5), rows ``0..nb-1`` replaced by ``-5x`` rows ``nb..2nb-1``."""
    import torch
    import torch.nn.functional as F

    from flwr_byzantine.data.partition import load_partition
    from flwr_byzantine.models import build_model

    out = []
    for alpha in alphas:
        for seed in seeds:
            parts = [load_partition("digits", i, R, alpha, seed) for i in range(R)]
            model = build_model("logreg", 64, 10, seed)
            rng = np.random.default_rng(seed)
            for step in range(max(steps) + 1):
                grads = []
                for X, y in parts:
                    idx = rng.choice(len(y), size=min(batch, len(y)), replace=False)
                    model.zero_grad()
                    F.cross_entropy(model(torch.as_tensor(X[idx])), torch.as_tensor(y[idx])).backward()
                    grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
                G = np.stack(grads).astype(np.float32)
                if step in steps:
                    A = G.copy()
                    A[:nb] = -5.0 * G[nb : 2 * nb]
                    out.append(A)
                mean = torch.as_tensor(G[nb:].mean(axis=0))
                with torch.no_grad():
                    off = 0
                    for p in model.parameters():
                        p -= 0.5 * mean[off : off + p.numel()].reshape(p.shape)
                        off += p.numel()
    return out


def section_small(args: argparse.Namespace) -> dict[str, Any]:
    from flwr_byzantine.aggregators import RGE, build_for_federation

    rounds = digits_rounds(alphas=(1.0,), seeds=(0,), steps=(0, 10)) if args.quick else digits_rounds()
    rows: dict[str, Any] = {}
    for name, make in (("rge (paper)", lambda: RGE(eps_tilde=args.eps)),
                       ("rge (registry default)", lambda: build_for_federation("rge", 20, args.eps)),
                       ("rge-fast", lambda: rge_fast(args.eps, 20))):
        ms, cpu_ms, ratios, byz, hon, iters = [], [], [], [], [], []
        for G in rounds:
            X = _device(G, args.device)
            t = Timer(X, args.repeats).time(lambda: make().aggregate(X))
            ms.append(1e3 * t["seconds"])
            cpu = []
            for _ in range(max(args.repeats, 5)):  # CPU time: what the decode costs without waiting for a core
                c0 = time.process_time()
                make().aggregate(X)
                cpu.append(time.process_time() - c0)
            cpu_ms.append(1e3 * statistics.median(cpu))
            ratios.append(t["ratio"])
            st = _kept_stats(t["result"], 4, 20)
            byz.append(st["byzantine_kept"])
            hon.append(st["honest_dropped"])
            iters.append(t["result"].info.get("solver_iterations", 0))
        rows[name] = {"ms_median": float(np.median(ms)), "ms_p90": float(np.percentile(ms, 90)),
                      "cpu_ms_median": float(np.median(cpu_ms)), "cpu_ms_p90": float(np.percentile(cpu_ms, 90)),
                      "ms_max": float(np.max(ms)), "ratio_median": float(np.median(ratios)),
                      "byzantine_kept_mean": float(np.mean(byz)), "honest_dropped_mean": float(np.mean(hon)),
                      "solver_iterations_median": float(np.median(iters)), "ms_all": ms}
    print("small: done", flush=True)
    return {"R": 20, "d": int(rounds[0].shape[1]), "rounds": len(rounds), "rules": rows}


def section_scale(args: argparse.Namespace, R: int, d: int, exact: bool) -> list[dict[str, Any]]:
    from flwr_byzantine.aggregators import RGE, Mean, build_for_federation

    out = []
    for kind in ("far", "alie"):
        G, f = make_round(R, d, 0.2, args.seed + R, kind)
        X = _device(G, args.device)
        timer = Timer(X, args.repeats)
        rows: dict[str, Any] = {"mean": _strip(timer.time(lambda: Mean().aggregate(X), warmup=False))}
        rules: list[tuple[str, Callable[[], Any]]] = [("rge (registry default)",
                                                        lambda: build_for_federation("rge", R, 0.2))]
        if exact:
            rules.append(("rge (paper, exact)", lambda: RGE(eps_tilde=0.2)))
        rules.append(("rge-fast", lambda: rge_fast(0.2, R)))
        for name, make in rules:
            t = timer.time(lambda make=make: make().aggregate(X), warmup=False)
            info = t["result"].info
            rows[name] = _strip(t) | _kept_stats(t["result"], f, R) | {
                "gram_seconds": info.get("gram_seconds"), "filter_seconds": info.get("filter_seconds")}
        out.append({"R": R, "d": d, "f": f, "attack": kind, "np_mean_seconds": statistics.median(timer.ref_times),
                    "rules": rows})
        print(f"scale R={R} d={d} {kind}: done", flush=True)
        del G, X
    return out


def section_randk(args: argparse.Namespace) -> dict[str, Any]:
    from flwr_byzantine.aggregators import RGE
    from flwr_byzantine.compression import draw_coordinates, randk_compress

    from benchmarks.randk import round_matrix

    R, d = (40, 100_000) if args.quick else (100, 1_000_000)
    G = round_matrix(R, d, R // 10, args.seed)
    Gk = randk_compress(G, draw_coordinates(d, d // 100, args.seed, 1)).astype(np.float32)
    timer = Timer(G, args.repeats)
    full = timer.time(lambda: RGE(eps_tilde=0.25).aggregate(G), warmup=False)
    comp = timer.time(lambda: RGE(eps_tilde=0.25).aggregate(Gk))
    print("randk: done", flush=True)
    return {"R": R, "d": d, "k": d // 100, "uncompressed": _strip(full), "compressed": _strip(comp),
            "speedup": full["seconds"] / comp["seconds"]}


def section_threads(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each rule timed with the process limited to 1 and to 2 BLAS threads, the two settings alternating call by call."""
    from threadpoolctl import threadpool_limits

    from flwr_byzantine.aggregators import RGE

    R, d = (40, 100_000) if args.quick else (100, 1_000_000)
    G, _ = make_round(R, d, 0.2, args.seed)
    rows = []
    for name, make in (("rge (blas_threads=1, default)", lambda: RGE(eps_tilde=0.2)),
                       ("rge (process setting)", lambda: RGE(eps_tilde=0.2, blas_threads=None)),
                       ("rge-fast (process setting)", lambda: rge_fast(0.2, R, blas_threads=None))):
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(max(args.repeats, 5)):
            for n in (1, 2):
                with threadpool_limits(limits=n):
                    t0 = time.perf_counter()
                    make().aggregate(G)
                    times[n].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"rule": name}
        for n in (1, 2):
            row[f"threads_{n}"] = {"seconds": statistics.median(times[n]), "all_seconds": times[n]}
        row["slowdown_2_vs_1"] = row["threads_2"]["seconds"] / row["threads_1"]["seconds"]
        rows.append(row)
    print("threads: done", flush=True)
    return rows


def section_agreement(args: argparse.Namespace) -> dict[str, Any]:
    from flwr_byzantine.aggregators import RGE

    R, d = (40, 20_000) if args.quick else (100, 100_000)
    seeds = range(2 if args.quick else 10)
    kinds = ("far", "alie", "clean", "gaussian", "sign-flip")
    rows, same, total = [], 0, 0
    for kind in kinds:
        for s in seeds:
            rng = np.random.default_rng(1000 + s)
            if kind in ("far", "alie"):
                G, f = make_round(R, d, 0.2, 1000 + s, kind)
            else:
                G = (0.3 + rng.standard_normal((R, d), dtype=np.float32))
                f = 0 if kind == "clean" else R // 5
                if kind == "gaussian":
                    G[:f] = 3.0 * rng.standard_normal((f, d), dtype=np.float32)
                elif kind == "sign-flip":
                    G[:f] = -G[f:].mean(axis=0)
            fast = rge_fast(0.2, R, seed=s)
            exact = RGE(eps_tilde=0.2, spectral_above=FAST["spectral_above"], threshold_factor=FAST["threshold_factor"])
            a, b = fast.aggregate(G), exact.aggregate(G)
            ok = np.array_equal(a.kept, b.kept)
            same += ok
            total += 1
            rows.append({"attack": kind, "seed": s, "identical": bool(ok), "sketch_kept": len(a.kept),
                         "exact_kept": len(b.kept), **{f"sketch_{k}": v for k, v in _kept_stats(a, f, R).items()},
                         **{f"exact_{k}": v for k, v in _kept_stats(b, f, R).items()}})
    print("agreement: done", flush=True)
    return {"R": R, "d": d, "identical_fraction": same / total, "rounds": total, "rows": rows}


def section_defence(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The default defence with node ids and a warm memory, and its RGE filter alone, as ratios to np.mean."""
    out = []
    for R, d in DEFENCE_SIZES[0 if args.quick else 1]:
        f = int(round(0.2 * R))
        rounds, ids, rule = _warmed_defence(R, d, 0.2, args)
        filt = rule.filter_for(R, d)
        ref, times, last = _time_alternating(rounds, {"defence": lambda G: rule.aggregate(G, client_ids=ids),
                                                      "filter": filt.aggregate}, args.repeats)
        res = last["defence"]
        row = {"R": R, "d": d, "f": f, "np_mean_seconds": ref, "sketched": res.info.get("sketch_dim") is not None,
               "spectral_passes": res.info.get("spectral_passes", 0), "suspected": len(res.info["suspected"])}
        for name, ts in times.items():
            row[name] = {"seconds": statistics.median(ts), "ratio": statistics.median(ts) / ref, "all_seconds": ts}
        row |= _kept_stats(res, f, R)
        del rounds, rule, filt, last, res
        row["clean"], row["clean_honest_dropped"] = _clean_defence(R, d, args)
        out.append(row)
        print(f"defence R={R} d={d}: {row['defence']['ratio']:.1f}x (filter alone {row['filter']['ratio']:.1f}x; "
              f"clean rounds {row['clean']['ratio']:.1f}x)", flush=True)
    return out


def _warmed_defence(R: int, d: int, eps: float, args: argparse.Namespace) -> tuple[list[np.ndarray], list[int], Any]:
    """Two rounds (``eps R`` far attackers), the node ids, and the default defence after :data:`DEFENCE_WARM` of them."""
    from flwr_byzantine.aggregators import build_for_federation

    rounds = [make_round(R, d, eps, args.seed + R + k, "far")[0] for k in range(2)]
    ids = list(range(10_000, 10_000 + R))
    rule = build_for_federation("rge", R, 0.2, seed=args.seed)
    for k in range(DEFENCE_WARM):
        rule.aggregate(rounds[k % 2], client_ids=ids)
    return rounds, ids, rule


def _time_alternating(rounds: list[np.ndarray], calls: dict[str, Callable[[np.ndarray], Any]], repeats: int
                      ) -> tuple[float, dict[str, list[float]], dict[str, Any]]:
    """``max(repeats, 5)`` times: ``np.mean`` and then every call on the next of the two rounds, which keep alternating
    after the warm-up (a repeat would make every node's change 0).  Returns ``(median np.mean seconds, {name: seconds
    of every call}, {name: its last result})``."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    last: dict[str, Any] = {}
    refs: list[float] = []
    for k in range(max(repeats, 5)):
        G = rounds[(DEFENCE_WARM + k) % 2]
        t0 = time.perf_counter()
        np.mean(G, axis=0)
        refs.append(time.perf_counter() - t0)
        for name, call in calls.items():
            t0 = time.perf_counter()
            last[name] = call(G)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(refs), times, last


def _clean_defence(R: int, d: int, args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The default defence with node ids on clean rounds (no attacker), warmed as :func:`section_defence` warms it:
    ``({"seconds", "ratio", "all_seconds", "np_mean_seconds"}, honest rows left out in the last timed round)``."""
    rounds, ids, rule = _warmed_defence(R, d, 0.0, args)
    ref, times, last = _time_alternating(rounds, {"clean": lambda G: rule.aggregate(G, client_ids=ids)}, args.repeats)
    ts = times["clean"]
    return ({"seconds": statistics.median(ts), "ratio": statistics.median(ts) / ref, "all_seconds": ts,
             "np_mean_seconds": ref},
            R - int(np.asarray(last["clean"].kept).size))


def _strip(t: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in t.items() if k != "result"}


# ---------------------------------------------------------------------------------------------- report


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def render_markdown(p: dict[str, Any]) -> str:
    L = ["# Decode time: ratios to `np.mean(G, axis=0)` measured in the same process", "",
         f"Command: `{p['command']}`", "",
         f"float32; median of {p['config']['repeats']} calls, each interleaved with a call of `np.mean(G, axis=0)` "
         f"on the same matrix; BLAS threads: {p['config']['blas_threads']} (except the threads section); device: "
         f"{p['config']['device']}; machine: {p['machine']} (shared with other jobs: absolute times vary, ratios "
         f"are the comparable quantity). `rge-fast` = RGE(sketch_dim={FAST['sketch_dim']} (1024 from R=500), "
         f"spectral_above={FAST['spectral_above']}, threshold_factor={FAST['threshold_factor']}).", ""]
    s = p["sections"]
    if "small" in s:
        sm = s["small"]
        L += [f"## App size: R = {sm['R']}, d = {sm['d']}, 4 attackers sending -5x a peer's gradient "
              f"({sm['rounds']} digits rounds)", "",
              "Wall time per decode, and CPU time (`time.process_time`: the decode's own cost, without the time "
              "spent waiting for a core on this shared machine).", "",
              "| rule | ms / decode (median) | p90 | max | CPU ms (median) | CPU ms p90 | ratio to np.mean (median) | "
              "Byzantine kept (mean) | honest dropped (mean) | solver iterations (median) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in sm["rules"].items():
            L.append(f"| {n} | {r['ms_median']:.2f} | {r['ms_p90']:.2f} | {r['ms_max']:.2f} | {r['cpu_ms_median']:.2f} | "
                     f"{r['cpu_ms_p90']:.2f} | {r['ratio_median']:.0f}x | "
                     f"{r['byzantine_kept_mean']:.2f} | {r['honest_dropped_mean']:.2f} | "
                     f"{r['solver_iterations_median']:.0f} |")
        L.append("")
    for key, title in (("large", "R = 100, d = 1e6, 20 attackers"), ("xlarge", "R = 1000, d = 1e5, 200 attackers")):
        if key not in s:
            continue
        L += [f"## {title}", "", "| attack | rule | time | ratio to np.mean | Byzantine kept | honest dropped | "
              "Gram/sketch part | filter part |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for c in s[key]:
            L.append(f"| {c['attack']} | np.mean | {_fmt_s(c['np_mean_seconds'])} | 1.0x | | | | |")
            for n, r in c["rules"].items():
                L.append(f"| {c['attack']} | {n} | {_fmt_s(r['seconds'])} | {r['ratio']:.1f}x | "
                         f"{r.get('byzantine_kept', '')} | {r.get('honest_dropped', '')} | "
                         f"{_fmt_s(r.get('gram_seconds')) if r.get('gram_seconds') else ''} | "
                         f"{_fmt_s(r.get('filter_seconds')) if r.get('filter_seconds') else ''} |")
        L.append("")
    if "grid" in s:
        cases = s["grid"]
        cols = [f"R={c['R']}, d={c['d']:.0e}" for c in cases]
        L += ["## Every rule (f = 0.2 R rows on a common 2 sqrt(d) shift)", "",
              "Cell: ratio to np.mean (time) [ours / best numpy formulation of the same rule].", "",
              "| rule | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
              "| np.mean | " + " | ".join(_fmt_s(c["np_mean_seconds"]) for c in cases) + " |"]
        for n in cases[0]["rules"]:
            cells = []
            for c in cases:
                r = c["rules"][n]
                if r.get("seconds") is None:
                    cells.append("n/a")
                    continue
                vs = f" [{r['vs_best_numpy']:.2f}x]" if "vs_best_numpy" in r else ""
                cells.append(f"{r['ratio']:.1f}x ({_fmt_s(r['seconds'])}){vs}")
            L.append(f"| {n} | " + " | ".join(cells) + " |")
        L += ["", "Byzantine rows kept: " + "; ".join(
            f"R={c['R']}, d={c['d']:.0e}: " + ", ".join(f"{n}={r['byzantine_kept']}" for n, r in c["rules"].items()
                                                    if r.get("byzantine_kept") is not None) for c in cases), ""]
    if "randk" in s:
        r = s["randk"]
        L += [f"## randk: R = {r['R']}, d = {r['d']:.0e}, k = d/100 (attacked)", "",
              f"RGE on the uncompressed round {_fmt_s(r['uncompressed']['seconds'])}, on the randk round "
              f"{_fmt_s(r['compressed']['seconds'])}: **{r['speedup']:.1f}x** faster.", ""]
    if "threads" in s:
        L += ["## BLAS threads: 1 vs 2 (process limit)", "", "| rule | 1 thread | 2 threads | 2 / 1 |",
              "|---|---:|---:|---:|"]
        for r in s["threads"]:
            L.append(f"| {r['rule']} | {_fmt_s(r['threads_1']['seconds'])} | {_fmt_s(r['threads_2']['seconds'])} | "
                     f"{r['slowdown_2_vs_1']:.2f} |")
        L.append("")
    if "defence" in s:
        L += ["## The default defence with node ids (warm memory) against its RGE filter alone", "",
              f"`rge` = `build_for_federation('rge', R, 0.2)` called with node ids after {DEFENCE_WARM} rounds of the "
              "same nodes; f = 0.2 R far attackers; filter alone = the RGE it runs (`filter_for`: sketched and "
              "spectral from 2^20 entries or 65 rows on, sketch length 1024 from 500 rows), on the same rounds; "
              "clean rounds = the default defence on rounds of the same size without attackers (its own memory; its "
              "ratio to the np.mean calls interleaved with it, whose median is in brackets).", "",
              "| R | d | np.mean | default defence | ratio | filter alone | ratio | sketched | excluded by the evidence | "
              "Byzantine kept | honest dropped | clean rounds: defence | ratio | honest dropped |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["defence"]:
            clean = r.get("clean")
            tail = (f"{_fmt_s(clean['seconds'])} [{_fmt_s(clean.get('np_mean_seconds'))}] | {clean['ratio']:.1f}x | "
                    f"{r['clean_honest_dropped']} |" if clean else "n/a | n/a | n/a |")
            L.append(f"| {r['R']} | {r['d']:.0e} | {_fmt_s(r['np_mean_seconds'])} | {_fmt_s(r['defence']['seconds'])} | "
                     f"{r['defence']['ratio']:.1f}x | {_fmt_s(r['filter']['seconds'])} | {r['filter']['ratio']:.1f}x | "
                     f"{'yes' if r['sketched'] else 'no'} | {r['suspected']} | {r['byzantine_kept']} | "
                     f"{r['honest_dropped']} | " + tail)
        L.append("")
    if "agreement" in s:
        a = s["agreement"]
        by: dict[str, list[bool]] = {}
        for r in a["rows"]:
            by.setdefault(r["attack"], []).append(r["identical"])
        L += [f"## Sketched vs exact filter: identical kept sets (R = {a['R']}, d = {a['d']:.0e})", "",
              f"{100 * a['identical_fraction']:.0f} % of {a['rounds']} rounds; per attack: "
              + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by.items()) + ".", ""]
    return "\n".join(L)


def plot(p: dict[str, Any], path: Path) -> Path:
    """Bars of the ratio to np.mean (log scale): the grid's rules and the large cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, dict[str, float]]] = []
    for c in p["sections"].get("grid", []):
        groups.append((f"R={c['R']}, d={c['d']:.0e}", {n: r["ratio"] for n, r in c["rules"].items() if r.get("ratio")}))
    for key in ("large", "xlarge"):
        for c in p["sections"].get(key, []):
            groups.append((f"R={c['R']}, d={c['d']:.0e}, {c['attack']}", {n: r["ratio"] for n, r in c["rules"].items()}))
    fig, ax = plt.subplots(figsize=(12, 5))
    names = sorted({n for _, g in groups for n in g})
    width = 0.8 / max(len(groups), 1)
    for j, (label, g) in enumerate(groups):
        ax.bar(np.arange(len(names)) + (j - (len(groups) - 1) / 2) * width, [g.get(n, 0.0) for n in names], width,
               label=label)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("decode time / np.mean(G, axis=0)")
    ax.set_title("Decode time relative to np.mean (same process, float32)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_defence(p: dict[str, Any], path: Path) -> Path | None:
    """Bars of the default defence's ratio to np.mean (warm memory, node ids) next to its filter alone."""
    rows = p["sections"].get("defence")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [r["defence"]["ratio"] for r in rows], 0.27, label="default defence (node ids, warm memory)")
    ax.bar(x, [r["filter"]["ratio"] for r in rows], 0.27, label="its RGE filter alone")
    ax.bar(x + 0.27, [r["clean"]["ratio"] if "clean" in r else 0.0 for r in rows], 0.27,
           label="default defence on clean rounds")
    ax.set_xticks(x, [f"R={r['R']}\nd={r['d']:.0e}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(5.0, color="r", lw=0.8, ls="--", label="5x (issue 12 target)")
    ax.set_ylabel("decode time / np.mean(G, axis=0)")
    ax.set_title("Default defence decode time relative to np.mean (same process, float32, 1 BLAS thread)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes everywhere")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--flower", action="store_true", help="add Flower's strategies to the grid")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (rules run on torch CUDA tensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from threadpoolctl import threadpool_limits

    try:
        import torch

        torch.set_num_threads(args.blas_threads)
        if args.device != "cpu" and not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA device available", file=sys.stderr)
            return 2
    except ImportError:  # pragma: no cover
        pass
    t0 = time.time()
    sections: dict[str, Any] = {}
    with threadpool_limits(limits=args.blas_threads):
        if "small" in args.sections:
            sections["small"] = section_small(args)
        if "large" in args.sections:
            sections["large"] = section_scale(args, *((40, 100_000) if args.quick else (100, 1_000_000)), exact=True)
        if "xlarge" in args.sections:
            sections["xlarge"] = section_scale(args, *((200, 20_000) if args.quick else (1000, 100_000)), exact=False)
        if "grid" in args.sections:
            sections["grid"] = section_grid(args)
        if "randk" in args.sections and args.device == "cpu":
            sections["randk"] = section_randk(args)
        if "agreement" in args.sections and args.device == "cpu":
            sections["agreement"] = section_agreement(args)
        if "defence" in args.sections and args.device == "cpu":
            sections["defence"] = section_defence(args)
    if "threads" in args.sections and args.device == "cpu":
        sections["threads"] = section_threads(args)
    command = ("python -m benchmarks.decode_time " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    previous = args.out / "decode_time.json"
    if set(args.sections) != set(SECTIONS) and previous.exists():
        # a partial run replaces its sections in the last full run's results (same config, one file)
        old = json.loads(previous.read_text())
        merged = dict(old.get("sections", {}))
        merged.update(sections)
        sections = merged
        command = old.get("command", command) + f"; then {command}"
    payload = {
        "command": command,
        "config": {"eps": args.eps, "repeats": max(args.repeats, 5), "blas_threads": args.blas_threads,
                   "device": args.device, "seed": args.seed, "dtype": "float32", "quick": args.quick,
                   "fast_rge": FAST},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}",
        "sections": sections,
        "wall_seconds": time.time() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_time.json").write_text(json.dumps(payload, indent=1, default=float))
    md = render_markdown(payload) + f"\nWall time: {payload['wall_seconds']:.0f} s.\n"
    (args.out / "decode_time.md").write_text(md)
    plot(payload, args.out / "decode_time.png")
    plot_defence(payload, args.out / "decode_time_defence.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

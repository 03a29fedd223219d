"""randk compression benchmark (Data & Diggavi, Section 5, Algorithm 2).

Two experiments, one command::

    python -m benchmarks.randk [--quick] [--out DIR]

(a) **Decode time.**  RGE (Algorithm 3) on R uncompressed gradients (an ``R x d``
    matrix) versus the same round compressed to ``k = d/10`` and ``k = d/100``
    coordinates (``R x k``).  The paper's cost model (O(R) SVDs of ``d x R``
    matrices) predicts a ``d/k`` speed-up.  Our RGE already touches ``d`` only once
    (one centred Gram product, O(d R^2)) and then filters in ``R x R`` space, so the
    speed-up is ``d/k`` on the Gram part and bounded by the (d-independent) filter
    cost overall; both are reported.

(b) **"Compression for free".**  Section 6's synthetic linear-regression model
    (:class:`flwr_byzantine.data.synthetic.SyntheticHeterogeneous`) with R workers of
    which ``eps R`` are Byzantine.  Algorithm 1 (uncompressed) and Algorithm 2 (randk
    with ``k >= (1 - eps) R``, plus a smaller and a larger k for contrast) run for the
    same number of rounds with the same math as
    :class:`~flwr_byzantine.strategies.RobustSGD`: ``K_t`` from ``randk-v1``
    (:func:`~flwr_byzantine.compression.draw_coordinates`), honest rows
    ``(d/k) p_r[K_t]`` (:func:`~flwr_byzantine.compression.randk_compress`) as
    float32, RGE on the ``R x k`` matrix, and ``x[K_t] -= eta * g_hat``.  Attacks
    (implemented here, in the compressed domain, knowing ``K_t`` and the honest rows
    of the round): ALIE-like (every Byzantine sends ``mean - z std`` of the honest
    rows, coordinate-wise) and sign flip (``-scale * mean`` of the honest rows).
    The sign flip sends ``-4`` times the honest mean from 4 of 20 workers, so an unfiltered
    round's mean is exactly zero and the iterate moves only in rounds where RGE drops an
    attacker: its runs need the full ``d/k`` times more rounds before the last quarter is a floor
    (``python -m benchmarks.paper_figures --only randk``, docs/paper_claims.md).
    Reported: ``||x_T - x*||``, its floor (mean over the last quarter of the rounds),
    uplink bytes per round, and the rounds (and uplink bytes) each run needs to come
    within 10 % of its own floor.  Optional: randk with error feedback at
    ``k = (1 - eps) R`` (honest workers send ``(p_r + e_r)[K_t]`` unscaled and keep
    the unsent rest ``e_r``; same step ``eta * k / d``: with ``eta`` it diverges).

    Step size: the randk estimator's second moment is ``d/k`` times that of the
    gradient it compresses, so Algorithm 2 uses ``eta_k = eta * k / d`` (the largest
    step with the same per-round stability as Algorithm 1's ``eta``; with ``eta``
    itself it diverges for ``k << d``).  Consequently Algorithm 2 needs about ``d/k``
    times more rounds to reach its floor; the rounds are chosen so that every run
    reaches it, and the floor is what the paper's claim is about.

Outputs under ``--out`` (default ``benchmarks/results``): ``randk.json``, ``randk.md``
(the markdown tables, also printed), ``randk_decode.png``, ``randk_convergence.png``,
``randk_bytes.png``.  Timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flwr_byzantine.aggregators import RGE, Aggregator
from flwr_byzantine.compression import draw_coordinates, randk_compress

# --------------------------------------------------------------------------- helpers


def payload_bytes(k: int) -> int:
    """Uplink bytes of one client reply carrying k float32 values, as RobustSGD counts them."""
    from flwr.app import Array  # local import: only the byte count needs Flower

    return len(Array(np.zeros(k, np.float32)).data)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------ (a) decode time


def round_matrix(R: int, d: int, num_byzantine: int, seed: int) -> np.ndarray:
    """One round's ``R x d`` float32 gradients: honest = common mean + noise, Byzantine = shifted."""
    rng = np.random.default_rng([seed, d])
    mean = rng.standard_normal(d).astype(np.float32)
    G = mean + rng.standard_normal((R, d), dtype=np.float32)
    G[:num_byzantine] = mean - 3.0 * (G[num_byzantine:].mean(axis=0) - mean) + 0.5  # a colluding shift
    return G


def time_rge(G: np.ndarray, repeats: int) -> dict[str, float]:
    """Median wall time of ``RGE().aggregate(G)`` and of its Gram and filter parts."""
    agg = RGE(eps_tilde=0.25)
    totals, grams, filters = [], [], []
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = agg.aggregate(G)
        totals.append(time.perf_counter() - t0)
        grams.append(res.info["gram_seconds"])
        filters.append(res.info["filter_seconds"])
    assert res is not None
    return {"total_s": float(np.median(totals)), "gram_s": float(np.median(grams)),
            "filter_s": float(np.median(filters)), "kept": len(res.kept)}


def decode_benchmark(R: int, dims: list[int], divisors: list[int], repeats: int, seed: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for d in dims:
        G = round_matrix(R, d, R // 10, seed)
        base = time_rge(G, repeats)
        rows.append({"R": R, "d": d, "k": d, "divisor": 1, **base, "speedup_total": 1.0, "speedup_gram": 1.0})
        log(f"  decode d={d:>8} k={d:>8}: {1e3 * base['total_s']:8.1f} ms (gram {1e3 * base['gram_s']:.1f} ms)")
        for div in divisors:
            k = max(d // div, 1)
            K = draw_coordinates(d, k, seed, 1)
            Gk = randk_compress(G, K).astype(np.float32)  # what the server receives (R x k)
            t = time_rge(Gk, repeats)
            rows.append({"R": R, "d": d, "k": k, "divisor": div, **t,
                         "speedup_total": base["total_s"] / t["total_s"],
                         "speedup_gram": base["gram_s"] / max(t["gram_s"], 1e-9)})
            log(f"  decode d={d:>8} k={k:>8}: {1e3 * t['total_s']:8.1f} ms (gram {1e3 * t['gram_s']:.2f} ms), "
                f"x{base['total_s'] / t['total_s']:.1f} total, x{base['gram_s'] / max(t['gram_s'], 1e-9):.0f} gram")
        del G
    return rows


# ------------------------------------------------------- (b) compression for free


def attack_rows(name: str, honest: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Byzantine rows crafted in the compressed domain from the honest rows of the round.

    ``alie``: every row ``mean - 1.5 std`` (coordinate-wise); ``alie-zmax``: the same with
    Baruch et al.'s ``z_max`` (:class:`~flwr_byzantine.attacks.ALIE`, about 0.39 for 4 of 20);
    ``sign-flip``: ``-4 mean``.
    """
    if name == "none" or num_byzantine == 0:
        return np.zeros((0, honest.shape[1]), dtype=honest.dtype)
    if name == "alie-zmax":  # ALIE with Baruch et al.'s z_max for R = honest + Byzantine workers
        from flwr_byzantine.attacks import make_attack

        R = honest.shape[0] + num_byzantine
        return np.asarray(make_attack("alie", num_workers=R).craft(honest, num_byzantine), dtype=honest.dtype)
    mu = honest.mean(axis=0)
    if name == "alie":
        row = mu - 1.5 * honest.std(axis=0)
    elif name == "sign-flip":
        row = -4.0 * mu  # with 4 of 20 Byzantine the mean of all rows is exactly 0
    else:
        raise ValueError(f"unknown attack {name!r}")
    return np.repeat(row[None, :], num_byzantine, axis=0)


class LinRegFederation:
    """Honest workers' data of the synthetic model, stacked for vectorised mini-batch gradients."""

    def __init__(self, synth: Any, honest_ids: list[int]) -> None:
        data = [synth.worker_data(r) for r in honest_ids]
        n = min(len(y) for _, y in data)
        self.X = np.stack([X[:n] for X, _ in data]).astype(np.float64)  # (H, n, d)
        self.y = np.stack([y[:n] for _, y in data]).astype(np.float64)  # (H, n)
        self.n = n

    def gradients(self, x: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
        """Mini-batch gradients (H, d), each worker's batch drawn without replacement (``b >= n``: full batch)."""
        H = self.X.shape[0]
        if b >= self.n:
            return np.einsum("hnd,hn->hd", self.X, np.einsum("hnd,d->hn", self.X, x) - self.y) / self.n
        idx = rng.random((H, self.n)).argsort(axis=1)[:, :b]
        Xb = np.take_along_axis(self.X, idx[:, :, None], axis=1)
        yb = np.take_along_axis(self.y, idx, axis=1)
        resid = np.einsum("hbd,d->hb", Xb, x) - yb
        return np.einsum("hbd,hb->hd", Xb, resid) / b


def run_sgd(fed: LinRegFederation, x_star: np.ndarray, *, k: int, rounds: int, lr: float, batch: int,
            num_byzantine: int, attack: str, seed: int, error_feedback: bool = False,
            aggregator: Aggregator | None = None) -> dict[str, Any]:
    """Algorithm 1 (k = d) or Algorithm 2 (k < d) in-process; returns the error per round.

    ``aggregator`` defaults to the paper's RGE (Algorithm 3, ``eps_tilde = 0.25``).  Rows carry
    stable node ids (Byzantine rows first); as in :class:`~flwr_byzantine.strategies.RobustSGD`,
    rounds with ``k = d`` pass them as ``client_ids`` and report the step taken through
    ``observe_step`` (rules with memory use both), compressed rounds pass neither.
    """
    d = x_star.size
    H = fed.X.shape[0]
    x = np.zeros(d)  # x_0 = 0 as in the paper
    rng = np.random.default_rng([seed, 7])
    memory = np.zeros((H, d))
    agg = RGE(eps_tilde=0.25) if aggregator is None else aggregator
    nb_rows = num_byzantine if attack != "none" else 0
    node_ids = list(range(nb_rows + H)) if k == d else None
    errors = [float(np.linalg.norm(x - x_star))]
    filtered_byz, filtered_honest = 0, 0
    for t in range(1, rounds + 1):
        K = draw_coordinates(d, k, seed, t)
        g = fed.gradients(x, batch, rng)
        if error_feedback:
            p = g + memory
            honest = p[:, K]  # unscaled: the residual is sent later instead
            memory = p
            memory[:, K] = 0.0
        else:
            honest = randk_compress(g, K, d)
        honest = honest.astype(np.float32)
        G = np.concatenate([attack_rows(attack, honest, num_byzantine), honest]).astype(np.float32)
        res = agg.aggregate(G, client_ids=node_ids)
        dropped = set(int(i) for i in res.dropped)
        filtered_byz += sum(1 for i in dropped if i < num_byzantine and attack != "none")
        filtered_honest += sum(1 for i in dropped if i >= (num_byzantine if attack != "none" else 0))
        step = lr * np.asarray(res.estimate, dtype=np.float64)
        x[K] -= step
        if node_ids is not None and hasattr(agg, "observe_step"):
            agg.observe_step(-step)
        errors.append(float(np.linalg.norm(x - x_star)))
        if not np.isfinite(errors[-1]) or errors[-1] > 1e6:
            errors += [float("inf")] * (rounds - t)
            break
    R = H + (num_byzantine if attack != "none" else 0)
    return {"errors": errors, "bytes_up_per_round": R * payload_bytes(k), "value_bytes_per_round": R * 4 * k,
            "filtered_byzantine_per_round": filtered_byz / rounds,
            "filtered_honest_per_round": filtered_honest / rounds}


def free_compression_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from flwr_byzantine.data.synthetic import SyntheticHeterogeneous

    d, R, eps = args.d, args.workers, args.eps
    nb = int(round(eps * R))
    k_free = int(np.ceil((1 - eps) * R))  # k >= (1 - eps) R
    ks = sorted({d, 2 * k_free, k_free, max(k_free // 4, 1)}, reverse=True)
    synth = SyntheticHeterogeneous(d, R, args.n_per_worker, kappa_mean=args.kappa, noise_std=args.noise,
                                   task="linreg", seed=args.seed)
    x_star = synth.global_optimum()
    runs = []
    for attack in args.attacks:
        nb_eff = 0 if attack == "none" else nb
        honest_ids = list(range(nb_eff, R))  # workers 0..nb-1 are the Byzantine ones
        fed = LinRegFederation(synth, honest_ids)
        variants = [(k, False) for k in ks] + ([(k_free, True)] if args.error_feedback else [])
        for k, ef in variants:
            lr = args.lr * k / d
            for s in range(args.seeds):
                t0 = time.perf_counter()
                out = run_sgd(fed, x_star, k=k, rounds=args.rounds, lr=lr, batch=args.batch,
                              num_byzantine=nb_eff, attack=attack, seed=args.seed * 1000 + s, error_feedback=ef)
                errs = np.asarray(out["errors"])
                tail = errs[-max(args.rounds // 4, 1):]
                reached = np.flatnonzero(errs <= 1.1 * tail.mean())
                to_floor = int(reached[0]) if reached.size else args.rounds
                runs.append({
                    "attack": attack, "k": k, "error_feedback": ef, "seed": s, "lr": lr,
                    "algorithm": "Alg. 1" if k == d else ("Alg. 2 + EF" if ef else "Alg. 2"),
                    "final_error": float(errs[-1]), "floor_error": float(tail.mean()),
                    "bytes_up_per_round": out["bytes_up_per_round"],
                    "value_bytes_per_round": out["value_bytes_per_round"],
                    "rounds_to_floor": to_floor,
                    "bytes_up_to_floor": to_floor * out["bytes_up_per_round"],
                    "bytes_up_total": out["bytes_up_per_round"] * args.rounds,
                    "filtered_byzantine_per_round": out["filtered_byzantine_per_round"],
                    "filtered_honest_per_round": out["filtered_honest_per_round"],
                    "errors": [float(e) for e in errs], "seconds": time.perf_counter() - t0,
                })
                log(f"  {attack:>9} k={k:>4}{' EF' if ef else '   '} seed {s}: final {errs[-1]:.4f}, floor "
                    f"{tail.mean():.4f}, filtered byz/honest per round {out['filtered_byzantine_per_round']:.2f}/"
                    f"{out['filtered_honest_per_round']:.2f} ({time.perf_counter() - t0:.1f} s)")
    return {"d": d, "R": R, "eps": eps, "num_byzantine": nb, "k_free": k_free, "ks": ks,
            "rounds": args.rounds, "batch": args.batch, "lr_alg1": args.lr, "kappa_mean": args.kappa,
            "noise_std": args.noise, "n_per_worker": args.n_per_worker,
            "x_star_norm": float(np.linalg.norm(x_star)), "runs": runs}


# ------------------------------------------------------------------ tables and plots


def decode_table(rows: list[dict[str, Any]]) -> str:
    out = ["| R | d | k | RGE decode (ms) | Gram part (ms) | filter part (ms) | speed-up total | speed-up Gram |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['R']} | {r['d']:,} | {r['k']:,} | {1e3 * r['total_s']:.1f} | {1e3 * r['gram_s']:.2f} | "
                   f"{1e3 * r['filter_s']:.1f} | {r['speedup_total']:.1f}x | {r['speedup_gram']:.0f}x |")
    return "\n".join(out)


def _group(runs: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["attack"], r["k"], r["error_feedback"]), []).append(r)
    return groups


def free_table(res: dict[str, Any]) -> str:
    d, kf = res["d"], res["k_free"]
    out = ["| attack | algorithm | k | k/d | step eta | final ‖x_T − x*‖ | floor (last 25 %) | "
           "Byz. filtered / round | honest filtered / round | uplink / round (values only) | "
           "rounds to floor (1.1x) | uplink to floor |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (attack, k, ef), rs in _group(res["runs"]).items():
        fin = np.array([r["final_error"] for r in rs])
        flo = np.array([r["floor_error"] for r in rs])
        note = " (= (1-eps)R)" if k == kf and not ef else ""
        pm = (lambda a: f"{a.mean():.4f} ± {a.std():.4f}") if len(rs) > 1 else (lambda a: f"{a.mean():.4f}")
        out.append(
            f"| {attack} | {rs[0]['algorithm']} | {k}{note} | {k / d:.3f} | {rs[0]['lr']:.4g} | {pm(fin)} | {pm(flo)} | "
            f"{np.mean([r['filtered_byzantine_per_round'] for r in rs]):.2f} | "
            f"{np.mean([r['filtered_honest_per_round'] for r in rs]):.2f} | "
            f"{_fmt_bytes(rs[0]['bytes_up_per_round'])} ({_fmt_bytes(rs[0]['value_bytes_per_round'])}) | "
            f"{np.mean([r['rounds_to_floor'] for r in rs]):.0f} | "
            f"{_fmt_bytes(np.mean([r['bytes_up_to_floor'] for r in rs]))} |")
    return "\n".join(out)


def make_plots(out_dir: Path, decode_rows: list[dict[str, Any]], free: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if decode_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for d in sorted({r["d"] for r in decode_rows}):
            rs = sorted((r for r in decode_rows if r["d"] == d), key=lambda r: r["k"])
            ax.plot([r["k"] for r in rs], [1e3 * r["total_s"] for r in rs], "o-", label=f"total, d={d:,}")
            ax.plot([r["k"] for r in rs], [1e3 * r["gram_s"] for r in rs], "s--", label=f"Gram part, d={d:,}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (coordinates per client)")
        ax.set_ylabel("RGE decode time (ms)")
        ax.set_title(f"RGE decode time, R={decode_rows[0]['R']} (k = d: uncompressed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "randk_decode.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))
    if free and free["runs"]:
        attacks = list(dict.fromkeys(r["attack"] for r in free["runs"]))
        groups = _group(free["runs"])
        for kind in ("convergence", "bytes"):
            fig, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4), squeeze=False)
            for ax, attack in zip(axes[0], attacks):
                for (a, k, ef), rs in groups.items():
                    if a != attack:
                        continue
                    errs = np.array([r["errors"] for r in rs])
                    med = np.median(errs, axis=0)
                    t = np.arange(med.size)
                    xs = t if kind == "convergence" else t * rs[0]["bytes_up_per_round"] / 2**20
                    label = f"{rs[0]['algorithm']}, k={k}" + (" = (1-eps)R" if k == free["k_free"] and not ef else "")
                    ax.plot(xs, med, label=label, lw=1.2)
                ax.set_yscale("log")
                ax.set_xlabel("round" if kind == "convergence" else "cumulative uplink (MiB, incl. npy headers)")
                ax.set_ylabel("||x_t - x*||")
                ax.set_title(f"attack: {attack} ({0 if attack == 'none' else free['num_byzantine']}/{free['R']} Byzantine)")
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize=7)
            fig.suptitle(f"Synthetic linear regression, d={free['d']}, R={free['R']}, b={free['batch']}", fontsize=10)
            fig.tight_layout()
            p = out_dir / f"randk_{kind}.png"
            fig.savefig(p, dpi=120)
            plt.close(fig)
            paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.randk", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: d=1e5 only for decode, fewer rounds, 1 seed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-free", action="store_true")
    ap.add_argument("--decode-R", type=int, default=100)
    ap.add_argument("--decode-dims", type=int, nargs="+", default=None, help="default 1e5 and 1e6 (1e5 with --quick)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--d", type=int, default=200)
    ap.add_argument("--workers", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--n-per-worker", type=int, default=500)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--kappa", type=float, default=0.3)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.2, help="Algorithm 1 step; Algorithm 2 uses lr * k / d")
    ap.add_argument("--rounds", type=int, default=None, help="default 800 (300 with --quick)")
    ap.add_argument("--seeds", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--attacks", nargs="+", default=["none", "alie", "sign-flip"])
    ap.add_argument("--no-error-feedback", dest="error_feedback", action="store_false")
    args = ap.parse_args(argv)
    if args.decode_dims is None:
        args.decode_dims = [100_000] if args.quick else [100_000, 1_000_000]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.rounds is None:
        args.rounds = 300 if args.quick else 800
    if args.seeds is None:
        args.seeds = 1 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    result: dict[str, Any] = {
        "benchmark": "randk", "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    decode_rows: list[dict[str, Any]] = []
    if not args.skip_decode:
        log(f"(a) RGE decode time, R={args.decode_R}, d in {args.decode_dims}")
        decode_rows = decode_benchmark(args.decode_R, args.decode_dims, [10, 100], args.repeats, args.seed, log)
    result["decode"] = decode_rows
    free = None
    if not args.skip_free:
        log(f"(b) compression for free: d={args.d}, R={args.workers}, eps={args.eps}, rounds={args.rounds}")
        free = free_compression_benchmark(args, log)
    result["free"] = free
    result["wall_seconds"] = time.time() - t0

    md = ["# randk benchmark (Algorithm 2)", ""]
    if decode_rows:
        md += ["## (a) RGE decode time, uncompressed (k = d) versus randk", "", decode_table(decode_rows), ""]
    if free:
        md += [f"## (b) Compression for free: synthetic linear regression, d={free['d']}, R={free['R']}, "
               f"{free['num_byzantine']} Byzantine (eps={free['eps']}), b={free['batch']}, {free['rounds']} rounds, "
               f"kappa_mean={free['kappa_mean']}, ||x*||={free['x_star_norm']:.2f}, {args.seeds} seed(s)", "",
               free_table(free), ""]
    md.append(f"Load average at start: {result['machine']['load_average']}; wall time {result['wall_seconds']:.0f} s.")
    text = "\n".join(md)
    log("\n" + text)
    (out_dir / "randk.md").write_text(text + "\n", encoding="utf-8")
    result["plots"] = make_plots(out_dir, decode_rows, free)
    if free:  # keep the JSON small: the error curves every few rounds, 5 significant digits
        step = max(len(free["runs"][0]["errors"]) // 200, 1) if free["runs"] else 1
        free["errors_every_rounds"] = step
        for run in free["runs"]:
            run["errors"] = [float(f"{e:.5g}") for e in run["errors"][::step]]
    with open(out_dir / "randk.json", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, default=float)
    log(f"wrote {out_dir / 'randk.json'}, {out_dir / 'randk.md'} and {len(result['plots'])} plot(s)")
    return result


if __name__ == "__main__":
    main()

"""Deployment benchmark: a real SuperLink + N SuperNodes on 127.0.0.1, with node crashes and a SuperLink crash.

One command (the venv's ``bin`` goes on ``PATH`` by itself, see
:mod:`flwr_byzantine.deploy.local`)::

    nice -n 5 python -m benchmarks.deployment [--nodes 20] [--attackers 4] [--rounds 5] [--out DIR]

It provisions the nodes' data (``python -m flwr_byzantine.data.cache``: the
partition cache the ClientApps read, so even round 1 skips scikit-learn), starts a
SuperLink (``--insecure``; in-memory state, ``--database`` for SQLite: with 20
SuperNodes on a loaded 2-core machine Flower's SQLite state hit ``database is
locked`` errors, lost replies and stalled rounds for minutes) and
``--nodes`` SuperNodes; the first ``--attackers`` partitions are malicious by node
config (``malicious=true attack='scaled-negative'``, so the server is told
nothing: run config ``num-malicious=0``).  Three runs of the default App
(``num-server-rounds = --rounds``, ``checkpoint = true``, ``reply-timeout =
--reply-timeout``) follow on the same deployment:

1. ``reference``: uninterrupted;
2. ``node-churn``: after round 1 ``--kill`` honest SuperNodes are killed with
   SIGKILL, after round 3 they are started again (new node ids, same node config);
3. ``superlink-restart``: after round 2 the SuperLink (with its SuperExec and
   ServerApp processes) is killed with SIGKILL, started again on the same port (and
   database); without a database the SuperNodes cannot continue their sessions and are
   all started again, as a supervisor would; with ``--database`` they keep their sessions
   and node ids, and the crashed run (still ``running`` in the database) is stopped with
   ``flwr stop`` first (:meth:`~flwr_byzantine.deploy.local.LocalDeployment.stop_crashed_run`);
   the same ``flwr run`` resumes from the checkpoint.

Recorded (``deployment.json`` and ``deployment.png`` in ``--out``, default
``benchmarks/results``): start-up time (SuperLink start until every SuperNode is
online), per run the wall time from ``flwr run`` to ``finished:completed``, the
ServerApp's own per-round seconds (``reply_seconds`` + ``decode_seconds``), the
erasures (rejections by kind) per round, the filtered nodes against the malicious
ones (node ids from each SuperNode's log, i.e. from node config, not from what a
client claims), the peak PSS and RSS summed over every process of the deployment
(``/proc/PID/smaps_rollup``, sampled every ``--memory-interval`` s, default 2; at the PSS
peak also per kind of process) and the final model of each run (``superlink-restart`` against ``reference``:
maximum absolute difference).  A run's wall time ends at the SuperLink's ``finished-at``
(whole seconds, + 1 s) or when the benchmark's ``flwr ls`` poll saw the status, whichever
is earlier; the poll's time is kept as ``wall_seconds_flwr_run_to_status_seen``.
Every process is started in its own process group and killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flwr_byzantine.deploy.local import LocalDeployment, MemorySampler, load_model, process_kind, read_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
GIB = 1024.0**3
GB = 1e9  # the target is 6 GB (decimal) of PSS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat", encoding="utf-8") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(dep: LocalDeployment) -> dict[str, float]:
    """CPU seconds of this benchmark and of the deployment's processes by kind, including reaped descendants.

    ``{kind: seconds}`` over the live processes (:func:`process_kind`), each counting its own
    ``utime + stime``; ``"<kind> children"`` is what its reaped children used (``cutime +
    cstime``: a finished ClientApp is in its SuperExec's), ``"benchmark"`` this process with
    its reaped children (the ``flwr`` CLI calls).
    """
    hz = os.sysconf("SC_CLK_TCK")
    out = {"benchmark": sum(os.times()[:4])}
    for pid in dep.pids():
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                stat = fh.read()
            f = stat[stat.rindex(")") + 2:].split()
            own, children = (int(f[11]) + int(f[12])) / hz, (int(f[13]) + int(f[14])) / hz
        except (OSError, ValueError, IndexError):
            continue
        kind = process_kind(pid)
        out[kind] = out.get(kind, 0.0) + own
        out[f"{kind} children"] = out.get(f"{kind} children", 0.0) + children
    return out


def clientapp_import_cpu_seconds(repeats: int = 3) -> float:
    """Median CPU seconds of a fresh process importing what ``flwr-clientapp`` imports.

    A ClientApp process costs about this (the App's own part is a few hundredths), so it
    calibrates a run: the same deployment on a busier or slower machine shows a larger value.
    """
    code = "import flwr.supernode.cli, flwr.supernode.runtime.run_clientapp"
    costs = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        costs.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return round(float(np.median(costs)), 3)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` per key (a process that appeared counts from 0), rounded; zeros dropped."""
    out = {k: round(v - before.get(k, 0.0), 1) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v > 0}


def summarise(res: dict[str, Any], malicious_ids: set[int], wall: float, num_attackers: int) -> dict[str, Any]:
    """Per-round view of a results file: seconds, erasures, filtered vs malicious nodes.

    A round filters exactly the attackers if it filters ``num_attackers`` nodes, all in
    ``malicious_ids`` (which may hold the old and new ids of restarted attackers).
    """
    rounds = []
    for rep in res["rounds"]:
        counts = {k: v for k, v in rep.get("rejection_counts", {}).items() if v}
        rounds.append({
            "round": rep["server_round"],
            "seconds": round(float(rep.get("reply_seconds", 0.0)) + float(rep["decode_seconds"]), 3),
            "decode_seconds": round(float(rep["decode_seconds"]), 4),
            "sampled": len(rep["sampled"]), "accepted": len(rep["accepted"]),
            "erasures": counts,
            "filtered_node_ids": sorted(int(n) for n in rep["filtered"]),
            "filtered_exactly_the_attackers": (len(set(rep["filtered"])) == num_attackers
                                               and set(int(n) for n in rep["filtered"]) <= malicious_ids),
            "accepted_node_ids": sorted(int(n) for n in rep["accepted"]),
        })
    return {
        "run_id": res["run_id"], "wall_seconds_flwr_run_to_finished": round(wall, 2),
        "server_wall_seconds": round(float(res["wall_seconds"]), 2),
        "rounds_seconds_sum": round(sum(r["seconds"] for r in rounds), 2),
        "final_accuracy": res["final_accuracy"], "resumed_from_round": res["resumed_from_round"],
        "rounds": rounds,
    }


def filtering_check(run: dict[str, Any]) -> None:
    """Add, per round, whether the filtered nodes are exactly the attackers among the valid replies.

    ``filtered_exactly_the_attackers`` asks for all attackers; when replies are missing the
    fair question is ``filtered == attackers & accepted`` (and ``honest_filtered``: never any).
    """
    mal = set(run["malicious_node_ids"])
    for r in run["rounds"]:
        acc, filt = set(r["accepted_node_ids"]), set(r["filtered_node_ids"])
        r["attackers_among_valid"] = len(acc & mal)
        r["filtered_exactly_the_attackers_among_valid"] = filt == (acc & mal)
        r["honest_filtered"] = len(filt - mal)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kill", type=int, default=3, help="honest SuperNodes killed in the node-churn run")
    parser.add_argument("--reply-timeout", type=float, default=30.0, help="run config reply-timeout (s)")
    parser.add_argument("--phases", default="reference,node-churn,superlink-restart")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="logs and state (default: a temporary folder)")
    parser.add_argument("--memory-interval", type=float, default=2.0,
                        help="seconds between two memory samples of all processes (each costs ~2 ms of CPU per "
                             "process, ~0.15 s for 60 processes; a round's peak, with every ClientApp alive, lasts "
                             "10 s and more)")
    parser.add_argument("--executor", choices=("flower", "fork"), default="flower",
                        help="flower: each SuperNode starts Flower's flower-superexec (a new flwr-clientapp process "
                             "per message); fork: SuperNodes with --isolation process and a "
                             "flwr_byzantine.deploy.forkexec SuperExec each (ClientApps forked from a warm parent)")
    parser.add_argument("--name", default=None,
                        help="file names NAME.json / NAME.png in --out (default: deployment, deployment_fork)")
    parser.add_argument("--database", action="store_true",
                        help="SuperLink state in SQLite (survives its restart; without it the SuperNodes exit when "
                             "the SuperLink restarts and are started again, as a supervisor would)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if args.rounds < 5 and {"node-churn", "superlink-restart"} & set(phases):
        parser.error("the node-churn and superlink-restart runs need --rounds >= 5")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flwr-byz-deploy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    attackers = list(range(args.attackers))
    run_config = {"num-server-rounds": args.rounds, "num-malicious": 0, "checkpoint": True,
                  "reply-timeout": args.reply_timeout}
    report: dict[str, Any] = {
        "command": "nice -n 5 python -m benchmarks.deployment " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nodes": args.nodes, "attackers_partitions": attackers, "rounds": args.rounds,
        "reply_timeout": args.reply_timeout, "executor": args.executor, "database": args.database,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": {},
    }
    report["clientapp_import_cpu_seconds"] = clientapp_import_cpu_seconds()
    dep = LocalDeployment(workdir, ROOT, database=workdir / "superlink.db" if args.database else None,
                          env={"FLWR_BYZANTINE_CACHE": str(workdir / "partition-cache")}, executor=args.executor)
    try:
        with MemorySampler(dep, interval=args.memory_interval) as mem:
            report["provisioning_seconds"] = round(dep.prefetch_partitions(args.nodes), 2)
            t0 = time.monotonic()
            dep.start_superlink()
            for i in range(args.nodes):
                cfg: dict[str, Any] = {"partition-id": i, "num-partitions": args.nodes}
                if i in attackers:
                    cfg.update({"malicious": True, "attack": "scaled-negative"})
                dep.add_node(i, cfg)
                dep.start_node(i)
            dep.wait_online(args.nodes, timeout=600)
            report["startup_seconds"] = round(time.monotonic() - t0, 2)
            print(f"{args.nodes} SuperNodes online after {report['startup_seconds']} s", flush=True)
            honest = [i for i in range(args.nodes) if i not in attackers]
            victims = honest[-args.kill:] if args.kill else []
            models: dict[str, dict[str, np.ndarray]] = {}

            for phase in phases:
                out_dir = workdir / f"out-{phase}"
                events: list[tuple[int, Any]] = []
                crash = None
                if phase == "node-churn":
                    def kill_victims() -> str:
                        for i in victims:
                            dep.kill_node(i)
                        return f"killed SuperNodes {victims} (SIGKILL)"

                    def restart_victims() -> str:
                        for i in victims:
                            dep.start_node(i)
                        return f"restarted SuperNodes {victims}"
                    events = [(1, kill_victims), (3, restart_victims)]
                if phase == "superlink-restart":
                    def crash_superlink() -> str:
                        dep.kill_superlink()
                        return "killed the SuperLink (SIGKILL, with its SuperExec and ServerApp)"
                    crash = (2, crash_superlink)
                malicious_ids = {dep.node_ids()[i] for i in attackers}
                busy0, own0 = machine_busy_seconds(), own_cpu_seconds(dep)
                run_id, wall, log = dep.run_and_wait(phase, run_config, out_dir, timeout=900, events=events,
                                              crash=crash)
                if phase == "superlink-restart":
                    # the first run died with the SuperLink; start it again and resume the same run config
                    t_restart = time.monotonic()
                    dep.start_superlink()
                    if not args.database:  # in-memory state: the SuperNodes cannot resume their sessions
                        for i in dep.nodes:  # restart them all, as a supervisor would
                            dep.kill_node(i)  # (with its SuperExec, which may still be retrying)
                            dep.start_node(i)
                    dep.wait_online(args.nodes, timeout=600)
                    online_after = time.monotonic() - t_restart
                    stop_wait = None
                    if args.database:  # the crashed run is still "running" there: stop it first
                        stop_wait = round(dep.stop_crashed_run(run_id), 1)
                    first_wall = wall
                    malicious_ids |= {dep.node_ids()[i] for i in attackers}
                    run_id, wall, _ = dep.run_and_wait(phase + "-resume", run_config, out_dir, timeout=900)
                    how = "same database" if args.database else "in-memory state, SuperNodes restarted"
                    log.append({"event": f"SuperLink restarted ({how}), {args.nodes} SuperNodes online after "
                                         f"{online_after:.1f} s, same flwr run resumed",
                                "first_run_seconds_until_crash": round(first_wall, 2)})
                    if stop_wait is not None:
                        log.append({"event": "crashed run stopped (flwr stop); SuperNodes done with its messages "
                                             f"{stop_wait} s later"})
                busy, own_by_kind = machine_busy_seconds() - busy0, cpu_delta(own0, own_cpu_seconds(dep))
                own = sum(own_by_kind.values())
                res = read_results(out_dir, run_id)
                models[phase] = load_model(out_dir, res)
                summary = summarise(res, malicious_ids, wall, len(attackers))
                summary["cpu_seconds_machine_busy"] = round(busy, 1)
                if phase == "reference":  # (killed processes take their CPU seconds with them)
                    # what else ran on the machine meanwhile (the benchmark assumes it has the CPUs to itself)
                    summary["cpu_seconds_deployment_and_benchmark"] = round(own, 1)
                    summary["cpu_seconds_other_processes"] = round(max(busy - own, 0.0), 1)
                    summary["cpu_seconds_by_kind"] = own_by_kind
                seen = dep.timings.get(run_id, {}).get("status_seen_seconds")
                if seen is not None:
                    summary["wall_seconds_flwr_run_to_status_seen"] = round(seen, 2)
                summary["events"] = log
                summary["malicious_node_ids"] = sorted(malicious_ids)
                summary["peak_pss_gib_so_far"] = round(mem.peak_pss / GIB, 3)
                filtering_check(summary)
                if phase == "node-churn":
                    ids_now = dep.node_ids()
                    summary["restarted_node_ids"] = sorted(ids_now[i] for i in victims)
                    after = [r for r in summary["rounds"] if r["round"] > 3]  # restarted after round 3
                    summary["restarted_nodes_rejoined"] = all(
                        any(ids_now[i] in r["accepted_node_ids"] for r in after) for i in victims)
                    killed = [r for r in summary["rounds"] if 1 < r["round"] <= 3]
                    summary["max_round_seconds_while_killed"] = max((r["seconds"] for r in killed), default=0.0)
                    malicious_ids = {ids_now[i] for i in attackers}
                report["runs"][phase] = summary
                print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, default=str), flush=True)
            if "reference" in models:
                for phase, model in models.items():
                    if phase != "reference":
                        diff = max(float(np.max(np.abs(model[k] - models["reference"][k]))) for k in model)
                        report["runs"][phase]["max_abs_diff_to_reference_model"] = diff
        report["peak_pss_gib"] = round(mem.peak_pss / GIB, 3)
        report["peak_pss_gb"] = round(mem.peak_pss / GB, 3)
        report["peak_rss_gib"] = round(mem.peak_rss / GIB, 3)
        report["peak_processes"] = mem.peak_processes
        report["memory_samples"] = {"interval_seconds": args.memory_interval, "samples": mem.samples,
                                    "sampler_cpu_seconds": round(mem.cpu_seconds, 1)}
        report["peak_pss_gib_by_kind"] = {kind: {"pss_gib": round(pss / GIB, 3), "processes": n}
                                          for kind, (pss, n) in sorted(mem.peak_by_kind.items())}
    finally:
        dep.close()
    report["left_running"] = dep.pids()
    ref = report["runs"].get("reference")
    if ref:
        report["targets"] = {
            "completes": True,
            "exactly_the_attackers_filtered_every_round": all(r["filtered_exactly_the_attackers"] for r in ref["rounds"]),
            "never_an_honest_node_filtered": all(r["honest_filtered"] == 0 for run in report["runs"].values()
                                                 for r in run["rounds"]),
            "rounds_within_120_s": ref["wall_seconds_flwr_run_to_finished"] <= 120.0,
            "peak_pss_within_6_gb": mem.peak_pss <= 6.0 * GB,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("deployment" if args.executor == "flower" else "deployment_fork")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, args.out / f"{name}.png")
    print(json.dumps({k: report.get(k) for k in ("startup_seconds", "peak_pss_gib", "peak_pss_gb", "peak_rss_gib",
                                                 "peak_pss_gib_by_kind", "targets")}))
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Seconds per round of every run (bars), erasures marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(runs), 1)
    for j, (name, run) in enumerate(runs.items()):
        xs = [r["round"] + (j - (len(runs) - 1) / 2) * width for r in run["rounds"]]
        ys = [r["seconds"] for r in run["rounds"]]
        ax.bar(xs, ys, width=width, label=name)
        for x, r in zip(xs, run["rounds"]):
            n = sum(r["erasures"].values())
            if n:
                ax.annotate(f"{n} eras.", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                            rotation=90, fontsize=7)
    ax.axhline(report["reply_timeout"], color="grey", ls=":", lw=1, label="reply-timeout")
    ax.set_xlabel("server round")
    ax.set_ylabel("seconds (ServerApp: replies + decode)")
    ax.set_title(f"{report['nodes']} SuperNodes ({len(report['attackers_partitions'])} attackers, "
                 f"{report.get('executor', 'flower')} executor) on {report['machine']['cpus']} cores; "
                 f"peak {report.get('peak_pss_gb', float('nan')):.2f} GB PSS", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

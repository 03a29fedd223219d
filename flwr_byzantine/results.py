"""Results of a run: one JSON file plus an accuracy-per-round plot (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, imported on first use.

    A ServerApp imports this module at start-up but plots only after its last round, so a
    deployment round (with every node's ClientApp alive) never holds matplotlib's memory.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_stem(*parts: object) -> str:
    """A file-name stem from ``parts`` joined by ``-`` that cannot leave its folder.

    Every character outside ``[A-Za-z0-9._+=-]`` (path separators, whitespace, control
    characters) and every run of dots becomes ``_``; the result is at most 120 characters.  Run-config strings go through this before they name a file.
    """
    stem = "-".join(re.sub(r"[^A-Za-z0-9._+=-]", "_", str(p)) for p in parts)
    stem = re.sub(r"\.{2,}", "_", stem).lstrip(".")
    return stem[:120] or "run"


def blame(reports: list[dict[str, Any]], num_nodes: int, key: str = "filtered") -> dict[str, Any]:
    """Who the defence removed, by identity (Flower node id), with the claimed partitions as labels.

    ``reports`` are per-round report dicts (``RoundReport.as_dict()`` / Newton reports) with
    ``key`` (``"filtered"`` or ``"trimmed"``: node ids) and ``partition_ids`` (node id ->
    partition id the client *claimed*; nothing verifies it).  Returns

    * ``<key>_node_ids``: every node id the defence removed in some round (the identity);
    * ``<key>_partitions``: their claimed partition ids, only where the claim is
      unambiguous: in ``[0, num_nodes)``, claimed by no other replying node in that
      round, and never changed by that node (a label for simulations, not an identity);
    * ``partition_claim_conflicts``: partition ids that were claimed ambiguously (two
      nodes in one round, a node changing its claim, or out of range).
    """
    removed: set[int] = set()
    labels: set[int] = set()
    conflicts: set[int] = set()
    claims_of: dict[str, set[int]] = {}
    for rep in reports:
        for node, pid in rep.get("partition_ids", {}).items():
            claims_of.setdefault(str(node), set()).add(int(pid))
    for rep in reports:
        claims = {str(n): int(p) for n, p in rep.get("partition_ids", {}).items()}
        counts = Counter(claims.values())
        for pid, c in counts.items():
            if c > 1 or not 0 <= pid < num_nodes:
                conflicts.add(pid)
        for node in rep.get(key, []):
            removed.add(int(node))
            pid = claims.get(str(node))
            if pid is None:
                continue
            if counts[pid] == 1 and 0 <= pid < num_nodes and len(claims_of.get(str(node), ())) == 1:
                labels.add(pid)
            else:
                conflicts.add(pid)
    for node, pids in claims_of.items():
        if len(pids) > 1:
            conflicts.update(pids)
    return {f"{key}_node_ids": sorted(removed), f"{key}_partitions": sorted(labels),
            "partition_claim_conflicts": sorted(conflicts)}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=float)
    os.replace(tmp, path)


def plot_accuracy(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    """One line per curve name: accuracy (y) against server round (x)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (rounds, acc) in curves.items():
        ax.plot(rounds, acc, marker=".", label=label)
    ax.set_xlabel("server round")
    ax.set_ylabel("central test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(payload: dict[str, Any], path: Path, title: str) -> Path:
    """The run's figure: the defence against the undefended mean (top) and who was removed (bottom).

    Top: central test accuracy per round of the defended model, and of the model one
    plain-mean step would have produced from the same defended model in that round
    (``payload["undefended_one_step"]``: the damage the attack does when nothing filters it).
    Bottom: one row per node id (labelled with its claimed partition, ``*`` for a claimed
    malicious partition); ``x`` marks a round in which the defence filtered that node's
    reply, ``o`` a round in which its reply was rejected by screening.  Returns ``path``.
    """
    central = payload.get("central", {})
    rounds = sorted(int(r) for r in central)
    metric = "accuracy" if any("accuracy" in central[str(r)] for r in rounds) else "loss"
    reports = payload.get("rounds", [])
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(rounds, [central[str(r)].get(metric, float("nan")) for r in rounds], marker=".",
             label=f"{payload.get('config', {}).get('aggregator', 'defence')} (defended run)")
    undefended = payload.get("undefended_one_step", {})
    if undefended:
        u_rounds = sorted(int(r) for r in undefended)
        top.plot(u_rounds, [undefended[str(r)].get(metric, float("nan")) for r in u_rounds], ls="--", marker=".",
                 color="tab:red", label="plain mean: one step from the same model")
    top.set_ylabel(f"central test {metric}")
    if metric == "accuracy":
        top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.set_title(title)
    top.legend(loc="best", fontsize=8)
    nodes = sorted({int(n) for rep in reports for n in rep.get("sampled", [])})
    row = {n: i for i, n in enumerate(nodes)}
    claims: dict[int, int] = {}
    for rep in reports:
        claims.update({int(n): int(p) for n, p in rep.get("partition_ids", {}).items()})
    malicious = set(payload.get("malicious_partitions", []))
    fx, fy, rx, ry = [], [], [], []
    for rep in reports:
        rnd = int(rep["server_round"])
        for n in rep.get("filtered", []):
            fx.append(rnd)
            fy.append(row.get(int(n), -1))
        for n in rep.get("rejected", {}):
            if int(n) in row:
                rx.append(rnd)
                ry.append(row[int(n)])
    bottom.scatter(fx, fy, marker="x", color="tab:red", label="filtered by the defence")
    bottom.scatter(rx, ry, marker="o", facecolors="none", edgecolors="tab:gray", label="rejected by screening")
    if len(nodes) <= 40:
        labels = []
        for n in nodes:
            claim = claims.get(n)
            mark = "*" if claim is not None and claim in malicious else ""
            labels.append(f"{n}" + (f" (p{claim}{mark})" if claim is not None else ""))
        bottom.set_yticks(range(len(nodes)))
        bottom.set_yticklabels(labels, fontsize=6)
    bottom.set_ylim(-1, max(len(nodes), 1))
    bottom.set_ylabel("node id (claimed partition)")
    bottom.set_xlabel("server round")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_result(path: Path) -> dict[str, Any]:
    """Read one results JSON written by the ServerApp."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def compare(paths: list[Path], out_png: Path | None = None) -> str:
    """Markdown table (and optional combined accuracy plot) of several runs' results files."""
    rows = ["| aggregator | malicious | attack | final accuracy | filtered = malicious | bytes up / round |",
            "|---|---|---|---|---|---|"]
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for path in paths:
        res = load_result(path)
        cfg = res["config"]
        n_mal = len(res["malicious_partitions"])
        attack = cfg["attack"] if n_mal else "none"
        rounds = sorted(int(r) for r in res["central"])
        acc = [res["central"][str(r)].get("accuracy", float("nan")) for r in rounds]
        label = f"{cfg['aggregator']}, {n_mal} malicious ({attack})"
        curves[label] = (rounds, acc)
        per_round = res["total_bytes_up"] / max(len(res["rounds"]), 1)
        match = "yes" if res["filtered_partitions"] == res["malicious_partitions"] else "no"
        rows.append(f"| {cfg['aggregator']} | {n_mal} | {attack} | {res['final_accuracy']:.3f} | {match} | {per_round:.0f} |")
    if out_png is not None:
        plot_accuracy(curves, Path(out_png), "central test accuracy per round")
    return "\n".join(rows)


def main() -> None:
    """``python -m flwr_byzantine.results RESULT.json ... [--plot OUT.png]``: compare runs."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    print(compare(args.files, args.plot))


if __name__ == "__main__":
    main()

"""Results of a run: one JSON file plus an accuracy-per-round plot (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def safe_stem(*parts: object) -> str:
    """A file-name stem from ``parts`` joined by ``-`` that cannot leave its folder.

    Every character outside ``[A-Za-z0-9._+=-]`` (path separators, whitespace, control
    characters) and every run of dots becomes ``_``; the result is at most 120 characters.  Run-config strings go through this before they name a file.
    """
    stem = "-".join(re.sub(r"[^A-Za-z0-9._+=-]", "_", str(p)) for p in parts)
    stem = re.sub(r"\.{2,}", "_", stem).lstrip(".")
    return stem[:120] or "run"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=float)
    os.replace(tmp, path)


def plot_accuracy(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    """One line per curve name: accuracy (y) against server round (x)."""
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

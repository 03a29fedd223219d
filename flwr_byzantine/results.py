"""Results of a run: one JSON file plus an accuracy-per-round plot (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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

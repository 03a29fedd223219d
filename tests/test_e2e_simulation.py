"""End-to-end: a real Flower simulation (Ray backend) with malicious clients, RGE versus the plain mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES = 10
# reply-timeout: round 1 includes Ray's worker start-up, which can exceed the default 30 s on a loaded machine.
COMMON = ("dataset='digits' model='logreg' num-server-rounds=20 num-malicious=2 attack='scaled-negative' "
          "attack-scale=10.0 seed=0 reply-timeout=300.0")


def run_sim(tmp_path: Path, extra: str, name: str | None = None) -> dict:
    out = tmp_path / (name or extra.split("=")[1].strip("'"))
    cfg = f"{COMMON} {extra} output-dir='{out}'"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "server_app.simulate", "--num-supernodes", str(NUM_NODES), "--run-config", cfg],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, (files, proc.stderr[-3000:])
    return json.loads(files[0].read_text())


def assert_filtering_matches(rounds: list[dict], bad_of) -> None:
    """Filtered == attackers in >= 75 % of rounds; an honest client filtered in at most one round."""
    exact = honest_slips = 0
    for rnd in rounds:
        filtered = sorted(rnd["partition_ids"][str(n)] for n in rnd["filtered"])
        bad = sorted(bad_of(rnd))
        exact += filtered == bad
        honest_slips += bool(set(filtered) - set(bad))
    assert exact >= 0.75 * len(rounds), (exact, len(rounds))
    assert honest_slips <= 1, honest_slips


@pytest.mark.slow
def test_rge_learns_and_filters_the_malicious_clients(tmp_path):
    """A Ray simulation of the App (30-40 s, most of it Ray's start: ``slow``, with the others of this file; the
    default suite keeps the in-process runs of the same ServerApp and ClientApp)."""
    rge = run_sim(tmp_path, "aggregator='rge'")
    assert len(rge["malicious_partitions"]) == 2
    assert rge["final_accuracy"] > 0.85, rge["final_accuracy"]
    # The filtered ids are the malicious ones: all of them over the run, exactly them in most rounds
    # (late in training a -10x gradient can be small enough to sit under RGE's threshold, which
    # Theorem 3 allows), and never an honest client.
    assert rge["filtered_partitions"] == rge["malicious_partitions"]
    assert_filtering_matches(rge["rounds"], lambda rnd: rge["malicious_partitions"])
    for rnd in rge["rounds"]:
        assert rnd["decode_seconds"] > 0 and rnd["bytes_up"] > 0 and rnd["bytes_down"] > 0
    assert list((tmp_path / "rge").glob("*.png"))


@pytest.mark.slow
def test_mean_is_driven_off_by_the_same_attack(tmp_path):
    """The plain mean (FedAvg's rule) under the same attack ends far below RGE's 0.85."""
    mean = run_sim(tmp_path, "aggregator='mean'")
    assert mean["final_accuracy"] < 0.55, mean["final_accuracy"]


@pytest.mark.slow
def test_omniscient_mobile_adversary_is_filtered_every_round(tmp_path):
    """adversary='omniscient': the server-side adversary corrupts a rotating set of 2 nodes per round."""
    res = run_sim(tmp_path, "aggregator='rge' adversary='omniscient' adversary-mode='rotate'", name="omniscient")
    assert res["malicious_partitions"] == []  # all clients honest: the server plays the adversary
    corrupt = res["corrupt_partitions_per_round"]
    assert len({tuple(v) for v in corrupt.values()}) > 1  # the corrupt set moves
    assert_filtering_matches(res["rounds"], lambda rnd: corrupt[str(rnd["server_round"])])
    # the clean run of this configuration reaches 0.90 at round 20 and the static attack 0.88 (in-process);
    # a rotating corrupt set restarts the worker momentum of the nodes it leaves, which costs a few rounds:
    # 0.85-0.87 here (Ray and in-process), against < 0.55 for the plain mean under the static attack
    assert res["final_accuracy"] > 0.82, res["final_accuracy"]

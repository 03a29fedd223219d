"""`flwr run .` end to end: the CLI starts a local SuperLink in simulation mode and runs the App.

Slow (starts real Flower processes); run with ``pytest -m slow``.  Uses its own
FLWR_HOME and ports, checks the run's final status through ``flwr ls`` (``flwr run
--stream`` exits 0 even when the run failed), and stops the SuperLink it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flwr_byzantine.deploy.local import free_port

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).parent / "flwr")


def kill_matching(pattern: str) -> None:
    """Stop every process whose command line contains ``pattern`` (our SuperLink)."""
    subprocess.run(["pkill", "-TERM", "-f", pattern], check=False)
    time.sleep(1.0)
    subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)


@pytest.mark.slow
def test_flwr_run_default_app(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "out"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    def run_and_wait(run_cfg: str) -> str:
        started = subprocess.run(
            [FLWR, "run", ".", "--format", "json", "--federation-config", "num-supernodes=5",
             "--run-config", run_cfg],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = json.loads(started.stdout[started.stdout.index("{"):])["run-id"]
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            ls = subprocess.run([FLWR, "ls", "--run-id", str(run_id), "--format", "json"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            if ls.returncode == 0:
                run = json.loads(ls.stdout[ls.stdout.index("{"):])["runs"][0]
                if run["status"].startswith("finished"):
                    return f"{run['status']}:{run['status-details']}"
            time.sleep(3)
        return "timeout"

    try:
        # `flwr run --stream` exits 0 even on failure: the SuperLink's run status is the truth.
        status = run_and_wait(f"num-server-rounds=4 num-malicious=1 output-dir='{out}'")
        assert status.startswith("finished:completed"), status
        # A garbage config fails the run cleanly (ConfigError before any round) and is reported.
        bad = run_and_wait(f"aggregator='magic' output-dir='{tmp_path / 'bad'}'")
        assert bad.startswith("finished:failed"), bad
        assert not (tmp_path / "bad").exists()
        files = list(out.glob("*.json"))
        assert len(files) == 1
        res = json.loads(files[0].read_text())
        assert res["num_nodes"] == 5 and len(res["central"]) == 5  # rounds 0..4
        assert res["filtered_partitions"] == res["malicious_partitions"]
    finally:
        kill_matching(str(home))

"""A real Flower deployment on loopback: SuperLink, 4 SuperNodes (one malicious by node config), `flwr run`.

Slow (real processes; every round starts one ClientApp process per SuperNode):
run with ``pytest -m slow tests/test_deployment.py``; about 2 minutes on 2 cores.

The commands are the ones of ``docs/deployment.md``, with free ports on 127.0.0.1,
an isolated ``FLWR_HOME`` whose ``config.toml`` names the SuperLink connection,
and ``--insecure`` (TLS is described in the docs).  The run's final status comes
from ``flwr ls --run-id N --format json`` (``flwr run`` returns as soon as the run
is submitted).  Every process started here is stopped in ``finally`` (SIGTERM to
its process group and descendants, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_checkpoint import _descendants

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_NODES = 4
MALICIOUS_PARTITION = 2
ROUNDS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_tree(proc: subprocess.Popen, pids: list[int], sig: int) -> None:
    for pid in [proc.pid, *pids]:
        try:
            if pid == proc.pid:
                os.killpg(pid, sig)  # the process group we created (start_new_session=True)
            else:
                os.kill(pid, sig)  # descendants that left our group
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM every process we started and its descendants, wait ``grace`` s, then SIGKILL the rest."""
    trees = {p.pid: _descendants(p.pid) for p in procs}
    for proc in procs:
        _signal_tree(proc, trees[proc.pid], signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        _signal_tree(proc, trees[proc.pid] + _descendants(proc.pid), signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def flwr(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_superlink_supernodes_flwr_run_filters_the_malicious_node(tmp_path):
    home, out, logs = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    port = free_port()  # the SuperLink's HTTP port: Fleet, Control and Runtime APIs (flwr 1.41)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        fh = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    def all_logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.iterdir()))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                            "--host", "127.0.0.1", "--port", str(port)])
        for pid in range(NUM_NODES):
            node_config = f"partition-id={pid} num-partitions={NUM_NODES}"
            if pid == MALICIOUS_PARTITION:
                node_config += " malicious=true attack='scaled-negative'"
            start(f"supernode{pid}", [str(BIN / "flower-supernode"), "--insecure",
                                      "--superlink", f"127.0.0.1:{port}",
                                      "--host", "127.0.0.1", "--port", str(free_port()),
                                      "--node-config", node_config])

        # wait until all SuperNodes are registered and online
        deadline = time.monotonic() + 120
        online = 0
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), all_logs()
            ls = flwr(env, "supernode", "ls", "loopback", "--format", "json")
            if ls.returncode == 0 and "{" in ls.stdout:
                nodes = json.loads(ls.stdout[ls.stdout.index("{"):]).get("nodes", [])
                online = sum(n.get("status") == "online" for n in nodes)
                if online >= NUM_NODES:
                    break
            time.sleep(2)
        assert online == NUM_NODES, all_logs()

        run_cfg = f"num-server-rounds={ROUNDS} num-malicious=0 aggregator='rge' output-dir='{out}'"
        started = flwr(env, "run", ".", "loopback", "--format", "json", "--run-config", run_cfg, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = json.loads(started.stdout[started.stdout.index("{"):])["run-id"]

        status = ""
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            ls = flwr(env, "ls", "loopback", "--run-id", str(run_id), "--format", "json")
            if ls.returncode == 0 and "{" in ls.stdout:
                runs = json.loads(ls.stdout[ls.stdout.index("{"):]).get("runs", [])
                status = runs[0].get("status", "") if runs else ""
                if status.startswith("finished"):
                    break
            time.sleep(3)
        assert status == "finished:completed", status + all_logs()

        files = list(out.glob("*.json"))
        assert len(files) == 1, (files, all_logs())
        res = json.loads(files[0].read_text())
        assert res["num_nodes"] == NUM_NODES and len(res["rounds"]) == ROUNDS
        assert res["filtered_partitions"] == [MALICIOUS_PARTITION]
        for rep in res["rounds"]:
            assert rep["applied"] and len(rep["accepted"]) == NUM_NODES
            assert [rep["partition_ids"][str(n)] for n in rep["filtered"]] == [MALICIOUS_PARTITION]
        assert (out / res["model_file"]).is_file()
    finally:
        stop_all(procs)
        for proc in procs:
            assert proc.poll() is not None

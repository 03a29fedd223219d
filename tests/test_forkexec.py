"""flwr_byzantine.deploy.forkexec without a deployment: the forked child runs Flower's run_clientapp, is reaped.

The deployment itself (SuperNodes with ``--isolation process`` and this SuperExec) runs in
``tests/test_deployment.py`` (slow) and ``python -m benchmarks.deployment --executor fork``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
from flwr.supercore.constant import ExecutorType, TaskType  # noqa: E402
from flwr.supercore.exit import exit_handler  # noqa: E402
from flwr.supercore.superexec import run_superexec  # noqa: E402
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus  # noqa: E402

from flwr_byzantine.deploy import forkexec  # noqa: E402
from flwr_byzantine.deploy.local import process_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _spec(task_type: TaskType, task_id: int = 7) -> ExecutionSpec:
    return ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9", token="tok-123", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                         suppress_output=False, task_id=task_id)


def _reap(executor: forkexec.ForkExecutor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.02)


def test_forked_child_runs_flowers_run_clientapp_with_the_task_token(tmp_path, monkeypatch):
    """The child calls run_clientapp with the spec's address, token and parent pid, without the
    parent's exit handlers, named flwr-clientapp; its exit status (flwr_exit's sys.exit) is kept."""
    import flwr.supernode.runtime.run_clientapp as rc

    out = tmp_path / "child.json"

    def fake_run_clientapp(**kwargs):
        with open("/proc/self/comm", encoding="utf-8") as fh:
            comm = fh.read().strip()
        out.write_text(json.dumps({**kwargs, "comm": comm, "pid": os.getpid(), "ppid": os.getppid(),
                                   "exit_handlers": len(exit_handler.registered_exit_handlers)}))
        raise SystemExit(3)  # as flwr_exit ends a ClientApp process

    monkeypatch.setattr(rc, "run_clientapp", fake_run_clientapp)
    parent_handler_ran = []
    exit_handler.add_exit_handler(lambda: parent_handler_ran.append(True))
    try:
        executor = forkexec.ForkExecutor()
        result = executor.launch(_spec(TaskType.CLIENT_APP))
        assert result.status == LaunchResultStatus.ACCEPTED
        assert list(executor.children.values()) == [7]
        _reap(executor)
    finally:
        exit_handler.registered_exit_handlers.pop()
    assert executor.children == {} and list(executor.exits) == [(7, 3)]
    got = json.loads(out.read_text())
    assert got["runtime_api_address"] == "127.0.0.1:9" and got["token"] == "tok-123"
    assert got["insecure"] is True and got["certificates"] is None and got["runtime_dependency_install"] is False
    assert got["parent_pid"] == os.getpid() == got["ppid"] and got["pid"] != os.getpid()
    assert got["comm"] == forkexec.CHILD_NAME
    assert got["exit_handlers"] == 0 and parent_handler_ran == []


def test_a_child_that_raises_exits_nonzero_and_never_returns_into_the_parent(tmp_path, monkeypatch):
    import flwr.supernode.runtime.run_clientapp as rc

    def boom(**kwargs):
        raise ValueError("broken ClientApp runtime")

    monkeypatch.setattr(rc, "run_clientapp", boom)
    executor = forkexec.ForkExecutor()
    me = os.getpid()
    executor.launch(_spec(TaskType.CLIENT_APP, task_id=11))
    assert os.getpid() == me  # only the parent gets here
    _reap(executor)
    assert list(executor.exits) == [(11, 1)]


def test_other_task_types_are_started_as_flower_does(monkeypatch):
    executor = forkexec.ForkExecutor()
    seen = []
    monkeypatch.setattr(executor._fallback, "launch", lambda spec: seen.append(spec.task_type) or "started")
    assert executor.launch(_spec(TaskType.SERVER_APP)) == "started"
    assert seen == [TaskType.SERVER_APP] and executor.children == {}


def test_install_makes_flowers_superexec_use_the_fork_executor(monkeypatch):
    monkeypatch.setattr(run_superexec, "get_executor", run_superexec.get_executor)  # restored afterwards
    forkexec.install()
    assert isinstance(run_superexec.get_executor(ExecutorType.SUBPROCESS), forkexec.ForkExecutor)


def test_the_fork_superexec_is_counted_as_a_superexec():
    proc = subprocess.Popen([sys.executable, "-m", "flwr_byzantine.deploy.forkexec", "--insecure",
                             "--runtime-api-address", "127.0.0.1:9", "--parent-pid", str(os.getpid())],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while process_kind(proc.pid) != "flower-superexec" and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has exec'd
        assert process_kind(proc.pid) == "flower-superexec"
    finally:
        proc.kill()
        proc.wait()

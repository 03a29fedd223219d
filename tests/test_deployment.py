"""Real Flower deployments on loopback: SuperLink, SuperNodes (some malicious by node config), `flwr run`.

Slow (real processes; every round starts one ClientApp process per SuperNode): run with
``python -m pytest -m slow tests/test_deployment.py``; a few minutes on 2 cores.

The processes are started by :class:`flwr_byzantine.deploy.local.LocalDeployment` with the
commands of ``docs/deployment.md``: free ports on 127.0.0.1, an isolated ``FLWR_HOME``
whose ``config.toml`` names the connection, the venv's ``bin`` on ``PATH``.  A run's
final status comes from ``flwr ls --run-id N --format json``.  Every process started
here is stopped at the end (SIGTERM to its process group and descendants, then SIGKILL)
and the test checks that none is left.

* the malicious node (by node config) is exactly the filtered one, by node id;
* a SuperNode killed with SIGKILL costs a round at most ``reply-timeout`` (plus the
  Grid's 3 s polling), is an erasure of its own node id, and its restart rejoins;
* the SuperLink (``--database``) killed with SIGKILL and restarted, the crashed run stopped:
  the same ``flwr run`` resumes from the checkpoint and ends with the model of an
  uninterrupted run, with the default defence (per-node memory) and with Algorithm 3;
* TLS and SuperNode authentication: registered nodes run the federation, a SuperNode
  with an unregistered key or without a key is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flwr_byzantine.deploy.certs import make_node_key, make_tls
from flwr_byzantine.deploy.local import LocalDeployment, load_model, read_results

ROOT = Path(__file__).resolve().parents[1]
#: Grid polling (flwr's HTTP Grid sleeps 3 s between pulls) and scheduling slack on a loaded machine.
POLL_SLACK = 6.0


def _deployment(tmp_path: Path, **kw) -> LocalDeployment:
    return LocalDeployment(tmp_path / "deploy", ROOT, env={"FLWR_BYZANTINE_CACHE": str(tmp_path / "cache")}, **kw)


def _start(dep: LocalDeployment, num: int, malicious: tuple[int, ...] = (), keys=None) -> None:
    dep.prefetch_partitions(num)  # provisioning: the nodes' data is in place before round 1
    dep.start_superlink()
    for i in range(num):
        cfg = {"partition-id": i, "num-partitions": num}
        if i in malicious:
            cfg.update({"malicious": True, "attack": "scaled-negative"})
        dep.add_node(i, cfg, key=None if keys is None else keys[i])
        dep.start_node(i)


def _assert_all_stopped(dep: LocalDeployment) -> None:
    dep.close()
    assert dep.pids() == [], dep.pids()


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["flower", "fork"])
def test_superlink_supernodes_flwr_run_filters_the_malicious_node(tmp_path, executor):
    """``executor='fork'``: SuperNodes with ``--isolation process`` and a forkexec SuperExec each."""
    num, malicious, rounds = 4, 2, 3
    dep = _deployment(tmp_path, executor=executor)
    try:
        _start(dep, num, (malicious,))
        dep.wait_online(num, timeout=180)
        out = tmp_path / "out"
        run_id, _, _ = dep.run_and_wait("filter", {"num-server-rounds": rounds, "num-malicious": 0,
                                                   "aggregator": "rge"}, out, timeout=600)
        res = read_results(out, run_id)
        bad = dep.node_ids()[malicious]  # by node config, not by what a client claims
        assert res["num_nodes"] == num and len(res["rounds"]) == rounds
        assert res["filtered_partitions"] == [malicious]
        for rep in res["rounds"]:
            assert rep["applied"] and len(rep["accepted"]) == num
            assert rep["filtered"] == [bad]
        assert (out / res["model_file"]).is_file()
    finally:
        _assert_all_stopped(dep)


@pytest.mark.slow
def test_killed_supernode_costs_at_most_the_reply_timeout_and_rejoins(tmp_path):
    num, victim, timeout, rounds = 4, 3, 25.0, 6
    dep = _deployment(tmp_path)
    try:
        _start(dep, num)
        dep.wait_online(num, timeout=180)
        old_id = dep.node_ids()[victim]
        out = tmp_path / "out"
        events = [(1, lambda: dep.kill_node(victim) or "killed"), (3, lambda: dep.start_node(victim) and "restarted")]
        run_id, _, log = dep.run_and_wait("churn", {"num-server-rounds": rounds, "num-malicious": 0,
                                                    "checkpoint": True, "reply-timeout": timeout},
                                          out, timeout=900, events=events)
        assert [e["event"] for e in log] == ["killed", "restarted"]
        res = read_results(out, run_id)
        new_id = dep.node_ids()[victim]
        for rep in res["rounds"]:
            assert rep["reply_seconds"] <= timeout + POLL_SLACK, rep
            assert rep["rejection_counts"].get("sender", 0) == 0, rep["rejected"]  # no "foreign sender" filings
            assert set(rep["rejected"]) <= {str(old_id), str(new_id)}, rep["rejected"]
        assert str(old_id) in res["rounds"][1]["rejected"]  # round 2: the killed node is an erasure
        assert any(new_id in rep["accepted"] for rep in res["rounds"][3:]), [r["accepted"] for r in res["rounds"]]
        assert all(rep["applied"] for rep in res["rounds"])
    finally:
        _assert_all_stopped(dep)


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["rge", "rge-paper"])
def test_superlink_kill_and_resume_ends_with_the_uninterrupted_model(tmp_path, aggregator):
    """The operator path of docs/deployment.md: SuperLink with ``--database``, killed after round 2,
    restarted on the same database (the SuperNodes keep their sessions and node ids, so the default
    defence's per-node memory in the checkpoint is theirs), the crashed run stopped with ``flwr stop``,
    the same ``flwr run`` again: the final model equals the uninterrupted run's, bit for bit."""
    num, rounds = 3, 4
    cfg = {"num-server-rounds": rounds, "num-malicious": 0, "checkpoint": True, "reply-timeout": 120.0,
           "aggregator": aggregator}
    dep = _deployment(tmp_path, database=tmp_path / "superlink.db", executor="fork")
    try:
        _start(dep, num)
        dep.wait_online(num, timeout=180)
        ref_out, out = tmp_path / "reference", tmp_path / "crashed"
        ref_id, _, _ = dep.run_and_wait("reference", cfg, ref_out, timeout=600)
        crashed_id, _, log = dep.run_and_wait("crash", cfg, out, timeout=600,
                                              crash=(2, lambda: dep.kill_superlink() or "killed"))
        assert log[-1]["event"] == "killed"
        dep.start_superlink()  # same port and database; the SuperNodes reconnect by themselves
        dep.wait_online(num, timeout=180)
        dep.stop_crashed_run(crashed_id)
        run_id, _, _ = dep.run_and_wait("resume", cfg, out, timeout=600)
        ref, res = read_results(ref_out, ref_id), read_results(out, run_id)
        assert res["resumed_from_round"] >= 2 and len(res["rounds"]) == rounds
        assert {tuple(sorted(int(n) for n in r["accepted"])) for r in ref["rounds"] + res["rounds"]} == {tuple(sorted(
            dep.node_ids().values()))}  # the same node ids in every round of both runs
        for rep in ref["rounds"] + res["rounds"]:  # no erasure in either run: the comparison is exact
            assert rep["applied"] and not rep["rejected"], rep["rejected"]
        ref_model, model = load_model(ref_out, ref), load_model(out, res)
        assert sorted(model) == sorted(ref_model)
        for key in model:
            np.testing.assert_array_equal(model[key], ref_model[key])
    finally:
        _assert_all_stopped(dep)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["flower", "fork"])
def test_tls_and_supernode_auth_refuse_unknown_nodes(tmp_path, executor):
    num = 3
    tls = make_tls(tmp_path / "certs")
    keys = [make_node_key(tmp_path / "certs" / "keys" / f"supernode-{i}") for i in range(num + 1)]
    dep = _deployment(tmp_path, tls=tls, supernode_auth=True, executor=executor)
    try:
        dep.prefetch_partitions(num)
        dep.start_superlink()
        registered = [dep.register(keys[i][1]) for i in range(num)]  # authorise the first three keys only
        assert len(set(registered)) == num
        for i in range(num):
            dep.add_node(i, {"partition-id": i, "num-partitions": num}, key=keys[i][0])
            dep.start_node(i)
        dep.add_node(num, {"partition-id": 0, "num-partitions": num}, key=keys[num][0])  # unregistered key
        dep.add_node(num + 1, {"partition-id": 1, "num-partitions": num})  # no key at all
        intruders = [dep.start_node(num), dep.start_node(num + 1)]
        dep.wait_online(num, timeout=180)
        for proc in intruders:
            assert proc.wait(timeout=120) != 0  # refused: the SuperNode exits
        assert sorted(int(n["node-id"]) for n in dep.node_list()) == sorted(registered)  # registered keys only
        assert sorted(dep.node_ids().values()) == sorted(registered)  # the intruders never got an id
        superlink_log = "".join(p.read_text(errors="replace") for p in dep.logs.glob("superlink.*.log"))
        assert "No SuperNode found with the given public key" in superlink_log  # the unregistered key
        assert "SuperNode authentication is enabled" in dep.logs.joinpath(f"supernode{num + 1}.1.log").read_text()
        out = tmp_path / "out"
        run_id, _, _ = dep.run_and_wait("tls", {"num-server-rounds": 2, "num-malicious": 0}, out, timeout=600)
        res = read_results(out, run_id)
        assert res["num_nodes"] == num
        assert all(rep["applied"] and len(rep["accepted"]) == num for rep in res["rounds"])
    finally:
        _assert_all_stopped(dep)

"""Deployment tooling without a deployment: certificates, keys, process cleanup, memory, log parsing."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from flwr_byzantine.deploy.certs import main as certs_main
from flwr_byzantine.deploy.certs import make_node_key, make_tls
from flwr_byzantine.deploy.local import (
    BIN,
    LocalDeployment,
    MemorySampler,
    checkpoint_round,
    finished_epoch,
    _ephemeral_range,
    format_node_config,
    free_port,
    process_kind,
    process_memory,
)


def test_tls_files_form_a_chain_for_loopback(tmp_path):
    files = make_tls(tmp_path, hosts=("127.0.0.1", "localhost", "edge.example"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "edge.example"} <= set(san.get_values_for_type(x509.DNSName))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert stat.S_IMODE(os.stat(files.server_key).st_mode) == 0o600


def test_node_keys_are_what_flower_node_auth_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    priv, pub = make_node_key(tmp_path / "keys" / "supernode-0")
    key = load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode --auth-supernode-private-key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(pub)  # as flwr supernode register (NIST curve check included)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    other = make_node_key(tmp_path / "keys" / "supernode-1")[1]
    assert other.read_bytes() != pub.read_bytes()


def test_certs_command_line(tmp_path, capsys):
    certs_main(["--out", str(tmp_path), "--nodes", "2"])
    assert {p.name for p in tmp_path.iterdir()} == {"ca.crt", "ca.key", "server.pem", "server.key", "keys"}
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "supernode-0", "supernode-0.pub", "supernode-1", "supernode-1.pub"]
    assert "server.pem" in capsys.readouterr().out


def test_deployment_environment_and_config(tmp_path):
    dep = LocalDeployment(tmp_path, tmp_path)
    assert dep.env["PATH"].split(os.pathsep)[0] == str(BIN)  # flower-superexec is found by name
    assert (BIN / "flower-superexec").exists() and BIN == __import__("pathlib").Path(sys.executable).parent
    conf = (tmp_path / "flwr-home" / "config.toml").read_text()
    assert f'address = "{dep.address}"' in conf and "insecure = true" in conf
    tls = make_tls(tmp_path / "certs")
    conf = (LocalDeployment(tmp_path / "t", tmp_path, tls=tls).home / "config.toml").read_text()
    assert f'root-certificates = "{tls.ca_cert}"' in conf and "insecure" not in conf
    with pytest.raises(ValueError, match="TLS"):
        LocalDeployment(tmp_path / "u", tmp_path, supernode_auth=True)


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range():
    """No port twice (``bind(0)`` and release once gave two SuperNodes the same one) and none that an
    outgoing connection can take before the server binds it."""
    import socket

    lo, hi = _ephemeral_range()
    assert 1024 <= lo < hi
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < lo for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # still free


def test_a_supernode_whose_port_was_taken_is_restarted_on_a_new_one(tmp_path):
    """The CI failure of the eighteenth landing: a SuperNode exits with "address already in use";
    ``wait_online``'s check restarts it on a fresh port (no SuperLink needed: the Runtime API binds first)."""
    import socket
    import time

    dep = LocalDeployment(tmp_path, tmp_path)
    blocker = socket.socket()
    try:
        node = dep.add_node(0, {"partition-id": 0, "num-partitions": 1})
        blocker.bind(("127.0.0.1", node.port))
        blocker.listen()
        taken = node.port
        dep.add_node(1, {"partition-id": 1, "num-partitions": 2})
        dep.start_node(0)
        dep.start_node(1)
        assert dep.nodes[0].proc.wait(timeout=120) != 0
        assert "address already in use" in (dep.logs / "supernode0.1.log").read_text().lower()
        dep.kill_node(1)  # killed on purpose: left alone
        assert dep._restart_port_clashes() == [0]  # noqa: SLF001
        assert dep.nodes[0].port != taken and (dep.logs / "supernode0.2.log").is_file()
        deadline = time.monotonic() + 120
        while "uvicorn running" not in (dep.logs / "supernode0.2.log").read_text().lower():
            assert dep.nodes[0].proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        assert dep._restart_port_clashes() == []  # noqa: SLF001
        assert not (dep.logs / "supernode1.2.log").exists()
    finally:
        blocker.close()
        dep.close(grace=2)
    assert dep.pids() == []


def test_close_kills_every_process_group_and_descendant(tmp_path):
    dep = LocalDeployment(tmp_path, tmp_path)
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    procs = [dep._spawn(f"p{i}", [sys.executable, "-c", script]) for i in range(2)]  # noqa: SLF001
    import time

    deadline = time.monotonic() + 30
    while len(dep.pids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(dep.pids()) == 4  # two pythons, two sleeps
    pss, rss, n = dep.memory()
    assert n == 4 and 0 < pss <= rss
    dep.close(grace=2)
    assert dep.pids() == [] and all(p.poll() is not None for p in procs)


def test_memory_sampler_keeps_the_peak_per_kind_of_process(tmp_path):
    """A process started as ``flwr-clientapp`` is counted as one; everything else as ``other``."""
    import subprocess
    import time

    exe = tmp_path / "flwr-clientapp"
    exe.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")  # started by name, as a SuperExec does
    exe.chmod(0o755)
    proc = subprocess.Popen([str(exe)])
    try:
        deadline = time.monotonic() + 10
        while process_kind(proc.pid) != "flwr-clientapp" and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has exec'd
        assert process_kind(proc.pid) == "flwr-clientapp"
        assert process_kind(os.getpid()) == "other"

        class Two:
            def pids(self):
                return [proc.pid, os.getpid()]

        sampler = MemorySampler(Two())  # type: ignore[arg-type]
        sampler.sample()
        by_kind = sampler.peak_by_kind
        assert set(by_kind) == {"flwr-clientapp", "other"}
        assert by_kind["flwr-clientapp"][1] == 1 and by_kind["flwr-clientapp"][0] > 0
        assert sum(p for p, _ in by_kind.values()) == sampler.peak_pss <= sampler.peak_rss
        assert sampler.peak_processes == 2
        proc.kill()  # a zombie until waited for (a finished ClientApp before its SuperExec reaps it)
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/stat").read().split(")")[1].split()[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_kind(proc.pid) == "flwr-clientapp"  # from the name in /proc/PID/stat
    finally:
        proc.kill()
        proc.wait()
    assert process_kind(2**22 + 12345) == "other"


def test_finished_at_of_flwr_ls_is_read_as_utc_seconds():
    assert finished_epoch("2026-11-30 02:28:36Z") == 1796005716.0
    assert finished_epoch("N/A") is None and finished_epoch("") is None


def test_process_memory_of_self_and_of_a_missing_process():
    pss, rss = process_memory(os.getpid())
    assert 0 < pss <= rss
    assert process_memory(2**22 + 12345) == (0, 0)


def test_node_ids_come_from_each_supernodes_latest_log(tmp_path):
    dep = LocalDeployment(tmp_path, tmp_path)
    dep.add_node(0, {"partition-id": 0})
    dep.add_node(1, {"partition-id": 1})
    (dep.logs / "supernode0.1.log").write_text("INFO : SuperNode ID: 111\n")
    (dep.logs / "supernode0.2.log").write_text("INFO : SuperNode ID: 222\n")
    (dep.logs / "supernode1.1.log").write_text("connection failed\n")
    assert dep.node_ids() == {0: 222}


def test_checkpoint_round_and_node_config_format(tmp_path):
    assert checkpoint_round(tmp_path) == 0
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint.json").write_text(json.dumps({"server_round": 3}))
    assert checkpoint_round(tmp_path) == 3
    (tmp_path / "checkpoint" / "checkpoint.json").write_text("{half")
    assert checkpoint_round(tmp_path) == 0
    assert format_node_config({"partition-id": 2, "malicious": True, "attack": "alie", "lr": 0.5}) == \
        "partition-id=2 malicious=true attack='alie' lr=0.5"


def test_a_node_is_fetching_a_run_until_its_log_shows_an_outcome(tmp_path):
    """LocalDeployment._fetching (stop_crashed_run waits on it) reads the SuperNode's latest log."""
    dep = LocalDeployment(tmp_path / "d", tmp_path)
    dep.add_node(0, {"partition-id": 0})
    log = dep.logs / "supernode0.1.log"
    assert not dep._fetching(0, 7)  # no log yet
    log.write_text("INFO: [RUN 7, ROUND 2]\nINFO: Receiving: train message (ID: a)\nINFO: Received successfully\n"
                   "INFO: [RUN 7, ROUND 2]\nINFO: Sending: train message (ID: b)\nINFO: Sent successfully\n"
                   "INFO: [RUN 7, ROUND 3]\nINFO: Receiving: train message (ID: c)\n")
    assert dep._fetching(0, 7) and not dep._fetching(0, 8)
    (dep.logs / "supernode0.2.log").write_text("INFO: [RUN 9, ROUND 1]\n")  # a restart: only the latest log counts
    assert not dep._fetching(0, 7)
    (dep.logs / "supernode0.2.log").unlink()
    with log.open("a") as fh:
        fh.write("INFO: Run ID 7 is not in `RUNNING` status. Ignoring message c.\n")
    assert not dep._fetching(0, 7)

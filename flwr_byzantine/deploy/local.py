"""A Flower deployment on one machine: SuperLink + N SuperNodes on 127.0.0.1, driven by the ``flwr`` CLI.

This is what an operator runs (the commands of ``docs/deployment.md``), wrapped so
that a benchmark or a test can start it, run the App, kill and restart processes
and always clean up:

* every process is started in its own session (process group) with the
  environment's ``bin`` folder (``Path(sys.executable).parent``) first on ``PATH``:
  the SuperLink and the SuperNodes start ``flower-superexec`` *by name*, so without
  it they fail at start-up (``FileNotFoundError``) unless the venv is activated;
* ``FLWR_HOME`` is private to the deployment, its ``config.toml`` names one
  connection (:attr:`LocalDeployment.connection`) to the SuperLink, with TLS
  (``root-certificates``) or ``insecure = true``;
* with ``tls`` the SuperLink serves its APIs with the certificates of
  :mod:`flwr_byzantine.deploy.certs`, SuperNodes verify it with the CA; with
  ``supernode_auth`` it also starts with ``--enable-supernode-auth`` and only
  SuperNodes whose public key was registered (``flwr supernode register``,
  :meth:`LocalDeployment.register`) may connect;
* :meth:`LocalDeployment.memory` sums PSS and RSS over every process of the
  deployment (the started ones and all their descendants: SuperExec, ServerApp
  and ClientApp processes) from ``/proc``; :class:`MemorySampler` keeps the peak;
* :meth:`LocalDeployment.close` (also on ``with`` exit) sends SIGTERM to every
  process group and descendant, then SIGKILL, and waits for them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from flwr_byzantine.deploy.certs import TlsFiles

#: The environment's executables (flower-superlink, flower-supernode, flwr, flower-superexec).
BIN = Path(sys.executable).parent


#: Ports :func:`free_port` has handed out in this process (never handed out twice).
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (``bind(0)`` and outgoing connections take ports from it)."""
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server process we start, never the same one twice.

    Drawn below the kernel's ephemeral range, so that no outgoing connection (of the
    SuperNodes, ``flwr``, ...) can take it between this call and the server's bind, and
    never a port handed out before in this process: ``bind(0)`` and release gave two
    SuperNodes the same Runtime API port once (the second exited: address already in use).
    Falls back to ``bind(0)`` where the range leaves no room below it.
    """
    lo, _ = _ephemeral_range()
    rng = np.random.default_rng()  # (not the seeded global state: ports are no part of a result)
    if lo - 1024 >= 2048:
        for port in rng.integers(max(1024, lo - 12000), lo, size=200):
            port = int(port)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> pids of its live children (one pass over ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """All live descendants of ``pid`` (from ``/proc``, or the ``children`` map of one pass), children first."""
    children = _children_map() if children is None else children
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_memory(pid: int) -> tuple[int, int]:
    """``(PSS, RSS)`` of one process in bytes (0, 0 if it is gone or unreadable)."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return pss, rss


def checkpoint_round(out_dir: Path) -> int:
    """Last completed round in the ServerApp's ``out_dir/checkpoint/checkpoint.json`` (0 if none yet)."""
    try:
        return int(json.loads((Path(out_dir) / "checkpoint" / "checkpoint.json").read_text())["server_round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def read_results(out_dir: Path, run_id: int) -> dict[str, Any]:
    """The ServerApp's results JSON of ``run_id`` in ``out_dir``."""
    files = list(Path(out_dir).glob(f"*-run{run_id}.json"))
    if len(files) != 1:
        raise RuntimeError(f"expected one results file for run {run_id} in {out_dir}, found {files}")
    return json.loads(files[0].read_text())


def load_model(out_dir: Path, results: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The final model named by a results file (``model_file`` in ``out_dir``)."""
    with np.load(Path(out_dir) / results["model_file"]) as npz:
        return {k: npz[k] for k in npz.files}


def finished_epoch(stamp: str) -> float | None:
    """Seconds since the epoch of a ``flwr ls`` timestamp (``2026-11-30 02:28:36Z``); None if absent."""
    try:
        return datetime.fromisoformat(str(stamp).strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _json_tail(text: str) -> Any:
    return json.loads(text[text.index("{"):]) if "{" in text else {}


def format_node_config(cfg: Mapping[str, Any]) -> str:
    """``--node-config`` string: ``key=value`` pairs, strings quoted."""
    parts = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(f"{k}='{v}'")
    return " ".join(parts)


def format_run_config(cfg: Mapping[str, Any]) -> str:
    """``--run-config`` string (same quoting as :func:`format_node_config`)."""
    return format_node_config(cfg)


@dataclass
class Node:
    """One SuperNode of the deployment."""

    index: int
    node_config: dict[str, Any]
    key: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    #: With ``executor="fork"``: the node's SuperExec (:mod:`flwr_byzantine.deploy.forkexec`).
    executor: subprocess.Popen | None = None


class LocalDeployment:
    """SuperLink + SuperNodes on loopback; see the module docstring.

    Parameters
    ----------
    workdir:
        Folder for ``FLWR_HOME``, logs and (if used) the SuperLink database.
    app_dir:
        The Flower App (the repository root: its ``pyproject.toml``).
    tls:
        Certificates from :func:`flwr_byzantine.deploy.certs.make_tls`; None: ``--insecure``.
    supernode_auth:
        Start the SuperLink with ``--enable-supernode-auth`` (needs ``tls``).
    database:
        Keep the SuperLink's state in this SQLite file (survives a SuperLink restart).
    env:
        Extra environment variables for every process.
    executor:
        ``"flower"`` (default): each SuperNode starts Flower's ``flower-superexec``, which
        starts a new ``flwr-clientapp`` process per message. ``"fork"``: SuperNodes run with
        ``--isolation process`` next to a :mod:`flwr_byzantine.deploy.forkexec` SuperExec
        each (``--preload numpy``), which forks the ClientApp processes from a warm parent.
    """

    connection = "loopback"

    def __init__(self, workdir: Path, app_dir: Path, *, tls: TlsFiles | None = None, supernode_auth: bool = False,
                 database: Path | None = None, env: Mapping[str, str] | None = None,
                 executor: str = "flower") -> None:
        if executor not in ("flower", "fork"):
            raise ValueError(f"executor must be 'flower' or 'fork', got {executor!r}")
        self.executor = executor
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
        self.workdir = Path(workdir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.tls, self.supernode_auth, self.database = tls, supernode_auth, database
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        conn = f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\naddress = "{self.address}"\n'
        conn += f'root-certificates = "{tls.ca_cert}"\n' if tls else "insecure = true\n"
        (self.home / "config.toml").write_text(conn)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec is started by name
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **dict(env or {}),
        }
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, Node] = {}
        self._all: list[subprocess.Popen] = []
        self._starts: dict[str, int] = {}
        #: Run id -> how long :meth:`run_and_wait` took, by the SuperLink's record and by its poller.
        self.timings: dict[int, dict[str, float]] = {}

    # ----------------------------------------------------------- processes
    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen:
        n = self._starts[name] = self._starts.get(name, 0) + 1
        fh = (self.logs / f"{name}.{n}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=cwd or self.workdir, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fh.close()
        self._all.append(proc)
        return proc

    def start_superlink(self) -> subprocess.Popen:
        """Start (or restart) the SuperLink on :attr:`address`."""
        cmd = [str(BIN / "flower-superlink"), "--isolation", "subprocess", "--host", "127.0.0.1",
               "--port", str(self.port)]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                    "--ssl-keyfile", str(self.tls.server_key)]
        else:
            cmd += ["--insecure"]
        if self.supernode_auth:
            cmd += ["--enable-supernode-auth"]
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        self.superlink = self._spawn("superlink", cmd)
        return self.superlink

    def add_node(self, index: int, node_config: Mapping[str, Any], key: Path | None = None) -> Node:
        """Declare SuperNode ``index`` (started by :meth:`start_node`)."""
        node = self.nodes[index] = Node(index, dict(node_config), key)
        return node

    def start_node(self, index: int) -> subprocess.Popen:
        """Start (or restart) SuperNode ``index`` (same node config, key and Runtime API port)."""
        node = self.nodes[index]
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1",
               "--port", str(node.port), "--node-config", format_node_config(node.node_config)]
        cmd += ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        if node.key is not None:
            cmd += ["--auth-supernode-private-key", str(node.key)]
        if self.executor == "fork":
            cmd += ["--isolation", "process"]
        node.proc = self._spawn(f"supernode{index}", cmd)
        if self.executor == "fork":  # its SuperExec: the node's Runtime API is local plain HTTP
            node.executor = self._spawn(f"forkexec{index}", [
                sys.executable, "-m", "flwr_byzantine.deploy.forkexec", "--insecure",
                "--runtime-api-address", f"127.0.0.1:{node.port}", "--parent-pid", str(node.proc.pid),
                "--preload", "numpy"], cwd=self.app_dir)  # (the App's folder: this checkout's package)
        return node.proc

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        pids = descendants(proc.pid)
        try:
            os.killpg(proc.pid, sig)  # the session/process group started with the process
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # descendants that left the group
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, proc: subprocess.Popen | None, sig: int = signal.SIGKILL, wait: float = 30.0) -> None:
        """Send ``sig`` to ``proc``'s process group and descendants; wait for ``proc`` to exit."""
        if proc is None:
            return
        self._signal(proc, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self._signal(proc, signal.SIGKILL)
            proc.wait(timeout=30)

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``index`` and its SuperExec (default ``kill -9``, as a crash of the device)."""
        node = self.nodes[index]
        self.kill(node.proc, sig)
        self.kill(node.executor, sig)

    def kill_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Kill the SuperLink and its SuperExec/ServerApp processes (default ``kill -9``)."""
        self.kill(self.superlink, sig)

    def close(self, grace: float = 10.0) -> None:
        """Stop everything this deployment started: SIGTERM, ``grace`` s, then SIGKILL."""
        trees = {p.pid: descendants(p.pid) for p in self._all}
        for proc in self._all:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self._all:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for proc in self._all:
            self._signal(proc, signal.SIGKILL)
            for pid in trees.get(proc.pid, []):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        """Every live process of the deployment (started ones and their descendants)."""
        out: list[int] = []
        children = _children_map()  # one pass over /proc for all of them (sampled every second)
        for proc in self._all:
            if proc.poll() is None:
                out.append(proc.pid)
            out.extend(descendants(proc.pid, children))
        return sorted(set(out))

    def memory(self) -> tuple[int, int, int]:
        """``(PSS, RSS, number of processes)`` summed over :meth:`pids`, in bytes."""
        pss = rss = 0
        pids = self.pids()
        for pid in pids:
            p, r = process_memory(pid)
            pss += p
            rss += r
        return pss, rss, len(pids)

    def node_ids(self) -> dict[int, int]:
        """SuperNode index -> the node id its latest start printed (``SuperNode ID: N``).

        This is who the node *is* (its node config is ours), not what its ClientApp claims.
        """
        out: dict[int, int] = {}
        for index in self.nodes:
            logs = sorted(self.logs.glob(f"supernode{index}.*.log"), key=lambda p: int(p.suffixes[0][1:]))
            for path in reversed(logs):
                found = re.findall(r"SuperNode ID: (\d+)", path.read_text(errors="replace"))
                if found:
                    out[index] = int(found[-1])
                    break
        return out

    def logs_tail(self, chars: int = 2000) -> str:
        """The end of every log file (for assertion messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.logs.iterdir()))

    def prefetch_partitions(self, num_partitions: int, dataset: str = "digits", alpha: float = 1.0,
                            seed: int = 0) -> float:
        """Provision the nodes' data: ``python -m flwr_byzantine.data.cache`` with this deployment's environment.

        Fills the ClientApp's partition cache, so that even the first round's ClientApps
        skip scikit-learn and ``datasets``, and the ServerApp's test set (same machine, same
        cache).  Returns the seconds it took.
        """
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "flwr_byzantine.data.cache", "--dataset", dataset,
                        "--num-partitions", str(num_partitions), "--alpha", repr(float(alpha)), "--seed", str(seed),
                        "--test-set"],
                       cwd=self.app_dir, env=self.env, check=True, capture_output=True, timeout=600)
        return time.monotonic() - t0

    # ----------------------------------------------------------- flwr CLI
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment (from the App's folder)."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.app_dir, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def register(self, public_key: Path, attempts: int = 20, wait: float = 3.0) -> int:
        """``flwr supernode register PUBLIC_KEY``: authorise a SuperNode key; returns its node id.

        Retried while the SuperLink is not answering yet (``flwr`` may exit 0 on a
        connection error, so success is read from the JSON output); raises ``RuntimeError``.
        """
        out = ""
        for _ in range(attempts):
            reg = self.flwr("supernode", "register", str(public_key), self.connection, "--format", "json")
            out = reg.stdout + reg.stderr
            try:
                doc = _json_tail(reg.stdout)
            except ValueError:
                doc = {}
            if reg.returncode == 0 and doc.get("success") is True and doc.get("node-id"):
                return int(doc["node-id"])
            time.sleep(wait)
        raise RuntimeError(f"could not register {public_key}: {out[-2000:]}")

    def node_list(self) -> list[dict[str, Any]]:
        """``flwr supernode ls`` as a list of dicts ([] if the SuperLink does not answer)."""
        try:
            ls = self.flwr("supernode", "ls", self.connection, "--format", "json", timeout=60)
        except subprocess.TimeoutExpired:
            return []
        if ls.returncode != 0:
            return []
        try:
            return list(_json_tail(ls.stdout).get("nodes", []))
        except ValueError:
            return []

    def online(self) -> int:
        """Number of SuperNodes the SuperLink reports ``online``."""
        return sum(n.get("status") == "online" for n in self.node_list())

    def _restart_port_clashes(self) -> list[int]:
        """Restart, on a new port, every SuperNode that exited because its Runtime API port was taken.

        Returns the indices restarted.  A node killed on purpose (any other exit) is left alone.
        """
        restarted = []
        for index, node in self.nodes.items():
            if node.proc is None or node.proc.poll() is None:
                continue
            n = self._starts.get(f"supernode{index}", 0)
            log = self.logs / f"supernode{index}.{n}.log"
            text = log.read_text(errors="replace") if log.is_file() else ""
            if "address already in use" not in text.lower():
                continue
            self.kill(node.executor)
            node.port = free_port()
            self.start_node(index)
            restarted.append(index)
        return restarted

    def wait_online(self, count: int, timeout: float = 300.0, poll: float = 2.0) -> float:
        """Wait until ``count`` SuperNodes are online; returns the seconds waited (raises on timeout).

        A SuperNode whose Runtime API port was taken meanwhile is restarted on a new one.
        """
        t0 = time.monotonic()
        online = 0
        while time.monotonic() - t0 < timeout:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {self.superlink.returncode}\n{self.logs_tail()}")
            online = self.online()
            if online >= count:
                return time.monotonic() - t0
            self._restart_port_clashes()
            time.sleep(poll)
        raise TimeoutError(f"{online} of {count} SuperNodes online after {timeout:.0f} s\n{self.logs_tail()}")

    def run(self, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP CONNECTION --run-config ...``; returns the run id."""
        started = self.flwr("run", ".", self.connection, "--format", "json", "--run-config",
                            format_run_config(run_config), timeout=300)
        if started.returncode != 0:
            raise RuntimeError(f"flwr run failed: {started.stdout}{started.stderr}")
        return int(_json_tail(started.stdout)["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id RUN_ID``: the run's row (``status``, ``pending-at``, ``finished-at``, ...); {} if unknown."""
        try:
            ls = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json", timeout=60)
        except subprocess.TimeoutExpired:
            return {}
        if ls.returncode != 0:
            return {}
        try:
            runs = _json_tail(ls.stdout).get("runs", [])
        except ValueError:
            return {}
        return dict(runs[0]) if runs else {}

    def status(self, run_id: int) -> str:
        """The run's status (``finished:completed`` at the end; '' if unknown)."""
        return str(self.run_info(run_id).get("status", ""))

    def wait_finished(self, run_id: int, timeout: float = 600.0, poll: float = 3.0) -> str:
        """Wait until the run is ``finished:*``; returns the status ('' or the last one on timeout)."""
        t0 = time.monotonic()
        status = ""
        while time.monotonic() - t0 < timeout:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        return status

    def run_and_wait(self, name: str, run_config: Mapping[str, Any], out_dir: Path, timeout: float = 900.0,
                     events: list[tuple[int, Callable[[], str]]] | None = None,
                     crash: tuple[int, Callable[[], str]] | None = None) -> tuple[int, float, list[dict[str, Any]]]:
        """``flwr run`` with ``output-dir = out_dir`` (run config ``checkpoint = true`` to see rounds).

        Fires ``events`` (``(after_round, action)``, ``action() -> description``) as the
        ServerApp's checkpoint reaches ``after_round``, then waits for ``finished:completed``.
        The seconds returned run from just before ``flwr run`` to the SuperLink's
        ``finished-at`` (recorded in whole seconds, so + 1 s: an upper bound), or to the
        moment this poller saw the status if that is earlier; both are kept in
        :attr:`timings` (``finished_at_seconds``, ``status_seen_seconds``) by run id.
        ``crash = (after_round, action)`` fires the action and returns at once (the run
        cannot finish).  Returns ``(run_id, seconds, event log)``; raises if the run fails.
        """
        log: list[dict[str, Any]] = []
        t0, epoch0 = time.monotonic(), time.time()
        run_id = self.run({**dict(run_config), "output-dir": str(out_dir)})
        last_round = int(run_config.get("num-server-rounds", 0)) if run_config.get("checkpoint") else 0
        pending = sorted(events or [], key=lambda e: e[0])
        last_poll, status, info = 0.0, "", {}

        def fire(after: int, action: Callable[[], str]) -> None:
            note = action()
            log.append({"after_round": after, "at_seconds": round(time.monotonic() - t0, 2), "event": note})
            print(f"[{name}] after round {after}: {note}", flush=True)

        progress, progress_at = -1, time.monotonic()
        while time.monotonic() - t0 < timeout:
            done = checkpoint_round(out_dir)
            if done != progress:
                progress, progress_at = done, time.monotonic()
            while pending and done >= pending[0][0]:
                fire(*pending.pop(0))
            if crash is not None and done >= crash[0]:
                fire(*crash)
                return run_id, time.monotonic() - t0, log
            # `flwr ls` costs a CLI start (~1 s CPU, competing with the deployment): ask every 3 s once
            # the last round is checkpointed, otherwise only after 30 s without a new checkpoint
            stalled = time.monotonic() - progress_at > 30.0
            if (done >= last_round or stalled) and time.monotonic() - last_poll > (3.0 if done >= last_round else 30.0):
                last_poll = time.monotonic()
                info = self.run_info(run_id)
                status = str(info.get("status", ""))
                if status.startswith("finished"):
                    break
            time.sleep(0.5)
        wall = time.monotonic() - t0
        if status != "finished:completed":
            raise RuntimeError(f"[{name}] run {run_id} ended with status {status!r} after {wall:.0f} s\n"
                               f"{self.server_log(run_id)[-4000:]}\n{self.logs_tail()}")
        finished = finished_epoch(info.get("finished-at", ""))
        self.timings[run_id] = {"status_seen_seconds": wall}
        if finished is not None:  # the SuperLink's own record, not when this poller saw it
            wall = min(wall, finished + 1.0 - epoch0)  # + 1 s: Flower records whole seconds (truncated)
            self.timings[run_id]["finished_at_seconds"] = wall
        return run_id, wall, log

    def stop_crashed_run(self, run_id: int, timeout: float = 60.0, poll: float = 1.0) -> float:
        """After a SuperLink restart with ``--database``: ``flwr stop RUN_ID``, then wait until no SuperNode
        is still fetching one of its messages; returns the seconds waited (at most ``timeout``).

        The database keeps the crashed run ``running`` and its last round's messages, but the
        message contents lived in the SuperLink's memory: a SuperNode that pulled such a
        message retries the missing contents (Flower's backoff, up to 10 s apart) until the run
        is no longer running, about 50 s after the restart if nobody stops it, and answers
        nothing else meanwhile.  After the stop its next try is refused and it logs ``Run ID
        ... is not in `RUNNING` status. Ignoring message``.  A node is done with the run when
        its log shows no ``Receiving`` of it without an outcome (received, ignored or sent).
        """
        self.flwr("stop", str(run_id), self.connection, timeout=120)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not any(self._fetching(index, run_id) for index in self.nodes):
                break
            time.sleep(poll)
        return time.monotonic() - t0

    def _fetching(self, index: int, run_id: int) -> bool:
        """Whether SuperNode ``index``'s latest log ends in a ``Receiving`` of a ``run_id`` message with no outcome."""
        logs = sorted(self.logs.glob(f"supernode{index}.*.log"), key=lambda p: int(p.suffixes[0][1:]))
        if not logs:
            return False
        text = logs[-1].read_text(errors="replace")
        last = text.rfind(f"[RUN {run_id}")
        if last < 0:
            return False
        tail = text[last:]
        return "Receiving" in tail and not any(m in tail for m in ("Received successfully", "Ignoring", "Sent"))

    def server_log(self, run_id: int) -> str:
        """``flwr log RUN_ID --show``: the ServerApp's log."""
        try:
            return self.flwr("log", str(run_id), self.connection, "--show", timeout=120).stdout
        except subprocess.TimeoutExpired:
            return ""


#: Process kinds of a deployment, by the executable in their command line (see :func:`process_kind`).
PROCESS_KINDS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")


def process_kind(pid: int) -> str:
    """Which of :data:`PROCESS_KINDS` process ``pid`` runs (``"other"`` if none, or it is gone).

    From the command line; a :mod:`flwr_byzantine.deploy.forkexec` SuperExec counts as
    ``flower-superexec`` and the ClientApps it forks (same command line, name
    ``flwr-clientapp``) as ``flwr-clientapp``; a zombie (an exited process its parent has not
    reaped yet, e.g. a finished ClientApp until its SuperExec's next poll) by its name in ``stat``.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm == "flwr-clientapp":  # Flower's, or forked by forkexec (which names it so)
            return comm
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = fh.read().split(b"\0")
        for arg in args[:3]:  # [python,] executable path, ...
            name = os.path.basename(arg.decode(errors="replace"))
            if name in PROCESS_KINDS:
                return name
            if name == "flwr_byzantine.deploy.forkexec":
                return "flower-superexec"
        if not any(args):
            for kind in PROCESS_KINDS:
                if comm == kind[:15]:  # the kernel keeps 15 characters of the name
                    return kind
    except (OSError, ValueError):
        pass
    return "other"


class MemorySampler:
    """Samples the deployment's memory every ``interval`` s in a thread; keeps the peaks.

    ``peak_pss`` / ``peak_rss`` / ``peak_processes``: the largest sums over all processes
    (:meth:`LocalDeployment.pids`); ``peak_by_kind``: at the PSS peak, ``{kind: (PSS bytes,
    processes)}`` per :func:`process_kind`.
    """

    def __init__(self, deployment: LocalDeployment, interval: float = 1.0) -> None:
        self.deployment, self.interval = deployment, interval
        self.peak_pss = self.peak_rss = self.peak_processes = 0
        self.peak_by_kind: dict[str, tuple[int, int]] = {}
        self.samples, self.cpu_seconds = 0, 0.0  # the sampler's own cost (PSS: ~2 ms of CPU per process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        """One sample of every process of the deployment."""
        pss = rss = 0
        by_kind: dict[str, tuple[int, int]] = {}
        pids = self.deployment.pids()
        for pid in pids:
            p, r = process_memory(pid)
            pss, rss = pss + p, rss + r
            kind = process_kind(pid)
            total, count = by_kind.get(kind, (0, 0))
            by_kind[kind] = (total + p, count + 1)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_by_kind = pss, by_kind
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.thread_time()
            self.sample()
            self.cpu_seconds += time.thread_time() - t
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

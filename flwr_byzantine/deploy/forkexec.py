"""A SuperExec whose ClientApp processes are forked from a warm parent instead of started afresh.

Flower 1.42's SuperExec (``flower-superexec``, started by each SuperNode in its default
``--isolation subprocess``) runs every message in a new ``flwr-clientapp`` process
(``SubprocessExecutor``: ``subprocess.Popen(["flwr-clientapp", ...])``), which first imports
most of Flower: 1.2-1.7 s of CPU and about 95 MB per message on a small machine, for a
training step of a few milliseconds.  This module is the same SuperExec (Flower's
``flower-superexec`` command line and main loop, all its flags) with one executor
replaced: :class:`ForkExecutor` imports what ``flwr-clientapp`` imports once, then
``os.fork()``s a child per ClientApp task that runs Flower's own
``flwr.supernode.runtime.run_clientapp.run_clientapp`` with the task's token, exactly
as ``flwr-clientapp`` would.  Each message still gets its own process (a fresh App
import, its own crash and memory boundary, killed with its parent); what is saved is
the interpreter start and Flower's imports, and the child shares the parent's pages
copy-on-write.  Other task types fall back to Flower's ``SubprocessExecutor``.

An operator uses it with the SuperNode's ``--isolation process`` (the SuperNode then
starts no SuperExec of its own) and one of these per SuperNode, on the same machine::

    flower-supernode --insecure --superlink SERVER:9093 --isolation process --port 9094 \\
        --node-config "partition-id=0 num-partitions=20"
    python -m flwr_byzantine.deploy.forkexec --insecure --runtime-api-address 127.0.0.1:9094 \\
        --preload numpy

(``--insecure`` here is the SuperNode's local Runtime API, which is plain HTTP unless the
SuperNode has ``--ssl-certfile``; the SuperNode's own connection to the SuperLink keeps TLS.)
``--preload MODULE`` (repeatable) imports third-party modules the ClientApp needs into the
warm parent; never preload the App's own packages: each ClientApp must load the App from
its FAB.  The App is not changed by any of this.

Only for POSIX (``os.fork``), and for flwr ``>=1.41,<1.43`` (the project's pin): the
executor is put in place by replacing ``get_executor`` in Flower's ``run_superexec``
module, which :func:`main` checks before it starts.
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # Flower is imported when the executor is built, not with this module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

#: ``/proc/PID/comm`` of a forked ClientApp (what ``ps`` and the deployment's process kinds see).
CHILD_NAME = "flwr-clientapp"


def _run_clientapp_child(spec: ExecutionSpec) -> int:  # pragma: no cover - runs in a forked child (tests check its effect)
    """Body of a forked child: Flower's ``run_clientapp`` for ``spec``; returns the exit code."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # The child starts with the parent's exit handlers (close the parent's Runtime API client,
    # ...) and signal handlers; a ClientApp process has neither: run_clientapp installs its own.
    exit_handler.registered_exit_handlers.clear()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        with open("/proc/self/comm", "w", encoding="utf-8") as fh:
            fh.write(CHILD_NAME)
    except OSError:
        pass
    sys.argv = [CHILD_NAME, "--runtime-api-address", spec.runtime_api_address]
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        return 0
    except SystemExit as ex:  # flwr_exit ends every ClientApp process with sys.exit
        return ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
        return 1


class ForkExecutor:
    """Flower ``Executor`` that forks ClientApp tasks from this (warm) process.

    ``launch`` forks a child for a ``flwr-clientapp`` task (see the module docstring) and
    hands any other task type to Flower's ``SubprocessExecutor``; ``reconcile`` (called by
    the SuperExec's loop before every task poll) reaps finished children, so none is left
    as a zombie.  ``children`` maps the running forked children's pids to their task ids;
    ``exits`` keeps ``(task_id, exit status)`` of the last 64 reaped ones.
    """

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self.children: dict[int, int] = {}
        self.exits: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """Every task type can start at once (as Flower's ``SubprocessExecutor``)."""
        return self._fallback.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                    root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate."""
        return None

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a ClientApp child for ``spec`` (other task types: a subprocess, as Flower does)."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as ex:
            return LaunchResult.failed(f"fork failed: {ex}")
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                code = _run_clientapp_child(spec)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.children[pid] = spec.task_id
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap every finished child (forked ClientApps and fallback subprocesses)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.exits.append((self.children.pop(pid), os.waitstatus_to_exitcode(status)))

    def close(self) -> None:
        """Nothing to release: children watch this process (``--parent-pid``) and exit with it."""
        self.reconcile()


def preload(modules: Sequence[str]) -> None:
    """Import what a ``flwr-clientapp`` process imports, plus ``modules``; then freeze the GC.

    ``gc.freeze()`` moves every object made so far out of the collector's generations, so a
    forked child's collections do not write to (and copy) the parent's pages.
    """
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401 - the ClientApp's imports
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def install() -> None:
    """Make Flower's SuperExec main loop use :class:`ForkExecutor` for its default (subprocess) executor.

    Raises ``RuntimeError`` if this flwr has no ``run_superexec.get_executor`` to replace.
    """
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as module

    original = getattr(module, "get_executor", None)
    if original is None:
        raise RuntimeError("this flwr has no flwr.supercore.superexec.run_superexec.get_executor; "
                           "flwr_byzantine.deploy.forkexec supports flwr >=1.41,<1.43")

    def get_executor(executor_type, executor_config=None, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return ForkExecutor()
        return original(executor_type, executor_config, **kwargs)

    module.get_executor = get_executor


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flwr_byzantine.deploy.forkexec [--preload MODULE ...] FLOWER_SUPEREXEC_ARGS``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preload", action="append", default=[])
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from flwr.supercore.cli import flower_superexec

    preload(ours.preload)
    install()
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


if __name__ == "__main__":
    main()

"""Deployment tooling: TLS certificates and SuperNode keys for loopback testing, a local SuperLink/SuperNode launcher.

* :mod:`flwr_byzantine.deploy.certs` (``python -m flwr_byzantine.deploy.certs``):
  a CA, a SuperLink server certificate for 127.0.0.1/localhost and SuperNode
  authentication key pairs (ECDSA P-384, OpenSSH format).
* :mod:`flwr_byzantine.deploy.forkexec` (``python -m flwr_byzantine.deploy.forkexec``):
  Flower's SuperExec with ClientApp processes forked from a warm parent, for
  SuperNodes started with ``--isolation process`` (no per-message interpreter start
  and Flower import).
* :mod:`flwr_byzantine.deploy.local`: starts a SuperLink and N SuperNodes on
  127.0.0.1 (optionally with TLS and node authentication), runs the App with
  ``flwr run``, kills and restarts processes, samples their memory from ``/proc``
  and stops everything it started (used by ``benchmarks/deployment.py`` and the
  slow deployment tests).

No Flower imports at module level; the math packages never import this one.
"""

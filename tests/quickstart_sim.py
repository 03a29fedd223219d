"""Real Flower simulation (Ray backend) of the quickstart-style app: ``python tests/quickstart_sim.py NAME OUTDIR``.

NAME is ``fedavg`` / ``robust`` (clean) or ``fedavg-attacked`` / ``robust-attacked`` (partitions 3
and 7 reply reversed x10 updates).  Writes ``OUTDIR/result.json`` (central accuracy per round).
Used by ``tests/test_robust_fedavg.py::test_quickstart_ray_simulation`` (slow).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import quickstart_app as qa  # noqa: E402
from flwr_byzantine.strategies import RobustFedAvg  # noqa: E402

NUM_NODES, ROUNDS, ATTACKERS = 10, 20, {3, 7}


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    make = RobustFedAvg if name.startswith("robust") else FedAvg
    client = qa.build_client_app(local_epochs=2, lr=0.1)
    if name.endswith("attacked"):
        client = qa.reversed_updates(client, ATTACKERS)
    server = qa.server_app(make, ROUNDS, out)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": False}}
    run_simulation(server_app=server, client_app=client, num_supernodes=NUM_NODES, backend_config=backend)
    if not (Path(out) / "result.json").exists():
        raise SystemExit("the ServerApp did not write its result")


if __name__ == "__main__":
    main()

"""Run the flwr-byzantine App in-process with Flower's simulation runtime (Ray backend).

``python -m server_app.simulate --num-supernodes 10 --run-config "aggregator='mean' num-server-rounds=5"``

Same ServerApp and ClientApp as ``flwr run .``, with the run-config overrides
applied on both sides; used by the end-to-end tests and the benchmarks.  Prints
the path of the results JSON the ServerApp wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from clients.client_app import build_client_app
from server_app.server_app import build_server_app


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k1=v1 k2=v2"`` (TOML values, like ``flwr run --run-config``)."""
    if not text.strip():
        return {}
    return tomllib.loads("\n".join(text.split()))


def simulate(overrides: dict[str, Any], num_supernodes: int, num_cpus: int | None = None) -> None:
    """Run one federation; the results JSON lands in ``overrides['output-dir']``."""
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or max(os.cpu_count() or 1, 1), "num_gpus": 0,
                      "logging_level": "ERROR", "log_to_driver": False},
    }
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=num_supernodes,
        backend_config=backend_config,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-supernodes", type=int, default=20)
    parser.add_argument("--run-config", default="", help="overrides, e.g. \"aggregator='mean' seed=1\"")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()
    overrides = parse_overrides(args.run_config)
    simulate(overrides, args.num_supernodes, args.num_cpus)
    out = Path(overrides.get("output-dir", "outputs")).resolve()
    print(json.dumps({"output-dir": str(out)}))


if __name__ == "__main__":
    main()

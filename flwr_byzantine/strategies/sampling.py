"""Seeded node sampling shared by every strategy (Flower's ``sample_nodes`` made deterministic)."""

from __future__ import annotations

import random
import time
from logging import INFO

from flwr.serverapp import Grid
from flwr.supercore import log


def sample_nodes(grid: Grid, rng: random.Random, fraction: float, min_nodes: int, min_available: int,
                 wait_timeout: float | None = None) -> list[int]:
    """``max(floor(fraction * n), min_nodes)`` of the connected node ids, drawn with ``rng``, sorted.

    Waits (polling every second, logging every 10 s) until ``max(min_available, wanted)``
    nodes are connected, at most ``wait_timeout`` seconds (``None``: no limit), then samples
    from whatever is connected.  Node ids are sorted before the draw, so the choice depends
    only on the set of ids and the generator's state.
    """
    nodes = sorted(int(n) for n in grid.get_node_ids())
    wanted = max(int(len(nodes) * fraction), min_nodes)
    start = time.monotonic()
    waited = 0
    while len(nodes) < max(min_available, wanted):
        if wait_timeout is not None and time.monotonic() - start >= wait_timeout:
            break
        if waited % 10 == 0:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), max(min_available, wanted))
        time.sleep(1.0)
        waited += 1
        nodes = sorted(int(n) for n in grid.get_node_ids())
    return sorted(rng.sample(nodes, min(wanted, len(nodes))))

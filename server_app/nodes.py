"""Waiting for a federation's SuperNodes before the first round (shared by the ServerApps)."""

from __future__ import annotations

import time

from flwr.serverapp import Grid


def wait_for_nodes(grid: Grid, minimum: int, *, settle: float = 2.0, timeout: float = 300.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected and the count has not changed for ``settle`` s.

    Nodes register asynchronously (in simulations too): sizing the federation on the first
    nodes that show up would build the aggregator (RGE's R, a peer rule's f, COMRADE's
    ceil((1 - beta) m)) for a fraction of the federation.
    """
    start = time.monotonic()
    nodes = sorted(grid.get_node_ids())
    stable_since = time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(0.5)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
        elif len(nodes) >= minimum and time.monotonic() - stable_since >= settle:
            break
    return nodes

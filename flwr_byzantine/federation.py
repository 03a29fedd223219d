"""Who is malicious in a simulated federation (pure numpy; shared by ClientApp and ServerApp)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from . import seeds


def malicious_partition_ids(num_partitions: int, num_malicious: int, seed: int) -> list[int]:
    """The partition ids whose clients attack in a simulation: a seeded random subset.

    Deterministic in ``(num_partitions, num_malicious, seed)`` so that clients
    (deciding whether to attack) and the server (reporting which ids it filtered
    against which ids were malicious) agree without any message.  The server
    never uses this to filter.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    m = int(min(max(num_malicious, 0), num_partitions))
    rng = np.random.default_rng([int(seed), seeds.MALICIOUS_PARTITIONS])
    return sorted(int(i) for i in rng.choice(num_partitions, size=m, replace=False))


def node_is_malicious(node_config: Mapping[str, Any], partition_id: int, num_partitions: int,
                      num_malicious: int, seed: int) -> bool:
    """Whether this node attacks, for every method's ClientApp.

    Node config ``malicious`` decides when present (deployments; ``true`` / ``1`` / ``yes``, any
    case, or a bool); otherwise (simulations) the partition id's membership in
    :func:`malicious_partition_ids` of run config ``num-malicious`` and ``seed``.
    """
    if "malicious" in node_config:
        value = node_config["malicious"]
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
    return partition_id in malicious_partition_ids(num_partitions, num_malicious, seed)

"""Who is malicious in a simulated federation (pure numpy; shared by ClientApp and ServerApp)."""

from __future__ import annotations

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

"""Named salts of the project's random streams, in one place.

Every seeded random choice draws from ``numpy.random.default_rng([seed, ..., SALT, ...])``
with its own salt below, so that two streams derived from the same run seed are
independent (e.g. who is malicious versus how the data is partitioned).  The values
are part of the reproducibility contract: changing one changes every result that
depends on that stream.  A test checks that they are distinct.
"""

from __future__ import annotations

#: Which partitions are malicious in a simulated federation, SGD or Newton (:mod:`flwr_byzantine.federation`).
MALICIOUS_PARTITIONS = 0xB12
#: Repair of too small partitions (:mod:`flwr_byzantine.data.partition`).
PARTITION_REPAIR = 0x5EED
#: The synthetic GLM data set (:mod:`flwr_byzantine.data.libsvm`).
SYNTHETIC_GLM = 0x5E7
#: Uniform row permutation of the GLM federated split.
GLM_UNIFORM_SPLIT = 0x0A1F
#: Rows the server keeps for its own objective in the GLM federated split.
GLM_SERVER_ROWS = 0x5E4
#: Static corrupt set of the mobile adversary (:mod:`flwr_byzantine.attacks.mobile`).
MOBILE_STATIC = 0x57A71C
#: Per-round corrupt set of the mobile adversary in ``random`` mode.
MOBILE_RANDOM = 0x40B11E
#: Rotation order of the mobile adversary in ``rotate`` mode.
MOBILE_ROTATE = 0x2074
#: Label flipping permutation (:class:`flwr_byzantine.attacks.data.LabelFlip`).
LABEL_FLIP = 0x1AB
#: Random labels (:class:`flwr_byzantine.attacks.data.RandomLabels`).
RANDOM_LABELS = 0x2AB
#: A client-side attacker's estimate batches (independent of the honest mini-batch stream).
ESTIMATE_BATCHES = 0xE57
#: Multiplier that gives each client's data attack its own seed: ``seed * CLIENT_STRIDE + partition_id``.
CLIENT_STRIDE = 100_003


def client_seed(seed: int, partition_id: int) -> int:
    """Seed of a per-client stream (data poisoning, Newton update attacks): ``seed * CLIENT_STRIDE + partition_id``."""
    return int(seed) * CLIENT_STRIDE + int(partition_id)


#: Every salt above, by name (for the distinctness test).
SALTS = {name: value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, int)}

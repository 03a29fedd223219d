"""Datasets, partitions and the Section 6 synthetic model for the flwr-byzantine clients and server.

Pure library code: imports ``datasets`` / ``flwr_datasets`` / scikit-learn, never ``flwr``.
"""

from flwr_byzantine.data.digits import load_digits_arrays
from flwr_byzantine.data.hub import HUB_DATASETS, images_to_arrays, load_hub_partition, load_hub_test_set
from flwr_byzantine.data.partition import (
    SYNTHETIC_DATASETS,
    VALID_DATASETS,
    dataset_info,
    dirichlet_partition,
    iid_partition,
    load_partition,
    load_test_set,
    parse_synthetic_name,
)
from flwr_byzantine.data.synthetic import SyntheticHeterogeneous

__all__ = [
    "HUB_DATASETS",
    "SYNTHETIC_DATASETS",
    "VALID_DATASETS",
    "SyntheticHeterogeneous",
    "dataset_info",
    "dirichlet_partition",
    "iid_partition",
    "images_to_arrays",
    "load_digits_arrays",
    "load_hub_partition",
    "load_hub_test_set",
    "load_partition",
    "load_test_set",
    "parse_synthetic_name",
]

"""Shared test fixtures: the Flower task identity needed to build Messages."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    """Flower needs a task identity to build Messages outside a running ServerApp."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    yield


@pytest.fixture(autouse=True, scope="session")
def partition_cache(tmp_path_factory):
    """Keep the ClientApp's on-disk partition cache (flwr_byzantine.data.cache) inside the test's tmp dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLWR_BYZANTINE_CACHE", str(tmp_path_factory.mktemp("partition-cache")))
    yield
    mp.undo()

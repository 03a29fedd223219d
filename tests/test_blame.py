"""Blame by identity: results name removed clients by Flower node id; claimed partitions are labels."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flwr_byzantine.config import RunConfig
from flwr_byzantine.results import blame
from server_app.server_app import run_federation

from fakes import FakeGrid

NODES = [1000 + 7 * i for i in range(8)]
ATTACKERS = {NODES[5]: 0, NODES[6]: 3}  # node id -> the partition it *claims* (honest nodes 0 and 3 own them)


def test_blame_unit():
    reports = [
        {"filtered": [11, 12], "partition_ids": {"10": 0, "11": 0, "12": 5, "13": 1}},
        {"filtered": [13], "partition_ids": {"10": 0, "13": 1}},
        {"filtered": [14], "partition_ids": {"14": 2}},
        {"filtered": [], "partition_ids": {"14": 4}},  # node 14 changes its claim
    ]
    out = blame(reports, num_nodes=4)
    assert out["filtered_node_ids"] == [11, 12, 13, 14]
    assert out["filtered_partitions"] == [1]  # 0: claimed twice, 5: out of range, 2: claim changed
    assert out["partition_claim_conflicts"] == [0, 2, 4, 5]


def _handler(msg: Message) -> Message:
    """Honest nodes reply small gradients and their own partition id; two attackers lie about theirs."""
    node = int(msg.metadata.dst_node_id)
    arrays = msg.content["arrays"]
    rng = np.random.default_rng(node)
    grads = {k: 0.01 * rng.normal(size=a.numpy().shape).astype(np.float32) for k, a in arrays.items()}
    if node in ATTACKERS:
        grads = {k: -1e3 * np.ones_like(g) for k, g in grads.items()}
    pid = ATTACKERS.get(node, NODES.index(node))
    rnd = int(msg.content["config"]["server-round"])
    rec = RecordDict({"gradient": ArrayRecord({k: Array(g) for k, g in grads.items()}),
                      "metrics": MetricRecord({"server-round": rnd, "partition-id": pid, "train-loss": 1.0})})
    return Message(rec, reply_to=msg)


def test_results_name_filtered_nodes_not_claimed_partitions(tmp_path, caplog):
    import logging

    cfg = RunConfig.from_mapping({"num-server-rounds": 2, "num-malicious": 0, "output-dir": str(tmp_path),
                                  "aggregator": "rge"})
    flwr_logger = logging.getLogger("flwr")  # other tests may stop it propagating: listen to it directly
    direct = not flwr_logger.propagate
    if direct:
        flwr_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="flwr"):
            payload = run_federation(FakeGrid(NODES, _handler), object(), cfg)
    finally:
        if direct:
            flwr_logger.removeHandler(caplog.handler)
    # the run's plot: the defence against one plain-mean step from the same model, filtered nodes marked
    plot = tmp_path / payload["plot_file"]
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert any(str(plot) in r.getMessage() for r in caplog.records)
    assert sorted(payload["undefended_one_step"]) == ["1", "2"]
    for rnd, metrics in payload["undefended_one_step"].items():
        assert metrics["loss"] != payload["central"][rnd]["loss"]  # the -1e3 rows move the plain mean
    assert payload["filtered_node_ids"] == sorted(ATTACKERS)
    assert payload["filtered_partitions"] == []  # 0 and 3 were claimed by two nodes each: not a label
    assert payload["partition_claim_conflicts"] == [0, 3]
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["filtered_node_ids"] == sorted(ATTACKERS)

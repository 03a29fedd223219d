"""The ClientApp's train function called in-process: honest replies and every kind of client-side attack."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import (
    DEFAULT_ESTIMATE_BATCHES,
    _node_attack,
    build_client_app,
    colluders,
    estimate_batches,
    minibatch_indices,
)
from flwr_byzantine.aggregators import RGE
from flwr_byzantine.attacks import LabelFlip, alie_z_max
from flwr_byzantine.compression.randk import RANDK_PROCEDURE, coordinate_digest, draw_coordinates
from flwr_byzantine.config import RunConfig
from flwr_byzantine.data import load_partition
from flwr_byzantine.federation import malicious_partition_ids
from flwr_byzantine.models import build_model, cross_entropy_loss

DS = "synthetic-logreg:d=10,n=60"
NUM = 4
ROUND = 3
B = 16
APP = build_client_app()


def run_config(**extra) -> dict:
    return {"dataset": DS, "model": "logreg", "seed": 0, "num-malicious": 1, "attack-scale": 0.0, **extra}


def model() -> torch.nn.Module:
    m = build_model("logreg", 10, 2, seed=0)
    with torch.no_grad():  # away from the symmetric initialisation, so gradients differ per label
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return m


def train(node_config: dict, rc: dict | None = None, config: dict | None = None, mdl=None) -> Message:
    mdl = mdl or model()
    cfg = {"server-round": ROUND, "batch-size": B, **(config or {})}
    msg = Message(RecordDict({"arrays": ArrayRecord(mdl.state_dict()), "config": ConfigRecord(cfg)}),
                  dst_node_id=5, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": NUM, **node_config},
                  state=RecordDict(), run_config=rc or run_config())
    reply = APP(msg, ctx)
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    return reply


def flat(reply: Message) -> np.ndarray:
    rc = reply.content["gradient"]
    return np.concatenate([rc[k].numpy().ravel() for k in rc.keys()])


def grad_on(X: np.ndarray, y: np.ndarray, mdl=None) -> np.ndarray:
    """Independent reference: autograd of the mean cross-entropy on (X, y)."""
    mdl = mdl or model()
    loss = cross_entropy_loss(mdl(torch.as_tensor(X)), torch.as_tensor(y))
    grads = torch.autograd.grad(loss, list(mdl.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


def partition(pid: int = 0):
    return load_partition(DS, pid, NUM, 1.0, 0)


def estimates(pid: int = 0, b: int = B, full: bool = False, num: int = DEFAULT_ESTIMATE_BATCHES) -> np.ndarray:
    X, y = partition(pid)
    return np.stack([grad_on(X[i], y[i]) for i in estimate_batches(len(y), b, num, 0, pid, ROUND, full_batch=full)])


def test_honest_reply_is_the_true_minibatch_gradient():
    X, y = partition()
    reply = train({"malicious": False})
    idx = minibatch_indices(len(y), B, 0, 0, ROUND)
    assert len(set(idx.tolist())) == B  # without replacement
    np.testing.assert_allclose(flat(reply), grad_on(X[idx], y[idx]), rtol=1e-5, atol=1e-6)
    m = reply.content["metrics"]
    assert m["server-round"] == ROUND and m["num-examples"] == B and m["partition-id"] == 0
    assert list(reply.content["gradient"].keys()) == ["linear.weight", "linear.bias"]


def test_estimate_batches_are_independent_minibatches_without_replacement():
    batches = estimate_batches(60, B, 8, 0, 0, ROUND)
    assert len(batches) == 8 and all(len(set(b.tolist())) == B for b in batches)
    assert len({tuple(sorted(b.tolist())) for b in batches}) == 8
    again = estimate_batches(60, B, 8, 0, 0, ROUND)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other_round = estimate_batches(60, B, 8, 0, 0, ROUND + 1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other_round))
    chunks = estimate_batches(60, 60, 8, 0, 0, ROUND, full_batch=True)  # full batch: disjoint chunks
    assert sorted(np.concatenate(chunks).tolist()) == list(range(60)) and len(chunks) == 8


def test_sign_flip_sends_minus_the_mean_of_its_own_estimates():
    reply = train({"malicious": True, "attack": "sign-flip"})
    E = estimates()
    np.testing.assert_allclose(flat(reply), -E.mean(axis=0), rtol=1e-5, atol=1e-6)
    # estimate-batches from node config
    reply3 = train({"malicious": True, "attack": "sign-flip", "estimate-batches": 3})
    np.testing.assert_allclose(flat(reply3), -estimates(num=3).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_full_batch_estimates_are_chunks_of_the_partition():
    reply = train({"malicious": True, "attack": "scaled-negative"}, config={"full-batch": True})
    E = estimates(full=True)
    np.testing.assert_allclose(flat(reply), -10.0 * E.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_label_flip_poisons_the_labels_before_the_gradient():
    X, y = partition()
    honest = flat(train({"malicious": False}))
    reply = train({"malicious": True, "attack": "label-flip"})
    assert not np.allclose(flat(reply), honest, atol=1e-4)
    Xp, yp = LabelFlip(seed=0 * 100_003 + 0).poison(X, y, 2)
    idx = minibatch_indices(len(y), B, 0, 0, ROUND)
    np.testing.assert_allclose(flat(reply), grad_on(Xp[idx], yp[idx]), rtol=1e-5, atol=1e-6)


def test_alie_row_stays_within_z_std_of_its_own_estimates():
    rc = run_config(**{"num-malicious": 2})
    reply = train({"malicious": True, "attack": "alie"}, rc=rc)
    E = estimates().astype(np.float64)
    mu, sd = E.mean(axis=0), E.std(axis=0)
    z = alie_z_max(NUM, 2)  # n = all partitions, f = num-malicious
    row = flat(reply)
    assert np.all(np.abs(row - mu) <= z * sd + 1e-5)
    np.testing.assert_allclose(row, mu - z * sd, rtol=1e-4, atol=1e-6)
    assert np.abs(row - mu).max() > 1e-4  # a real shift, not the mean
    # attack-scale sets z explicitly
    reply2 = train({"malicious": True, "attack": "alie"}, rc=run_config(**{"attack-scale": 1.5}))
    np.testing.assert_allclose(flat(reply2), mu - 1.5 * sd, rtol=1e-4, atol=1e-6)


def _randk_config(d: int, k: int) -> dict:
    coords = draw_coordinates(d, k, 7, ROUND)
    return {"randk-procedure": RANDK_PROCEDURE, "randk-d": d, "randk-k": k, "randk-seed": 7,
            "randk-digest": coordinate_digest(coords)}, coords


@pytest.mark.parametrize("attack", ["sign-flip", "alie", "label-flip"])
def test_randk_malicious_replies_have_length_k(attack):
    d, k = 22, 5
    config, coords = _randk_config(d, k)
    full = flat(train({"malicious": True, "attack": attack}))
    reply = train({"malicious": True, "attack": attack}, config=config)
    values = reply.content["gradient"]["values"].numpy()
    assert values.shape == (k,) and values.dtype == np.float32
    np.testing.assert_allclose(values, (d / k) * full[coords], rtol=1e-5, atol=1e-6)
    assert reply.content["metrics"]["randk-digest"] == config["randk-digest"]


def test_erasure_sends_no_gradient():
    reply = train({"malicious": True, "attack": "erasure"})
    assert "gradient" not in reply.content.array_records
    assert reply.content["metrics"]["server-round"] == ROUND


def test_simulation_colluders_from_run_config_agree_on_gaussian_draw():
    rc = run_config(**{"num-malicious": 2, "attack": "gaussian", "attack-scale": 2.0})
    bad = malicious_partition_ids(NUM, 2, 0)
    good = sorted(set(range(NUM)) - set(bad))[0]
    rows = {}
    for pid in bad + [good]:
        cfg = RunConfig.from_mapping(rc)
        rows[pid] = flat(train({"partition-id": pid}, rc=rc))
        if pid in bad:
            assert colluders(cfg, {}, pid, NUM) == (2, bad.index(pid))
    X, y = partition(good)
    idx = minibatch_indices(len(y), B, 0, good, ROUND)
    np.testing.assert_allclose(rows[good], grad_on(X[idx], y[idx]), rtol=1e-5, atol=1e-6)  # honest one
    draw = 2.0 * np.random.default_rng([0, ROUND]).standard_normal((2, rows[good].size))
    for i, pid in enumerate(bad):  # one shared seeded draw, one row each
        np.testing.assert_allclose(rows[pid], draw[i], rtol=1e-5, atol=1e-5)
    assert not np.allclose(rows[bad[0]], rows[bad[1]])


def test_defence_aware_hides_inside_the_run_config_aggregator():
    rc = run_config(**{"aggregator": "rge", "eps-tilde": 0.25})
    row = flat(train({"malicious": True, "attack": "defence-aware"}, rc=rc))
    E = estimates()
    mu = E.mean(axis=0)
    assert not np.allclose(row, mu, atol=1e-5)
    G = np.vstack([E, row[None, :]])
    assert 8 in RGE(eps_tilde=0.25).aggregate(G).kept.tolist()


def test_omniscient_mode_keeps_every_client_honest():
    cfg = SimpleNamespace(adversary="omniscient", num_malicious=4, seed=0, attack="alie")
    assert _node_attack(cfg, {"malicious": True, "attack": "alie"}, 0, NUM) is None
    cfg.adversary = "client"
    assert _node_attack(cfg, {"malicious": True, "attack": "alie"}, 0, NUM) == "alie"


def test_defence_aware_simulates_the_byzantine_share_of_eps_tilde():
    from clients.client_app import simulated_byzantine_rows

    assert simulated_byzantine_rows(0.25, 8, 4) == 2  # 2 / 10 <= 0.25 < 3 / 11
    assert simulated_byzantine_rows(0.25, 8, 1) == 1
    assert simulated_byzantine_rows(0.25, 3, 4) == 1  # at least one row
    assert simulated_byzantine_rows(0.2, 8, 5) == 2
    for eps in (0.05, 0.1, 0.2, 0.25):
        for n in range(1, 20):
            f = simulated_byzantine_rows(eps, n, 100)
            assert f == 1 or f / (n + f) <= eps + 1e-12


@pytest.mark.parametrize("aggregator", ["rge", "bulyan", "krum", "trimmed-mean", "cclip", "bucketing:cclip"])
def test_defence_aware_row_is_accepted_by_the_defence_it_targets(aggregator):
    """The crafted row passes the server's screening and sits inside the rule (no erasure, no crash)."""
    from flwr_byzantine.aggregators import build_for_federation

    rc = run_config(**{"aggregator": aggregator, "eps-tilde": 0.25, "num-malicious": 4})
    row = flat(train({"malicious": True, "attack": "defence-aware"}, rc=rc))
    E = estimates()
    assert np.isfinite(row).all()
    # not an absurd vector: far inside the server's size guard (1e6 x the median norm)
    assert np.linalg.norm(row) < 1e3 * np.median(np.linalg.norm(E, axis=1))
    if aggregator == "rge":
        assert not np.allclose(row, E.mean(axis=0), atol=1e-5)
        G = np.vstack([E] + [row[None, :]] * 2)  # 8 estimates + 2 crafted rows: a 20 % share <= eps-tilde
        res = build_for_federation("rge", len(G), 0.25).aggregate(G)
        # the first copy is kept; the second is its duplicate (one vote for one message, step 9)
        assert 8 in res.kept.tolist() and res.info["duplicates"] == [9]


def test_gradient_client_refuses_another_protocol():
    """A Newton (or unknown) protocol tag fails the ClientApp call, not a silently wrong gradient."""
    from flwr_byzantine.protocol import GRADIENT_PROTOCOL, NEWTON_PROTOCOL

    ok = train({"malicious": False}, config={"protocol": GRADIENT_PROTOCOL})
    assert "gradient" in ok.content.array_records
    mdl = model()
    msg = Message(RecordDict({"arrays": ArrayRecord(mdl.state_dict()),
                              "config": ConfigRecord({"server-round": ROUND, "batch-size": B,
                                                      "protocol": NEWTON_PROTOCOL})}),
                  dst_node_id=5, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": NUM},
                  state=RecordDict(), run_config=run_config())
    with pytest.raises(ValueError, match="protocol"):  # Flower turns it into an error reply
        APP(msg, ctx)

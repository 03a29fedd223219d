"""Checkpoint and resume: atomic state files, config checks, and resuming a killed run.

Fast tests drive :class:`RobustSGD` with a fake Grid; the slow test kills a
real ``python -m server_app.simulate ... checkpoint=true`` process group with
SIGKILL after round 2, restarts the same command and checks that the final model
equals the one of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer, TrainingState
from flwr_byzantine.compression import RandK
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid
from flwr_byzantine.compression import randk_compress
from test_randk import client_coords, values_reply
from test_robust_sgd import grad_reply, honest_handler, model_record
from flwr_byzantine.deploy.local import descendants

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Checkpointer


def _state(rnd: int, value: float) -> TrainingState:
    arrays = ArrayRecord({"w": Array(np.full((3, 4), value, np.float32)), "b": Array(np.arange(3.0))})
    result = Result(arrays=arrays, evaluate_metrics_serverapp={0: MetricRecord({"loss": 1.5, "n": 3})},
                    train_metrics_clientapp={1: MetricRecord({"ids": [1, 2**63 + 5], "nan": float("nan")})})
    return TrainingState(server_round=rnd, arrays=arrays, strategy={"rng_state": [3, [1, 2], None]},
                         strategy_arrays={"aggregator/centre": np.ones(5)}, result=result)


def test_checkpointer_roundtrip_and_atomic_files(tmp_path):
    ck = Checkpointer(tmp_path / "ck", {"seed": 1, "lr": 0.5}, meta={"num_nodes": 7})
    assert ck.load() is None and not ck.exists()
    ck.save(_state(1, 1.0))
    ck.save(_state(2, 2.0))
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["checkpoint.json", "state-r000002.npz"]  # old state and temp files gone
    st = Checkpointer(tmp_path / "ck", {"lr": 0.5, "seed": 1}).load()
    assert st.server_round == 2 and st.meta == {"num_nodes": 7}
    np.testing.assert_array_equal(st.arrays["w"].numpy(), np.full((3, 4), 2.0, np.float32))
    assert st.arrays["w"].numpy().dtype == np.float32 and st.arrays["b"].numpy().dtype == np.float64
    assert list(st.arrays.keys()) == ["w", "b"]
    np.testing.assert_array_equal(st.strategy_arrays["aggregator/centre"], np.ones(5))
    assert st.result.evaluate_metrics_serverapp[0]["n"] == 3
    assert st.result.train_metrics_clientapp[1]["ids"] == [1, 2**63 + 5]
    assert np.isnan(st.result.train_metrics_clientapp[1]["nan"])


def test_checkpointer_refuses_other_config_and_corrupt_files(tmp_path):
    Checkpointer(tmp_path, {"seed": 1, "aggregator": "rge"}).save(_state(3, 0.0))
    with pytest.raises(CheckpointMismatch, match=r"seed: checkpoint=1 now=2"):
        Checkpointer(tmp_path, {"seed": 2, "aggregator": "rge"}).load()
    npz = tmp_path / "state-r000003.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="hash"):
        Checkpointer(tmp_path, {"seed": 1, "aggregator": "rge"}).load()
    npz.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpointer(tmp_path, {"seed": 1, "aggregator": "rge"}).load()


def _rewrite(tmp_path: Path, **changes) -> None:
    """Edit checkpoint.json (a value of ``...`` deletes the field)."""
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    for key, val in changes.items():
        if val is ...:
            doc.pop(key, None)
        else:
            doc[key] = val
    (tmp_path / "checkpoint.json").write_text(json.dumps(doc))


def _rehash(tmp_path: Path, name: str) -> str:
    import hashlib

    return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


MALFORMED_DOCS = {
    "round-negative": {"server_round": -1},
    "round-zero": {"server_round": 0},
    "round-float": {"server_round": 1.9},
    "round-bool": {"server_round": True},
    "round-string": {"server_round": "3"},
    "round-missing": {"server_round": ...},
    "arrays-file-escape": {"arrays_file": "../state-r000003.npz"},
    "arrays-file-absolute": {"arrays_file": "/etc/passwd"},
    "arrays-file-other-round": {"arrays_file": "state-r000002.npz"},
    "arrays-file-type": {"arrays_file": 3},
    "hash-type": {"arrays_sha256": None},
    "model-keys-missing": {"model_keys": ...},
    "model-keys-type": {"model_keys": "w"},
    "model-keys-too-many": {"model_keys": ["w", "b", "c"]},
    "strategy-keys-too-many": {"strategy_array_keys": ["x", "y"]},
    "strategy-type": {"strategy": []},
    "result-type": {"result": "none"},
    "result-garbage": {"result": {"train_metrics_clientapp": {"x": {"a": 1}}}},
    "meta-type": {"meta": 5},
    "identity-missing": {"identity": ...},
}


@pytest.mark.parametrize("case", sorted(MALFORMED_DOCS))
def test_every_malformed_checkpoint_document_raises_checkpoint_error(tmp_path, case):
    Checkpointer(tmp_path, {"seed": 1}).save(_state(3, 0.0))
    _rewrite(tmp_path, **MALFORMED_DOCS[case])
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path, {"seed": 1}).load()


def test_arrays_file_outside_the_checkpoint_folder_is_refused(tmp_path):
    """Even when the named file exists (with the right hash) outside the folder."""
    ck_dir = tmp_path / "ck"
    Checkpointer(ck_dir, {"seed": 1}).save(_state(3, 0.0))
    (tmp_path / "state-r000003.npz").write_bytes((ck_dir / "state-r000003.npz").read_bytes())
    _rewrite(ck_dir, arrays_file="../state-r000003.npz")
    with pytest.raises(CheckpointError, match="arrays_file"):
        Checkpointer(ck_dir, {"seed": 1}).load()


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"null", b"\xff\xfe", b'{"format": "flwr-byzantine-checkpoint"}'])
def test_unreadable_checkpoint_json_raises_checkpoint_error(tmp_path, content):
    Checkpointer(tmp_path, {"seed": 1}).save(_state(3, 0.0))
    (tmp_path / "checkpoint.json").write_bytes(content)
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path, {"seed": 1}).load()


@pytest.mark.parametrize("payload", ["truncated", "not-a-zip", "nan-model", "complex-model", "pickled"])
def test_malformed_array_files_raise_checkpoint_error(tmp_path, payload):
    Checkpointer(tmp_path, {"seed": 1}).save(_state(3, 0.0))
    npz = tmp_path / "state-r000003.npz"
    if payload == "truncated":
        npz.write_bytes(npz.read_bytes()[:100])
    elif payload == "not-a-zip":
        npz.write_bytes(b"garbage" * 10)
    else:
        w = {"nan-model": np.full((3, 4), np.nan, np.float32), "complex-model": np.ones((3, 4), np.complex64),
             "pickled": np.array([{"a": 1}], dtype=object)}[payload]
        with npz.open("wb") as fh:
            np.savez(fh, model_0=w, model_1=np.arange(3.0), strategy_0=np.ones(5))
    _rewrite(tmp_path, arrays_sha256=_rehash(tmp_path, npz.name))  # a consistent hash: the content is the problem
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path, {"seed": 1}).load()


def test_wrong_size_clipping_centre_is_rejected_not_replaced(tmp_path):
    """A clipping centre that does not fit the model is a CheckpointError, not silently the median."""
    from flwr_byzantine.aggregators import make_aggregator

    def strategy():
        return RobustSGD(aggregator=make_aggregator("cclip", momentum=0.5), learning_rate=0.3, seed=1)

    nodes = range(1, 8)
    with pytest.raises(KeyboardInterrupt):
        strategy().start(CrashingGrid(nodes, honest_handler(), crash_round=3), model_record(), num_rounds=5,
                         checkpoint=Checkpointer(tmp_path, {}))
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    assert doc["strategy_array_keys"] == ["aggregator/centre"]
    npz = tmp_path / doc["arrays_file"]
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["strategy_0"] = np.ones(arrays["strategy_0"].size + 1)
    with npz.open("wb") as fh:
        np.savez(fh, **arrays)
    _rewrite(tmp_path, arrays_sha256=_rehash(tmp_path, npz.name))
    with pytest.raises(CheckpointError, match="centre"):
        strategy().start(FakeGrid(nodes, honest_handler()), model_record(), num_rounds=5,
                         checkpoint=Checkpointer(tmp_path, {}))


def test_aggregator_state_roundtrip_by_explicit_names():
    from flwr_byzantine.aggregators import make_aggregator

    agg = make_aggregator("nnm", inner="cclip", num_byzantine=1, inner_params={"momentum": 0.5})
    agg.aggregate(np.random.default_rng(0).normal(size=(6, 4)))
    state, arrays = agg.state_dict()
    assert state == {"inner": {"centre_given": False}} and sorted(arrays) == ["inner/centre"]
    fresh = make_aggregator("nnm", inner="cclip", num_byzantine=1, inner_params={"momentum": 0.5})
    fresh.load_state_dict(state, arrays, dim=4)
    np.testing.assert_array_equal(fresh.inner.centre, arrays["inner/centre"])
    with pytest.raises(ValueError, match="stateless"):
        make_aggregator("mean").load_state_dict({"x": 1}, {})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"inner": {"centre_given": False}}, {"inner/centre": np.full(4, np.nan)}, dim=4)


# ----------------------------------------------------------------------------- strategy resume


class CrashingGrid(FakeGrid):
    """Dies (like a killed server) when asked to send the training messages of ``crash_round``."""

    def __init__(self, node_ids, handler, crash_round: int):
        super().__init__(node_ids, handler)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and int(messages[0].content["config"]["server-round"]) == self.crash_round:
            raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout=timeout)


def _attacked_handler(seed: int):
    def handler(msg):
        # Deterministic per (node, round) so that a replay of a round gives the same replies.
        rnd = int(msg.content["config"]["server-round"])
        node = int(msg.metadata.dst_node_id)
        if node in (2, 7):
            reply = grad_reply(msg, np.full((3, 4), 30.0), np.full((3,), -30.0))
        else:
            rng = np.random.default_rng([seed, node, rnd])
            arrays = msg.content["arrays"]
            w, b = arrays["w"].numpy(), arrays["b"].numpy()
            reply = grad_reply(msg, w - 1.0 + 0.1 * rng.normal(size=w.shape),
                               b - 1.0 + 0.1 * rng.normal(size=b.shape))
        if "randk-procedure" not in msg.content["config"]:
            return reply
        # Algorithm 2: the same gradient, compressed to (d/k) g[K_t] (as the ClientApp does).
        g = ArrayLayout.of(reply.content["gradient"]).flatten(reply.content["gradient"])
        idx = client_coords(msg)
        return values_reply(msg, randk_compress(g, idx))

    return handler


def _eval(rnd, arrays):
    x = ArrayLayout.of(arrays).flatten(arrays)
    return MetricRecord({"err": float(np.abs(x - 1.0).max())})


@pytest.mark.parametrize("compression", [None, RandK(k=5, seed=4)])
def test_resumed_strategy_equals_uninterrupted(tmp_path, compression):
    def strategy():
        return RobustSGD(aggregator=RGE(), learning_rate=0.3, fraction_train=0.75, min_train_nodes=2,
                         compression=compression, seed=11)

    nodes = range(1, 13)
    ref = strategy()
    ref_res = ref.start(FakeGrid(nodes, _attacked_handler(0)), model_record(), num_rounds=7, evaluate_fn=_eval)

    ck = Checkpointer(tmp_path, {"seed": 11})
    first = strategy()
    with pytest.raises(KeyboardInterrupt):
        first.start(CrashingGrid(nodes, _attacked_handler(0), crash_round=4), model_record(), num_rounds=7,
                    evaluate_fn=_eval, checkpoint=ck)
    assert json.loads(ck.json_path.read_text())["server_round"] == 3
    second = strategy()
    res = second.start(FakeGrid(nodes, _attacked_handler(0)), model_record(), num_rounds=7, evaluate_fn=_eval,
                       checkpoint=Checkpointer(tmp_path, {"seed": 11}))
    assert second.resumed_from == 3
    for key in ("w", "b"):
        np.testing.assert_array_equal(res.arrays[key].numpy(), ref_res.arrays[key].numpy())
    assert [r.sampled for r in second.history] == [r.sampled for r in ref.history]
    assert [r.filtered for r in second.history] == [r.filtered for r in ref.history]
    assert sorted(res.evaluate_metrics_serverapp) == list(range(8))
    assert {r: dict(m) for r, m in res.evaluate_metrics_serverapp.items()} == \
        {r: dict(m) for r, m in ref_res.evaluate_metrics_serverapp.items()}
    assert sorted(res.train_metrics_clientapp) == list(range(1, 8))
    assert all(r.applied for r in ref.history)  # every round moved the model (no vacuous equality)


def test_resume_refuses_other_strategy_setup(tmp_path):
    ck = Checkpointer(tmp_path, {"seed": 0})
    RobustSGD(aggregator=RGE()).start(FakeGrid(range(1, 6), honest_handler()), model_record(), num_rounds=2,
                                      checkpoint=ck)
    with pytest.raises(CheckpointMismatch, match="aggregator"):
        RobustSGD(aggregator=Mean()).start(FakeGrid(range(1, 6), honest_handler()), model_record(),
                                           num_rounds=2, checkpoint=Checkpointer(tmp_path, {"seed": 0}))
    with pytest.raises(CheckpointMismatch, match="layout"):
        other = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
        RobustSGD(aggregator=RGE()).start(FakeGrid(range(1, 6), honest_handler()), other,
                                          num_rounds=2, checkpoint=Checkpointer(tmp_path, {"seed": 0}))


# ----------------------------------------------------------------------------- kill a real run

NUM_NODES = 5
ROUNDS = 25
# Flower gives the nodes of a restarted simulation new node ids, so the default defence's per-node
# memory (self-reference clipping, evidence) restarts with them and a resumed run cannot equal the
# uninterrupted one bit for bit.  This test checks the checkpoint itself, with Algorithm 3 (no per-node
# state); the default defence's own state round trip is in tests/test_temporal.py and test_defence.py.
CONFIG = (f"num-server-rounds={ROUNDS} seed=3 num-malicious=1 attack='scaled-negative' aggregator='rge-paper' "
          "batch-size=16 learning-rate=0.5")


def _sim_cmd(out: Path, checkpoint: bool) -> list[str]:
    cfg = f"{CONFIG} checkpoint={'true' if checkpoint else 'false'} output-dir='{out}'"
    return [sys.executable, "-m", "server_app.simulate", "--num-supernodes", str(NUM_NODES), "--num-cpus", "2",
            "--run-config", cfg]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started and every descendant (Ray may start its own sessions)."""
    pids = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _checkpoint_round(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["server_round"])
    except (OSError, ValueError, KeyError):
        return 0


def _final(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    with np.load(out / res["model_file"]) as data:
        model = {k: data[k] for k in data.files}
    return res, model


def _run_to_end(cmd: list[str], log: Path) -> None:
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                _kill_tree(proc)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_model(tmp_path):
    """~2.5 min on 2 shared cores (three Ray simulations): run with ``pytest -m slow``."""
    resumed_out, ref_out = tmp_path / "resumed", tmp_path / "reference"
    ck_json = resumed_out / "checkpoint" / "checkpoint.json"
    log = tmp_path / "resumed.log"

    # 1. start with checkpoint=true and SIGKILL the whole process tree once round >= 2 is checkpointed
    with log.open("ab") as fh:
        proc = subprocess.Popen(_sim_cmd(resumed_out, True), cwd=ROOT, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _checkpoint_round(ck_json) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        killed_at = _checkpoint_round(ck_json)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-4000:]
    finally:
        _kill_tree(proc)
    assert 2 <= killed_at < ROUNDS, killed_at
    assert not list(resumed_out.glob("*.json")), "no results may exist for the killed run"

    # 2. the same command again: resumes after the last checkpointed round and finishes
    _run_to_end(_sim_cmd(resumed_out, True), log)
    resumed, resumed_model = _final(resumed_out)
    assert resumed["resumed_from_round"] >= killed_at
    assert "Resuming from checkpoint" in log.read_text()

    # 3. an uninterrupted run of the same config (no checkpointing at all)
    _run_to_end(_sim_cmd(ref_out, False), tmp_path / "reference.log")
    ref, ref_model = _final(ref_out)
    assert ref["resumed_from_round"] is None

    assert sorted(resumed_model) == sorted(ref_model)
    gap = max(float(np.abs(resumed_model[k] - ref_model[k]).max()) for k in ref_model)
    print(f"\nkilled after round {killed_at}, resumed from {resumed['resumed_from_round']}; "
          f"max |resumed - uninterrupted| = {gap:.3g}")
    for key in ref_model:
        np.testing.assert_allclose(resumed_model[key], ref_model[key], rtol=1e-6, atol=1e-7)
    assert resumed["central"].keys() == ref["central"].keys() and len(ref["central"]) == ROUNDS + 1
    for rnd, metrics in ref["central"].items():
        assert resumed["central"][rnd]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9), rnd
    assert [r["server_round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    assert resumed["filtered_partitions"] == ref["filtered_partitions"] == ref["malicious_partitions"]


def test_resume_restores_stateful_aggregators(tmp_path):
    """Bucketing's permutation RNG and centred clipping's momentum centre survive a crash."""
    from flwr_byzantine.aggregators import make_aggregator

    def strategy():
        agg = make_aggregator("bucketing", inner="cclip", bucket_size=2, seed=5,
                              inner_params={"momentum": 0.5})
        return RobustSGD(aggregator=agg, learning_rate=0.3, seed=1)

    nodes = range(1, 11)
    ref = strategy().start(FakeGrid(nodes, _attacked_handler(1)), model_record(), num_rounds=6)
    first = strategy()
    with pytest.raises(KeyboardInterrupt):
        first.start(CrashingGrid(nodes, _attacked_handler(1), crash_round=4), model_record(), num_rounds=6,
                    checkpoint=Checkpointer(tmp_path, {}))
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    # explicit state_dict() names, not attribute names
    assert doc["strategy"]["aggregator_state"]["permutation_rng"]["bit_generator"] == "PCG64"
    assert doc["strategy"]["aggregator_state"]["inner"] == {"centre_given": False}
    assert doc["strategy_array_keys"] == ["aggregator/inner/centre"]
    res = strategy().start(FakeGrid(nodes, _attacked_handler(1)), model_record(), num_rounds=6,
                           checkpoint=Checkpointer(tmp_path, {}))
    for key in ("w", "b"):
        np.testing.assert_array_equal(res.arrays[key].numpy(), ref.arrays[key].numpy())

"""Property-based fuzzing of RobustSGD's reply screening, aggregation and metrics (hypothesis).

Random federations (6-12 sampled nodes, a few unsampled ones) answer each round
with a random mixture of honest and hostile replies: error replies, silence,
missing / extra / duplicated records, wrong array keys, random shapes, dtypes
(int, uint, bool, complex, strings, float16/float64), NaN/Inf, huge values,
wrong round echoes, wrong message types or groups, oversized payloads, stale
randk coordinate digests, duplicated senders, unsampled senders and random
metric garbage.  For RGE and the plain mean, with and without randk:

* no exception escapes ``aggregate_train`` / ``aggregate_evaluate``;
* the model never gets a non-finite parameter (and keeps its dtype);
* every sampled node is either accepted or rejected (with a reason and the
  expected kind), every hostile reply is rejected, every honest one accepted,
  and the counts in the round's metrics agree with the report.

Each test calls its ``@given`` function directly and then asserts (and prints)
how many generated cases ran, so the number of cases is visible in ``pytest -s``
output and checked.  The default suite runs 250 / 200 derandomized cases (every
rejection kind and behaviour is still generated, which the tests assert); longer
campaigns: ``FUZZ_TRAIN_EXAMPLES=5000 FUZZ_EVAL_EXAMPLES=2000 python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.compression import RandK
from flwr_byzantine.strategies.robust_base import RunFailed
from flwr_byzantine.strategies.robust_sgd import RobustSGD
from flwr_byzantine.strategies.validation import REJECTION_KINDS

from fakes import FakeGrid
from test_robust_sgd import model_record

TRAIN_EXAMPLES = int(os.environ.get("FUZZ_TRAIN_EXAMPLES", "250"))
EVAL_EXAMPLES = int(os.environ.get("FUZZ_EVAL_EXAMPLES", "200"))

#: Counters of generated cases (and what they contained), checked after each run.
STATS: dict[str, int] = {"train_cases": 0, "rounds": 0, "replies": 0, "eval_cases": 0}
KINDS_SEEN: set[str] = set()
BEHAVIOURS_SEEN: set[str] = set()

FUZZ_SETTINGS = settings(
    max_examples=TRAIN_EXAMPLES, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

#: behaviour -> kind the server must reject it with (None: valid, must be accepted;
#: "maybe-magnitude": valid encoding, may be rejected as an absurd magnitude).
BEHAVIOURS: dict[str, str | None] = {
    "honest": None,
    "honest-float64": None,
    "honest-float16": None,
    "honest-no-echo": None,
    "honest-metric-garbage": None,
    "huge-float32": "maybe-magnitude",
    "error": "error",
    "silent": "no-reply",
    "no-gradient": "format",
    "extra-array-record": "format",
    "extra-config-record": "format",
    "two-metric-records": "format",
    "missing-key": "format",
    "extra-key": "format",
    "renamed-key": "format",
    "bad-shape": "format",
    "bad-dtype": "format",
    "oversized": "format",
    "nan": "non-finite",
    "inf": "non-finite",
    "beyond-float32": "magnitude",
    "wrong-round": "stale",
    "garbage-round": "stale",
    "wrong-type": "stale",
    "wrong-group": "stale",
    "duplicate": "sender",
}
RANDK_ONLY = {"stale-digest": "stale"}

metric_value = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=100),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
)
metric_key = st.one_of(st.sampled_from(["train-loss", "partition-id", "num-examples", "randk-digest",
                                        "eval-accuracy", "eval-loss"]), st.text(min_size=1, max_size=12))
garbage_metrics = st.dictionaries(metric_key, metric_value, max_size=6)
bad_dtypes = st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64,
                              np.complex128, "<U3"])


def _honest_arrays(layout, rng, dtype=np.float32) -> dict[str, np.ndarray]:
    return {k: rng.normal(size=shape).astype(dtype) for k, shape in zip(layout.keys, layout.shapes)}


def _reply(msg: Message, arrays: dict[str, np.ndarray] | None, metrics: dict, *, extra: dict | None = None) -> Message:
    content: dict = {}
    if arrays is not None:
        content["gradient"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content["metrics"] = MetricRecord(metrics)
    content.update(extra or {})
    return Message(RecordDict(content), reply_to=msg)


def _metric_record_ok(d: dict) -> dict:
    """Keep only entries MetricRecord accepts (homogeneous lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, list) and len({type(x) for x in v}) > 1:
            continue
        out[k] = v
    return out


def build_replies(behaviour: str, msg: Message, layout, rng, data) -> list[Message]:
    """The reply (or replies) a node with ``behaviour`` sends to ``msg``."""
    cfg = msg.content["config"]
    rnd = int(cfg["server-round"])
    pid = int(msg.metadata.dst_node_id)
    metrics = {"server-round": rnd, "partition-id": pid, "train-loss": 1.0, "num-examples": 10}
    if "randk-digest" in cfg:
        metrics["randk-digest"] = int(cfg["randk-digest"])
    arrays = _honest_arrays(layout, rng)
    key0 = layout.keys[0]
    if behaviour == "honest":
        return [_reply(msg, arrays, metrics)]
    if behaviour == "honest-float64":
        return [_reply(msg, _honest_arrays(layout, rng, np.float64), metrics)]
    if behaviour == "honest-float16":
        return [_reply(msg, _honest_arrays(layout, rng, np.float16), metrics)]
    if behaviour == "honest-no-echo":
        metrics.pop("server-round")
        return [_reply(msg, arrays, metrics)]
    if behaviour == "honest-metric-garbage":
        garbage = _metric_record_ok(data.draw(garbage_metrics))
        garbage.pop("randk-digest", None)
        return [_reply(msg, arrays, {**garbage, **{k: metrics[k] for k in ("server-round", "randk-digest")
                                                   if k in metrics}})]
    if behaviour == "huge-float32":
        scale = data.draw(st.sampled_from([1e20, 1e30, 3e38]))
        return [_reply(msg, {k: np.full_like(v, scale) for k, v in arrays.items()}, metrics)]
    if behaviour == "error":
        return [Message(Error(code=data.draw(st.integers(0, 999)), reason="boom"), reply_to=msg)]
    if behaviour == "silent":
        return []
    if behaviour == "no-gradient":
        return [_reply(msg, None, metrics)]
    if behaviour == "extra-array-record":
        return [_reply(msg, arrays, metrics, extra={"more": ArrayRecord({"z": Array(np.zeros(2, np.float32))})})]
    if behaviour == "extra-config-record":
        return [_reply(msg, arrays, metrics, extra={"cfg": ConfigRecord({"x": "y"})})]
    if behaviour == "two-metric-records":
        return [_reply(msg, arrays, metrics, extra={"metrics2": MetricRecord({"a": 1.0})})]
    if behaviour == "missing-key":
        if len(arrays) == 1:
            arrays = {}
        else:
            arrays.pop(key0)
        return [_reply(msg, arrays, metrics)]
    if behaviour == "extra-key":
        arrays["surprise"] = np.zeros(3, np.float32)
        return [_reply(msg, arrays, metrics)]
    if behaviour == "renamed-key":
        arrays["not-" + key0] = arrays.pop(key0)
        return [_reply(msg, arrays, metrics)]
    if behaviour == "bad-shape":
        good = tuple(arrays[key0].shape)
        shape = data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple).filter(lambda s: s != good))
        arrays[key0] = np.asarray(rng.normal(size=shape), dtype=np.float32)
        return [_reply(msg, arrays, metrics)]
    if behaviour == "bad-dtype":
        dt = data.draw(bad_dtypes)
        arrays[key0] = np.zeros(arrays[key0].shape, dtype=dt)
        return [_reply(msg, arrays, metrics)]
    if behaviour == "oversized":
        arrays[key0] = np.zeros((data.draw(st.integers(20_000, 60_000)),), np.float32)
        return [_reply(msg, arrays, metrics)]
    if behaviour in ("nan", "inf"):
        flat = arrays[key0].reshape(-1)
        idx = data.draw(st.integers(0, flat.size - 1))
        flat[idx] = np.nan if behaviour == "nan" else data.draw(st.sampled_from([np.inf, -np.inf]))
        return [_reply(msg, arrays, metrics)]
    if behaviour == "beyond-float32":
        arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
        arrays[key0].reshape(-1)[0] = data.draw(st.sampled_from([1e39, -1e200, 1.7e308]))
        return [_reply(msg, arrays, metrics)]
    if behaviour == "wrong-round":
        metrics["server-round"] = rnd + data.draw(st.sampled_from([-2, -1, 1, 5, 10**12]))
        return [_reply(msg, arrays, metrics)]
    if behaviour == "garbage-round":
        metrics["server-round"] = data.draw(st.sampled_from([float("nan"), float("inf"), 0.5, [rnd], [1.0, 2.0]]))
        return [_reply(msg, arrays, metrics)]
    if behaviour == "wrong-type":
        reply = _reply(msg, arrays, metrics)
        reply.metadata.message_type = MessageType.EVALUATE
        return [reply]
    if behaviour == "wrong-group":
        reply = _reply(msg, arrays, metrics)
        reply.metadata.group_id = str(rnd + 1)
        return [reply]
    if behaviour == "duplicate":
        first = _reply(msg, arrays, metrics)
        second = first if data.draw(st.booleans()) else _reply(msg, _honest_arrays(layout, rng), metrics)
        return [first, second]
    if behaviour == "stale-digest":
        metrics["randk-digest"] = (metrics["randk-digest"] + 1) % 2**32
        return [_reply(msg, arrays, metrics)]
    raise AssertionError(behaviour)


def _check_round(strategy: RobustSGD, arrays, out, metrics, behaviours: dict[int, str], strangers: set[int],
                 min_valid: int):
    report = strategy.history[-1]
    sampled = set(report.sampled)
    accepted = set(report.accepted)
    rejected = report.rejected
    # Every sampled node is accepted xor rejected; every rejection has a reason.
    assert accepted <= sampled and not accepted & set(rejected)
    assert accepted | (set(rejected) & sampled) == sampled
    assert all(isinstance(r, str) and r for r in rejected.values())
    assert set(rejected) - sampled == strangers
    # Counts in the round's metrics agree with the report.
    assert metrics["num-sampled"] == len(sampled)
    assert metrics["num-valid"] == len(accepted)
    assert metrics["num-rejected"] == len(rejected) == sum(report.rejection_counts.values())
    assert metrics["num-valid"] + len(set(rejected) & sampled) == metrics["num-sampled"]
    for kind in REJECTION_KINDS:
        assert metrics.get(f"rejected-{kind}", 0) == report.rejection_counts[kind]
    assert report.rejection_counts["sender"] >= len(strangers)
    # Each behaviour gets the verdict it deserves, and the per-kind counts add up.
    verdicts = {**BEHAVIOURS, **RANDK_ONLY}
    expected_counts = dict.fromkeys(REJECTION_KINDS, 0)
    expected_counts["sender"] += len(strangers)
    maybe = 0
    for node, beh in behaviours.items():
        expected = verdicts[beh]
        if expected is None:
            assert node in accepted, (beh, rejected.get(node))
        elif expected == "maybe-magnitude":
            assert node in accepted or "absurd magnitude" in rejected[node], rejected.get(node)
            maybe += node in rejected
        else:
            assert node in rejected, (beh, node)
            expected_counts[expected] += 1
    expected_counts["magnitude"] += maybe
    assert report.rejection_counts == expected_counts, (report.rejection_counts, expected_counts, behaviours)
    KINDS_SEEN.update(k for k, v in report.rejection_counts.items() if v)
    for node in strangers:
        assert "not sampled" in rejected[node]
    # The model: unchanged (None) or finite, same dtypes; kept/filtered partition the accepted set.
    if len(accepted) < min_valid:
        assert out is None and metrics["applied"] == 0
    if out is not None:
        assert metrics["applied"] == 1
        for key in arrays.keys():
            new = out[key].numpy()
            assert new.dtype == arrays[key].numpy().dtype and new.shape == arrays[key].numpy().shape
            assert np.isfinite(new).all()
        assert set(report.kept) | set(report.filtered) == accepted and not set(report.kept) & set(report.filtered)
    assert math.isfinite(metrics["update-norm"])


@FUZZ_SETTINGS
@given(
    data=st.data(),
    num_nodes=st.integers(6, 12),
    aggregator=st.sampled_from(["rge", "mean"]),
    randk=st.booleans(),
    fraction=st.sampled_from([1.0, 0.8]),
    min_valid=st.integers(1, 4),
    num_rounds=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def _fuzz_aggregate_train(data, num_nodes, aggregator, randk, fraction, min_valid, num_rounds, seed):
    STATS["train_cases"] += 1
    rng = np.random.default_rng(seed)
    all_nodes = list(range(100, 100 + num_nodes))
    strategy = RobustSGD(
        aggregator=RGE() if aggregator == "rge" else Mean(), learning_rate=0.1,
        compression=RandK(k=6, seed=seed) if randk else None, fraction_train=fraction,
        min_train_nodes=2, min_valid_replies=min_valid, seed=seed,
    )
    names = list(BEHAVIOURS) + (list(RANDK_ONLY) if randk else [])
    arrays = model_record(0.5)
    for rnd in range(1, num_rounds + 1):
        grid = FakeGrid(all_nodes, None)
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        layout = strategy._expected_layout()  # pylint: disable=protected-access
        behaviours: dict[int, str] = {}
        replies: list[Message] = []
        for msg in msgs:
            beh = data.draw(st.sampled_from(names) | st.just("honest"))
            behaviours[int(msg.metadata.dst_node_id)] = beh
            BEHAVIOURS_SEEN.add(beh)
            replies += build_replies(beh, msg, layout, rng, data)
        sampled = {int(m.metadata.dst_node_id) for m in msgs}
        strangers = set()
        for node in data.draw(st.lists(st.sampled_from(all_nodes + [7, 2**64 - 1]), max_size=2)):
            if node in sampled:
                continue
            fake = Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}), dst_node_id=node,
                           message_type=MessageType.TRAIN, group_id=str(rnd))
            replies += build_replies("honest", fake, layout, rng, data)
            strangers.add(node)
        order = data.draw(st.permutations(range(len(replies))))
        replies = [replies[i] for i in order]
        STATS["replies"] += len(replies)
        STATS["rounds"] += 1
        try:
            out, metrics = strategy.aggregate_train(rnd, replies)
        except RunFailed:
            # The one deliberate raise: max_invalid_rounds consecutive rounds without enough valid replies.
            assert strategy.invalid_streak == strategy.max_invalid_rounds == rnd
            assert all(not r.applied and len(r.accepted) < min_valid for r in strategy.history)
            return
        _check_round(strategy, arrays, out, metrics, behaviours, strangers, min_valid)
        if out is not None:
            arrays = out


def test_fuzz_aggregate_train_never_breaks():
    before = STATS["train_cases"]
    _fuzz_aggregate_train()  # pylint: disable=no-value-for-parameter
    ran = STATS["train_cases"] - before
    print(f"\nhypothesis fuzz aggregate_train: {ran} cases, {STATS['rounds']} rounds, {STATS['replies']} replies; "
          f"rejection kinds seen {sorted(KINDS_SEEN)}")
    assert ran >= TRAIN_EXAMPLES
    assert set(BEHAVIOURS) | set(RANDK_ONLY) <= BEHAVIOURS_SEEN
    assert set(REJECTION_KINDS) <= KINDS_SEEN


@settings(max_examples=EVAL_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), num_nodes=st.integers(3, 10), seed=st.integers(0, 2**16))
def _fuzz_aggregate_evaluate(data, num_nodes, seed):
    STATS["eval_cases"] += 1
    rng = np.random.default_rng(seed)
    strategy = RobustSGD(fraction_evaluate=1.0, min_evaluate_nodes=2)
    msgs = list(strategy.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid(range(1, num_nodes + 1), None)))
    replies, honest_acc = [], []
    for msg in msgs:
        kind = data.draw(st.sampled_from(["honest", "honest", "garbage", "error", "silent", "duplicate", "two"]))
        if kind == "silent":
            continue
        if kind == "error":
            replies.append(Message(Error(code=1, reason="x"), reply_to=msg))
            continue
        if kind == "honest":
            acc = float(rng.uniform(0.8, 0.9))
            honest_acc.append(acc)
            replies.append(Message(RecordDict({"metrics": MetricRecord({"eval-accuracy": acc})}), reply_to=msg))
            continue
        garbage = MetricRecord(_metric_record_ok(data.draw(garbage_metrics)))
        content = {"metrics": garbage}
        if kind == "two":
            content["m2"] = MetricRecord({"eval-accuracy": 0.0})
        reply = Message(RecordDict(content), reply_to=msg)
        replies += [reply, reply] if kind == "duplicate" else [reply]
    replies = [replies[i] for i in data.draw(st.permutations(range(len(replies))))]
    agg = strategy.aggregate_evaluate(1, replies)
    if agg is None:
        return
    for key, val in agg.items():
        assert isinstance(val, float) and math.isfinite(val), (key, val)
    voters = len({int(r.metadata.src_node_id) for r in replies if not r.has_error()
                  and len(r.content.metric_records) == 1})
    if honest_acc and 2 * len(honest_acc) > voters:
        # honest majority: the median lies within the honest values' range (garbage may add a few votes)
        assert "eval-accuracy" in agg


def test_fuzz_aggregate_evaluate_never_breaks():
    before = STATS["eval_cases"]
    _fuzz_aggregate_evaluate()  # pylint: disable=no-value-for-parameter
    ran = STATS["eval_cases"] - before
    print(f"\nhypothesis fuzz aggregate_evaluate: {ran} cases")
    assert ran >= EVAL_EXAMPLES


# ----------------------------------------------------------------------------- regressions
# Cases the fuzzer (or its design) found in the previous screening code, pinned down.


def _one_round(strategy: RobustSGD, handler, nodes=range(1, 6)):
    grid = FakeGrid(nodes, handler)
    msgs = list(strategy.configure_train(1, model_record(0.5), ConfigRecord(), grid))
    return strategy.aggregate_train(1, grid.send_and_receive(msgs))


def _plain(msg: Message, value: float = 0.1, dtype=np.float32, **metrics) -> Message:
    arrays = {"w": np.full((3, 4), value, dtype), "b": np.full((3,), value, dtype)}
    return _reply(msg, arrays, {"server-round": 1, **metrics})


def test_regression_huge_integer_metric_does_not_escape():
    """np.isfinite(2**70) raises TypeError: it used to escape aggregate_train via train-loss."""
    out, metrics = _one_round(RobustSGD(aggregator=Mean()), lambda m: _plain(m, **{"train-loss": 2**70}))
    assert out is not None and metrics["num-valid"] == 5 and "train-loss" not in metrics


def test_regression_value_beyond_float32_is_an_erasure_not_a_lost_round():
    """A float64 1e39 used to become inf in the float32 matrix and make every round fail (one node = DoS)."""
    def handler(m):
        return _plain(m, 1e39, np.float64) if m.metadata.dst_node_id == 2 else _plain(m)

    out, metrics = _one_round(RobustSGD(aggregator=RGE()), handler)
    assert out is not None and metrics["applied"] == 1 and metrics["rejected-magnitude"] == 1


def test_regression_update_overflowing_the_model_dtype_keeps_the_model():
    """x_new finite in float64 but not in the float32 model: the round is skipped, no inf in the model."""
    strategy = RobustSGD(aggregator=Mean(), learning_rate=10.0, min_valid_replies=2)
    out, metrics = _one_round(strategy, lambda m: _plain(m, 1e38), nodes=[1, 2])
    assert out is None and metrics["applied"] == 0


def test_regression_median_of_huge_metrics_does_not_overflow():
    strategy = RobustSGD(fraction_evaluate=1.0)
    msgs = list(strategy.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid([1, 2], None)))
    replies = [Message(RecordDict({"metrics": MetricRecord({"m": 1.7e308})}), reply_to=m) for m in msgs]
    assert strategy.aggregate_evaluate(1, replies)["m"] == 1.7e308


def test_evaluate_metric_names_need_a_quorum_and_one_vote_per_node():
    strategy = RobustSGD(fraction_evaluate=1.0)
    msgs = list(strategy.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid(range(1, 6), None)))
    replies = [Message(RecordDict({"metrics": MetricRecord({"acc": 0.9})}), reply_to=m) for m in msgs[:4]]
    liar = Message(RecordDict({"metrics": MetricRecord({"acc": 0.0, "invented": 5.0})}), reply_to=msgs[4])
    agg = strategy.aggregate_evaluate(1, replies + [liar] * 10)
    assert dict(agg) == {"acc": 0.9}

"""OmniscientAdversary: a server-side colluding attacker that sees every honest gradient (fake Grid, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flwr_byzantine.aggregators import RGE, Mean
from flwr_byzantine.attacks import MobileAdversary, alie_z_max, make_attack
from flwr_byzantine.compression.randk import RandK, coordinate_digest, draw_coordinates
from flwr_byzantine.strategies.omniscient import OmniscientAdversary
from flwr_byzantine.strategies.records import ArrayLayout
from flwr_byzantine.strategies.robust_sgd import RobustSGD

from fakes import FakeGrid

D_W, D_B = (3, 4), (3,)
D = 15
NODES = list(range(1, 13))


def model_record(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(D_W, value, np.float32)), "b": Array(np.full(D_B, value, np.float32))})


class Clients:
    """Honest clients of f(x) = 0.5 ||x - target||^2 with per-node noise; remembers what each node sent."""

    def __init__(self, target: float = 1.0, noise: float = 0.1, seed: int = 0, drop: set[int] | None = None):
        self.target, self.noise, self.seed = target, noise, seed
        self.drop = drop or set()
        self.sent: dict[tuple[int, int], np.ndarray] = {}  # (round, node) -> vector it replied with

    def __call__(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in self.drop:
            return None
        cfg = msg.content["config"]
        rnd = int(cfg["server-round"])
        layout = ArrayLayout.of(msg.content["arrays"])
        x = layout.flatten(msg.content["arrays"], np.float64)
        rng = np.random.default_rng([self.seed, rnd, node])
        g = (x - self.target + self.noise * rng.normal(size=x.size)).astype(np.float32)
        metrics = {"num-examples": 10, "train-loss": 1.0, "server-round": rnd, "partition-id": node - 1}
        if "randk-procedure" in cfg:
            coords = draw_coordinates(int(cfg["randk-d"]), int(cfg["randk-k"]), int(cfg["randk-seed"]), rnd)
            metrics["randk-digest"] = coordinate_digest(coords)
            vec = ((x.size / coords.size) * g[coords]).astype(np.float32)
            payload = ArrayRecord({"values": Array(vec)})
        else:
            vec = g
            payload = layout.unflatten(g.astype(np.float64))
        self.sent[(rnd, node)] = vec
        return Message(RecordDict({"gradient": payload, "metrics": MetricRecord(metrics)}), reply_to=msg)


def one_round(wrapper: OmniscientAdversary, grid: FakeGrid, rnd: int = 1, arrays: ArrayRecord | None = None):
    msgs = list(wrapper.configure_train(rnd, arrays if arrays is not None else model_record(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    tampered = wrapper.tamper(rnd, list(replies))
    return msgs, replies, tampered


def vectors_by_node(replies: list[Message], key: str = "gradient") -> dict[int, np.ndarray]:
    out = {}
    for m in replies:
        rc = m.content[key]
        out[m.metadata.src_node_id] = np.concatenate([rc[k].numpy().ravel() for k in rc.keys()])
    return out


def test_sign_flip_rows_equal_minus_mean_of_all_honest_replies():
    clients = Clients()
    grid = FakeGrid(NODES, clients)
    adv = MobileAdversary(num_byzantine=3, seed=1, mode="random")
    wrapper = OmniscientAdversary(RobustSGD(aggregator=Mean()), make_attack("sign-flip"), adv)
    msgs, _, tampered = one_round(wrapper, grid, rnd=2)
    rec = wrapper.history[-1]
    corrupt = adv.corrupt_set(2, NODES)
    assert rec.corrupt == corrupt == rec.crafted == rec.replaced and len(corrupt) == 3
    honest = [n for n in NODES if n not in corrupt]
    assert rec.honest == honest
    got = vectors_by_node(tampered)
    assert sorted(got) == NODES  # still one reply per sampled node
    expected = -np.mean([clients.sent[(2, n)] for n in honest], axis=0)
    for n in corrupt:
        np.testing.assert_allclose(got[n], expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(got[n], clients.sent[(2, n)])
    for n in honest:
        np.testing.assert_array_equal(got[n], clients.sent[(2, n)])
    # Reply semantics: same keys/shapes/dtypes, reply_to the train message of that node, metrics kept.
    by_dst = {m.metadata.dst_node_id: m for m in msgs}
    for m in tampered:
        n = m.metadata.src_node_id
        assert m.metadata.reply_to_message_id == by_dst[n].metadata.message_id
        assert m.metadata.message_type == by_dst[n].metadata.message_type
        assert m.metadata.dst_node_id == by_dst[n].metadata.src_node_id
        assert list(m.content["gradient"].keys()) == ["w", "b"]
        assert m.content["gradient"]["w"].numpy().shape == D_W and m.content["gradient"]["w"].numpy().dtype == np.float32
        assert m.content["metrics"]["server-round"] == 2 and m.content["metrics"]["partition-id"] == n - 1


def test_alie_uses_statistics_of_all_honest_replies_and_passes_the_strategy():
    clients = Clients(noise=0.3, seed=4)
    adv = MobileAdversary(num_byzantine=3, seed=0, mode="static")
    inner = RobustSGD(aggregator=Mean(), learning_rate=1.0)
    wrapper = OmniscientAdversary(inner, "alie", adv)
    grid = FakeGrid(NODES, clients)
    msgs = list(wrapper.configure_train(1, model_record(), ConfigRecord(), grid))
    arrays, metrics = wrapper.aggregate_train(1, grid.send_and_receive(msgs))
    corrupt = wrapper.history[-1].corrupt
    H = np.stack([clients.sent[(1, n)] for n in NODES if n not in corrupt]).astype(np.float64)
    z = alie_z_max(12, 3)
    row = H.mean(axis=0) - z * H.std(axis=0)
    # The wrapped strategy received and accepted the crafted rows: mean of 9 honest + 3 ALIE rows.
    assert metrics["num-valid"] == 12 and sorted(inner.history[-1].accepted) == NODES
    g = (H.sum(axis=0) + 3 * row) / 12
    x = ArrayLayout.of(arrays).flatten(arrays)
    np.testing.assert_allclose(x, -g, rtol=1e-4, atol=1e-5)
    assert wrapper.aggregator is inner.aggregator  # unknown attributes are delegated


def test_corrupt_set_is_fixed_before_gradients_and_independent_of_them():
    adv = MobileAdversary(num_byzantine=4, seed=7, mode="random")
    sets = []
    for target, noise in ((1.0, 0.1), (-50.0, 3.0)):
        wrapper = OmniscientAdversary(RobustSGD(aggregator=Mean()), "sign-flip", adv)
        grid = FakeGrid(NODES, Clients(target=target, noise=noise))
        msgs = list(wrapper.configure_train(5, model_record(), ConfigRecord(), grid))
        before = wrapper.corrupt_nodes(5)  # known before any reply exists
        assert before == adv.corrupt_set(5, sorted(m.metadata.dst_node_id for m in msgs))
        wrapper.aggregate_train(5, grid.send_and_receive(msgs))
        assert wrapper.history[-1].corrupt == before == wrapper.corrupt_nodes(5)
        sets.append(before)
    assert sets[0] == sets[1]


@pytest.mark.parametrize("mode", ["random", "rotate"])
def test_mobile_sets_change_across_rounds_within_budget(mode):
    adv = MobileAdversary(fraction=0.25, seed=3, mode=mode)
    wrapper = OmniscientAdversary(RobustSGD(aggregator=Mean(), learning_rate=0.1), "ipm", adv)
    wrapper.start(grid=FakeGrid(NODES, Clients()), initial_arrays=model_record(), num_rounds=6)
    sets = [tuple(r.corrupt) for r in wrapper.history]
    assert [r.server_round for r in wrapper.history] == list(range(1, 7))
    assert all(len(s) == 3 and set(s) <= set(NODES) for s in sets)  # budget floor(0.25 * 12)
    assert len(set(sets)) > 1
    assert all(a != b for a, b in zip(sets, sets[1:])) or mode == "random"
    for r in wrapper.history:
        assert r.crafted == r.corrupt and set(r.honest) == set(NODES) - set(r.corrupt)


def test_static_mode_keeps_one_set():
    adv = MobileAdversary(num_byzantine=2, seed=3, mode="static")
    wrapper = OmniscientAdversary(RobustSGD(aggregator=Mean(), learning_rate=0.1), "sign-flip", adv)
    wrapper.start(grid=FakeGrid(NODES, Clients()), initial_arrays=model_record(), num_rounds=3)
    assert len({tuple(r.corrupt) for r in wrapper.history}) == 1


def test_erasure_drops_the_corrupt_replies():
    adv = MobileAdversary(num_byzantine=3, seed=2, mode="random")
    inner = RobustSGD(aggregator=Mean(), learning_rate=1.0)
    wrapper = OmniscientAdversary(inner, make_attack("erasure"), adv)
    grid = FakeGrid(NODES, Clients(noise=0.0))
    msgs = list(wrapper.configure_train(1, model_record(), ConfigRecord(), grid))
    arrays, metrics = wrapper.aggregate_train(1, grid.send_and_receive(msgs))
    rec = wrapper.history[-1]
    assert rec.erased == rec.corrupt and rec.crafted == [] and len(rec.corrupt) == 3
    assert metrics["num-valid"] == 9 and metrics["num-rejected"] == 3
    for n in rec.corrupt:
        assert "erasure" in inner.history[-1].rejected[n]
    np.testing.assert_allclose(ArrayLayout.of(arrays).flatten(arrays), 1.0, rtol=1e-6)  # honest step


def test_crafts_for_a_corrupt_node_that_did_not_answer():
    adv = MobileAdversary(num_byzantine=2, seed=5, mode="static")
    corrupt = adv.corrupt_set(1, NODES)
    clients = Clients(drop={corrupt[0]})
    wrapper = OmniscientAdversary(RobustSGD(aggregator=Mean()), "sign-flip", adv)
    _, replies, tampered = one_round(wrapper, FakeGrid(NODES, clients))
    assert len(replies) == 11 and len(tampered) == 12
    rec = wrapper.history[-1]
    assert rec.crafted == corrupt and rec.replaced == [corrupt[1]]
    missing = next(m for m in tampered if m.metadata.src_node_id == corrupt[0])
    assert "partition-id" not in missing.content["metrics"]  # template metrics, no borrowed identity
    assert missing.content["metrics"]["server-round"] == 1


def test_randk_compressed_replies_are_crafted_in_compressed_form():
    clients = Clients(noise=0.2)
    adv = MobileAdversary(num_byzantine=3, seed=9, mode="random")
    inner = RobustSGD(aggregator=Mean(), learning_rate=1.0, compression=RandK(k=5, seed=2))
    wrapper = OmniscientAdversary(inner, "scaled-negative", adv)
    grid = FakeGrid(NODES, clients)
    msgs = list(wrapper.configure_train(3, model_record(), ConfigRecord(), grid))
    tampered = wrapper.tamper(3, grid.send_and_receive(msgs))
    got = vectors_by_node(tampered)
    corrupt = wrapper.history[-1].corrupt
    honest = np.stack([clients.sent[(3, n)] for n in NODES if n not in corrupt])
    for n in corrupt:
        assert got[n].shape == (5,)
        np.testing.assert_allclose(got[n], -10.0 * honest.mean(axis=0), rtol=1e-5)
    assert all(m.content["metrics"]["randk-digest"] == msgs[0].content["config"]["randk-digest"] for m in tampered)
    # and the strategy accepts them (digest, shape, dtype all valid)
    _, metrics = inner.aggregate_train(3, tampered)
    assert metrics["num-valid"] == 12


def test_evaluation_is_delegated_and_wrapper_validates_inputs():
    inner = RobustSGD(aggregator=Mean(), fraction_evaluate=1.0)
    wrapper = OmniscientAdversary(inner, "sign-flip", MobileAdversary(num_byzantine=1))
    msgs = list(wrapper.configure_evaluate(1, model_record(), ConfigRecord(), FakeGrid(NODES, Clients())))
    assert len(msgs) == 12
    with pytest.raises(TypeError, match="data-poisoning"):
        OmniscientAdversary(inner, "label-flip", MobileAdversary(num_byzantine=1))
    with pytest.raises(TypeError):
        OmniscientAdversary(object(), "sign-flip", MobileAdversary(num_byzantine=1))  # type: ignore[arg-type]


def _final_error(aggregator, attack: str, rounds: int = 20, seed: int = 3) -> float:
    adv = MobileAdversary(num_byzantine=3, seed=seed, mode="random")
    wrapper = OmniscientAdversary(RobustSGD(aggregator=aggregator, learning_rate=0.3), attack, adv)
    result = wrapper.start(grid=FakeGrid(NODES, Clients(noise=0.1, seed=seed)), initial_arrays=model_record(),
                           num_rounds=rounds)
    assert len(wrapper.history) == rounds and all(len(r.crafted) == 3 for r in wrapper.history)
    return float(np.abs(ArrayLayout.of(result.arrays).flatten(result.arrays) - 1.0).max())


@pytest.mark.parametrize("attack", ["alie", "ipm", "scaled-negative"])
def test_rge_converges_on_the_quadratic_under_omniscient_attacks(attack):
    assert _final_error(RGE(eps_tilde=0.25), attack) < 0.15


def test_mean_fails_under_omniscient_scaled_negative():
    assert _final_error(Mean(), "scaled-negative") > 10.0

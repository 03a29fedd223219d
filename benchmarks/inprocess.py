"""Run the real flwr-byzantine ServerApp logic and ClientApp in one process, without Ray.

:class:`InProcessGrid` is a Flower :class:`~flwr.serverapp.Grid` whose virtual
nodes are the *real* ClientApp (``clients.client_app.build_client_app(overrides)``)
called directly: every message a strategy sends is given an id, delivered to the
ClientApp of its destination node with that node's own :class:`~flwr.app.Context`
(``node_config = {"partition-id", "num-partitions"}``, a persistent ``state``, the
run config), and the reply comes back with Flower's reply metadata.  A ClientApp
exception becomes an error reply, as Flower's runtime does.  So a benchmark run is
the exact strategy loop (``RobustSGD.start``, or any ``flwr.serverapp.strategy``
strategy's ``start``) and ClientApp code of a ``flwr run`` / ``run_simulation``
federation, minus Ray's process boundaries and serialisation.  Which clients are
malicious follows the run config (``num-malicious``: a seeded set of partition ids,
:func:`flwr_byzantine.federation.malicious_partition_ids`), exactly as in the Ray
simulation.

Differences from the Ray simulation, none of which changes the numbers of a seeded
run: messages are delivered sequentially in the order the strategy sends them
(``RobustSGD`` orders the replies by partition id anyway); message contents are
passed by reference, not serialised (the ClientApp does not mutate them); node ids
are drawn from ``seed`` (Flower draws them at random; ``RobustSGD`` with
``fraction-train = 1`` samples every node, so the ids do not matter).

:class:`GradientToModel` lets Flower's model-averaging strategies (``FedMedian``,
``FedTrimmedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan``) drive the same gradient
ClientApp: each gradient reply ``g`` to a train message carrying ``x_t`` becomes a
model reply ``x_t - lr * g`` with the client's ``MetricRecord`` (``num-examples``
included).  Averaging (or taking the median, trimming, Krum-selecting) those models
is FedAvg with one local SGD step, i.e. ``x_t - lr * agg(g_1, ..., g_R)`` for any rule
that commutes with the affine map ``g -> x_t - lr g`` (all five do; the distances
Krum/Bulyan compare are ``lr`` times the gradient distances).  Flower's rules weight
by the client-reported ``num-examples`` (``min(batch-size, n_r)`` here, the same for
honest and malicious clients except on partitions smaller than a batch).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

#: Error code of a reply whose ClientApp raised (Flower's ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
CLIENT_APP_RAISED_EXCEPTION = 2

#: ``reply_transform(sent_message, reply) -> reply | None`` (``None`` drops the reply).
ReplyTransform = Callable[[Message, Message], "Message | None"]


def set_server_identity(run_id: int = 1) -> None:
    """Set Flower's task identity of the server process (needed to build Messages outside a runtime)."""
    TaskIdentity.run_id = int(run_id)
    TaskIdentity.node_id = 0  # SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1


class _RunInfo:
    """Minimal stand-in for ``flwr.supercore.run.Run`` (only ``run_id`` and ``override_config`` are read)."""

    def __init__(self, run_id: int, run_config: Mapping[str, Any]) -> None:
        self.run_id = run_id
        self.override_config = dict(run_config)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApps called in-process (see the module docstring).

    Parameters
    ----------
    client_app:
        The ClientApp every node runs (a callable ``(message, context) -> message``).
    num_nodes:
        Number of virtual nodes; node ``i`` gets ``partition-id = i``.
    run_config:
        ``context.run_config`` of every node (the ClientApp built with
        ``build_client_app(overrides)`` also applies its own overrides, as in
        ``server_app.simulate``).
    seed:
        Seed of the node ids.
    run_id:
        Run id of the contexts and messages.
    reply_transform:
        Optional ``(sent, reply) -> reply | None`` applied to every reply (e.g.
        :class:`GradientToModel`); ``None`` drops the reply.
    node_configs:
        Optional extra node-config entries per partition id (e.g. ``{"malicious": True}``).
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        run_id: int = 1,
        reply_transform: ReplyTransform | None = None,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        self.client_app = client_app
        self.run_id = int(run_id)
        self.reply_transform = reply_transform
        rng = np.random.default_rng([int(seed), 0x1D5])
        ids: list[int] = []
        while len(ids) < num_nodes:  # distinct positive 63-bit ids, like Flower's
            nid = int(rng.integers(1, 2**63 - 1))
            if nid not in ids:
                ids.append(nid)
        self._node_ids = ids
        self.partition_of = {nid: i for i, nid in enumerate(ids)}
        self.contexts: dict[int, Context] = {}
        for i, nid in enumerate(ids):
            node_config: dict[str, Any] = {"partition-id": i, "num-partitions": int(num_nodes)}
            node_config.update(dict((node_configs or {}).get(i, {})))
            self.contexts[nid] = Context(run_id=self.run_id, node_id=nid, node_config=node_config,
                                         state=RecordDict(), run_config=dict(run_config or {}))
        self._run = _RunInfo(self.run_id, run_config or {})
        self._counter = 0
        self._replies: dict[str, Message] = {}
        #: Number of messages delivered per message type (diagnostics).
        self.delivered: dict[str, int] = {}
        set_server_identity(self.run_id)

    # ----------------------------------------------------------- Grid API
    def set_run(self, run: Any) -> None:
        """Accept the run (kept for ``Grid`` compatibility)."""
        self._run = run

    @property
    def run(self) -> Any:
        """The run (``run_id`` and ``override_config``)."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Build an instruction message (deprecated in Flower; kept for completeness)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The virtual nodes' ids."""
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Give each message an id, run its destination's ClientApp now, store the reply; return the ids."""
        ids = []
        for msg in messages:
            self._counter += 1
            mid = f"{self.run_id}-{self._counter:08d}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The stored replies to ``message_ids`` (each returned once)."""
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver every message and return the replies (in sending order)."""
        return list(self.pull_messages(self.push_messages(messages)))

    # ----------------------------------------------------------- delivery
    def _deliver(self, msg: Message) -> Message | None:
        dst = int(msg.metadata.dst_node_id)
        if dst not in self.contexts:
            return None  # unknown node: no reply, as for an offline node
        mtype = str(msg.metadata.message_type)
        self.delivered[mtype] = self.delivered.get(mtype, 0) + 1
        try:
            reply = self.client_app(msg, self.contexts[dst])
        except Exception as exc:  # pylint: disable=broad-except  # Flower turns it into an error reply
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        if reply is not None and self.reply_transform is not None:
            reply = self.reply_transform(msg, reply)
        return reply


class GradientToModel:
    """Reply transform: gradient reply ``g`` -> model reply ``x_t - lr * g`` (FedAvg with one SGD step).

    ``x_t`` is the ``arrays_key`` record of the train message; the reply keeps the
    client's metric records (``num-examples`` for Flower's weighting) and carries the
    model under ``arrays_key``.  A train reply without a gradient (an erasure) is
    dropped; error replies and non-train replies pass through unchanged.
    """

    def __init__(self, learning_rate: float, gradient_key: str = "gradient", arrays_key: str = "arrays") -> None:
        self.learning_rate = float(learning_rate)
        self.gradient_key = gradient_key
        self.arrays_key = arrays_key

    def __call__(self, sent: Message, reply: Message) -> Message | None:
        if reply.has_error() or sent.metadata.message_type != MessageType.TRAIN:
            return reply
        content = reply.content
        if self.gradient_key not in content.array_records:
            return None
        grad = content.array_records[self.gradient_key]
        x = sent.content.array_records[self.arrays_key]
        out: dict[str, Array] = {}
        for key, arr in x.items():
            xv = arr.numpy()
            gv = grad[key].numpy().astype(np.float64).reshape(xv.shape)
            out[key] = Array(np.ascontiguousarray((xv.astype(np.float64) - self.learning_rate * gv).astype(xv.dtype)))
        record = RecordDict({self.arrays_key: ArrayRecord(out)})
        for key, mrec in content.metric_records.items():
            record[key] = mrec
        return Message(record, reply_to=sent)


def seed_flower_sampling(seed: int) -> None:
    """Seed Python's global ``random`` (Flower's ``sample_nodes`` uses ``random.sample``)."""
    random.seed(int(seed))


def run_app(overrides: Mapping[str, Any], num_supernodes: int, run_id: int = 1) -> dict[str, Any]:
    """The flwr-byzantine App on an :class:`InProcessGrid`: ``server_app.simulate`` without Ray.

    Builds the ClientApp exactly as ``server_app.simulate`` does
    (``build_client_app(overrides)``, empty run config in the node contexts) and runs
    the ServerApp's main logic (:func:`server_app.server_app.serve` with the same
    overrides: any ``method``), so the results JSON (in ``overrides['output-dir']``) and
    the returned payload are those of a simulated ``flwr run``.
    """
    from clients.client_app import build_client_app
    from flwr_byzantine.config import parse_run_config
    from server_app.server_app import serve

    cfg = parse_run_config(dict(overrides))
    grid = InProcessGrid(build_client_app(dict(overrides)), num_supernodes, {}, seed=cfg.seed, run_id=run_id)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return serve(grid, context, overrides)


def main() -> None:
    """CLI: ``python -m benchmarks.inprocess --num-supernodes 20 --run-config "aggregator='mean' seed=1"``."""
    import argparse
    import json
    import time

    from server_app.simulate import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-supernodes", type=int, default=20)
    parser.add_argument("--run-config", default="", help="overrides, e.g. \"aggregator='mean' seed=1\"")
    args = parser.parse_args()
    t0 = time.time()
    payload = run_app(parse_overrides(args.run_config), args.num_supernodes)
    print(json.dumps({"final_accuracy": payload["final_accuracy"], "final_loss": payload["final_loss"],
                      "malicious_partitions": payload["malicious_partitions"],
                      "filtered_partitions": payload["filtered_partitions"],
                      "wall_seconds": round(time.time() - t0, 2)}))


__all__ = ["GradientToModel", "InProcessGrid", "run_app", "seed_flower_sampling", "set_server_identity"]


if __name__ == "__main__":
    main()

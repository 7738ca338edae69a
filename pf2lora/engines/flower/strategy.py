"""A Flower ``Strategy`` for one pf2lora method, for users who write their own ServerApp.

``pf2lora run --engine flower-*`` drives rounds with :class:`~.server.FlowerServer`. This class
exposes the same rounds through Flower's typed strategy interface
(:class:`flwr.serverapp.strategy.Strategy`), so that a method can be started with Flower's own
``strategy.start(grid=..., ...)`` in a ServerApp the user controls. It holds no round logic of its
own: every step calls the FlowerServer halves the engine uses (:meth:`~.server.FlowerServer.prepare_round`,
:meth:`~.server.FlowerServer.collect_round`, :meth:`~.server.FlowerServer.evaluation_messages`,
:meth:`~.server.FlowerServer.collect_evaluation`) over the same :class:`~pf2lora.engines.rounds.MethodRun`,
so the numbers and records equal the local engine's for the same config and seed.

Example (in a ServerApp's ``main(grid, context)``; the nodes run :func:`~.client.make_client_app`)::

    strategy = MethodStrategy(cfg, "pf2lora")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds)
    per_client = strategy.result().clients  # personalised and global metrics of every client
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, transport

env.apply()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pf2lora.engines.flower import nodedata
from pf2lora.engines.flower.channel import Outgoing
from pf2lora.engines.flower.messages import claimed_client
from pf2lora.engines.flower.server import FlowerServer, Sent
from pf2lora.engines.rounds import MethodResult, MethodRun, RoundCallback, RoundLedger, mean_of
from pf2lora.methods import registry
from pf2lora.plan import build_task
from pf2lora.tasks.base import Task

log = logging.getLogger("pf2lora.flower")

__all__ = ["MethodStrategy"]


class MethodStrategy(Strategy):
    """Flower strategy that runs the pf2lora method ``method`` as ``cfg`` configures it.

    Parameters
    ----------
    cfg : RunConfig
        The run's config; pass ``num_rounds=cfg.rounds`` to :meth:`start` (the last round is the
        one whose evaluation gives the final per-client metrics).
    method : str
        A registered method name (``pf2lora methods``).
    task : Task, optional
        The task, if already built (else built from ``cfg``).
    on_round : callable, optional
        Called with each round's record, as ``pf2lora run`` writes it to ``metrics.jsonl``.

    Notes
    -----
    The server state lives in the strategy: the ``arrays`` Flower passes between rounds are
    returned for the record (the method's server state after each round) and otherwise unused,
    because what each client receives is per client (``method.broadcast``), not one global model.
    Secure aggregation needs Flower's legacy workflow: use ``pf2lora run --engine flower-*``.
    """

    def __init__(self, cfg: RunConfig, method: str, task: Task | None = None, on_round: RoundCallback | None = None):
        if cfg.server.secure_aggregation:
            raise ValueError(
                "MethodStrategy does not do server.secure_aggregation; run it with pf2lora run --engine flower-sim|flower-deploy"
            )
        if task is None:
            task = build_task(nodedata.server_view(cfg))  # node-local data: never a client's file
        self.cfg, self.task = cfg, task
        self.run = MethodRun(cfg, task, registry()[method](cfg, task), on_round=on_round, hold_clients=False)
        self._driver: FlowerServer | None = None
        self._pending: tuple[RoundLedger, Sent, dict[str, int]] | None = None  # the prepared round awaiting its replies
        self._unevaluated: dict[str, Any] | None = None  # the round record awaiting its evaluation
        self._evaluating: tuple[int, dict[str, int]] | None = None  # (round, client -> node) being evaluated
        self._result: MethodResult | None = None

    # -- Flower's Strategy interface ---------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        driver = self._bind(grid)
        ledger, sent, outgoing = driver.prepare_round(self.run, server_round)
        messages, to_node = self._messages("train", outgoing)
        self._pending = (ledger, sent, to_node)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._pending is None or self._driver is None:
            raise RuntimeError("aggregate_train without configure_train")
        ledger, sent, to_node = self._pending
        self._pending = None
        record = self._driver.collect_round(self.run, ledger, sent, _by_client(to_node, replies))
        if self.run.eval_due(server_round):
            self._unevaluated = record  # closed by aggregate_evaluate, with its evaluation
        else:
            self.run.end_round(record)
        metrics: dict[str, int | float | list[int] | list[float]] = {
            k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return transport.to_record(self.run.server)[0], MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not (self.run.eval_due(server_round) or server_round == self.cfg.rounds):
            return []
        outgoing = self._bind(grid).evaluation_messages(self.run, server_round)
        messages, to_node = self._messages("evaluate", outgoing)
        self._evaluating = (server_round, to_node)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._evaluating is None or self._driver is None:
            return None
        round_, to_node = self._evaluating
        self._evaluating = None
        clients = self._driver.collect_evaluation(self.run, _by_client(to_node, replies))
        if self._unevaluated is not None:
            self.run.end_round(self._unevaluated, clients)
            self._unevaluated = None
        if round_ == self.cfg.rounds:
            self._result = self.run.finish(clients)
        names = sorted({k for c in clients.values() for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return MetricRecord({f"mean_{k}": float(mean_of(clients, k)) for k in names})

    def summary(self) -> None:
        log.info("pf2lora MethodStrategy: method %s, %d clients, %d rounds", self.run.method.name, len(self.task.clients), self.cfg.rounds)

    # -- results -----------------------------------------------------------------------------------

    @property
    def server_state(self) -> dict[str, Any]:
        """The method's server state after the last aggregated round."""
        return self.run.server

    def result(self) -> MethodResult:
        """The run as the engines report it (per-client metrics after the last round, rounds, faults)."""
        if self._result is None:
            raise RuntimeError(f"the run of {self.run.method.name} has not finished: start it with num_rounds={self.cfg.rounds}")
        return self._result

    # -- helpers -----------------------------------------------------------------------------------

    def _bind(self, grid: Grid) -> FlowerServer:
        """The FlowerServer halves on ``grid``; the first call asks every node which client it plays."""
        if self._driver is None or self._driver.grid is not grid:
            self._driver = FlowerServer(self.cfg, self.task, grid)
            self._driver.discover()
        return self._driver

    def _messages(self, kind: str, outgoing: list[Outgoing]) -> tuple[list[Message], dict[str, int]]:
        assert self._driver is not None
        return self._driver.channel.messages(kind, outgoing)


def _by_client(to_node: Mapping[str, int], replies: Iterable[Message]) -> dict[str, Message]:
    """Each client's reply: by the node it came from, and where a node played several clients (a
    pooled method's evaluation), by the client the reply names among them. A reply from a node we
    sent nothing to, or naming a client that node was not sent, is ignored (no reply)."""
    clients_of: dict[int, list[str]] = defaultdict(list)
    for client, node in to_node.items():
        clients_of[node].append(client)
    out: dict[str, Message] = {}
    for reply in replies:
        candidates = clients_of.get(reply.metadata.src_node_id, [])
        if len(candidates) == 1:
            cid: str | None = candidates[0]  # FlowerServer checks the client the reply claims to be
        else:
            cid = None if reply.has_error() else claimed_client(reply.content)
            cid = cid if cid in candidates else None
        if cid is not None and cid not in out:
            out[cid] = reply
    return out

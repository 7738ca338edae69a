"""A Flower ``Strategy`` for one pf2lora method, for users who write their own ServerApp.

``pf2lora run --engine flower-*`` drives rounds with :class:`~.server.FlowerServer`. This class
exposes the same rounds through Flower's typed strategy interface
(:class:`flwr.serverapp.strategy.Strategy`), so that a method can be started with Flower's own
``strategy.start(grid=..., ...)`` in a ServerApp the user controls. It holds no round logic of its
own: every step calls the FlowerServer halves the engine uses (:meth:`~.server.FlowerServer.prepare_round`,
:meth:`~.server.FlowerServer.collect_round`, :meth:`~.server.FlowerServer.evaluation_messages`,
:meth:`~.server.FlowerServer.collect_evaluation`), which call :mod:`pf2lora.engines.rounds`, so the
numbers equal the local engine's for the same config and seed.

Example (in a ServerApp's ``main(grid, context)``; the nodes run :func:`~.client.make_client_app`)::

    strategy = MethodStrategy(cfg, "pf2lora")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds)
    per_client = strategy.result().clients  # personalised and global metrics of every client
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, transport

env.apply()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pf2lora.engines.flower.server import FlowerServer
from pf2lora.engines.rounds import (
    MethodResult,
    account_round,
    eval_due,
    initial_server,
    make_accountant,
    mean_of,
    privacy_report,
    trainers,
)
from pf2lora.methods import registry
from pf2lora.methods.base import Method
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

    Notes
    -----
    The server state lives in the strategy: the ``arrays`` Flower passes between rounds are
    returned for the record (the method's server state after each round) and otherwise unused,
    because what each client receives is per client (``method.broadcast``), not one global model.
    Secure aggregation needs Flower's legacy workflow: use ``pf2lora run --engine flower-*``.
    """

    def __init__(self, cfg: RunConfig, method: str, task: Task | None = None):
        if cfg.server.secure_aggregation:
            raise ValueError("MethodStrategy does not do server.secure_aggregation; run it with pf2lora run --engine flower-sim|flower-deploy")
        if task is None:
            from pf2lora.tasks import build_task

            task = build_task(cfg)
        self.cfg, self.task = cfg, task
        self.method: Method = registry()[method](cfg, task)
        self.server_state = initial_server(cfg, self.method)
        self.accepted: dict[str, int] = {}  # client -> last round whose training counted
        self.rounds: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.clients: dict[str, dict[str, Any]] = {}
        self.accountant = make_accountant(cfg, task)
        self._by_id = {c.client_id: c for c in trainers(cfg, task, self.method)[0]}
        self._driver: FlowerServer | None = None
        self._pending: tuple[Any, ...] | None = None  # the prepared round awaiting its replies
        self._evaluating: tuple[int, dict[str, int]] | None = None  # (round, client -> node) being evaluated
        self._start = time.perf_counter()

    # -- Flower's Strategy interface ---------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        driver = self._bind(grid)
        ledger, sent, outgoing = driver.prepare_round(
            self.method, self.server_state, self._by_id, driver.plays(self._by_id), self.accepted, self.faults, server_round,
        )
        messages, to_node = self._messages("train", outgoing)
        self._pending = (ledger, sent, to_node)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._pending is None or self._driver is None:
            raise RuntimeError("aggregate_train without configure_train")
        ledger, sent, to_node = self._pending
        self._pending = None
        self.server_state, record = self._driver.collect_round(
            self.method, self.server_state, ledger, sent, _by_client(to_node, replies), self.accepted,
        )
        account_round(self.accountant, record)
        self.rounds.append(record)
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return transport.to_record(self.server_state)[0], MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not (eval_due(self.cfg, server_round) or server_round == self.cfg.rounds):
            return []
        driver = self._bind(grid)
        outgoing = driver.evaluation_messages(self.method, self.server_state, self.accepted, server_round)
        messages, to_node = self._messages("evaluate", outgoing)
        self._evaluating = (server_round, to_node)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._evaluating is None or self._driver is None:
            return None
        round_, to_node = self._evaluating
        self._evaluating = None
        clients = self._driver.collect_evaluation(self.method, _by_client(to_node, replies))
        primary = self.task.primary_metric
        if round_ == self.cfg.rounds:
            self.clients = clients
        elif self.rounds:
            self.rounds[-1]["eval"] = mean_of(clients, primary)
        names = sorted({k for c in clients.values() for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return MetricRecord({f"mean_{k}": float(mean_of(clients, k)) for k in names})

    def summary(self) -> None:
        log.info("pf2lora MethodStrategy: method %s, %d clients, %d rounds", self.method.name, len(self.task.clients), self.cfg.rounds)

    # -- results -----------------------------------------------------------------------------------

    def result(self) -> MethodResult:
        """The run as the engines report it (per-client metrics after the last round, rounds, faults)."""
        out = MethodResult(self.method.name, dict(self.clients), list(self.rounds), faults=list(self.faults))
        if self.accountant is not None:
            out.privacy = privacy_report(self.cfg, self.task, self.accountant, self.rounds)
        out.wall_time_s = time.perf_counter() - self._start
        return out

    # -- helpers -----------------------------------------------------------------------------------

    def _bind(self, grid: Grid) -> FlowerServer:
        """The FlowerServer halves on ``grid``; the first call asks every node which client it plays."""
        if self._driver is None or self._driver.grid is not grid:
            self._driver = FlowerServer(self.cfg, self.task, grid)
            self._driver.discover()
        return self._driver

    def _messages(self, kind: str, outgoing: list[tuple[str, str, RecordDict]]) -> tuple[list[Message], dict[str, int]]:
        assert self._driver is not None
        node_of = self._driver.node_of
        to_node = {cid: node_of[node_cid] for cid, node_cid, _ in outgoing}
        return [Message(content, dst_node_id=node_of[node_cid], message_type=kind) for _, node_cid, content in outgoing], to_node


def _by_client(to_node: Mapping[str, int], replies: Iterable[Message]) -> dict[str, Message]:
    """Each client's reply: by the node it came from, and where a node played several clients (a
    pooled method's evaluation), by the client the reply names among them. A reply from a node we
    sent nothing to, or naming a client that node was not sent, is ignored (no reply)."""
    clients_of: dict[int, list[str]] = defaultdict(list)
    for cid, node in to_node.items():
        clients_of[node].append(cid)
    out: dict[str, Message] = {}
    for reply in replies:
        candidates = clients_of.get(reply.metadata.src_node_id, [])
        if len(candidates) == 1:
            cid: str | None = candidates[0]  # FlowerServer checks the client the reply claims to be
        else:
            try:
                cid = str(reply.content["config"]["client_id"]) if not reply.has_error() else None
            except Exception:  # noqa: BLE001 - malformed: no reply from that client
                cid = None
            cid = cid if cid in candidates else None
        if cid is not None and cid not in out:
            out[cid] = reply
    return out

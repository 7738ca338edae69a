"""The ClientApp factory. Light to import (no torch): a deployed SuperNode starts a fresh process
for every message, and the ``query`` that maps nodes to clients needs none of the heavy parts.

Config reaches the app through :func:`make_client_app` (Flower's run_config is read-only): a
:class:`RunConfig`, or a function loading one (the generated Flower App reads its bundled file only
when a train / evaluate message needs it). What a node does with train / evaluate messages is in
:mod:`.runtime`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pf2lora import config as config_mod
from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, nodedata, nodeworker

env.apply()

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from pf2lora.engines.flower.channel import hello_reply

log = logging.getLogger("pf2lora.flower")

ERROR_CLIENT = 1
"""Error code of a client-side failure (the reason carries the exception)."""


def partition_of(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'")
    return int(value)


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ messages of a run with
    ``server.secure_aggregation`` (train messages with a ``secaggplus`` config record); any other
    message goes straight to the app. A failure (the app's or the protocol's) is a one-line error
    reply, so the server drops this client from the round and the round goes on."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type != "train" or not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    def train(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():  # the mod would fail on a reply without content: keep the app's reason
            raise _AppFailed(reply.error.reason)
        return reply

    try:
        return secaggplus_mod(msg, context, train)
    except Exception as e:  # noqa: BLE001
        reason = str(e) if isinstance(e, _AppFailed) else f"{type(e).__name__}: {e}"[:500]
        log.warning("client SecAgg+ stage failed: %s", reason)
        return Message(Error(code=ERROR_CLIENT, reason=reason), reply_to=msg)


class _AppFailed(Exception):
    pass


def make_client_app(cfg: RunConfig | Callable[[], RunConfig], state_dir: str | Path | None = None, node_cache: bool = False) -> ClientApp:
    """A ClientApp for ``cfg``. The state folder is the node's ``state-dir`` node config if set,
    else ``state_dir``, else ``cfg.flower.state_dir``. The app holds no task (it is pickled to
    Ray workers): each process builds the task from ``cfg`` once, or, with ``node_cache`` (a
    deployed node, whose ClientApp process lives for one message) and ``cfg.flower.node_cache``,
    hands train / evaluate messages to the node's long-lived worker (:mod:`.nodeworker`)."""
    app = ClientApp()
    runtimes: dict[str, Any] = {}
    default_dir = str(state_dir or "")
    loaded: list[RunConfig] = [cfg] if isinstance(cfg, RunConfig) else []

    def config() -> RunConfig:
        if not loaded:
            loaded.append(cfg())  # type: ignore[operator]
        return loaded[0]

    def node(context: Context, partition: int) -> tuple[RunConfig, RunConfig, str]:
        """(the run's config, the config of this node's own data, its state folder)."""
        c = config()
        folder = str(context.node_config.get("state-dir", "") or default_dir or c.flower.state_dir)
        if not folder:
            raise ValueError("no folder for client state: set flower.state_dir or the node config 'state-dir'")
        data = c  # node-local data: the task holds this node's own file only
        if nodedata.node_mode(c) and 0 <= partition < c.task.num_clients:
            data = nodedata.node_view(c, partition, nodedata.own_path(c, partition, context.node_config))
        return c, data, folder

    def answer(kind: str, content: RecordDict, context: Context, partition: int) -> RecordDict:
        c, data, folder = node(context, partition)
        if node_cache and c.flower.node_cache and nodeworker.available():
            request = {
                "kind": kind,
                "partition": partition,
                "run_cfg": config_mod.dumps(c),
                "data_cfg": config_mod.dumps(data),
                "stamp": nodedata.stamp(data),
            }
            return nodeworker.call(folder, request, content, c.flower.node_cache_idle_s)
        from pf2lora.engines.flower.runtime import ClientRuntime, cached_task

        key = f"{folder}\0{data.task.data_path.strip()}"
        if key not in runtimes:
            runtimes[key] = ClientRuntime(c, cached_task(data), folder)
        return getattr(runtimes[key], kind)(content, partition)

    def handle(kind: str, msg: Message, context: Context) -> Message:
        try:
            partition = partition_of(context)
            if kind == "query":  # which partition is this node (the server maps it to clients), and its own data's sizes
                return Message(hello_reply(partition, **nodedata.node_report(config(), partition, context.node_config)), reply_to=msg)
            return Message(answer(kind, msg.content, context, partition), reply_to=msg)
        except Exception as e:  # noqa: BLE001 - the server records the failure and carries on
            reason = f"{type(e).__name__}: {e}"[:500]
            log.warning("client %s failed: %s", kind, reason)
            return Message(Error(code=ERROR_CLIENT, reason=reason), reply_to=msg)

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        return handle("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle("evaluate", msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle("query", msg, context)

    return app

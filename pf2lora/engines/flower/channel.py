"""The server's side of the Flower Grid: which node plays which client, and sending messages to
them and collecting their replies. Used by the ServerApp (:mod:`.server`), the Strategy
(:mod:`.strategy`) and SecAgg+ (:mod:`.secagg`); it knows messages only as Flower ``Message``
objects (their contents are :mod:`.messages`) and imports no torch, so a node's ``query`` handler
can use :func:`hello_reply` cheaply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pf2lora.engines.flower import env
from pf2lora.engines.flower.common import FlowerEngineError

env.apply()

from flwr.app import ConfigRecord, Message, RecordDict

log = logging.getLogger("pf2lora.flower")

POLL_S = 0.2
"""Seconds between two pulls for replies (Flower's own ``send_and_receive`` sleeps 3 s)."""

ReplyHook = Callable[[str, Message], None]
"""Called with (message kind, reply) for every reply the server receives, before it is used."""


class GridLike(Protocol):
    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


def hello() -> RecordDict:
    """The ``query`` content that asks a node which partition (client) it plays."""
    return RecordDict({"config": ConfigRecord({"hello": 1})})


def hello_reply(partition: int, **data: int | str) -> RecordDict:
    """A node's answer to :func:`hello`; with node-local data also its own file's ``num_train`` /
    ``num_test``, or ``data_error`` (see :mod:`.nodedata`)."""
    return RecordDict({"config": ConfigRecord({"partition": partition, **data})})


@dataclass(frozen=True)
class Outgoing:
    """One message to send: for client ``client_id``, to the node that plays ``node_client``."""

    client_id: str
    node_client: str
    content: RecordDict
    kind: str = ""
    """Its message type, where it differs from the rest of its exchange (see :meth:`Channel.exchange`)."""


class Channel:
    """Messages to the clients of a federation over ``grid``, with a short poll, waves so that no
    node ever holds two of our messages at once, and the reply hook (tests, debugging)."""

    def __init__(self, grid: GridLike, on_reply: ReplyHook | None = None):
        self.grid = grid
        self.on_reply = on_reply
        self.node_of: dict[str, int] = {}
        """Client id -> the node that plays it (filled by :meth:`discover`)."""
        self.sizes: dict[str, tuple[int, int]] = {}
        """Client id -> (training, test) examples its node reported (node-local data; filled by :meth:`discover`)."""

    def discover(self, client_ids: Sequence[str], wait_s: float, extra: Callable[[int], list[str]] = lambda p: []) -> dict[str, int]:
        """Wait up to ``wait_s`` for one node per client; ask each which partition it plays
        (partition K plays ``client_ids[K]`` and ``extra(K)``). Raises FlowerEngineError when a
        client has no node or two nodes claim one."""
        want = len(client_ids)
        deadline = time.monotonic() + wait_s
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= want or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if len(nodes) < want:
            raise FlowerEngineError(
                f"only {len(nodes)} of {want} SuperNodes connected within flower.node_wait_s = "
                f"{wait_s:g} s (one SuperNode per client, --node-config 'partition-id=K')"
            )
        replies = self.send([Message(hello(), dst_node_id=n, message_type="query") for n in nodes], wait_s)
        node_of: dict[str, int] = {}
        bad_data: list[str] = []
        for n in nodes:
            reply = replies.get(n)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                log.warning("node %s did not say which partition it is (%s); it is left out", n, why)
                continue
            try:
                partition = int(reply.content["config"]["partition"])  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a malformed hello leaves that node out
                log.warning("node %s sent a malformed hello; it is left out", n)
                continue
            if not 0 <= partition < want:
                raise FlowerEngineError(f"SuperNode {n} has partition-id {partition}, outside 0..{want - 1} (task.num_clients = {want})")
            for cid in [client_ids[partition], *extra(partition)]:
                if cid in node_of:
                    raise FlowerEngineError(
                        f"two SuperNodes ({node_of[cid]} and {n}) have partition-id {partition}: give each a distinct one"
                    )
                node_of[cid] = n
            c: dict = dict(reply.content["config"])
            if "data_error" in c:  # node-local data: its file is missing or wrong
                bad_data.append(f"SuperNode {n} (partition-id {partition}, {client_ids[partition]}): {c['data_error']!s}")
            elif "num_train" in c:
                self.sizes[client_ids[partition]] = (int(c["num_train"]), int(c["num_test"]))
        if bad_data:  # the run stops before any round: nothing is lost on the other nodes
            raise FlowerEngineError("bad node data: " + "; ".join(bad_data))
        missing = [c for c in client_ids if c not in node_of]
        if missing:
            raise FlowerEngineError(f"no SuperNode plays client(s) {missing[:5]} (partition-id 0..{want - 1}, one node each)")
        self.node_of = node_of
        return node_of

    def push_pull(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """``send_and_receive`` with a short poll where the grid can push and pull separately."""
        push = getattr(self.grid, "push_messages", None)
        pull = getattr(self.grid, "pull_messages", None)
        if push is None or pull is None:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        pending = {i for i in push(messages) if i}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            got = list(pull(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(POLL_S)
        return replies

    def send(self, messages: list[Message], timeout: float | None) -> dict[int, Message]:
        """Send; the first reply of each destination node, by node (a node gets at most one message per call)."""
        if not messages:
            return {}
        wanted = {m.metadata.dst_node_id for m in messages}
        out: dict[int, Message] = {}
        for r in self.push_pull(messages, timeout):
            src = r.metadata.src_node_id
            if src in wanted and src not in out:
                out[src] = r
        return out

    def messages(self, kind: str, outgoing: Sequence[Outgoing]) -> tuple[list[Message], dict[str, int]]:
        """(the Flower messages of ``outgoing``, client id -> destination node) for a caller that
        sends them itself (a Strategy hands them to Flower)."""
        to_node = {o.client_id: self.node_of[o.node_client] for o in outgoing}
        return [Message(o.content, dst_node_id=to_node[o.client_id], message_type=kind) for o in outgoing], to_node

    def exchange(self, kind: str, outgoing: Sequence[Outgoing], timeout: float | None) -> dict[str, Message | None]:
        """Send ``outgoing`` (messages of type ``kind``, or each its own ``kind``) in waves (a node
        never holds two of our messages at once); the reply per client id, None where none came."""
        waves: list[list[tuple[Outgoing, int]]] = []
        for o in outgoing:
            node = self.node_of[o.node_client]
            wave = next((w for w in waves if all(n != node for _, n in w)), None)
            if wave is None:
                wave = []
                waves.append(wave)
            wave.append((o, node))
        out: dict[str, Message | None] = {}
        for wave in waves:
            got = self.send([Message(o.content, dst_node_id=node, message_type=o.kind or kind) for o, node in wave], timeout)
            for o, node in wave:
                reply = got.get(node)
                if reply is not None and self.on_reply is not None:
                    self.on_reply(o.kind or kind, reply)
                out[o.client_id] = reply
        return out

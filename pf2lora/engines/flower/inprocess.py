"""A Grid that delivers messages to ClientApps in this process, one node per client: the Flower
apps' logic (messages, records, transport, node state, validation) without Ray or a SuperLink.
For tests and debugging; ``flower-sim`` and ``flower-deploy`` use Flower's own runtimes."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Sequence

from pf2lora.engines.flower import env

env.apply()

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp


class InProcessGrid:
    def __init__(self, client_app: ClientApp, num_nodes: int, node_config: dict | None = None, node_configs: Sequence[dict] = ()):
        """``node_config``: keys every node gets; ``node_configs[i]``: node i's own (e.g. its ``data-path``)."""
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._run_id is None:  # Flower sets these in its own runtimes; messages need them
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={
                    "partition-id": i,
                    "num-partitions": num_nodes,
                    **(node_config or {}),
                    **(node_configs[i] if i < len(node_configs) else {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                continue  # a message to an unknown node is never answered
            # a copy, as a real runtime delivers a deserialised one: Flower's SecAgg+ workflow sends
            # one content object to every node, and its client mod edits what it receives
            reply = self.app(copy.deepcopy(msg), self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies

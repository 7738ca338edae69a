"""The typed Flower message contents (engines/flower/messages.py) and the grid channel: what is
written is what is read, private tensors cannot be put in a reply, malformed replies say why."""

from __future__ import annotations

import pytest
import torch

from pf2lora.engines.flower.channel import Channel, Outgoing, hello, hello_reply
from pf2lora.engines.flower.messages import EvaluateIns, EvaluateReply, MalformedReply, TrainIns, TrainReply, claimed_client
from pf2lora.state import PrivacyViolation

RECEIVED = {"shared:l.lora_A.common": torch.randn(2, 3), "shared:head.weight": torch.randn(2, 2).to(torch.bfloat16)}


def test_train_instruction_round_trips_with_dtypes():
    ins = TrainIns("pf2lora", "run", "c1", 3, 2, RECEIVED, inject_crash=True)
    back = TrainIns.parse(ins.content())
    assert (back.method, back.run_key, back.client_id, back.round, back.accepted_round, back.inject_crash) == (
        "pf2lora",
        "run",
        "c1",
        3,
        2,
        True,
    )
    assert set(back.received) == set(RECEIVED)
    for k, v in RECEIVED.items():
        assert back.received[k].dtype == v.dtype and torch.equal(back.received[k], v)
        assert back.received[k].data_ptr() != v.data_ptr()  # a copy: a message never aliases the sender's tensor


def test_evaluate_instruction_names_the_state_it_uses():
    back = EvaluateIns.parse(EvaluateIns("homlora", "run", "c2", 5, -1, RECEIVED, state_of="pooled").content())
    assert back.state_of == "pooled" and back.client_id == "c2" and back.accepted_round == -1
    assert EvaluateIns.parse(EvaluateIns("homlora", "run", "c2", 5, 4, {}).content()).state_of == "c2"


def test_train_reply_round_trips_and_refuses_private_tensors():
    upload = {"shared:l.lora_B.common": torch.randn(3, 2)}
    back = TrainReply.parse(TrainReply("c1", upload, 64, {"train_loss": 0.5}, 1.25).content())
    assert back.client_id == "c1" and back.num_examples == 64 and back.metrics == {"train_loss": 0.5} and back.took_s == 1.25
    assert torch.equal(back.upload["shared:l.lora_B.common"], upload["shared:l.lora_B.common"])
    with pytest.raises(PrivacyViolation):
        TrainReply("c1", {**upload, "private:l.lora_A.private": torch.zeros(1, 3)}, 64).content()


def test_malformed_train_replies_say_why():
    content = TrainReply("c1", {}, 10, {"train_loss": 1.0}).content()
    content["config"]["num_examples"] = -1
    with pytest.raises(MalformedReply, match="negative num_examples"):
        TrainReply.parse(content)
    content["config"]["num_examples"] = 1
    content["config"]["metrics"] = '{"train_loss": "x"}'
    with pytest.raises(MalformedReply, match="malformed metrics"):
        TrainReply.parse(content)


def test_evaluate_reply_and_claimed_client():
    content = EvaluateReply("c3", {"accuracy": 0.75}).content()
    assert EvaluateReply.parse(content).metrics == {"accuracy": 0.75}
    assert claimed_client(content) == "c3" and claimed_client(hello()) is None


class _EchoGrid:
    """Nodes 7 and 8 answer every message at once; node 8 also plays partition 1."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def get_node_ids(self):
        return [7, 8]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        messages = list(messages)
        self.batches.append([m.metadata.dst_node_id for m in messages])
        replies = []
        for m in messages:
            content = hello_reply(m.metadata.dst_node_id - 7) if m.metadata.message_type == "query" else m.content
            reply = Message(content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def test_channel_discovers_nodes_and_never_gives_a_node_two_messages_at_once():
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # Flower sets these in its own runtimes; messages need them
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    grid = _EchoGrid()
    channel = Channel(grid)
    assert channel.discover(["a", "b"], wait_s=5.0, extra=lambda p: ["pooled"] if p == 0 else []) == {"a": 7, "pooled": 7, "b": 8}
    outgoing = [Outgoing(cid, node_cid, EvaluateReply(cid, {}).content()) for cid, node_cid in (("a", "a"), ("pooled", "a"), ("b", "b"))]
    replies = channel.exchange("evaluate", outgoing, timeout=5.0)
    assert set(replies) == {"a", "pooled", "b"} and all(r is not None for r in replies.values())
    assert grid.batches[1:] == [[7, 8], [7]]  # node 7 plays two clients: two waves

"""What a client node does with the server's messages (the heavy part of the ClientApp: torch,
the task, the methods; :mod:`.client` imports it on the first train / evaluate message).

One node plays one client (partition ``partition-id`` of the task; node 0 also plays the pooled
client of a centralised reference) and runs the method's own client code. Messages
(``content["config"]`` holds the scalars, ``content["arrays"]`` the tensors):

* ``train``: ``received`` tensors in, :func:`pf2lora.engines.rounds.train_client` (the local
  engine's training, same context and random streams), the new state saved as pending, only
  ``shared:`` tensors out (through :func:`pf2lora.state.outgoing`, the one gate).
* ``train`` through SecAgg+ (``server.secure_aggregation``; legacy FitIns / FitRes records, see
  :mod:`.secagg`): the same training and pending state; the client checks its own upload (the
  server sees only the masked sum) and never sends it in the clear.
* ``evaluate``: personalised and global metrics of one client,
  :func:`pf2lora.engines.rounds.evaluate_client` (what the local engine computes).
* ``train`` with ``evaluate_round`` set: first the evaluation after that round, on the tensors
  received for training (the server's state has not changed since), then the training; the reply
  carries both, or the evaluation and why the training failed (one message per round instead of two).

Every message carries the last round whose training the server counted for that client: the
pending state of that round is committed, any other pending state dropped (see :mod:`.store`). The task is built once per process.

Tensors travel and are stored on the CPU; a node moves what it receives and the state it loads
to its task's device (``device``) on arrival.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path
from typing import Any, TypeVar

import torch

from pf2lora import config as config_mod
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, transport
from pf2lora.engines.flower.store import NodeStore

env.apply()

from flwr.app import RecordDict

from pf2lora import adapters
from pf2lora.engines.flower.messages import EVALUATION, EvaluateIns, EvaluateReply, Instruction, TrainFailure, TrainIns, TrainReply
from pf2lora.engines.rounds import (
    InjectedCrash,
    divergence,
    evaluate_client,
    initial_client,
    injected_poison,
    personal_model,
    train_client,
    trainers,
)
from pf2lora.methods import registry
from pf2lora.methods.base import ClientState, ClientUpdate, Method
from pf2lora.plan import build_task
from pf2lora.tasks.base import ClientData, Task

_TASKS: dict[str, Task] = {}
InsT = TypeVar("InsT", bound=Instruction)
_TASK_LOCK = threading.Lock()


def cfg_key(cfg: RunConfig) -> str:
    return hashlib.sha256(config_mod.dumps(cfg).encode()).hexdigest()[:16]


def cached_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``, built once per process (Ray actors serve many messages)."""
    key = cfg_key(cfg)
    with _TASK_LOCK:
        if key not in _TASKS:
            if cfg.num_threads:
                torch.set_num_threads(cfg.num_threads)
            _TASKS[key] = build_task(cfg)
        return _TASKS[key]


class ClientRuntime:
    """What one node needs to answer messages: the task, the methods, its state folder."""

    def __init__(self, cfg: RunConfig, task: Task, state_dir: str | Path):
        self.cfg = cfg
        self.task = task
        self.store = NodeStore(state_dir)
        self._methods: dict[str, Method] = {}

    def method(self, name: str) -> Method:
        if name not in registry():
            raise ValueError(f"unknown method {name!r}")
        if name not in self._methods:
            self._methods[name] = registry()[name](self.cfg, self.task)
        return self._methods[name]

    def served(self, partition: int) -> list[str]:
        """Client ids node ``partition`` plays: its task client, and node 0 the pooled one."""
        n = len(self.task.clients)
        if not 0 <= partition < n:
            raise ValueError(f"partition-id {partition} is outside the task's {n} clients")
        return [self.task.clients[partition].client_id] + (["pooled"] if partition == 0 else [])

    def trainer(self, method: Method, client_id: str) -> tuple[ClientData, int]:
        clients, steps = trainers(self.cfg, self.task, method)
        by_id = {c.client_id: c for c in clients}
        if client_id not in by_id:
            raise ValueError(f"{method.name}: {client_id!r} is not a training client of this method")
        return by_id[client_id], steps

    def state(self, method: Method, run_key: str, client_id: str) -> ClientState:
        saved = self.store.load(run_key, method.name, client_id)
        if saved is not None:
            return st.to_device(saved, self.task.device)
        return initial_client(self.cfg, method, client_id)

    def arrived(self, ins: InsT) -> InsT:
        """``ins`` with its received tensors (CPU, off the wire) on this node's device."""
        return dataclasses.replace(ins, received=st.to_device(ins.received, self.task.device))

    def apply_verdict(self, ins: Instruction, client_id: str) -> None:
        """Commit ``client_id``'s pending state if the server counted that round, else drop it."""
        self.store.resolve(ins.run_key, ins.method, client_id, ins.accepted_round)

    # -- message handlers ------------------------------------------------------------------------

    def train(self, content: RecordDict, partition: int) -> RecordDict:
        from pf2lora.engines.flower import secagg  # Flower's legacy SecAgg+ API: only for such messages

        if secagg.FITINS in content.config_records:
            return self.train_secure(content, partition)
        ins = self.arrived(TrainIns.parse(content))
        self._check_served(ins.client_id, partition)
        method = self.method(ins.method)
        if self.cfg.server.secure_aggregation and method.upload_spec(ins.received):
            raise PermissionError("this run uses server.secure_aggregation: this client does not send its upload in the clear")
        evaluation = None
        if ins.evaluate_round >= 0:  # the evaluation after the last round rides on this message
            evaluation = self._evaluation(method, ins, ins.client_id, ins.client_id, ins.evaluate_round)
        try:
            update, new_state, took = self._train(ins, method)
            update = injected_poison(self.cfg, ins.client_id, update, ins.received)
            self.store.save_pending(ins.run_key, ins.method, ins.client_id, ins.round, new_state)
            reply = TrainReply(ins.client_id, update.shared, update.num_examples, update.metrics, took).content()
        except Exception as e:
            if evaluation is None:
                raise
            reply = TrainFailure(ins.client_id, f"{type(e).__name__}: {e}"[:500]).content()  # the evaluation still counts
        if evaluation is not None:
            reply[EVALUATION] = EvaluateReply(ins.client_id, evaluation).record()
        return reply

    def _train(self, ins: TrainIns, method: Method) -> tuple[ClientUpdate, ClientState, float]:
        """What both train paths do: the server's verdict on the last round, this client's state,
        an injected crash, then the method's local training."""
        self.apply_verdict(ins, ins.client_id)
        state = self.state(method, ins.run_key, ins.client_id)
        if ins.inject_crash:
            raise InjectedCrash("injected crash")
        data, steps = self.trainer(method, ins.client_id)
        return train_client(self.cfg, self.task, method, data, steps, ins.round, ins.received, state)

    def train_secure(self, content: RecordDict, partition: int) -> RecordDict:
        """A SecAgg+ train message (legacy FitIns records, reached through ``secaggplus_mod``):
        train and keep the state exactly as :meth:`train`, check the upload here (the server will
        see only the masked sum), reply as a legacy FitRes for the mod to mask."""
        from pf2lora.engines.flower import secagg  # Flower's legacy SecAgg+ API: only for such messages

        c, received = secagg.fitins_of(content)
        received = st.to_device(received, self.task.device)
        ins = TrainIns.from_fields(c, received)
        cid = ins.client_id
        self._check_served(cid, partition)
        if not self.cfg.server.secure_aggregation:
            raise PermissionError("a SecAgg+ train message, but this client's config has server.secure_aggregation = false")
        method = self.method(ins.method)
        update, new_state, took = self._train(ins, method)
        keys = transport.loads(str(c["upload_keys"]))
        clip = float(c.get("secagg_clipping_range", self.cfg.server.secagg_clipping_range))
        reason = secagg.check_upload(update.shared, method.upload_spec(received), keys, clip)
        if reason is None and update.num_examples > float(c.get("secagg_max_weight", float("inf"))):
            reason = f"num_examples {update.num_examples} exceeds the server's max_weight {c['secagg_max_weight']}"
        if reason is None:
            reason = divergence(update)
        if reason is not None:  # nothing is saved: the state stays at the last counted round
            raise ValueError(f"upload not sent: {reason}")
        update = injected_poison(self.cfg, cid, update, received)  # an injected attacker skips the honest checks above
        self.store.save_pending(ins.run_key, ins.method, cid, ins.round, new_state)
        shared = st.outgoing(update.shared)  # the one gate: raises on any private tensor
        metrics = {"client_id": cid, "took_s": float(took), "metrics": transport.dumps(update.metrics)}
        return secagg.fitres_content(shared, keys, update.num_examples, metrics)

    def evaluate(self, content: RecordDict, partition: int) -> RecordDict:
        ins = self.arrived(EvaluateIns.parse(content))
        self._check_served(ins.state_of, partition)
        metrics = self._evaluation(self.method(ins.method), ins, ins.client_id, ins.state_of, ins.round)
        return EvaluateReply(ins.client_id, metrics).content()

    def _evaluation(self, method: Method, ins: Instruction, client_id: str, state_of: str, round_: int) -> dict[str, Any]:
        """Client ``client_id``'s metrics on what ``ins`` received, with the state of ``state_of``
        after the server's verdict; after the last round its personalised adapter is also written."""
        self.apply_verdict(ins, state_of)
        state = self.state(method, ins.run_key, state_of)
        client = next((k for k in self.task.clients if k.client_id == client_id), None)
        if client is None:
            raise ValueError(f"no client {client_id!r} in this node's task")
        metrics = evaluate_client(self.cfg, self.task, method, client, ins.received, state, round_)
        if round_ == self.cfg.rounds:  # the final evaluation: the client keeps its model, here
            personal = personal_model(self.cfg, self.task, method, client, ins.received, state, round_)
            adapters.write(
                self.store.root / adapters.DIRNAME, self.cfg, self.task, method.name, client.client_id, personal, round_, metrics
            )
        return metrics

    def _check_served(self, client_id: str, partition: int) -> None:
        if client_id not in self.served(partition):
            raise ValueError(f"this node (partition {partition}) does not serve client {client_id!r}")


def register_task(cfg: RunConfig, task: Task) -> None:
    """Use ``task`` for ``cfg`` in this process (saves building it again; Ray workers build theirs)."""
    with _TASK_LOCK:
        _TASKS[cfg_key(cfg)] = task

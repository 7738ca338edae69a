"""The in-process runner, the default engine.

One frozen base model (the task's) serves every simulated client; a client's state is only its
adapters and optimizer entries, held here between rounds. What a round does around the method
(sampling, faults, contexts and random streams, checking uploads, the round's record, evaluation,
checkpoint state) is :mod:`.rounds`, shared with the Flower engines; this module adds the loop.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from pf2lora import secagg
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.lockstep import LockstepEngine, Outcome, parallel_clients
from pf2lora.engines.rounds import (
    InjectedCrash,
    MethodResult,
    MethodRun,
    RoundCallback,
    RoundFailure,
    RunState,
    StateCallback,
    common_adapter,
    evaluate_client,
    generator,
    injected_fault,
    injected_poison,
    mean_of,
    sample_clients,
    train_client,
)
from pf2lora.methods import registry
from pf2lora.methods.base import ClientState, Method
from pf2lora.tasks.base import Task

T = TypeVar("T")

__all__ = [  # the shared names are re-exported: callers import them from here
    "InjectedCrash",
    "LocalEngine",
    "MethodResult",
    "RoundCallback",
    "RoundFailure",
    "RunState",
    "StateCallback",
    "common_adapter",
    "generator",
    "mean_of",
    "sample_clients",
]


class LocalEngine:
    """Runs one method over the task's clients, round by round, in this process.

    Per round each sampled client may drop out, crash, miss the deadline or send an invalid update
    (injected by ``cfg.faults`` or real); such a client is recorded and left out of the aggregate,
    and its state stays as it was after its last good round.
    """

    def __init__(self, cfg: RunConfig, task: Task, progress: bool = True):
        self.cfg = cfg
        self.task = task
        self.progress = progress
        self.lockstep: LockstepEngine | None = None

    def run(
        self,
        method_name: str,
        on_round: RoundCallback | None = None,
        resume: RunState | None = None,
        on_state: StateCallback | None = None,
    ) -> MethodResult:
        """Run ``method_name`` to the end (from ``resume`` if given); ``on_state`` gets the state
        after every round (for checkpoints), ``on_round`` the round's metrics record."""
        secagg.check_engine(self.cfg, "local")  # no SecAgg+ here: refuse rather than aggregate in the clear
        method: Method = registry()[method_name](self.cfg, self.task)
        run = MethodRun(self.cfg, self.task, method, resume=resume, on_round=on_round, on_state=on_state, progress=self.progress)
        try:
            for round_ in run.pending_rounds():
                record = self._round(run, round_)
                run.end_round(record, self.evaluate(method, run.server, run.clients, round_) if run.eval_due(round_) else None)
        finally:
            if self.lockstep is not None:
                self.lockstep.close()
        return run.finish(self.evaluate(method, run.server, run.clients, self.cfg.rounds))

    def _round(self, run: MethodRun, round_: int) -> dict[str, Any]:
        """One round: the sampled clients train (one by one, or in lockstep with
        ``parallel_clients``), then the ledger settles them in sampling order."""
        cfg, task, method = self.cfg, self.task, run.method
        ledger = run.open_round(round_)
        faults = {cid: injected_fault(cfg, cid, round_) for cid in ledger.sampled}
        # the client never holds the server's tensors
        received = {cid: st.packed_clone(method.broadcast(run.server, cid)) for cid, (kind, _) in faults.items() if kind != "dropout"}
        training = [cid for cid in received if faults[cid][0] != "crash"]
        jobs = [
            functools.partial(train_client, cfg, task, method, run.trainers[cid], run.local_steps, round_, received[cid], run.clients[cid])
            for cid in training
        ]
        outcomes = dict(zip(training, self._train(jobs, len(ledger.sampled)), strict=True))
        for cid in ledger.sampled:
            kind, delay = faults[cid]
            if kind == "dropout":
                ledger.dropped(cid)
                continue
            ledger.sent(received[cid])
            if kind == "crash":
                ledger.crashed(cid, f"{InjectedCrash.__name__}: injected crash")
                continue
            outcome = outcomes[cid]
            if outcome.error is not None or outcome.value is None:
                ledger.crashed(cid, f"{type(outcome.error).__name__}: {outcome.error}")
                continue
            update, new_state, took = outcome.value
            took -= outcome.waited_s  # its own time: waiting for the other clients of its round is not its work
            if ledger.missed_deadline(cid, took + delay):
                run.counted(cid, round_, new_state)  # it did train; only the server ignores its late upload
                continue
            if ledger.offer(cid, injected_poison(cfg, cid, update, received[cid]), received[cid]) is None:
                run.counted(cid, round_, new_state)  # a rejected client's state stays at its last good round
        run.server, record = ledger.finish(run.server)
        return record

    def _train(self, jobs: Sequence[Callable[[], T]], sampled: int) -> list[Outcome[T]]:
        """Each job's outcome: run one after another, or together by the lockstep engine."""
        k = parallel_clients(self.cfg, self.task, sampled)
        if k > 1 and len(jobs) > 1:
            if self.lockstep is None or self.lockstep.max_clients != k:
                if self.lockstep is not None:
                    self.lockstep.close()
                self.lockstep = LockstepEngine(k, note=lambda line: print(line, file=sys.stderr))
            return self.lockstep.run(jobs)
        return [Outcome.of(job) for job in jobs]

    @torch.no_grad()
    def evaluate(self, method: Method, server: st.Tensors, states: dict[str, ClientState], round_: int) -> dict[str, dict[str, Any]]:
        """Personalised metrics (client's own model) and global metrics (server model) per client."""
        out: dict[str, dict[str, Any]] = {}
        for client in self.task.clients:
            state = states.get(client.client_id) or states.get("pooled") or {}
            received = st.clone(method.broadcast(server, client.client_id))
            out[client.client_id] = evaluate_client(self.cfg, self.task, method, client, received, state, round_, server=server)
        return out

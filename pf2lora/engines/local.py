"""The in-process runner, the default engine.

One frozen base model (the task's) serves every simulated client; a client's state is only its
adapters and optimizer entries, held here between rounds. What a round does around the method
(sampling, faults, contexts and random streams, checking uploads, the round's record, evaluation)
is :mod:`.rounds`, shared with the Flower engine; this module adds the loop, resume and progress.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.rounds import (
    InjectedCrash,
    MethodResult,
    RoundCallback,
    RoundFailure,
    common_adapter,
    eval_due,
    evaluate_client,
    generator,
    initial_client,
    initial_server,
    injected_fault,
    injected_poison,
    account_round,
    make_accountant,
    mean_of,
    open_round,
    privacy_report,
    sample_clients,
    train_client,
    trainers,
)
from pf2lora.methods import registry
from pf2lora.methods.base import ClientState, Method
from pf2lora.tasks.base import ClientData, Task

__all__ = [  # the shared names are re-exported: callers import them from here
    "InjectedCrash", "LocalEngine", "MethodResult", "RoundCallback", "RoundFailure", "RunState", "StateCallback",
    "common_adapter", "generator", "mean_of", "sample_clients",
]


@dataclass
class RunState:
    """A method in progress after ``round`` completed rounds: what a checkpoint must hold."""

    method: str
    round: int
    server: st.Tensors
    clients: dict[str, ClientState]
    rounds: list[dict[str, Any]]
    faults: list[dict[str, Any]]
    elapsed_s: float
    accountant: dict[str, Any] | None = None


StateCallback = Callable[[RunState], None]


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

    def run(
        self, method_name: str, on_round: RoundCallback | None = None, resume: RunState | None = None,
        on_state: StateCallback | None = None,
    ) -> MethodResult:
        """Run ``method_name`` to the end (from ``resume`` if given); ``on_state`` gets the state
        after every round (for checkpoints), ``on_round`` the round's metrics record."""
        cfg, task = self.cfg, self.task
        from pf2lora.secagg import check_engine

        check_engine(cfg, "local")  # no SecAgg+ here: refuse rather than aggregate in the clear
        method: Method = registry()[method_name](cfg, task)
        clients, steps = trainers(cfg, task, method)
        by_id = {c.client_id: c for c in clients}
        accountant = make_accountant(cfg, task)
        if resume is None:
            server = initial_server(cfg, method)
            states: dict[str, ClientState] = {c.client_id: initial_client(cfg, method, c.client_id) for c in clients}
            run_state = RunState(method_name, 0, server, states, [], [], 0.0)
        else:
            if resume.method != method_name:
                raise ValueError(f"resume state is for {resume.method!r}, not {method_name!r}")
            run_state = resume
            if accountant is not None and resume.accountant is not None:
                accountant.load_state_dict(resume.accountant)
        start = time.perf_counter() - run_state.elapsed_s
        bar = tqdm(
            range(run_state.round + 1, cfg.rounds + 1), desc=f"{method_name:>12}", disable=not self.progress,
            leave=True, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15.0,
            initial=run_state.round, total=cfg.rounds,
        )
        for round_ in bar:
            record = self._round(method, run_state, by_id, steps, round_)
            account_round(accountant, record)
            if accountant is not None:
                run_state.accountant = accountant.state_dict()
            if eval_due(cfg, round_):
                clients_metrics = self.evaluate(method, run_state.server, run_state.clients, round_)
                record["eval"] = mean_of(clients_metrics, task.primary_metric)
            run_state.rounds.append(record)
            run_state.round = round_
            run_state.elapsed_s = time.perf_counter() - start
            shown = record.get("eval", record["train_loss"])
            bar.set_postfix({task.primary_metric if "eval" in record else "train_loss": f"{shown:.4g}"}, refresh=False)
            if on_round:
                on_round(record)
            if on_state:
                on_state(run_state)
        result = MethodResult(method_name, {}, run_state.rounds, faults=run_state.faults)
        result.clients = self.evaluate(method, run_state.server, run_state.clients, cfg.rounds)
        if accountant is not None:
            result.privacy = privacy_report(cfg, task, accountant, run_state.rounds)
        result.wall_time_s = time.perf_counter() - start
        return result

    def _round(self, method: Method, rs: RunState, by_id: dict[str, ClientData], steps: int, round_: int) -> dict[str, Any]:
        """One round: each sampled client trains here, in sampling order; the ledger decides."""
        cfg, task = self.cfg, self.task
        ledger = open_round(cfg, method, list(by_id), round_, rs.faults)
        for cid in ledger.sampled:
            kind, delay = injected_fault(cfg, cid, round_)
            if kind == "dropout":
                ledger.dropped(cid)
                continue
            received = st.clone(method.broadcast(rs.server, cid))  # the client never holds the server's tensors
            ledger.sent(received)
            try:
                if kind == "crash":
                    raise InjectedCrash("injected crash")
                update, new_state, took = train_client(cfg, task, method, by_id[cid], steps, round_, received, rs.clients[cid])
            except Exception as e:  # a failing client is recorded, never takes the federation down
                ledger.crashed(cid, f"{type(e).__name__}: {e}")
                continue
            if ledger.missed_deadline(cid, took + delay):
                rs.clients[cid] = new_state  # it did train; only the server ignores its late upload
                continue
            if ledger.offer(cid, injected_poison(cfg, cid, update, received), received) is None:
                rs.clients[cid] = new_state  # a rejected client's state stays at its last good round
        rs.server, record = ledger.finish(rs.server)
        return record

    @torch.no_grad()
    def evaluate(self, method: Method, server: st.Tensors, states: dict[str, ClientState], round_: int) -> dict[str, dict[str, Any]]:
        """Personalised metrics (client's own model) and global metrics (server model) per client."""
        out: dict[str, dict[str, Any]] = {}
        for client in self.task.clients:
            state = states.get(client.client_id) or states.get("pooled") or {}
            received = st.clone(method.broadcast(server, client.client_id))
            out[client.client_id] = evaluate_client(self.cfg, self.task, method, client, received, state, round_, server=server)
        return out

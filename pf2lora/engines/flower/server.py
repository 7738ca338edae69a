"""The ServerApp: the local engine's round loop, with clients reached through a Flower Grid.

The server holds the server state and calls the method's own ``broadcast``; everything else a
round does (client sampling, injected faults, checking every upload against
``method.upload_spec(received)``, the fault records, the min_clients rule, the aggregation, DP
accounting, the per-round record) is :mod:`pf2lora.engines.rounds`, which the local engine runs
too, in the same order, so a run gives the local engine's numbers for the same seed. A bad reply (an error, no reply
within ``flower.round_timeout_s``, a private key, a wrong shape, a non-finite value, a claim to be
another client) is logged, recorded as a fault and left out; the round carries on.

The evaluation after a round rides on the next round's train messages where it can (not for a
pooled method, not with SecAgg+; :meth:`FlowerServer.folds`): a node evaluates what it is sent to
train before training on it, so a round with an evaluation costs one message per client, not two.

With ``server.secure_aggregation`` a round's training goes through Flower's SecAgg+ instead
(:mod:`.secagg`): the server gets only the weighted mean of the uploads, so the per-upload
validation above is done by each client on its own upload, and the method's ``aggregate`` gets
that mean as a single update.

With a :class:`~.resume.ServerCheckpoint` the server checkpoints after every round and continues a
run from one (``pf2lora run --resume``): the same run key (the nodes' state folders of this run),
the finished methods' results as they were, the method in progress from its last round. A node
whose saved state is not of the round the checkpoint last counted for its client refuses (see
:mod:`.store`), and the run stops with one line naming the client.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pf2lora import adapters
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, nodedata

env.apply()

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from pf2lora.engines.flower.channel import Channel, GridLike, Outgoing, ReplyHook
from pf2lora.engines.flower.common import FlowerEngineError
from pf2lora.engines.flower.messages import (
    EVALUATION,
    EvaluateIns,
    EvaluateReply,
    MalformedReply,
    TrainFailure,
    TrainIns,
    TrainReply,
    with_evaluate_round,
)
from pf2lora.engines.flower.resume import ServerCheckpoint
from pf2lora.engines.flower.store import MISMATCH
from pf2lora.engines.rounds import MethodResult, MethodRun, RoundCallback, RoundLedger, RunState, global_model, injected_fault, num_bytes
from pf2lora.methods import registry
from pf2lora.methods.base import ClientUpdate
from pf2lora.plan import build_task
from pf2lora.tasks.base import Task
from pf2lora.tasks.text_base import RemoteClient

log = logging.getLogger("pf2lora.flower")

__all__ = ["FlowerServer", "GridLike", "ReplyHook", "RoundCallback", "ServerHook", "make_server_app"]

ServerHook = Callable[[str, int, st.Tensors], None]
"""Called with (method, round, server state) after every round's aggregation (tests, debugging)."""

Sent = Mapping[str, tuple[TrainIns, float]]
"""Client id -> (its train instruction, holding what the server broadcast to it; its injected delay in seconds)."""


class FlowerServer:
    """Runs ``cfg.methods`` (or ``methods``) over the nodes of ``grid``; returns MethodResults."""

    def __init__(
        self,
        cfg: RunConfig,
        task: Task,
        grid: GridLike,
        *,
        on_round: RoundCallback | None = None,
        on_reply: ReplyHook | None = None,
        progress: bool = False,
        on_server: ServerHook | None = None,
        adapters_root: str | Path | None = None,
        checkpoint: ServerCheckpoint | None = None,
    ):
        """``adapters_root``: where the server writes each method's global adapter when it
        finishes (``ROOT/METHOD/global``); the personalised ones stay on the nodes.
        ``checkpoint``: written after every round; a resumed one continues its run (see the module docstring)."""
        nodedata.check_run(cfg, files_needed=False)
        self.cfg = cfg
        self.adapters_root = Path(adapters_root) if adapters_root else None
        self.task = task
        self.channel = Channel(grid, on_reply)
        self.on_round = on_round
        self.on_server = on_server
        self.progress = progress
        self.checkpoint = checkpoint
        # namespaces the client state files of this run (a resumed run keeps its own)
        self.run_key = checkpoint.run_key if checkpoint is not None else uuid.uuid4().hex

    @property
    def grid(self) -> GridLike:
        return self.channel.grid

    @property
    def node_of(self) -> dict[str, int]:
        return self.channel.node_of

    def discover(self) -> dict[str, int]:
        """Wait for every client's node; ask each node which client it plays (node 0 also plays
        the pooled client of a centralised reference)."""
        ids = [c.client_id for c in self.task.clients]
        node_of = self.channel.discover(ids, self.cfg.flower.node_wait_s, extra=lambda p: ["pooled"] if p == 0 else [])
        for c in self.task.clients:  # node-local data: the sizes only its node knows (e.g. SecAgg+'s weights)
            if isinstance(c, RemoteClient) and c.client_id in self.channel.sizes:
                c.reported = self.channel.sizes[c.client_id]
        return node_of

    def plays(self, client_ids: Iterable[str]) -> dict[str, str]:
        """Which node's client plays each of ``client_ids``: itself, or node 0's client for the
        pooled client of a centralised reference."""
        return {cid: (cid if cid in self.node_of else self.task.clients[0].client_id) for cid in client_ids}

    # -- the run ---------------------------------------------------------------------------------

    def run(self, methods: Sequence[str] | None = None) -> list[MethodResult]:
        """Every method's result; with a resumed checkpoint, those it finished are taken from it."""
        if not self.node_of:
            self.discover()
        results = []
        for name in methods or self.cfg.methods:
            done = self.checkpoint.result_of(name) if self.checkpoint is not None else None
            results.append(done if done is not None else self.run_method(name))
        return results

    def start(self, name: str, on_round: RoundCallback | None = None, progress: bool = False, resume: RunState | None = None) -> MethodRun:
        """A run of method ``name`` whose client states live on the nodes (fresh, or from ``resume``)."""
        return MethodRun(
            self.cfg,
            self.task,
            registry()[name](self.cfg, self.task),
            resume=resume,
            on_round=on_round,
            on_state=self.checkpoint.on_state if self.checkpoint is not None else None,
            progress=progress,
            hold_clients=False,
        )

    def run_method(self, name: str) -> MethodResult:
        resume = self.checkpoint.resume_state(name) if self.checkpoint is not None else None
        run = self.start(name, self.on_round, self.progress, resume)
        owed: dict[str, Any] | None = None  # the last round's record, its evaluation riding on this round's train messages
        for round_ in run.pending_rounds():
            record = self._round(run, round_, owed)
            if self.on_server is not None:
                self.on_server(name, round_, st.clone(run.server))
            owed = None
            if run.eval_due(round_) and self.folds(run):  # evaluated with the next round's training
                owed = record
            else:
                run.end_round(record, self._evaluate(run, round_) if run.eval_due(round_) else None)
        result = run.finish(self._evaluate(run, self.cfg.rounds))
        if self.adapters_root is not None:
            self._write_global(run)
        if self.checkpoint is not None:
            self.checkpoint.on_method(result)
        return result

    def _write_global(self, run: MethodRun) -> None:
        """The global model (:func:`~pf2lora.engines.rounds.global_model`), as a PEFT adapter
        (none for a method without one, e.g. local-only)."""
        global_params = global_model(self.task, run.method, run.server)
        if global_params is not None and self.adapters_root is not None:
            adapters.write(self.adapters_root, self.cfg, self.task, run.method.name, adapters.GLOBAL, global_params, self.cfg.rounds)

    def folds(self, run: MethodRun) -> bool:
        """Whether the evaluation after a round rides on the next round's train messages (one
        message per client and round instead of two): not for a pooled method (its clients are
        evaluated on one node with one state) nor with SecAgg+ (its train messages are Flower's)."""
        return not run.method.pools_data and not self.cfg.server.secure_aggregation

    def _round(self, run: MethodRun, round_: int, owed: dict[str, Any] | None = None) -> dict[str, Any]:
        """One round: broadcast to every sampled client that did not drop out, one exchange, then
        the replies in sampling order through the ledger (as the local engine reports them).

        ``owed``: the record of the round before, still to be evaluated. The server state has not
        changed since that round, so each sampled client is asked to evaluate what it is sent
        before training on it, every other client gets an evaluate message in the same exchange,
        and the owed round is closed with those metrics before this round's replies change the
        server state (so its checkpoint is the one an unfolded run writes)."""
        ledger, sent, outgoing = self.prepare_round(run, round_)
        if self.cfg.server.secure_aggregation and any(run.method.upload_spec(ins.received) for ins, _ in sent.values()):
            return self._secure_round(run, ledger, sent)  # (never owed: see folds)
        if owed is None:
            return self.collect_round(run, ledger, sent, self.channel.exchange("train", outgoing, self._timeout()))
        evaluated = owed["round"]
        folded = [replace(o, content=with_evaluate_round(o.content, evaluated)) for o in outgoing]
        evaluations = self.evaluation_messages(run, evaluated)
        others = [replace(o, kind="evaluate") for o in evaluations if o.client_id not in sent]
        replies = self.channel.exchange("train", folded + others, self._timeout())
        # a client whose reply carries no evaluation (no reply, or its evaluation failed) is asked again on its own
        again = [o for o in evaluations if not _evaluated(replies.get(o.client_id))]
        evaluation = {**replies, **(self.channel.exchange("evaluate", again, self._timeout()) if again else {})}
        run.end_round(owed, self.collect_evaluation(run, evaluation))
        return self.collect_round(run, ledger, sent, {cid: replies.get(cid) for cid in sent})

    def _timeout(self) -> float | None:
        return self.cfg.flower.round_timeout_s or None

    def prepare_round(self, run: MethodRun, round_: int) -> tuple[RoundLedger, dict[str, tuple[TrainIns, float]], list[Outgoing]]:
        """The first half of a round: (its ledger, what each client that did not drop out is sent
        with its injected delay, the train messages)."""
        ledger = run.open_round(round_)
        plays = self.plays(run.trainers)
        sent: dict[str, tuple[TrainIns, float]] = {}
        outgoing = []
        for cid in ledger.sampled:
            kind, delay = injected_fault(self.cfg, cid, round_)
            if kind == "dropout":
                continue  # recorded by collect_round, in sampling order
            received = st.clone(run.method.broadcast(run.server, cid))
            ledger.sent(received)
            ins = TrainIns(run.method.name, self.run_key, cid, round_, run.accepted.get(cid, -1), received, inject_crash=kind == "crash")
            sent[cid] = (ins, delay)
            outgoing.append(Outgoing(cid, plays[cid], ins.content()))
        return ledger, sent, outgoing

    def collect_round(self, run: MethodRun, ledger: RoundLedger, sent: Sent, replies: Mapping[str, Message | None]) -> dict[str, Any]:
        """The second half: each sampled client's reply (by client id; missing = no reply), in
        sampling order, through the ledger; sets the new server state, returns the round's record."""
        name, round_ = run.method.name, ledger.round
        for cid in ledger.sampled:
            if cid not in sent:
                ledger.dropped(cid)
                continue
            ins, delay = sent[cid]
            content, why = _train_part(replies.get(cid))
            if content is None:
                _stop_on_mismatch(name, round_, cid, why)
                log.warning("%s round %d: client %s failed: %s", name, round_, cid, ledger.crashed(cid, why))
                continue
            update, took, reason = self._parse(content, cid)
            if update is None:
                ledger.rejected(cid, reason or "malformed reply")
            elif ledger.missed_deadline(cid, took + delay):
                run.counted(cid, round_)  # it did train; only the server ignores its late upload
                continue
            else:
                reason = ledger.offer(cid, update, ins.received)
            if reason is not None:
                log.warning("%s round %d: rejected the upload of client %s: %s", name, round_, cid, reason)
                continue  # its state stays at the last good round
            run.counted(cid, round_)
        run.server, record = ledger.finish(run.server)
        return record

    def _secure_round(self, run: MethodRun, ledger: RoundLedger, sent: Sent) -> dict[str, Any]:
        """One round through Flower's SecAgg+ (:mod:`.secagg`): the server gets only the weighted
        mean of the uploads and hands it to the method's ``aggregate`` as a single update."""
        from pf2lora.engines.flower import secagg  # SecAgg+ pulls in Flower's legacy server API: only when asked for

        method, round_ = run.method, ledger.round
        ledger.secure = True
        fields = {cid: ins.fields() for cid, (ins, _) in sent.items()}  # the FitIns config carries them
        got = secagg.secure_round(self, method, round_, {cid: ins.received for cid, (ins, _) in sent.items()}, fields)
        for cid in ledger.sampled:  # in sampling order, as the normal path records faults
            if cid not in sent:
                ledger.dropped(cid)
            elif cid in got.failed:
                _stop_on_mismatch(method.name, round_, cid, got.failed[cid])
                log.warning("%s round %d: client %s failed: %s", method.name, round_, cid, ledger.crashed(cid, got.failed[cid]))
        if got.mean is not None:
            got.mean = st.to_device(got.mean, self.task.device)  # off the wire (CPU), to the server state's device
        reason = None if got.mean is None else secagg.out_of_range(got.mean, self.cfg.server.secagg_clipping_range)
        if reason is not None:  # no client's training counted: every state stays at its last good round
            for cid in got.included:
                ledger.rejected(cid, reason)
            log.warning("%s round %d: %s", method.name, round_, reason)
            got.included = []
        if got.mean is None or not got.included:
            run.server, record = ledger.finish(run.server)  # nobody counted: fails the round (server.min_clients >= 1)
            return record
        for cid in got.included:
            run.counted(cid, round_)
            ledger.count(cid, got.metrics[cid], num_bytes(got.mean))  # the upload's size in the clear, as the normal path
        total = sum(got.num_examples[c] for c in got.included)
        run.server, record = ledger.finish(run.server, ClientUpdate("secure-aggregate", got.mean, total, {}))
        return record

    def _parse(self, content: RecordDict, cid: str) -> tuple[ClientUpdate | None, float, str | None]:
        """(update, client-measured seconds, None) or (None, 0, why the reply is malformed)."""
        try:
            got = TrainReply.parse(content)
        except MalformedReply as e:
            return None, 0.0, str(e)
        except Exception as e:  # noqa: BLE001 - a malformed reply never takes the server down
            return None, 0.0, f"malformed reply ({type(e).__name__}: {str(e)[:100]})"
        if got.client_id != cid:
            return None, 0.0, f"reply from the node of {cid!r} claims to be client {got.client_id!r}"
        # the upload arrives on the CPU (off the wire); the server state lives on the task's device
        return ClientUpdate(cid, st.to_device(got.upload, self.task.device), got.num_examples, got.metrics), got.took_s, None

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(self, run: MethodRun, round_: int) -> dict[str, dict[str, Any]]:
        replies = self.channel.exchange("evaluate", self.evaluation_messages(run, round_), self._timeout())
        return self.collect_evaluation(run, replies)

    def evaluation_messages(self, run: MethodRun, round_: int) -> list[Outgoing]:
        """The evaluate message of every client (a pooled method's clients are all evaluated on
        node 0, which holds the pooled state)."""
        method, pooled = run.method, run.method.pools_data
        outgoing = []
        for client in self.task.clients:
            cid = client.client_id
            received = st.clone(method.broadcast(run.server, cid))
            node_cid = self.task.clients[0].client_id if pooled else cid
            state_of = "pooled" if pooled else cid
            ins = EvaluateIns(method.name, self.run_key, cid, round_, run.accepted.get(state_of, -1), received, state_of=state_of)
            outgoing.append(Outgoing(cid, node_cid, ins.content()))
        return outgoing

    def collect_evaluation(self, run: MethodRun, replies: Mapping[str, Message | None]) -> dict[str, dict[str, Any]]:
        """Every client's metrics from its evaluate reply; a missing or failed one stops the run."""
        out: dict[str, dict[str, Any]] = {}
        for client in self.task.clients:
            cid = client.client_id
            reply = replies.get(cid)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                _stop_on_mismatch(run.method.name, -1, cid, why or "")
                raise FlowerEngineError(f"{run.method.name}: evaluation of client {cid} failed: {why}")
            out[cid] = EvaluateReply.parse(reply.content).metrics
        return out


def _train_part(reply: Message | None) -> tuple[RecordDict | None, str]:
    """(the content of a train reply, "") or (None, why it holds no upload): no reply, an error
    reply, or a training failure reported beside an evaluation (:class:`TrainFailure`)."""
    if reply is None:
        return None, "no reply within flower.round_timeout_s"
    if reply.has_error():
        return None, reply.error.reason or "client error"
    try:
        failure = TrainFailure.parse(reply.content)
    except Exception:  # noqa: BLE001 - a malformed reply is judged by the upload's parser
        failure = None
    if failure is not None:
        return None, failure.reason or "client error"
    return reply.content, ""


def _evaluated(reply: Message | None) -> bool:
    """Whether ``reply`` carries an evaluation (an evaluate reply, or a train reply with one)."""
    if reply is None or reply.has_error():
        return False
    return EVALUATION in reply.content or reply.metadata.message_type == "evaluate"


def _stop_on_mismatch(method: str, round_: int, cid: str, reason: str) -> None:
    """A node whose saved state is not of the round the server counted (:mod:`.store`) stops the
    run: carrying on would train that client from the wrong state."""
    if MISMATCH in reason:
        when = f"round {round_}" if round_ >= 0 else "evaluation"
        raise FlowerEngineError(f"{method} {when}: the node of {cid} cannot continue: {reason.split(MISMATCH + ': ', 1)[-1]}")


def make_server_app(
    cfg: RunConfig,
    task: Task | None = None,
    *,
    results: list[MethodResult] | None = None,
    on_round: RoundCallback | None = None,
    on_reply: ReplyHook | None = None,
    progress: bool = False,
    on_done: Callable[[list[MethodResult]], None] | None = None,
    on_server: ServerHook | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    adapters_root: str | Path | None = None,
    checkpoint: ServerCheckpoint | None = None,
) -> ServerApp:
    """A ServerApp running ``cfg.methods``. Results are appended to ``results`` (in-process
    simulation) and/or passed to ``on_done`` (a deployed ServerApp writes them out)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        try:
            server = FlowerServer(
                cfg,
                task if task is not None else build_task(nodedata.server_view(cfg)),  # never a client's file
                grid,
                on_round=on_round,
                on_reply=on_reply,
                progress=progress,
                on_server=on_server,
                adapters_root=adapters_root,
                checkpoint=checkpoint,
            )
            out = server.run()
        except BaseException as e:
            if on_error is not None:
                on_error(e)
            raise
        if results is not None:
            results.extend(out)
        if on_done is not None:
            on_done(out)

    return app

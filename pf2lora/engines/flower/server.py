"""The ServerApp: the local engine's round loop, with clients reached through a Flower Grid.

The server holds the server state and calls the method's own ``broadcast``; everything else a
round does (client sampling, injected faults, checking every upload against
``method.upload_spec(received)``, the fault records, the min_clients rule, the aggregation, DP
accounting, the per-round record) is :mod:`pf2lora.engines.rounds`, which the local engine runs
too, in the same order, so a run gives the local engine's numbers for the same seed. A bad reply (an error, no reply
within ``flower.round_timeout_s``, a private key, a wrong shape, a non-finite value, a claim to be
another client) is logged, recorded as a fault and left out; the round carries on.

With ``server.secure_aggregation`` a round's training goes through Flower's SecAgg+ instead
(:mod:`.secagg`): the server gets only the weighted mean of the uploads, so the per-upload
validation above is done by each client on its own upload, and the method's ``aggregate`` gets
that mean as a single update.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, transport
from pf2lora.engines.flower.common import FlowerEngineError

env.apply()

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from pf2lora.engines.rounds import (
    MethodResult,
    RoundCallback,
    RoundLedger,
    eval_due,
    initial_server,
    injected_fault,
    account_round,
    make_accountant,
    mean_of,
    num_bytes,
    open_round,
    privacy_report,
    trainers,
)
from pf2lora.methods import registry
from pf2lora.methods.base import ClientUpdate, Method
from pf2lora.tasks.base import ClientData, Task

log = logging.getLogger("pf2lora.flower")

__all__ = ["FlowerServer", "GridLike", "ReplyHook", "RoundCallback", "ServerHook", "make_server_app"]

ReplyHook = Callable[[str, Message], None]
"""Called with (message kind, reply) for every reply the server receives, before it is used."""
ServerHook = Callable[[str, int, st.Tensors], None]
"""Called with (method, round, server state) after every round's aggregation (tests, debugging)."""


POLL_S = 0.2
"""Seconds between two pulls for replies."""


class GridLike(Protocol):
    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


class FlowerServer:
    """Runs ``cfg.methods`` (or ``methods``) over the nodes of ``grid``; returns MethodResults."""

    def __init__(
        self, cfg: RunConfig, task: Task, grid: GridLike, *, on_round: RoundCallback | None = None,
        on_reply: ReplyHook | None = None, progress: bool = False, on_server: ServerHook | None = None,
    ):
        self.cfg = cfg
        self.on_server = on_server
        self.task = task
        self.grid = grid
        self.on_round = on_round
        self.on_reply = on_reply
        self.progress = progress
        self.run_key = uuid.uuid4().hex  # namespaces the client state files of this run
        self.node_of: dict[str, int] = {}
        self.bytes_up = 0
        self.bytes_down = 0

    # -- nodes -----------------------------------------------------------------------------------

    def discover(self) -> dict[str, int]:
        """Wait for every client's node; ask each node which client(s) it plays."""
        want = len(self.task.clients)
        deadline = time.monotonic() + self.cfg.flower.node_wait_s
        nodes: list[int] = []
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(nodes) < want:
            raise FlowerEngineError(
                f"only {len(nodes)} of {want} SuperNodes connected within flower.node_wait_s = "
                f"{self.cfg.flower.node_wait_s:g} s (one SuperNode per client, --node-config 'partition-id=K')"
            )
        msgs = [Message(RecordDict({"config": ConfigRecord({"hello": 1})}), dst_node_id=n, message_type="query") for n in nodes]
        replies = self._send(msgs, self.cfg.flower.node_wait_s)
        node_of: dict[str, int] = {}
        for n in nodes:
            reply = replies.get(n)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                log.warning("node %s did not say which partition it is (%s); it is left out", n, why)
                continue
            try:
                partition = int(reply.content["config"]["partition"])
            except Exception:  # noqa: BLE001
                log.warning("node %s sent a malformed hello; it is left out", n)
                continue
            if not 0 <= partition < want:
                raise FlowerEngineError(f"SuperNode {n} has partition-id {partition}, outside 0..{want - 1} (task.num_clients = {want})")
            for cid in [self.task.clients[partition].client_id] + (["pooled"] if partition == 0 else []):
                if cid in node_of:
                    raise FlowerEngineError(f"two SuperNodes ({node_of[cid]} and {n}) have partition-id {partition}: give each a distinct one")
                node_of[cid] = n
        missing = [c.client_id for c in self.task.clients if c.client_id not in node_of]
        if missing:
            raise FlowerEngineError(f"no SuperNode plays client(s) {missing[:5]} (partition-id 0..{want - 1}, one node each)")
        self.node_of = node_of
        return node_of

    def _send(self, messages: list[Message], timeout: float | None) -> dict[int, Message]:
        """Send; replies by source node (each node gets at most one message per call)."""
        if not messages:
            return {}
        replies = self._push_pull(messages, timeout)
        wanted = {m.metadata.dst_node_id for m in messages}
        out: dict[int, Message] = {}
        for r in replies:
            src = r.metadata.src_node_id
            if src in wanted and src not in out:
                out[src] = r
        return out

    def _push_pull(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """``send_and_receive`` with a short poll (Flower's HTTP grid sleeps 3 s between pulls)."""
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

    def _exchange(self, kind: str, outgoing: list[tuple[str, str, RecordDict]]) -> dict[str, Message | None]:
        """Send (client id, node client id, content) messages in waves (a node never holds two of
        our messages at once); the reply per client id, None if none came."""
        timeout = self.cfg.flower.round_timeout_s or None
        waves: list[list[tuple[str, int, RecordDict]]] = []
        for cid, node_cid, content in outgoing:
            node = self.node_of[node_cid]
            wave = next((w for w in waves if all(n != node for _, n, _ in w)), None)
            if wave is None:
                wave = []
                waves.append(wave)
            wave.append((cid, node, content))
        out: dict[str, Message | None] = {}
        for wave in waves:
            msgs = [Message(content, dst_node_id=node, message_type=kind) for _, node, content in wave]
            self.bytes_down += sum(_payload(m) for m in msgs)
            got = self._send(msgs, timeout)
            for cid, node, _ in wave:
                reply = got.get(node)
                if reply is not None:
                    self.bytes_up += _payload(reply)
                    if self.on_reply is not None:
                        self.on_reply(kind, reply)
                out[cid] = reply
        return out

    # -- the run ---------------------------------------------------------------------------------

    def run(self, methods: Sequence[str] | None = None) -> list[MethodResult]:
        if not self.node_of:
            self.discover()
        return [self.run_method(name) for name in (methods or self.cfg.methods)]

    def run_method(self, name: str) -> MethodResult:
        cfg, task = self.cfg, self.task
        method: Method = registry()[name](cfg, task)
        by_id = {c.client_id: c for c in trainers(cfg, task, method)[0]}
        plays = self.plays(by_id)
        accountant = make_accountant(cfg, task)
        server = initial_server(cfg, method)
        accepted: dict[str, int] = {}  # client -> last round whose training counted (its state advances)
        rounds: list[dict[str, Any]] = []
        faults: list[dict[str, Any]] = []
        start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.rounds, desc=f"{name:>12}", dynamic_ncols=True)
        for round_ in range(1, cfg.rounds + 1):
            server, record = self._round(method, server, by_id, plays, accepted, faults, round_)
            if self.on_server is not None:
                self.on_server(method.name, round_, st.clone(server))
            account_round(accountant, record)
            if eval_due(cfg, round_):
                record["eval"] = mean_of(self._evaluate(method, server, accepted, round_), task.primary_metric)
            rounds.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"train_loss": f"{record['train_loss']:.4g}"})
            if self.on_round:
                self.on_round(record)
        if bar is not None:
            bar.close()
        result = MethodResult(name, {}, rounds, faults=faults)
        result.clients = self._evaluate(method, server, accepted, cfg.rounds)
        if accountant is not None:
            result.privacy = privacy_report(cfg, task, accountant, rounds)
        result.wall_time_s = time.perf_counter() - start
        return result

    def plays(self, client_ids: Iterable[str]) -> dict[str, str]:
        """Which node's client plays each of ``client_ids``: itself, or node 0's client for the
        pooled client of a centralised reference."""
        return {cid: (cid if cid in self.node_of else self.task.clients[0].client_id) for cid in client_ids}

    def _content(self, method: Method, cid: str, round_: int, received: st.Tensors, accepted: dict[str, int], **extra: Any) -> RecordDict:
        arrays, dtypes = transport.to_record(received)
        last = accepted.get(extra.get("state_of", cid), -1)
        c = ConfigRecord({
            "method": method.name, "run_key": self.run_key, "client_id": cid, "round": round_,
            "dtypes": dtypes, "accepted_round": last, **extra,
        })
        return RecordDict({"arrays": arrays, "config": c})

    def _round(
        self, method: Method, server: st.Tensors, by_id: dict[str, ClientData], plays: dict[str, str],
        accepted: dict[str, int], faults: list[dict[str, Any]], round_: int,
    ) -> tuple[st.Tensors, dict[str, Any]]:
        """One round: broadcast to every sampled client that did not drop out, one exchange, then
        the replies in sampling order through the ledger (as the local engine reports them)."""
        ledger, sent, outgoing = self.prepare_round(method, server, by_id, plays, accepted, faults, round_)
        if self.cfg.server.secure_aggregation and any(method.upload_spec(r) for r, _ in sent.values()):
            return self._secure_round(method, server, ledger, sent, accepted, outgoing)
        return self.collect_round(method, server, ledger, sent, self._exchange("train", outgoing), accepted)

    def prepare_round(
        self, method: Method, server: st.Tensors, by_id: Mapping[str, ClientData], plays: Mapping[str, str],
        accepted: dict[str, int], faults: list[dict[str, Any]], round_: int,
    ) -> tuple[RoundLedger, dict[str, tuple[st.Tensors, float]], list[tuple[str, str, RecordDict]]]:
        """The first half of a round: (its ledger, what each client that did not drop out is sent
        with its injected delay, the (client, node's client, content) train messages)."""
        cfg = self.cfg
        ledger = open_round(cfg, method, list(by_id), round_, faults)
        sent: dict[str, tuple[st.Tensors, float]] = {}
        outgoing = []
        for cid in ledger.sampled:
            kind, delay = injected_fault(cfg, cid, round_)
            if kind == "dropout":
                continue  # recorded by collect_round, in sampling order
            received = st.clone(method.broadcast(server, cid))
            ledger.sent(received)
            sent[cid] = (received, delay)
            outgoing.append((cid, plays[cid], self._content(method, cid, round_, received, accepted, inject_crash=kind == "crash")))
        return ledger, sent, outgoing

    def collect_round(
        self, method: Method, server: st.Tensors, ledger: RoundLedger, sent: Mapping[str, tuple[st.Tensors, float]],
        replies: Mapping[str, Message | None], accepted: dict[str, int],
    ) -> tuple[st.Tensors, dict[str, Any]]:
        """The second half: each sampled client's reply (by client id; missing = no reply), in
        sampling order, through the ledger; (the new server state, the round's record)."""
        round_ = ledger.round
        for cid in ledger.sampled:
            if cid not in sent:
                ledger.dropped(cid)
                continue
            received, delay = sent[cid]
            reply = replies.get(cid)
            if reply is None or reply.has_error():
                why = "no reply within flower.round_timeout_s" if reply is None else (reply.error.reason or "client error")
                log.warning("%s round %d: client %s failed: %s", method.name, round_, cid, ledger.crashed(cid, why))
                continue
            update, took, reason = self._parse(reply, cid)
            if update is None:
                ledger.rejected(cid, reason or "malformed reply")
            elif ledger.missed_deadline(cid, took + delay):
                accepted[cid] = round_  # it did train; only the server ignores its late upload
                continue
            else:
                reason = ledger.offer(cid, update, received)
            if reason is not None:
                log.warning("%s round %d: rejected the upload of client %s: %s", method.name, round_, cid, reason)
                continue  # its state stays at the last good round
            accepted[cid] = round_
        return ledger.finish(server)

    def _secure_round(
        self, method: Method, server: st.Tensors, ledger: RoundLedger, sent: dict[str, tuple[st.Tensors, float]],
        accepted: dict[str, int], outgoing: list[tuple[str, str, RecordDict]],
    ) -> tuple[st.Tensors, dict[str, Any]]:
        """One round through Flower's SecAgg+ (:mod:`.secagg`): the server gets only the weighted
        mean of the uploads and hands it to the method's ``aggregate`` as a single update."""
        from pf2lora.engines.flower import secagg

        round_ = ledger.round
        ledger.secure = True
        configs = {cid: dict(content["config"]) for cid, _, content in outgoing}
        got = secagg.secure_round(self, method, round_, {cid: r for cid, (r, _) in sent.items()}, configs)
        for cid in ledger.sampled:  # in sampling order, as the normal path records faults
            if cid not in sent:
                ledger.dropped(cid)
            elif cid in got.failed:
                log.warning("%s round %d: client %s failed: %s", method.name, round_, cid, ledger.crashed(cid, got.failed[cid]))
        reason = None if got.mean is None else secagg.out_of_range(got.mean, self.cfg.server.secagg_clipping_range)
        if reason is not None:  # no client's training counted: every state stays at its last good round
            for cid in got.included:
                ledger.rejected(cid, reason)
            log.warning("%s round %d: %s", method.name, round_, reason)
            got.included = []
        if got.mean is None or not got.included:
            return ledger.finish(server)  # nobody counted: fails the round (server.min_clients >= 1)
        for cid in got.included:
            accepted[cid] = round_
            ledger.count(cid, got.metrics[cid], num_bytes(got.mean))  # the upload's size in the clear, as the normal path
        total = sum(got.num_examples[c] for c in got.included)
        return ledger.finish(server, ClientUpdate("secure-aggregate", got.mean, total, {}))

    def _parse(self, reply: Message, cid: str) -> tuple[ClientUpdate | None, float, str | None]:
        """(update, client-measured seconds, None) or (None, 0, why the reply is malformed)."""
        try:
            c = reply.content["config"]
            claimed = str(c["client_id"])
            if claimed != cid:
                return None, 0.0, f"reply from the node of {cid!r} claims to be client {claimed!r}"
            shared = transport.from_record(reply.content["arrays"], str(c.get("dtypes", "{}")))
            metrics = transport.loads(str(c.get("metrics", "{}")))
            if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
                return None, 0.0, "malformed metrics in the reply"
            num = int(c["num_examples"])
            if num < 0:
                return None, 0.0, f"negative num_examples {num}"
            return ClientUpdate(cid, shared, num, {k: float(v) for k, v in metrics.items()}), float(c.get("took_s", 0.0)), None
        except Exception as e:  # noqa: BLE001 - a malformed reply never takes the server down
            return None, 0.0, f"malformed reply ({type(e).__name__}: {str(e)[:100]})"

    def _evaluate(self, method: Method, server: st.Tensors, accepted: dict[str, int], round_: int) -> dict[str, dict[str, Any]]:
        outgoing = self.evaluation_messages(method, server, accepted, round_)
        return self.collect_evaluation(method, self._exchange("evaluate", outgoing))

    def evaluation_messages(
        self, method: Method, server: st.Tensors, accepted: dict[str, int], round_: int,
    ) -> list[tuple[str, str, RecordDict]]:
        """(client, node's client, content) of the evaluate message of every client (a pooled
        method's clients are all evaluated on node 0, which holds the pooled state)."""
        pooled = method.pools_data
        outgoing = []
        for client in self.task.clients:
            cid = client.client_id
            received = st.clone(method.broadcast(server, cid))
            node_cid = self.task.clients[0].client_id if pooled else cid
            state_of = "pooled" if pooled else cid
            outgoing.append((cid, node_cid, self._content(method, cid, round_, received, accepted, state_of=state_of)))
        return outgoing

    def collect_evaluation(self, method: Method, replies: Mapping[str, Message | None]) -> dict[str, dict[str, Any]]:
        """Every client's metrics from its evaluate reply; a missing or failed one stops the run."""
        out: dict[str, dict[str, Any]] = {}
        for client in self.task.clients:
            cid = client.client_id
            reply = replies.get(cid)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else reply.error.reason
                raise FlowerEngineError(f"{method.name}: evaluation of client {cid} failed: {why}")
            out[cid] = transport.loads(str(reply.content["config"]["metrics"]))
        return out


def _payload(msg: Message) -> int:
    if not msg.has_content() or "arrays" not in msg.content:
        return 0
    return sum(len(a.data) for a in msg.content["arrays"].values())


def make_server_app(
    cfg: RunConfig, task: Task | None = None, *, results: list[MethodResult] | None = None,
    on_round: RoundCallback | None = None, on_reply: ReplyHook | None = None, progress: bool = False,
    on_done: Callable[[list[MethodResult]], None] | None = None, on_server: ServerHook | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp running ``cfg.methods``. Results are appended to ``results`` (in-process
    simulation) and/or passed to ``on_done`` (a deployed ServerApp writes them out)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from pf2lora.tasks import build_task

        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        try:
            server = FlowerServer(
                cfg, task if task is not None else build_task(cfg), grid, on_round=on_round, on_reply=on_reply, progress=progress,
                on_server=on_server,
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

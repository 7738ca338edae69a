"""What every engine does around a method, written once.

The in-process runner (:mod:`.local`) and the Flower apps (:mod:`.flower`) are thin layers over
these functions: which clients a round samples, their injected faults, a client's context and
random streams, its training and evaluation, and the server's side of a round (checking each
upload, the fault records, the min_clients rule, the aggregation, the round's record). That is
what makes the engines give the same numbers for the same seed; nothing here imports Flower.

Every random stream is derived from (seed, purpose, client, round), so a run is deterministic and
each client sees the same mini-batches whatever the engine, the method or the order clients run in.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pf2lora import adapters, lora, privacy
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method
from pf2lora.robust import validate_update
from pf2lora.tasks.base import ClientData, Task, concat

RoundCallback = Callable[[dict[str, Any]], None]
"""Called with each round's record (see :meth:`RoundLedger.finish`)."""

OUTCOMES = ("dropped", "crashed", "late", "rejected")
"""What may become of a sampled client other than being counted, in the order records list them."""


@dataclass
class MethodResult:
    """One method's run: per-client metrics, per-round records, fault records, DP report."""

    method: str
    clients: dict[str, dict[str, Any]]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    faults: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None


class RoundFailure(RuntimeError):
    """Fewer clients than ``server.min_clients`` succeeded in a round: the run stops loudly."""


class InjectedCrash(RuntimeError):
    """A client crash injected by ``faults.crash_prob`` (for testing fault handling)."""


# -- random streams, clients, sampling -------------------------------------------------------------


def generator(seed: int, *parts: object) -> torch.Generator:
    """A torch generator seeded by a stable hash of ``seed`` and ``parts``."""
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, (seed, *parts))).encode()))


def sample_clients(cfg: RunConfig, client_ids: list[str], round_: int) -> list[str]:
    """The ``client_fraction`` of ``client_ids`` that round ``round_`` trains, in their order."""
    k = max(1, round(cfg.client_fraction * len(client_ids)))
    if k >= len(client_ids):
        return list(client_ids)
    pick = torch.randperm(len(client_ids), generator=generator(cfg.seed, "sample", round_))[:k]
    return [client_ids[i] for i in sorted(pick.tolist())]


def trainers(cfg: RunConfig, task: Task, method: Method) -> tuple[list[ClientData], int]:
    """The clients that train ``method`` and their local steps per round.

    A centralised reference (``pools_data``) trains one client holding everyone's training data,
    taking the federation's total steps.
    """
    if method.pools_data:
        pooled = ClientData("pooled", concat([c.train for c in task.clients]), concat([c.test for c in task.clients]))
        return [pooled], cfg.local_steps * len(sample_clients(cfg, [c.client_id for c in task.clients], 1))
    return list(task.clients), cfg.local_steps


def initial_server(cfg: RunConfig, method: Method) -> st.Tensors:
    """The server state before round 1, on the task's device (drawn on the CPU from a CPU
    generator, then moved: the same values on every device)."""
    return st.to_device(method.init_server(generator(cfg.seed, "init", "server")), method.task.device)


def initial_client(cfg: RunConfig, method: Method, client_id: str) -> ClientState:
    """A client's state before its first round (also what a Flower node starts from), on the
    task's device (drawn on the CPU, as :func:`initial_server`)."""
    return st.to_device(method.init_client(client_id, generator(cfg.seed, "init", client_id)), method.task.device)


def client_context(cfg: RunConfig, task: Task, client: ClientData, round_: int, purpose: str, steps: int) -> ClientContext:
    """What ``method.client_update`` / ``personalized`` get: the client's own stream for ``purpose``."""
    return ClientContext(
        client=client,
        task=task,
        generator=generator(cfg.seed, purpose, client.client_id, round_),
        round=round_,
        local_steps=steps,
        batch_size=cfg.batch_size,
    )


def num_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes as every engine counts them (numel x element size, original dtype)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- injected faults ---------------------------------------------------------------------------------


def injected_fault(cfg: RunConfig, cid: str, round_: int) -> tuple[str | None, float]:
    """Injected fault of client ``cid`` in ``round_``: (None | "dropout" | "crash", extra delay).

    Drawn by the server from its own stream, so every engine injects the same faults.
    """
    f = cfg.faults
    if not (f.dropout_prob or f.crash_prob or f.straggler_prob):
        return None, 0.0
    u = torch.rand(3, generator=generator(cfg.seed, "fault", cid, round_)).tolist()
    kind = "dropout" if u[0] < f.dropout_prob else "crash" if u[1] < f.crash_prob else None
    return kind, f.straggler_delay_s if u[2] < f.straggler_prob else 0.0


def injected_poison(cfg: RunConfig, cid: str, update: ClientUpdate, received: st.Tensors) -> ClientUpdate:
    """What client ``cid`` uploads: ``update``, or an attacker's version of it if ``cid`` is in
    ``faults.poison_clients`` (NaNs, or its change from ``received`` scaled by ``poison_scale``)."""
    f = cfg.faults
    if cid not in f.poison_clients:
        return update
    shared = dict(update.shared)
    for k, v in update.shared.items():
        if not v.is_floating_point():  # a byte payload (ciphertexts) has no NaN and no scale
            continue
        if f.poison == "nan":
            shared[k] = torch.full_like(v, float("nan"))
        elif k in received and received[k].shape == v.shape:
            shared[k] = received[k] + f.poison_scale * (v - received[k])
        else:
            shared[k] = f.poison_scale * v
    return ClientUpdate(update.client_id, shared, update.num_examples, update.metrics)


# -- a client's work ---------------------------------------------------------------------------------


def train_client(
    cfg: RunConfig,
    task: Task,
    method: Method,
    client: ClientData,
    steps: int,
    round_: int,
    received: st.Tensors,
    state: ClientState,
) -> tuple[ClientUpdate, ClientState, float]:
    """One client's training in ``round_``: (its update, its new state, seconds it took)."""
    t0 = time.perf_counter()
    update, new_state = method.client_update(client_context(cfg, task, client, round_, "train", steps), received, state)
    return update, new_state, time.perf_counter() - t0


def divergence(update: ClientUpdate) -> str | None:
    """Why ``update`` comes from a diverged client (a non-finite training loss), or None."""
    loss = update.metrics.get("train_loss", 0.0)
    return None if math.isfinite(loss) else f"diverged: non-finite training loss {loss}"


def upload_problem(method: Method, update: ClientUpdate, received: st.Tensors) -> str | None:
    """Why the server must not aggregate ``update`` (malformed for ``method.upload_spec(received)``,
    or diverged), or None if it may."""
    reason = validate_update(update.shared, method.upload_spec(received))
    return reason if reason is not None else divergence(update)


@torch.no_grad()
def personal_model(
    cfg: RunConfig, task: Task, method: Method, client: ClientData, received: st.Tensors, state: ClientState, round_: int
) -> st.Tensors:
    """Client k's personalised model after ``round_``: what its evaluation tests and what an
    exported adapter holds (the same random stream, so both are the same tensors)."""
    ctx = client_context(cfg, task, client, round_, "eval", 1)
    with torch.enable_grad():  # methods that adapt before evaluating (Per-FedAvg) need grads
        return method.personalized(ctx, received, state)


def evaluate_client(
    cfg: RunConfig,
    task: Task,
    method: Method,
    client: ClientData,
    received: st.Tensors,
    state: ClientState,
    round_: int,
    server: st.Tensors | None = None,
) -> dict[str, Any]:
    """Personalised metrics (the client's own model) and global metrics (the server model) of one
    client, from what the server broadcast to it. ``server`` is what ``describe_client`` gets
    where the engine holds the server state (a Flower node has only ``received``)."""
    personal = personal_model(cfg, task, method, client, received, state, round_)
    metrics: dict[str, Any] = dict(task.evaluate(st.model_params(personal), client.test))
    global_params = method.global_params(received, state)
    if global_params is not None:
        for name, value in task.evaluate(st.model_params(global_params), client.test).items():
            metrics[f"global_{name}"] = value
    metrics.update(task.diagnostics(client, st.model_params(personal), common_adapter(personal)))
    metrics.update(method.describe_client(received if server is None else server, state))
    metrics["num_train"] = client.num_train
    return metrics


def common_adapter(personal: st.Tensors) -> dict[str, torch.Tensor]:
    """The common adapter's tensors (model paths) when the method shares it, for diagnostics.

    A method whose adapter A is private (local-only) has no common part.
    """
    common = {k: v for k, v in personal.items() if lora.is_adapter(k) and _adapter_of(k) == lora.COMMON}
    if not any(st.has_role(k, st.SHARED) and lora.is_a(k) for k in common):
        return {}
    return {st.path_of(k): v for k, v in common.items()}


def _adapter_of(key: str) -> str | None:
    """The adapter name (``common`` / ``private``) of a LoRA tensor's key."""
    parts = lora.split_path(key)
    return None if parts is None else parts[2]


def mean_of(clients: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    """The mean of ``metric`` over the clients that report it (NaN if none does)."""
    values = [c[metric] for c in clients.values() if isinstance(c.get(metric), (int, float))]
    return sum(values) / len(values) if values else float("nan")


def eval_means(clients: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The mean over clients of every finite scalar metric of an evaluation round (a metric no
    client reports a finite value of is left out), for learning curves."""
    values: dict[str, list[float]] = {}
    for c in clients.values():
        for k, v in c.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    return {k: sum(vs) / len(vs) for k, vs in sorted(values.items())}


@torch.no_grad()
def save_adapters(
    root: str | Path,
    cfg: RunConfig,
    task: Task,
    method: Method,
    server: st.Tensors,
    clients: Mapping[str, ClientState],
    round_: int,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write every client's personalised adapter and the global one (:func:`global_model`) into
    ``root/METHOD/`` (a run's root is ``RUN/adapters``), as the evaluation after ``round_`` sees
    them: the same tensors (:func:`personal_model`)."""
    written: list[Path] = []
    for client in task.clients:
        cid = client.client_id
        state = clients.get(cid) or clients.get("pooled") or {}
        received = st.clone(method.broadcast(server, cid))
        personal = personal_model(cfg, task, method, client, received, state, round_)
        written.append(adapters.write(root, cfg, task, method.name, cid, personal, round_, (metrics or {}).get(cid)))
    global_params = global_model(task, method, server)
    if global_params is not None:
        written.append(adapters.write(root, cfg, task, method.name, adapters.GLOBAL, global_params, round_))
    return written


def global_model(task: Task, method: Method, server: st.Tensors) -> st.Tensors | None:
    """The method's global model at the server's own rank (:meth:`Method.global_broadcast`), or
    None for a method without one."""
    if not task.clients:
        return None
    return method.global_params(st.clone(method.global_broadcast(server, task.clients[0].client_id)), {})


# -- the server's side of a round ------------------------------------------------------------------


@dataclass
class RoundLedger:
    """The server's bookkeeping of one round, kept the same way by every engine.

    The engine reports what became of each sampled client, in sampling order (the fault records and
    the aggregate's sum follow that order, so the engines agree bit for bit); :meth:`finish`
    applies the min_clients rule, aggregates and gives the round's record. A client that is
    dropped, crashed, late or rejected is left out of the aggregate.
    """

    cfg: RunConfig
    method: Method
    round: int
    sampled: list[str]
    faults: list[dict[str, Any]]
    """The run's fault records: this round's are appended."""
    outcome: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in OUTCOMES})
    updates: list[ClientUpdate] = field(default_factory=list)
    """The uploads to aggregate, in sampling order."""
    counted: list[tuple[str, float, int]] = field(default_factory=list)
    """(client, training loss, upload bytes) of each client whose training counts this round."""
    download: int = 0
    secure: bool = False
    """The uploads reach the server only as one secure aggregate (see :meth:`count`)."""

    def sent(self, received: st.Tensors) -> None:
        """The server broadcast ``received`` to a client (counted in the download bytes)."""
        self.download += num_bytes(received)

    def _fault(self, cid: str, fault: str, reason: str | None = None) -> None:
        self.outcome[fault].append(cid)
        self.faults.append({"round": self.round, "client": cid, "fault": fault, **({"reason": reason} if reason is not None else {})})

    def dropped(self, cid: str) -> None:
        self._fault(cid, "dropped")

    def crashed(self, cid: str, reason: str) -> str:
        """Record a client that failed or never replied; returns the recorded (shortened) reason."""
        self._fault(cid, "crashed", reason[:200])
        return reason[:200]

    def missed_deadline(self, cid: str, took: float) -> bool:
        """Whether a client's training (``took`` seconds, delays included) missed
        ``faults.deadline_s``; if so it is recorded late (it did train: its state advances, only
        the server ignores the upload)."""
        deadline = self.cfg.faults.deadline_s
        if not (deadline and took > deadline):
            return False
        self._fault(cid, "late", f"{took:.3f} s > deadline {deadline:g} s")
        return True

    def rejected(self, cid: str, reason: str) -> None:
        """Record an upload the server refused (the client's state stays at its last good round)."""
        self._fault(cid, "rejected", reason)

    def offer(self, cid: str, update: ClientUpdate, received: st.Tensors) -> str | None:
        """Check ``cid``'s upload against what it was sent: accept it (None) or record it rejected
        and return why."""
        reason = upload_problem(self.method, update, received)
        if reason is not None:
            self.rejected(cid, reason)
            return reason
        self.updates.append(update)
        self.count(cid, update.metrics, update.num_bytes)
        return None

    def count(self, cid: str, metrics: Mapping[str, float], upload_bytes: int) -> None:
        """Count ``cid``'s training this round without holding its upload (a secure aggregate);
        :meth:`offer` counts the clients whose uploads it accepts."""
        self.counted.append((cid, metrics.get("train_loss", 0.0), upload_bytes))

    def finish(self, server: st.Tensors, combined: ClientUpdate | None = None) -> tuple[st.Tensors, dict[str, Any]]:
        """(the new server state, the round's record). ``combined``: the one update the method
        aggregates instead of the accepted uploads (a secure aggregate of the counted clients).
        Raises :class:`RoundFailure` if fewer than ``server.min_clients`` clients counted."""
        method, n_ok = self.method, len(self.counted)
        if n_ok < self.cfg.server.min_clients:
            detail = ", ".join(f"{k}: {v}" for k, v in self.outcome.items() if v)
            what = "client update(s) in the secure aggregate" if self.secure else "successful client update(s)"
            raise RoundFailure(
                f"{method.name} round {self.round}: {n_ok} {what}, fewer than "
                f"server.min_clients = {self.cfg.server.min_clients}" + (f" ({detail})" if detail else "")
            )
        method.begin_round(self.round)
        batch = self.updates if combined is None else [combined]
        if batch:
            server = method.aggregate(server, batch)
        n = max(1, n_ok)
        record = {
            "method": method.name,
            "round": self.round,
            "sampled": len(self.sampled),
            "participants": n_ok,
            **{k: v for k, v in self.outcome.items() if v},
            "train_loss": sum(loss for _, loss, _ in self.counted) / n if self.counted else float("nan"),
            "upload_bytes_per_client": sum(b for _, _, b in self.counted) / n,
            "download_bytes_per_client": self.download / max(1, len(self.sampled) - len(self.outcome["dropped"])),
            **method.round_record(self.updates),
        }
        return server, record


# -- a method's run, as every engine keeps it --------------------------------------------------------


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
    accepted: dict[str, int] = field(default_factory=dict)
    """Client -> the last round whose training counted (its state advanced); Flower nodes need it."""


StateCallback = Callable[[RunState], None]
"""Called with the run's state after every round (checkpoints)."""


class MethodRun:
    """One method's run as every engine keeps it: its server state, the client states the engine
    holds, the round records and fault records, the DP accountant, the evaluation schedule, the
    progress bar, the callbacks and the result.

    The in-process engine, the Flower server and the Flower ``Strategy`` differ only in how they
    reach clients; each opens a round with :meth:`open_round`, settles it through the ledger, and
    closes it with :meth:`end_round`, so a change to what a round records is made here once.
    """

    def __init__(
        self,
        cfg: RunConfig,
        task: Task,
        method: Method,
        *,
        resume: RunState | None = None,
        on_round: RoundCallback | None = None,
        on_state: StateCallback | None = None,
        progress: bool = False,
        hold_clients: bool = True,
    ):
        self.cfg, self.task, self.method = cfg, task, method
        clients, self.local_steps = trainers(cfg, task, method)
        self.trainers: dict[str, ClientData] = {c.client_id: c for c in clients}
        """The clients that train this method, by id (one pooled client for a centralised reference)."""
        self.on_round, self.on_state = on_round, on_state
        self.accountant = privacy.accountant_for(cfg.server, sample_rate(cfg, task))
        if resume is None:
            held = {cid: initial_client(cfg, method, cid) for cid in self.trainers} if hold_clients else {}
            self.state = RunState(method.name, 0, initial_server(cfg, method), held, [], [], 0.0)
        else:
            if resume.method != method.name:
                raise ValueError(f"resume state is for {resume.method!r}, not {method.name!r}")
            # a checkpoint holds CPU tensors (pf2lora.checkpoint): continue on this run's device
            resume.server = st.to_device(resume.server, task.device)
            resume.clients = {cid: st.to_device(s, task.device) for cid, s in resume.clients.items()}
            self.state = resume
            if self.accountant is not None and resume.accountant is not None:
                self.accountant.load_state_dict(resume.accountant)
        self.accepted = self.state.accepted
        """Client -> the last round whose training counted (its state advanced): kept in the state, so a
        resumed Flower server tells each node which of its saved states to continue from."""
        self._start = time.perf_counter() - self.state.elapsed_s
        self._bar = tqdm(  # advanced by end_round
            desc=f"{method.name:>12}",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 15.0,
            initial=self.state.round,
            total=cfg.rounds,
        )

    @property
    def server(self) -> st.Tensors:
        return self.state.server

    @server.setter
    def server(self, value: st.Tensors) -> None:
        self.state.server = value

    @property
    def clients(self) -> dict[str, ClientState]:
        """The client states this engine holds (empty where the nodes hold their own)."""
        return self.state.clients

    def pending_rounds(self) -> range:
        """The rounds still to run (all of them, or those after a resumed checkpoint)."""
        return range(self.state.round + 1, self.cfg.rounds + 1)

    def open_round(self, round_: int) -> RoundLedger:
        """The ledger of ``round_`` over the trainers: every one for a pooled method, else a sample."""
        ids = list(self.trainers)
        sampled = ids if self.method.pools_data else sample_clients(self.cfg, ids, round_)
        return RoundLedger(self.cfg, self.method, round_, sampled, self.state.faults)

    def counted(self, cid: str, round_: int, new_state: ClientState | None = None) -> None:
        """``cid``'s training in ``round_`` counts: its state advances (to ``new_state`` where
        this engine holds it)."""
        self.accepted[cid] = round_
        if new_state is not None:
            self.state.clients[cid] = new_state

    def eval_due(self, round_: int) -> bool:
        """Whether the run evaluates after ``round_`` (``eval.every``; the last round always is, by :meth:`finish`)."""
        return bool(self.cfg.eval.every) and round_ % self.cfg.eval.every == 0 and round_ < self.cfg.rounds

    def end_round(self, record: dict[str, Any], evaluation: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Close a round: charge it to the DP accountant, note the mean of ``evaluation`` (the
        per-client metrics, when :meth:`eval_due`), keep the record, advance the progress bar, and
        call the callbacks. Returns the record."""
        privacy.charge_round(self.accountant, record)
        if self.accountant is not None:
            self.state.accountant = self.accountant.state_dict()
        primary = self.task.primary_metric
        if evaluation is not None:
            record["eval"] = mean_of(evaluation, primary)
            record["eval_means"] = eval_means(evaluation)
        self.state.rounds.append(record)
        self.state.round = record["round"]
        self.state.elapsed_s = time.perf_counter() - self._start
        shown = record.get("eval", record["train_loss"])
        self._bar.update(1)
        self._bar.set_postfix({primary if "eval" in record else "train_loss": f"{shown:.4g}"}, refresh=False)
        if self.on_round is not None:
            self.on_round(record)
        if self.on_state is not None:
            self.on_state(self.state)
        return record

    def finish(self, clients: dict[str, dict[str, Any]]) -> MethodResult:
        """The method's result, from the per-client metrics of the final evaluation."""
        self._bar.close()
        result = MethodResult(self.method.name, clients, self.state.rounds, faults=self.state.faults)
        if self.accountant is not None:
            result.privacy = privacy.report(self.cfg.server, self.accountant, self.state.rounds, self.cfg.rounds)
        result.wall_time_s = time.perf_counter() - self._start
        return result


def sample_rate(cfg: RunConfig, task: Task) -> float:
    """The share of clients sampled per round (the DP accountant's sampling rate)."""
    n = len(task.clients)
    return len(sample_clients(cfg, [c.client_id for c in task.clients], 1)) / n

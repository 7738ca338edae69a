"""The in-process runner, the default engine.

One frozen base model (the task's) serves every simulated client; a client's state is only its
adapters and optimizer entries, held here between rounds. Every random stream is derived from
(seed, purpose, client, round), so a run is deterministic and each client sees the same
mini-batches whatever the method or the order clients run in.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from pf2lora import lora
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.methods import registry
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method
from pf2lora.tasks.base import ClientData, Task, concat


def generator(seed: int, *parts: object) -> torch.Generator:
    """A torch generator seeded by a stable hash of ``seed`` and ``parts``."""
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, (seed, *parts))).encode()))


def sample_clients(cfg: RunConfig, client_ids: list[str], round_: int) -> list[str]:
    k = max(1, round(cfg.client_fraction * len(client_ids)))
    if k >= len(client_ids):
        return list(client_ids)
    pick = torch.randperm(len(client_ids), generator=generator(cfg.seed, "sample", round_))[:k]
    return [client_ids[i] for i in sorted(pick.tolist())]


@dataclass
class MethodResult:
    method: str
    clients: dict[str, dict[str, Any]]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    faults: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None


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


class RoundFailure(RuntimeError):
    """Fewer clients than ``server.min_clients`` succeeded in a round: the run stops loudly."""


class InjectedCrash(RuntimeError):
    """A client crash injected by ``faults.crash_prob`` (for testing fault handling)."""


RoundCallback = Callable[[dict[str, Any]], None]
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

    def _context(self, client: ClientData, round_: int, purpose: str, steps: int) -> ClientContext:
        return ClientContext(
            client=client, task=self.task, generator=generator(self.cfg.seed, purpose, client.client_id, round_),
            round=round_, local_steps=steps, batch_size=self.cfg.batch_size,
        )

    def _trainers(self, method: Method) -> tuple[list[ClientData], int]:
        cfg, task = self.cfg, self.task
        if method.pools_data:
            # One client holding everyone's training data, taking the federation's total steps.
            pooled = ClientData("pooled", concat([c.train for c in task.clients]), concat([c.test for c in task.clients]))
            return [pooled], cfg.local_steps * len(sample_clients(cfg, [c.client_id for c in task.clients], 1))
        return list(task.clients), cfg.local_steps

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
        trainers, steps = self._trainers(method)
        by_id = {c.client_id: c for c in trainers}
        accountant = self._accountant()
        if resume is None:
            server = method.init_server(generator(cfg.seed, "init", "server"))
            states: dict[str, ClientState] = {
                c.client_id: method.init_client(c.client_id, generator(cfg.seed, "init", c.client_id)) for c in trainers
            }
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
            if accountant is not None:
                accountant.step()
                record["dp_epsilon"] = accountant.epsilon()
                run_state.accountant = accountant.state_dict()
            if cfg.eval.every and round_ % cfg.eval.every == 0 and round_ < cfg.rounds:
                clients = self.evaluate(method, run_state.server, run_state.clients, round_)
                record["eval"] = mean_of(clients, task.primary_metric)
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
            result.privacy = {
                "epsilon": accountant.epsilon(), "delta": cfg.server.dp_delta,
                "noise_multiplier": cfg.server.dp_noise_multiplier, "clip_norm": cfg.server.dp_clip_norm,
                "sample_rate": self._sample_rate(), "rounds": cfg.rounds,
                "epsilon_per_round": [r.get("dp_epsilon") for r in run_state.rounds],
            }
        result.wall_time_s = time.perf_counter() - start
        return result

    def _sample_rate(self) -> float:
        n = len(self.task.clients)
        return len(sample_clients(self.cfg, [c.client_id for c in self.task.clients], 1)) / n

    def _accountant(self) -> Any:
        sc = self.cfg.server
        if sc.dp_noise_multiplier <= 0:
            return None
        from pf2lora.privacy import PrivacyAccountant

        return PrivacyAccountant(sc.dp_noise_multiplier, self._sample_rate(), sc.dp_delta)

    def _fault(self, cid: str, round_: int) -> tuple[str | None, float]:
        """Injected fault of client ``cid`` in ``round_``: (None | "dropout" | "crash", extra delay)."""
        f = self.cfg.faults
        if not (f.dropout_prob or f.crash_prob or f.straggler_prob):
            return None, 0.0
        u = torch.rand(3, generator=generator(self.cfg.seed, "fault", cid, round_)).tolist()
        kind = "dropout" if u[0] < f.dropout_prob else "crash" if u[1] < f.crash_prob else None
        return kind, f.straggler_delay_s if u[2] < f.straggler_prob else 0.0

    def _poison(self, update: ClientUpdate, received: st.Tensors) -> ClientUpdate:
        f = self.cfg.faults
        if f.poison == "nan":
            shared = {k: torch.full_like(v, float("nan")) for k, v in update.shared.items()}
        else:
            shared = {k: received[k] + f.poison_scale * (v - received[k]) if k in received and received[k].shape == v.shape else f.poison_scale * v
                      for k, v in update.shared.items()}
        return ClientUpdate(update.client_id, shared, update.num_examples, update.metrics)

    def _round(self, method: Method, rs: RunState, by_id: dict[str, ClientData], steps: int, round_: int) -> dict[str, Any]:
        from pf2lora.robust import validate_update

        cfg = self.cfg
        ids = list(by_id) if method.pools_data else sample_clients(cfg, list(by_id), round_)
        updates: list[ClientUpdate] = []
        download = 0
        outcome: dict[str, list[str]] = {"dropped": [], "crashed": [], "late": [], "rejected": []}
        for cid in ids:
            kind, delay = self._fault(cid, round_)
            if kind == "dropout":
                outcome["dropped"].append(cid)
                rs.faults.append({"round": round_, "client": cid, "fault": "dropped"})
                continue
            received = st.clone(method.broadcast(rs.server, cid))  # the client never holds the server's tensors
            download += sum(t.numel() * t.element_size() for t in received.values())
            t0 = time.perf_counter()
            try:
                if kind == "crash":
                    raise InjectedCrash("injected crash")
                update, new_state = method.client_update(self._context(by_id[cid], round_, "train", steps), received, rs.clients[cid])
            except Exception as e:  # a failing client is recorded, never takes the federation down
                outcome["crashed"].append(cid)
                rs.faults.append({"round": round_, "client": cid, "fault": "crashed", "reason": f"{type(e).__name__}: {e}"[:200]})
                continue
            took = time.perf_counter() - t0 + delay
            if cfg.faults.deadline_s and took > cfg.faults.deadline_s:
                outcome["late"].append(cid)
                rs.faults.append({"round": round_, "client": cid, "fault": "late", "reason": f"{took:.3f} s > deadline {cfg.faults.deadline_s:g} s"})
                rs.clients[cid] = new_state  # it did train; only the server ignores its late upload
                continue
            if cid in cfg.faults.poison_clients:
                update = self._poison(update, received)
            reason = validate_update(update.shared, method.upload_spec(received))
            loss = update.metrics.get("train_loss", 0.0)
            if reason is None and not math.isfinite(loss):
                reason = f"diverged: non-finite training loss {loss}"
            if reason is not None:
                outcome["rejected"].append(cid)
                rs.faults.append({"round": round_, "client": cid, "fault": "rejected", "reason": reason})
                continue  # its state stays at the last good round
            rs.clients[cid] = new_state
            updates.append(update)
        if len(updates) < cfg.server.min_clients:
            detail = ", ".join(f"{k}: {v}" for k, v in outcome.items() if v)
            raise RoundFailure(
                f"{method.name} round {round_}: {len(updates)} successful client update(s), fewer than "
                f"server.min_clients = {cfg.server.min_clients}" + (f" ({detail})" if detail else "")
            )
        method.begin_round(round_)
        if updates:
            rs.server = method.aggregate(rs.server, updates)
        n = max(1, len(updates))
        return {
            "method": method.name,
            "round": round_,
            "sampled": len(ids),
            "participants": len(updates),
            **{k: v for k, v in outcome.items() if v},
            "train_loss": sum(u.metrics.get("train_loss", 0.0) for u in updates) / n if updates else float("nan"),
            "upload_bytes_per_client": sum(u.num_bytes for u in updates) / n,
            "download_bytes_per_client": download / max(1, len(ids) - len(outcome["dropped"])),
        }

    @torch.no_grad()
    def evaluate(self, method: Method, server: st.Tensors, states: dict[str, ClientState], round_: int) -> dict[str, dict[str, Any]]:
        """Personalised metrics (client's own model) and global metrics (server model) per client."""
        out: dict[str, dict[str, Any]] = {}
        task = self.task
        for client in task.clients:
            state = states.get(client.client_id) or states.get("pooled") or {}
            received = st.clone(method.broadcast(server, client.client_id))
            ctx = self._context(client, round_, "eval", 1)
            with torch.enable_grad():  # methods that adapt before evaluating (Per-FedAvg) need grads
                personal = method.personalized(ctx, received, state)
            metrics: dict[str, Any] = dict(task.evaluate(st.model_params(personal), client.test))
            global_params = method.global_params(received, state)
            if global_params is not None:
                for name, value in task.evaluate(st.model_params(global_params), client.test).items():
                    metrics[f"global_{name}"] = value
            metrics.update(task.diagnostics(client, st.model_params(personal), common_adapter(personal)))
            metrics.update(method.describe_client(server, state))
            metrics["num_train"] = client.num_train
            out[client.client_id] = metrics
        return out


def common_adapter(personal: st.Tensors) -> dict[str, torch.Tensor]:
    """The common adapter's tensors (model paths) when the method shares it, for diagnostics.

    A method whose adapter A is private (local-only) has no common part.
    """
    suffix = f".{lora.COMMON}"
    shared_a = any(st.role_of(k) == st.SHARED and ".lora_A." in k and k.endswith(suffix) for k in personal)
    if not shared_a:
        return {}
    return {st.path_of(k): v for k, v in personal.items() if ".lora_" in k and k.endswith(suffix)}


def mean_of(clients: dict[str, dict[str, Any]], metric: str) -> float:
    values = [c[metric] for c in clients.values() if isinstance(c.get(metric), (int, float))]
    return sum(values) / len(values) if values else float("nan")

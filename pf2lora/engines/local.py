"""The in-process runner, the default engine.

One frozen base model (the task's) serves every simulated client; a client's state is only its
adapters and optimizer entries, held here between rounds. Every random stream is derived from
(seed, purpose, client, round), so a run is deterministic and each client sees the same
mini-batches whatever the method or the order clients run in.
"""

from __future__ import annotations

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


RoundCallback = Callable[[dict[str, Any]], None]


class LocalEngine:
    """Runs one method over the task's clients, round by round, in this process."""

    def __init__(self, cfg: RunConfig, task: Task, progress: bool = True):
        self.cfg = cfg
        self.task = task
        self.progress = progress

    def _context(self, client: ClientData, round_: int, purpose: str, steps: int) -> ClientContext:
        return ClientContext(
            client=client, task=self.task, generator=generator(self.cfg.seed, purpose, client.client_id, round_),
            round=round_, local_steps=steps, batch_size=self.cfg.batch_size,
        )

    def run(self, method_name: str, on_round: RoundCallback | None = None) -> MethodResult:
        cfg, task = self.cfg, self.task
        method: Method = registry()[method_name](cfg, task)
        start = time.perf_counter()
        if method.pools_data:
            # One client holding everyone's training data, taking the federation's total steps.
            pooled = ClientData("pooled", concat([c.train for c in task.clients]), concat([c.test for c in task.clients]))
            trainers = [pooled]
            steps = cfg.local_steps * len(sample_clients(cfg, [c.client_id for c in task.clients], 1))
        else:
            trainers = list(task.clients)
            steps = cfg.local_steps
        by_id = {c.client_id: c for c in trainers}
        server = method.init_server(generator(cfg.seed, "init", "server"))
        states: dict[str, ClientState] = {
            c.client_id: method.init_client(c.client_id, generator(cfg.seed, "init", c.client_id)) for c in trainers
        }
        result = MethodResult(method_name, {})
        bar = tqdm(
            range(1, cfg.rounds + 1), desc=f"{method_name:>12}", disable=not self.progress, leave=True,
            dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15.0,
        )
        for round_ in bar:
            ids = list(by_id) if method.pools_data else sample_clients(cfg, list(by_id), round_)
            updates: list[ClientUpdate] = []
            download = 0
            for cid in ids:
                received = st.clone(method.broadcast(server, cid))  # the client never holds the server's tensors
                download += sum(t.numel() * t.element_size() for t in received.values())
                update, states[cid] = method.client_update(self._context(by_id[cid], round_, "train", steps), received, states[cid])
                updates.append(update)
            server = method.aggregate(server, updates)
            record: dict[str, Any] = {
                "method": method_name,
                "round": round_,
                "participants": len(updates),
                "train_loss": sum(u.metrics.get("train_loss", 0.0) for u in updates) / len(updates),
                "upload_bytes_per_client": sum(u.num_bytes for u in updates) / len(updates),
                "download_bytes_per_client": download / len(updates),
            }
            if cfg.eval.every and round_ % cfg.eval.every == 0 and round_ < cfg.rounds:
                clients = self.evaluate(method, server, states, round_)
                record["eval"] = mean_of(clients, task.primary_metric)
            result.rounds.append(record)
            shown = record.get("eval", record["train_loss"])
            bar.set_postfix({task.primary_metric if "eval" in record else "train_loss": f"{shown:.4g}"})
            if on_round:
                on_round(record)
        result.clients = self.evaluate(method, server, states, cfg.rounds)
        result.wall_time_s = time.perf_counter() - start
        return result

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

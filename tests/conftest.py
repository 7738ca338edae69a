"""Shared fixtures: a tiny synthetic configuration every core test can afford to run many times."""

from __future__ import annotations

import pytest
import torch

from pf2lora import config
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.engines.rounds import client_context as engine_context
from pf2lora.methods import ClientContext, registry
from pf2lora.tasks.synthetic import SyntheticRankTask

# Tiny models run fastest on one thread, and the suite must stay fast on two cores.
torch.set_num_threads(1)

SMALL = [
    "rounds=3",
    "local_steps=2",
    "batch_size=16",
    "task.num_clients=2",
    "task.dim=8",
    "task.shared_rank=2",
    "task.private_ranks=[0,1]",
    "task.train_samples=64",
    "task.test_samples=64",
    "lora.rank=2",
    "lora.alpha=2.0",
    "lora.private_rank=1",
    "lora.private_alpha=1.0",
]

CORE_METHODS = ["centralized", "hetlora", "homlora", "local", "perfedavg", "pf2lora", "pf2lora-fo"]
"""The methods this suite was written against; every registered method is tested generically."""
ALL_METHODS = sorted(registry())


def small_cfg(*overrides: str) -> RunConfig:
    """The tiny config with ``overrides`` applied after it (later keys win)."""
    return config.load(None, [*SMALL, *overrides])


def small_task(*overrides: str) -> tuple[RunConfig, SyntheticRankTask]:
    cfg = small_cfg(*overrides)
    return cfg, SyntheticRankTask(cfg)


@pytest.fixture
def cfg_task() -> tuple[RunConfig, SyntheticRankTask]:
    return small_task()


# Three clients and a smaller test split: what the per-method test files share.
TINY = ("task.num_clients=3", "task.test_samples=32")


def tiny_task(*overrides: str) -> tuple[RunConfig, SyntheticRankTask]:
    """``small_task`` with three clients (so averages differ from any one client's value)."""
    return small_task(*TINY, *overrides)


def client_context(cfg: RunConfig, task, k: int = 0, round_: int = 1, steps: int | None = None,
                   purpose: str = "train") -> ClientContext:
    """Client ``k``'s context for ``round_``, as the engines make it."""
    return engine_context(cfg, task, task.clients[k], round_, purpose, cfg.local_steps if steps is None else steps)


def record_client_updates(monkeypatch, cls, calls: list[dict]) -> None:
    """Wrap ``cls.client_update`` to append, per call, its inputs (copied before the call, so a
    mutation would show) and outputs: round, client, received, state, update, new_state."""
    original = cls.client_update

    def wrapper(self, ctx, received, client_state):
        before_received, before_state = st.clone(received), st.clone(client_state)
        update, new_state = original(self, ctx, received, client_state)
        calls.append({"round": ctx.round, "client": ctx.client.client_id, "received": before_received,
                      "state": before_state, "update": update, "new_state": st.clone(new_state)})
        return update, new_state

    monkeypatch.setattr(cls, "client_update", wrapper)

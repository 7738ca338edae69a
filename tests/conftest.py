"""Shared fixtures: a tiny synthetic configuration every core test can afford to run many times."""

from __future__ import annotations

import pytest
import torch

from pf2lora import config
from pf2lora.config import RunConfig
from pf2lora.methods import registry
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

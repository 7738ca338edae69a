"""The task interface: a frozen model with LoRA layers, per-client data, a loss and metrics.

A task knows nothing about federation or methods; methods see it only through this interface, so
real models and data slot in by adding a task, not by touching methods or engines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pf2lora.lora import LoRATarget
from pf2lora.state import Tensors

Batch = dict[str, torch.Tensor]


@dataclass
class ClientData:
    """One client's examples; every field of ``train``/``test`` is indexed by example first."""

    client_id: str
    train: Batch
    test: Batch
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))

    @property
    def num_test(self) -> int:
        return len(next(iter(self.test.values())))


def take(data: Batch, index: torch.Tensor) -> Batch:
    return {k: v[index] for k, v in data.items()}


def sample_batch(data: Batch, batch_size: int, generator: torch.Generator) -> Batch:
    """A mini-batch drawn without replacement (the whole set when it is smaller)."""
    n = len(next(iter(data.values())))
    index = torch.randperm(n, generator=generator)[: min(batch_size, n)]
    return take(data, index)


def concat(parts: list[Batch]) -> Batch:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class Task(ABC):
    """A model with LoRA layers injected, and the clients' data.

    ``primary_metric`` is what progress bars and tables lead with.
    """

    name: str
    model: nn.Module
    targets: list[LoRATarget]
    clients: list[ClientData]
    primary_metric: str = "loss"
    higher_is_better: bool = False
    table_columns: tuple[str, ...] = ()
    """Per-client metrics the results table shows (empty: all of them)."""
    reference: tuple[str, str] | None = None
    """(per-client metric, label) of a trivial baseline for ``primary_metric`` that tables show as a
    reference row, e.g. the majority-class accuracy."""

    def forward(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Model output with ``params`` (model paths) in place of the registered adapters.

        A key that names no model parameter is an error: silently ignoring it would leave a
        misspelt tensor untrained.
        """
        known = self.__dict__.get("_param_names")
        if known is None:
            known = self.__dict__["_param_names"] = frozenset(n for n, _ in self.model.named_parameters())
        unknown = [k for k in params if k not in known]
        if unknown:
            raise KeyError(f"not parameters of the model: {sorted(unknown)[:3]}")
        return functional_call(self.model, dict(params), args=(), kwargs=self.model_inputs(batch), strict=False)

    @abstractmethod
    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean loss of the model with ``params`` (model paths) on ``batch``."""

    @abstractmethod
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        """Metrics of the model with ``params`` on a whole split."""

    def init_head(self, role: str, generator: torch.Generator) -> Tensors:
        """Initial values of trained non-LoRA tensors (a new task head), keyed with ``role``."""
        return {}

    def diagnostics(
        self, client: ClientData, personalized: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> dict[str, float | None]:
        """Extra per-client figures (e.g. the learned rank); ``common`` holds only the common adapter."""
        return {}

    def report_notes(self) -> list[str]:
        return []

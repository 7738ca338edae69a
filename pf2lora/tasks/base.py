"""The task interface: a frozen model with LoRA layers, per-client data, a loss and metrics.

A task knows nothing about federation or methods; methods see it only through this interface, so
real models and data slot in by adding a task, not by touching methods or engines.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pf2lora import batching
from pf2lora.lora import LoRATarget, ParameterSlots
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


HOST = "host/"
"""Prefix of a data field that stays on the CPU whatever the task's device: what a step needs to
know of its batch without reading the device back (``host/lengths``: each text's tokens, so the
batch's width). It is gathered with the CPU index, the device fields with the device's."""


def on_host(key: str) -> bool:
    return key.startswith(HOST)


def data_device(data: Batch) -> torch.device:
    """Where ``data``'s examples live (its host fields aside)."""
    return next((v.device for k, v in data.items() if not on_host(k)), torch.device("cpu"))


def take(data: Batch, index: torch.Tensor) -> Batch:
    """The examples ``index`` of ``data``; a CPU ``index`` (drawn from a CPU generator) is moved to
    the data's device first (host fields take it as it is; an index already on a device is brought
    back for them, at the cost of a read)."""
    on_device = index_to(index, data_device(data)) if data else index
    on_cpu = index if index.device.type == "cpu" or not any(map(on_host, data)) else index.cpu()
    return {k: v.index_select(0, on_cpu if on_host(k) else on_device) for k, v in data.items()}


def index_to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``index`` on ``device``, without waiting for the device: a plain copy to a GPU
    synchronises its stream (the host would wait, every local step, for the kernels it queued), so
    a GPU gets it from pinned memory, asynchronously, in stream order before the gather that reads it."""
    if index.device == device:
        return index
    if device.type == "cuda" and index.device.type == "cpu":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def batch_index(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` examples a mini-batch holds: drawn without replacement (all of them when
    ``n`` is smaller), on the CPU (``generator`` is a CPU generator), so the same on every device."""
    return torch.randperm(n, generator=generator)[: min(batch_size, n)]


def batch_indices(n: int, batch_size: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """:func:`batch_index` for each generator (the same draws), as one ``(len(generators), b)``
    tensor: for stacked clients, one stack and one slice rather than one slice per client."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators])[:, : min(batch_size, n)]


def sample_batch(data: Batch, batch_size: int, generator: torch.Generator) -> Batch:
    """A mini-batch drawn without replacement (the whole set when it is smaller)."""
    return take(data, batch_index(len(next(iter(data.values()))), batch_size, generator))


def flatten_clients(batch: Batch) -> Batch:
    """A stacked batch ``(k, n, ...)`` as one of ``k * n`` examples, client-major (each client's
    rows together, as :func:`pf2lora.lora.per_client_rows` expects)."""
    return {key: v.flatten(0, 1) for key, v in batch.items()}


def per_client_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each of ``k`` clients' mean cross-entropy over its own rows of a flattened stacked batch."""
    return F.cross_entropy(logits, labels, reduction="none").view(k, -1).mean(1)


def float32_outputs(out: Any) -> Any:
    """A model's output with its low-precision floating tensors (of a bf16 autocast forward) cast
    to float32, so losses and metrics are computed in float32: a tensor, or a ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        for k, v in list(out.items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = v.float()
    return out


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
    device: torch.device = torch.device("cpu")
    """Where the model and the clients' data live (:meth:`to`); methods' states follow it."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: the frozen base computes under bfloat16 autocast (:meth:`autocast`)."""
    device_tensors: ClassVar[tuple[str, ...]] = ()
    """Names of the task's own tensor attributes that evaluation or diagnostics combine with the
    model's outputs, so :meth:`to` moves them too (e.g. a true update to compare with)."""

    def to(self, device: torch.device | str) -> Task:
        """Move the frozen model, every client's data (its :data:`HOST` fields aside) and
        :attr:`device_tensors` to ``device``, once, where the task is built
        (:func:`pf2lora.plan.build_task`). Returns the task."""
        device = torch.device(device)
        self.model.to(device)
        for c in self.clients:
            c.train = {k: v if on_host(k) else v.to(device) for k, v in c.train.items()}
            c.test = {k: v if on_host(k) else v.to(device) for k, v in c.test.items()}
        for name in self.device_tensors:
            setattr(self, name, getattr(self, name).to(device))
        self.device = device
        return self

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the frozen base computes in: bfloat16 autocast under ``precision = "bf16"``
        (matmul inputs are cast; the trained float32 leaves and their gradients stay float32),
        else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Model output with ``params`` (model paths) in place of the registered adapters.

        A key that names no model parameter is an error: silently ignoring it would leave a
        misspelt tensor untrained.
        """
        with self.autocast():
            out = self.parameter_slots().call(params, self.model_inputs(batch))
        return out if self.precision == "fp32" else float32_outputs(out)

    def parameter_slots(self) -> ParameterSlots:
        """The model's parameters by path, for calls with other tensors in their place; found on
        the first call, when the task has built its model (LoRA layers and head included)."""
        slots = self.__dict__.get("_parameter_slots")
        if slots is None or slots.model is not self.model:
            slots = self.__dict__["_parameter_slots"] = ParameterSlots(self.model)
        return slots

    @abstractmethod
    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def loss(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean loss of the model with ``params`` (model paths) on ``batch``."""

    stacking_pays_on_cpu: bool = False
    """Whether stacking clients (``parallel_clients = 0``) is worth it on a CPU: true where a step
    is overhead-bound (small models), false where it is compute-bound (real text)."""

    def objective(self, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The loss a training step differentiates: :meth:`loss`, or with clients stacked
        (:func:`pf2lora.batching.clients`), each client's own mean loss (:meth:`stacked_loss`)."""
        k = batching.clients()
        return self.stacked_loss(params, batch, k) if k else self.loss(params, batch)

    def stacked_loss(self, params: Mapping[str, torch.Tensor], batch: Batch, k: int) -> torch.Tensor:
        """Each of ``k`` stacked clients' mean loss, shape ``(k,)``: ``params`` and every field of
        ``batch`` have a leading client dimension. A task that cannot train clients stacked
        leaves this unimplemented and the batched engine trains its clients one by one."""
        raise NotImplementedError(f"{self.name} cannot train clients stacked")

    def can_stack(self) -> bool:
        return type(self).stacked_loss is not Task.stacked_loss

    @abstractmethod
    def evaluate(self, params: Mapping[str, torch.Tensor], data: Batch) -> dict[str, float]:
        """Metrics of the model with ``params`` on a whole split."""

    def init_head(self, role: str, generator: torch.Generator) -> Tensors:
        """Initial values of trained non-LoRA tensors (a new task head), keyed with ``role``."""
        return {}

    def diagnostics(
        self, client: ClientData, personalized: Mapping[str, torch.Tensor], common: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Extra per-client figures (e.g. the learned rank); ``common`` holds only the common adapter."""
        return {}

    def report_notes(self) -> list[str]:
        return []

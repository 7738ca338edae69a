"""Tasks: a frozen model with LoRA layers plus per-client data. ``build_task`` picks one by kind."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from pf2lora.config import RunConfig
from pf2lora.tasks.base import ClientData, Task


class TaskBuilder(Protocol):
    """What :func:`register_task` registers: usually the task class itself."""

    def __call__(self, cfg: RunConfig, *, double_backward: bool = False) -> Task: ...


_BUILDERS: dict[str, TaskBuilder] = {}


def register_task(kind: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def deco(builder: TaskBuilder) -> TaskBuilder:
        _BUILDERS[kind] = builder
        return builder

    return deco


# Task kind -> module that registers it, imported on demand (the text tasks pull in transformers).
_MODULES = {
    "synthetic": "pf2lora.tasks.synthetic",
    "tiny-text": "pf2lora.tasks.tiny_text",
    "text-classification": "pf2lora.tasks.text_classification",
    "generation": "pf2lora.tasks.generation",
}


def build_task(cfg: RunConfig, *, double_backward: bool = False) -> Task:
    """The task of ``cfg``. ``double_backward``: a method will differentiate through gradients, so
    the model must support that (text tasks switch to eager attention); see
    :func:`pf2lora.plan.build_task`, which asks the run's methods."""
    importlib.import_module(_MODULES[cfg.task.kind])
    return _BUILDERS[cfg.task.kind](cfg, double_backward=double_backward)


__all__ = ["ClientData", "Task", "build_task", "register_task"]

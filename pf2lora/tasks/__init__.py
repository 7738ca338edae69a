"""Tasks: a frozen model with LoRA layers plus per-client data. ``build_task`` picks one by kind."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pf2lora.config import RunConfig
from pf2lora.tasks.base import ClientData, Task

_BUILDERS: dict[str, Callable[[RunConfig], Task]] = {}


def register_task(kind: str) -> Callable[[Callable[[RunConfig], Task]], Callable[[RunConfig], Task]]:
    def deco(builder: Callable[[RunConfig], Task]) -> Callable[[RunConfig], Task]:
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


def build_task(cfg: RunConfig) -> Task:
    importlib.import_module(_MODULES[cfg.task.kind])
    return _BUILDERS[cfg.task.kind](cfg)


__all__ = ["ClientData", "Task", "build_task", "register_task"]

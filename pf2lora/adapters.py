"""What a run keeps of its training: each client's personalised model and the global one, as
standard PEFT LoRA adapters in the run directory.

Why: nobody fine-tunes a model to keep only its accuracy. A client of a federation wants its own
model at the end, loadable like any Hugging Face adapter (``peft.PeftModel.from_pretrained``).
Every method's personalised model is role-keyed LoRA tensors on the task's targets plus any head;
:func:`pf2lora.export.export_peft` folds them (common + private, a method's own ranks and
scales) into one exact LoRA per layer.

Layout: ``RUN/adapters/METHOD/CLIENT_ID/`` and ``RUN/adapters/METHOD/global/`` (where the method
has a global model), each an adapter directory plus ``pf2lora_adapter.json`` (method, round,
client, its metrics, the base model's name, the label names). Each directory is replaced
atomically, so a reader sees a whole adapter or the previous one. What goes in them (every
client's personalised model as its evaluation sees it) is
:func:`pf2lora.engines.rounds.save_adapters`; a Flower node writes its own client's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.export import export_peft
from pf2lora.tasks.base import Task

DIRNAME = "adapters"
META = "pf2lora_adapter.json"
GLOBAL = "global"


def adapter_dir(root: str | Path, method: str, client: str) -> Path:
    """Where ``client``'s adapter of ``method`` lives under ``root`` (a run's is ``RUN/adapters``;
    ``client`` is ``global`` for the global model)."""
    return Path(root) / method / client


def _meta(cfg: RunConfig, task: Task, method: str, client: str, round_: int, metrics: Mapping[str, Any] | None) -> str:
    labels = list(getattr(task, "label_names", []) or [])
    meta: dict[str, Any] = {
        "method": method,
        "client": client,
        "round": round_,
        "task": cfg.task.kind,
        "base_model": getattr(task, "model_name", None),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
    }
    if labels:
        meta["id2label"] = dict(enumerate(labels))
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def write(
    root: str | Path,
    cfg: RunConfig,
    task: Task,
    method: str,
    client: str,
    params: st.Tensors,
    round_: int,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``params`` (role-keyed; common, private and head tensors) as ``client``'s adapter
    under ``root`` (see :func:`adapter_dir`)."""
    cpu = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in params.items()}
    return export_peft(
        task.model,
        task.targets,
        cpu,
        adapter_dir(root, method, client),
        base_model_name_or_path=getattr(task, "model_name", None),
        extra_files={META: _meta(cfg, task, method, client, round_, metrics)},
    )

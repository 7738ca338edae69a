"""Atomic checkpoints of a run: everything needed to continue it after a kill.

A checkpoint holds the resolved config, the results of finished methods, the metrics lines so
far, and the method in progress: its last completed round, the server state, every client's
state (private adapters, optimizer moments) and the fault and privacy records. Random streams
need no saving: each is derived from (seed, purpose, client, round). The file is written to a
temporary name and renamed, so a kill or a full disk never leaves a half-written
checkpoint in place of the last good one.

Every checkpoint names the engine its run was started on (``engine``), so ``--resume`` continues
on it. A Flower run's checkpoint is written by its server side (:mod:`pf2lora.engines.flower.resume`,
with :func:`header` passed to it): it adds the run key that names the nodes' state folders, holds
no client state (that stays on the nodes) and no metrics lines (they are its round records, rebuilt
by :func:`load`).

A checkpoint is device-independent: its tensors are saved from the CPU and loaded onto the CPU,
and the resumed run moves them to its own device (:class:`pf2lora.engines.rounds.MethodRun`), so
a run checkpointed on a GPU resumes on a CPU and the other way round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pf2lora.errors import UserError
from pf2lora.io import atomic_save

FILENAME = "checkpoint.pt"
VERSION = 1


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (through dicts, lists and tuples) on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def header(engine: str, **extra: Any) -> dict[str, Any]:
    """What every checkpoint of a run on ``engine`` starts with (a Flower server writes it as is)."""
    return {"version": VERSION, "engine": engine, **extra}


def save(run_dir: Path, payload: dict[str, Any]) -> None:
    path = run_dir / FILENAME
    try:
        # No fsync: the rename is atomic against a killed process (SIGKILL, Ctrl-C), which is
        # what checkpoints are for; an fsync per round would dominate small runs.
        atomic_save({"version": VERSION, **on_cpu(payload)}, path, fsync=False)
    except OSError as e:
        kept = f"the last good checkpoint {path} is intact" if path.exists() else "no checkpoint was written yet"
        raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e}); {kept}") from None


def load(run_dir: Path) -> dict[str, Any]:
    path = run_dir / FILENAME
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so in one line
        raise UserError(f"{path}: not a readable pf2lora checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise UserError(f"{path}: not a pf2lora checkpoint of version {VERSION}")
    payload.setdefault("engine", "local")
    if "metrics_lines" not in payload:  # a Flower server's: the lines are its round records
        payload["metrics_lines"] = metrics_lines(payload)
    return payload


def metrics_lines(payload: dict[str, Any]) -> list[str]:
    """The metrics.jsonl lines of a checkpoint's round records (finished methods, then the one in
    progress), as ``pf2lora run`` writes each round's record."""
    from pf2lora.report import finite_or_none

    records = [r for m in payload.get("completed", []) for r in m["rounds"]]
    records += (payload.get("current") or {}).get("rounds", [])
    return [json.dumps(finite_or_none(r), allow_nan=False) for r in records]

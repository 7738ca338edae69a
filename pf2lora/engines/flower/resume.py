"""The server side of a Flower run, checkpointed after every round, and resumed from it.

A :class:`ServerCheckpoint` is what the ServerApp keeps for ``pf2lora run --resume``: the run key
(which names the nodes' state folders of this run, :mod:`.store`), the results of the finished
methods and the method in progress (:class:`~pf2lora.engines.rounds.RunState`: its last completed
round, the server state, the round and fault records, the DP accountant, and which round of each
client last counted; client states stay on the nodes). After every round it is written whole, as
the run's checkpoint file in the format of :mod:`pf2lora.checkpoint` (whose ``header`` the caller
passes in, so this layer needs no import of it), and/or handed to ``emit`` (a deployed ServerApp on
another machine sends it back through its log, :mod:`.fab`). The metrics lines of the local engine's
checkpoint are left out: they are the round records, which the checkpoint holds.

Where the server runs decides who writes: ``flower-sim`` runs the ServerApp in the ``pf2lora run``
process; a loopback ``flower-deploy`` ServerApp writes the run directory's file itself (its path
travels in the app's ``settings.json``); a ServerApp on an existing SuperLink sends it back.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pf2lora.engines.rounds import MethodResult, RunState
from pf2lora.io import atomic_save

HOLD_ENV = "PF2LORA_TEST_HOLD_AFTER"
"""= ``pf2lora.cli.TEST_HOLD_ENV`` (test-only): ``METHOD:ROUND``; the server holds right after
checkpointing that round and says so on stderr, so a test can kill the run at a known state."""


class ServerCheckpoint:
    """What a Flower server has done so far, written after every round (see the module docstring)."""

    def __init__(
        self,
        header: Mapping[str, Any],
        *,
        path: str | Path | None = None,
        emit: Callable[[bytes], None] | None = None,
        run_key: str | None = None,
        completed: Sequence[Mapping[str, Any]] = (),
        current: Mapping[str, Any] | None = None,
    ):
        self.header = dict(header)
        self.path = Path(path) if path else None
        self.emit = emit
        self.run_key = run_key or uuid.uuid4().hex
        self.completed: list[dict[str, Any]] = [dict(r) for r in completed]
        self.current: dict[str, Any] | None = dict(current) if current is not None else None

    @classmethod
    def resumed(cls, payload: Mapping[str, Any], header: Mapping[str, Any], **kwargs: Any) -> ServerCheckpoint:
        """Continue from a checkpoint's ``payload`` (its run key, finished methods, method in progress)."""
        return cls(header, run_key=payload.get("run_key"), completed=payload.get("completed", ()), current=payload.get("current"), **kwargs)

    # -- what the server asks ----------------------------------------------------------------------

    def result_of(self, method: str) -> MethodResult | None:
        """The result of ``method`` if it finished before the checkpoint."""
        return next((MethodResult(**r) for r in self.completed if r["method"] == method), None)

    def resume_state(self, method: str) -> RunState | None:
        """The state to continue ``method`` from, if it was in progress."""
        if self.current is None or self.current["method"] != method:
            return None
        return RunState(**self.current)

    # -- what the server reports -------------------------------------------------------------------

    def on_state(self, state: RunState) -> None:
        """After every round: the method in progress, written out."""
        self.current = _cpu(dataclasses.asdict(state))
        self.write()
        hold = os.environ.get(HOLD_ENV, "")
        if hold and hold == f"{state.method}:{state.round}":  # test-only, see HOLD_ENV
            print(f"pf2lora: holding after {hold} ({HOLD_ENV})", file=sys.stderr, flush=True)
            while True:  # short sleeps: a signal handled by another thread does not end a long sleep early
                time.sleep(0.05)

    def on_method(self, result: MethodResult) -> None:
        """A method finished: its result joins the finished ones, nothing is in progress."""
        self.completed.append(dataclasses.asdict(result))
        self.current = None
        self.write()

    def payload(self) -> dict[str, Any]:
        return {**self.header, "run_key": self.run_key, "completed": self.completed, "current": self.current}

    def write(self) -> None:
        payload = self.payload()
        if self.path is not None:
            # no fsync: the rename is atomic against a killed process, which is what checkpoints are for
            atomic_save(payload, self.path, fsync=False)
        if self.emit is not None:
            self.emit(encode(payload))


def _cpu(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    return obj


def encode(payload: Mapping[str, Any]) -> bytes:
    """A checkpoint as one line of ASCII (base64 of its ``torch.save`` bytes): what travels in a log."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return base64.b64encode(buffer.getvalue())


def decode(data: bytes | str) -> dict[str, Any]:
    """The checkpoint of :func:`encode`'s line (tensors on the CPU; plain types only)."""
    raw = base64.b64decode(data)
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

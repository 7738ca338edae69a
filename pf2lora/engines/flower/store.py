"""A client node's private state between rounds: one file per (run, method, client) on disk.

The ClientApp of a deployed SuperNode runs in a fresh process for every message, and a SuperNode
may be restarted between rounds: the state cannot live in memory. It is written with
``torch.save`` to a temporary file and moved into place (atomic on POSIX), so a crash mid-write
never leaves a torn file. States are stored from the CPU and loaded onto it (the node moves them
to its device), so a file does not depend on the device that wrote it.

A training round writes the new state as *pending*; it becomes the client's state only when the
server's next message to that client names that round as the last one it counted (the upload was
accepted, or arrived late: the client did train). A rejected or lost update leaves the state at
the last good round, exactly as the local engine keeps it; a lost message cannot lose an accepted
round, since every message repeats the last counted round.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pf2lora.io import atomic_save

Tensors = dict[str, torch.Tensor]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe(name: str) -> str:
    cleaned = _SAFE.sub("_", name)
    if cleaned in ("", ".", ".."):
        raise ValueError(f"unusable name for a state file: {name!r}")
    return cleaned


class NodeStore:
    """Client states of one node under ``root/<run_key>/<method>/<client>.pt``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, run_key: str, method: str) -> Path:
        return self.root / _safe(run_key) / _safe(method)

    def path(self, run_key: str, method: str, client_id: str) -> Path:
        return self._dir(run_key, method) / f"{_safe(client_id)}.pt"

    def _pending(self, run_key: str, method: str, client_id: str) -> Path:
        return self._dir(run_key, method) / f"{_safe(client_id)}.pending.pt"

    def load(self, run_key: str, method: str, client_id: str) -> Tensors | None:
        """The client's committed state, or None if it has none yet."""
        p = self.path(run_key, method, client_id)
        if not p.exists():
            return None
        return torch.load(p, map_location="cpu", weights_only=True)

    def save_pending(self, run_key: str, method: str, client_id: str, round_: int, state: Tensors) -> None:
        path = self._pending(run_key, method, client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"round": round_, "state": {k: v.detach().cpu() for k, v in state.items()}}, path)

    def resolve(self, run_key: str, method: str, client_id: str, accepted_round: int) -> None:
        """Commit the pending state if it is of ``accepted_round`` (the last round whose training
        the server counted for this client), else drop it (rejected, crashed or lost)."""
        p = self._pending(run_key, method, client_id)
        if not p.exists():
            return
        try:
            pending = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return
        if int(pending["round"]) == accepted_round:
            atomic_save(pending["state"], self.path(run_key, method, client_id))
        try:
            p.unlink()
        except FileNotFoundError:
            pass

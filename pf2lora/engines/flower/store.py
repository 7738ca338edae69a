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

A committed state records its round, and the one it replaced is kept beside it: a server resumed
from its last checkpoint (``pf2lora run --resume``) may name an earlier round than a node has
committed (the evaluation after a round commits it, and the server can die before that round's
checkpoint), so the node steps back to the state of that round. A node whose saved state is not of
the round the server names (another state folder, a lost file, a run that went on without its
checkpoint) refuses the message with :class:`NodeStateMismatch` and the server stops the run: a
resumed run never continues from the wrong state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pf2lora.io import atomic_save

Tensors = dict[str, torch.Tensor]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")

MISMATCH = "NodeStateMismatch"
"""The name a node's refusal carries in its error reply (the server stops the run on it)."""


class NodeStateMismatch(ValueError):
    """A client's saved state is not of the round the server says it last counted."""


def _safe(name: str) -> str:
    cleaned = _SAFE.sub("_", name)
    if cleaned in ("", ".", ".."):
        raise ValueError(f"unusable name for a state file: {name!r}")
    return cleaned


class NodeStore:
    """Client states of one node under ``root/<run_key>/<method>/<client>.pt`` (committed, with its
    round), ``<client>.prev.pt`` (the committed state before it) and ``<client>.pending.pt``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, run_key: str, method: str) -> Path:
        return self.root / _safe(run_key) / _safe(method)

    def path(self, run_key: str, method: str, client_id: str) -> Path:
        return self._dir(run_key, method) / f"{_safe(client_id)}.pt"

    def _pending(self, run_key: str, method: str, client_id: str) -> Path:
        return self._dir(run_key, method) / f"{_safe(client_id)}.pending.pt"

    def _previous(self, run_key: str, method: str, client_id: str) -> Path:
        return self._dir(run_key, method) / f"{_safe(client_id)}.prev.pt"

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """``{"round": r, "state": tensors}`` of a state file, or None if there is none."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        return {"round": int(saved["round"]), "state": saved["state"]}

    def load(self, run_key: str, method: str, client_id: str) -> Tensors | None:
        """The client's committed state, or None if it has none yet."""
        saved = self._read(self.path(run_key, method, client_id))
        return None if saved is None else saved["state"]

    def committed_round(self, run_key: str, method: str, client_id: str) -> int:
        """The round of the client's committed state (-1: none, the initial state)."""
        saved = self._read(self.path(run_key, method, client_id))
        return -1 if saved is None else saved["round"]

    def save_pending(self, run_key: str, method: str, client_id: str, round_: int, state: Tensors) -> None:
        path = self._pending(run_key, method, client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"round": round_, "state": {k: v.detach().cpu() for k, v in state.items()}}, path)

    @contextmanager
    def _locked(self, run_key: str, method: str, client_id: str) -> Iterator[None]:
        """An exclusive lock on one client's state files: Flower's simulation runs messages of one
        node (e.g. the evaluations of every client with a pooled method's one state) in parallel
        processes over the same folder, and a commit must not be seen half done."""
        lock = self._dir(run_key, method) / f"{_safe(client_id)}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no parallel node processes to guard
            yield
            return
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def resolve(self, run_key: str, method: str, client_id: str, accepted_round: int) -> None:
        """Make the client's committed state the one of ``accepted_round`` (the last round whose
        training the server counted for this client; -1: none): commit the pending state if it is
        of that round, else drop it (rejected, crashed or lost); step back one commit if the server
        resumed from a checkpoint taken before it. Raises :class:`NodeStateMismatch` if no saved
        state is of that round."""
        with self._locked(run_key, method, client_id):
            self._resolve(run_key, method, client_id, accepted_round)

    def _resolve(self, run_key: str, method: str, client_id: str, accepted_round: int) -> None:
        path, prev_path = self.path(run_key, method, client_id), self._previous(run_key, method, client_id)
        committed = self._read(path)
        if committed is None or committed["round"] > accepted_round:
            # a commit the server's checkpoint never saw (or a commit cut short): back to the one before
            prev = self._read(prev_path)
            if prev is not None and prev["round"] == accepted_round:
                os.replace(prev_path, path)
                committed = prev
            elif committed is not None and prev is None and accepted_round < 0:
                path.unlink()
                committed = None
        pending_path = self._pending(run_key, method, client_id)
        pending = self._read(pending_path)
        if pending is not None:
            if pending["round"] == accepted_round and (committed is None or committed["round"] != accepted_round):
                if committed is not None:
                    os.replace(path, prev_path)
                atomic_save(pending, path)
                committed = pending
            pending_path.unlink(missing_ok=True)
        have = -1 if committed is None else committed["round"]
        if have != accepted_round:
            held = "no saved state" if committed is None else f"a saved state of round {have}"
            raise NodeStateMismatch(
                f"{client_id} ({method}) has {held} in {self.root}, but the server last counted its round {accepted_round}: "
                "this node's state folder is not the one of this run, or the run went on past its last checkpoint"
            )

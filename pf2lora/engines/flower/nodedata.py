"""Node-local data (``task.partition = "node"``): each SuperNode reads its own client's file, given
by its node config ``data-path``; the server and the submitting machine never need (or open) one.

Light to import (no torch): a node's ``query`` handler checks its file with it before a run starts,
so a missing file, a missing column or a label outside ``task.label_names`` stops the run with one
line naming the node, before any round (and before any other node has trained).

* :func:`server_view`: the run's config as the ServerApp and the generated app get it, without the
  file list (a loopback try-out hands node K file K through its ``data-path`` instead).
* :func:`node_view`: the config a node builds its task from: its own file at its client's place,
  none for the other clients (they are :class:`~pf2lora.tasks.text_base.RemoteClient` there).
* :func:`node_report`: what a node says in its hello: its sizes, or what is wrong with its data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pf2lora.config import FileList, RunConfig
from pf2lora.data import catalogue
from pf2lora.errors import UserError

DATA_PATH = "data-path"
"""The node config key that names a SuperNode's own data file."""


def node_mode(cfg: RunConfig) -> bool:
    """Whether the run's clients read their own files (``task.partition = "node"`` of a text task)."""
    return cfg.task.kind in catalogue.KINDS and cfg.task.partition == catalogue.NODE


def server_view(cfg: RunConfig) -> RunConfig:
    """``cfg`` without the clients' files (node-local data): what the ServerApp builds its task from."""
    if not node_mode(cfg) or not cfg.task.data_path.strip():
        return cfg
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_path=""))


def node_view(cfg: RunConfig, position: int, path: str) -> RunConfig:
    """``cfg`` as node ``position`` (its partition-id) builds its task: ``path`` for its own client, no file for the others."""
    files = FileList([""] * cfg.task.num_clients)
    files[position] = path
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, data_path=files))


def own_path(cfg: RunConfig, position: int, node_config: Mapping[str, Any]) -> str:
    """The file of the node playing client ``position``: its node config ``data-path``, else the
    config's own file for that client (flower-sim, an in-process grid), else a one-line error."""
    path = str(node_config.get(DATA_PATH, "") or "").strip()
    if path:
        return path
    files = catalogue.client_files(cfg.task)
    if 0 <= position < len(files) and files[position]:
        return files[position]
    raise UserError(f"no {DATA_PATH} in its node config: start it with --node-config 'partition-id={position} {DATA_PATH}=\"FILE\"'")


def node_report(cfg: RunConfig, position: int, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What node ``position`` adds to its hello: ``num_train`` / ``num_test`` of its own file as the
    task cuts it, or ``data_error`` (one line); nothing when the run's data is not node-local."""
    if not node_mode(cfg) or not 0 <= position < cfg.task.num_clients:
        return {}  # partition-id mode, or a partition-id the server refuses with its own message
    try:
        train, test = catalogue.own_file_sizes(cfg.task, position, own_path(cfg, position, node_config))
    except UserError as e:
        return {"data_error": str(e)}
    return {"num_train": train, "num_test": test}


def check_run(cfg: RunConfig, *, files_needed: bool) -> None:
    """A one-line UserError for a node-local run the Flower engines cannot do: a method that pools
    every client's data; with ``files_needed`` (flower-sim, a loopback federation) a client with no
    file in ``task.data_path``."""
    if not node_mode(cfg):
        return
    from pf2lora.methods import registry

    pooled = [m for m in cfg.methods if registry()[m].pools_data]
    if pooled:
        raise UserError(
            f'method {pooled[0]!r} pools every client\'s data, which task.partition = "node" keeps on the SuperNodes: leave it out of methods'
        )
    files = catalogue.client_files(cfg.task)
    if files_needed and (not files or not all(files)):
        missing = "no file" if not files else f"no file for client position(s) {[k for k, f in enumerate(files) if not f]}"
        raise UserError(
            f'task.partition = "node" with {missing} in task.data_path: this machine runs every client, so list one file per client '
            "(or submit to a SuperLink whose SuperNodes hold them: --engine flower-deploy --superlink HOST:PORT)"
        )


def stamp(cfg: RunConfig) -> str:
    """The size and modification time of each local file ``task.data_path`` names ("" for none):
    a node's cached task (:mod:`.nodeworker`) is rebuilt when its file changes between runs."""
    paths = list(cfg.task.data_path) if isinstance(cfg.task.data_path, FileList) else [cfg.task.data_path]
    parts = []
    for p in paths:
        try:
            st = Path(p.strip()).expanduser().stat()
        except (OSError, ValueError):
            continue
        parts.append(f"{p.strip()}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)

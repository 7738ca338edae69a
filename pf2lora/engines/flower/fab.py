"""The apps of a generated Flower App Bundle (see :mod:`.deploy`). Light to import: a deployed
SuperNode imports the bundle in a fresh process for every message, and only train / evaluate
messages need torch. The run's config is the bundle's ``run.toml``; the ServerApp reports rounds,
results and failures as tagged lines of its log (``flwr run --stream`` brings them back, also from
a remote SuperLink) and also writes the results to ``settings.json``'s ``result_path`` if set.
With ``settings.json``'s ``checkpoint`` it checkpoints after every round (:mod:`.resume`): into the
file ``path`` (a loopback federation: the run directory is on this machine), or as
``PF2LORA_CHECKPOINT`` lines of its log (``stream``: a SuperLink elsewhere); a resumed run reads
its checkpoint from that file, or from the bundle's ``resume.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pf2lora.engines.flower import env, nodedata

env.apply()

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.common import CHECKPOINT_TAG, ERROR_TAG, RESULT_TAG, ROUND_TAG
from pf2lora.io import atomic_write


def bundled_apps(folder: str | Path) -> tuple[ServerApp, Any]:
    """(ServerApp, ClientApp) of the generated app folder ``folder``."""
    folder = Path(folder)

    def load_cfg() -> Any:
        from pf2lora import plan

        return plan.load(folder / "run.toml")

    def load_node_cfg() -> Any:  # light (no torch): a node's hello reads the config to check its own data
        from pf2lora import config

        return config.load(folder / "run.toml")

    settings = json.loads((folder / "settings.json").read_text())
    result_path = settings.get("result_path") or ""
    adapters_path = settings.get("adapters_path") or None
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        import dataclasses

        import torch

        from pf2lora.engines.flower.server import FlowerServer
        from pf2lora.plan import build_task

        try:
            cfg = load_cfg()
            if cfg.num_threads:
                torch.set_num_threads(cfg.num_threads)
            on_round = lambda record: print(ROUND_TAG + json.dumps(record), flush=True)
            _audit_opens()
            task = build_task(nodedata.server_view(cfg))  # node-local data: no client's file, ever
            checkpoint = _checkpoint(folder, settings.get("checkpoint"))
            results = FlowerServer(cfg, task, grid, on_round=on_round, adapters_root=adapters_path, checkpoint=checkpoint).run()
        except BaseException as e:
            print(ERROR_TAG + f"{type(e).__name__}: {e}".replace("\n", " ")[:500], flush=True)
            raise
        payload = json.dumps([dataclasses.asdict(r) for r in results])
        if result_path:
            try:
                atomic_write(result_path, payload)
            except OSError:
                pass  # the log line below carries the results
        print(RESULT_TAG + payload, flush=True)

    return server, make_client_app(load_node_cfg, node_cache=True)  # a deployed node: one process per message


def _checkpoint(folder: Path, spec: dict[str, Any] | None) -> Any:
    """The ServerApp's :class:`~.resume.ServerCheckpoint` of ``settings.json``'s ``checkpoint`` (None: none)."""
    if not spec:
        return None
    import torch

    from pf2lora.engines.flower.resume import ServerCheckpoint, decode

    path = spec.get("path") or None
    emit = (lambda line: print(CHECKPOINT_TAG + line.decode(), flush=True)) if spec.get("stream") else None
    if not spec.get("resume"):
        return ServerCheckpoint(spec["header"], path=path, emit=emit, run_key=spec["run_key"])
    if path:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    else:
        payload = decode(json.loads((folder / "resume.json").read_text())["checkpoint"])
    return ServerCheckpoint.resumed(payload, spec["header"], path=path, emit=emit)


AUDIT_OPENS_ENV = "PF2LORA_AUDIT_SERVER_OPENS"
"""Test and audit hook: a file to which a ServerApp started with this variable set appends the path
of every file it opens (Python's ``open`` audit event), e.g. to check that a run with node-local
data never opens a client's file on the server side. Unset, nothing is recorded."""


def _audit_opens() -> None:
    import os
    import sys

    log_path = os.environ.get(AUDIT_OPENS_ENV, "")
    if not log_path:
        return
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the ServerApp's lifetime

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            log.write(os.fsdecode(args[0]) + "\n")

    sys.addaudithook(hook)

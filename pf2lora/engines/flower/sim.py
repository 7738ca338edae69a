"""``flower-sim``: the Flower apps on Flower's simulation runtime (Ray), in this process.

The ServerApp runs in a thread of this process (so callbacks and the returned results work); each
client node runs the ClientApp in a Ray worker process that builds its own copy of the task.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pf2lora.config import RunConfig
from pf2lora.engines.flower import env, nodedata, reaper

env.apply()

from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.common import FlowerEngineError
from pf2lora.engines.flower.resume import ServerCheckpoint
from pf2lora.engines.flower.server import ReplyHook, RoundCallback, ServerHook, make_server_app
from pf2lora.engines.rounds import MethodResult, RoundFailure
from pf2lora.errors import UserError
from pf2lora.plan import build_task
from pf2lora.tasks.base import Task


def run_flower_sim(
    cfg: RunConfig,
    task: Task | None = None,
    *,
    on_round: RoundCallback | None = None,
    on_reply: ReplyHook | None = None,
    progress: bool = False,
    num_cpus: int | None = None,
    verbose: bool = False,
    on_server: ServerHook | None = None,
    adapters_root: str | Path | None = None,
    checkpoint: ServerCheckpoint | None = None,
    state_dir: str | Path | None = None,
) -> list[MethodResult]:
    """Run ``cfg.methods`` on a simulated federation (one virtual SuperNode per client).

    ``task`` (built from ``cfg`` when None) serves the ServerApp; Ray workers build theirs.
    Client state lives in ``state_dir``, else ``cfg.flower.state_dir``, else a temporary folder
    removed afterwards. ``checkpoint``: the server checkpoints after every round, and a resumed one
    continues its run (:mod:`.resume`; the client states must be in the same folder as before).
    ``num_cpus`` caps the cores Ray may use (default: all); each client takes
    ``cfg.flower.client_cpus``. ``on_server`` sees the server state after every round. The server
    writes each method's global adapter under ``adapters_root``; every client's personalised one is
    written by its node under ``STATE/adapters``. Raises :class:`FlowerEngineError` if the simulation fails.
    """
    import ray
    from flwr.simulation import run_simulation

    try:  # node-local data: every simulated node reads its client's file from task.data_path
        nodedata.check_run(cfg, files_needed=True)
    except UserError as e:
        raise FlowerEngineError(str(e)) from None
    if task is None:
        task = build_task(cfg)
    results: list[MethodResult] = []
    errors: list[BaseException] = []
    tmp = None
    state_dir = state_dir or cfg.flower.state_dir
    if not state_dir:
        tmp = tempfile.mkdtemp(prefix="pf2lora-flower-state-")
        state_dir = tmp
    server_app = make_server_app(
        cfg,
        task,
        results=results,
        on_round=on_round,
        on_reply=on_reply,
        progress=progress,
        on_server=on_server,
        adapters_root=adapters_root,
        checkpoint=checkpoint,
    )
    client_app = make_client_app(cfg, state_dir)
    init_args: dict = {"include_dashboard": False}
    if num_cpus:
        init_args["num_cpus"] = int(num_cpus)
    backend_config = {
        "client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:
        flwr_log.setLevel(logging.ERROR)
    watchdog = reaper.start_watchdog(None)  # Ray's processes end with this one, even if it is killed
    try:
        run_simulation(server_app, client_app, num_supernodes=len(task.clients), backend_config=backend_config, verbose_logging=verbose)
    except BaseException as e:  # noqa: BLE001
        errors.append(e)
    finally:
        flwr_log.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
        reaper.stop_watchdog(watchdog)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        err = errors[0]
        if isinstance(err, KeyboardInterrupt):
            raise err
        cause = err.__cause__ or err
        if isinstance(cause, (RoundFailure, FlowerEngineError)):
            raise cause
        raise FlowerEngineError(f"flower-sim failed: {type(cause).__name__}: {cause}") from err
    if len(results) != len(cfg.methods):
        raise FlowerEngineError(f"flower-sim ended with results for {len(results)} of {len(cfg.methods)} methods (see the log above)")
    return results


def default_state_dir(out: str | Path) -> Path:
    """Where a CLI run keeps its simulated nodes' state when it checkpoints (unless
    ``flower.state_dir`` says otherwise): inside its run directory, where ``--resume`` finds it."""
    return Path(out) / "flower" / "state"


__all__: Sequence[str] = ["default_state_dir", "run_flower_sim"]

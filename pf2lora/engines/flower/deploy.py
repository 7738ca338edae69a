"""``flower-deploy``: the Flower apps on Flower's deployment runtime.

Either starts a loopback federation here (a SuperLink and one SuperNode per client on 127.0.0.1,
free ports, insecure mode: a one-machine try-out), submits the app with ``flwr run`` and shuts
everything down afterwards (also on error or Ctrl-C: every process it started is terminated with
its children), or submits the app to an existing SuperLink (``superlink="HOST:PORT"``) whose
SuperNodes someone else started, one per client::

    flower-supernode --insecure --superlink HOST:PORT --node-config node.toml
    # node.toml:  partition-id = K    num-partitions = N    state-dir = "/var/lib/pf2lora/client-K"
    #             data-path = "/data/mine.csv"    (only with task.partition = "node": its own file)

With node-local data (``task.partition = "node"``, :mod:`.nodedata`) the loopback federation gives
SuperNode K the file K of ``task.data_path`` as its ``data-path``; the app carries no file at all.

The app (a Flower App Bundle) is generated in a temporary folder: the run's config travels inside
it (Flower's run_config is read-only and flat), the ServerApp reports rounds and results as
``PF2LORA_ROUND`` / ``PF2LORA_RESULT`` lines of its log, which ``flwr run --stream`` brings back,
so results return from a remote SuperLink too.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from pf2lora import config as config_mod
from pf2lora.config import RunConfig
from pf2lora.data import catalogue
from pf2lora.engines.flower import env, nodedata, nodeworker
from pf2lora.errors import UserError
from pf2lora.io import atomic_write

env.apply()

from pf2lora.engines.flower import reaper
from pf2lora.engines.flower.common import (
    CHECKPOINT_TAG,
    ERROR_TAG,
    RESULT_TAG,
    ROUND_TAG,
    FlowerEngineError,
)
from pf2lora.engines.flower.reaper import alive, descendants
from pf2lora.engines.flower.resume import ServerCheckpoint, encode
from pf2lora.engines.flower.server import RoundCallback
from pf2lora.engines.rounds import MethodResult, RoundFailure

CONNECTION = "pf2lora"
HOLDING = "pf2lora: holding after "
FAB_PACKAGE = "pf2lora_fab"


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FlowerEngineError(f"{name} not found: install the Flower extra (pip install 'pf2lora[flower]')")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FlowerEngineError(f"--superlink {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9093")
    return host.strip("[]"), int(port)


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the generated Flower App ------------------------------------------------------------------------


FAB_LIMIT = 10 * 1024 * 1024
"""Flower's largest app bundle (flwr 1.41, ``FAB_MAX_SIZE``)."""


def write_app(
    folder: Path,
    cfg: RunConfig,
    result_path: Path | None,
    adapters_path: Path | None = None,
    checkpoint: ServerCheckpoint | None = None,
    remote: bool = False,
) -> Path:
    """A Flower App Bundle folder whose apps run ``cfg`` (the config travels inside it).

    ``checkpoint``: the ServerApp checkpoints after every round, into ``checkpoint.path`` (a
    loopback federation: this machine's file) or, ``remote``, as ``PF2LORA_CHECKPOINT`` lines of
    its log; a resumed one continues its run, read from that file, or, ``remote``, from a copy
    inside the bundle (``resume.json``)."""
    app = folder / "app"
    pkg = app / FAB_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pf2lora-flower-app"
        version = "1.0.0"
        description = "pf2lora run {cfg.name} on Flower"
        license = "Apache-2.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "pf2lora"

        [tool.flwr.app.components]
        serverapp = "{FAB_PACKAGE}.app:server"
        clientapp = "{FAB_PACKAGE}.app:client"

        [tool.flwr.app.config]
        """)
    )
    (pkg / "__init__.py").write_text("")
    (pkg / "run.toml").write_text(config_mod.dumps(cfg))
    settings: dict = {"result_path": str(result_path) if result_path else "", "adapters_path": str(adapters_path) if adapters_path else ""}
    (pkg / "resume.json").unlink(missing_ok=True)
    if checkpoint is not None:
        resuming = bool(checkpoint.completed or checkpoint.current)
        settings["checkpoint"] = {
            "header": checkpoint.header,
            "run_key": checkpoint.run_key,
            "path": "" if remote or checkpoint.path is None else str(checkpoint.path),
            "stream": remote,
            "resume": resuming,
        }
        if remote and resuming:
            line = encode(checkpoint.payload()).decode()
            if len(line) > FAB_LIMIT - 256 * 1024:
                raise FlowerEngineError(
                    f"--resume: the checkpoint ({len(line) / 2**20:.1f} MB as text) does not fit in a Flower app (10 MB) to reach the SuperLink"
                )
            (pkg / "resume.json").write_text(json.dumps({"checkpoint": line}))
    (pkg / "settings.json").write_text(json.dumps(settings))
    (pkg / "app.py").write_text(
        textwrap.dedent("""\
        \"\"\"Generated by pf2lora: the run's Flower apps (config in run.toml next to this file).\"\"\"
        from pathlib import Path

        from pf2lora.engines.flower.fab import bundled_apps

        _apps = bundled_apps(Path(__file__).parent)
        server = _apps[0]
        client = _apps[1]
        """)
    )
    return app


# -- processes -----------------------------------------------------------------------------------------


class Processes:
    """Processes this engine started; ``stop`` ends them and every descendant they started (Flower's
    SuperExec, ServerApp and ClientApp processes run in sessions of their own), by process id.

    With ``folder`` they are also recorded there and a watchdog process ends them all should this
    process die without calling ``stop`` (SIGKILL; :mod:`.reaper`)."""

    def __init__(self, logs: Path, environ: dict[str, str], folder: Path | None = None):
        self.logs = logs
        self.env = environ
        self.folder = folder
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.seen: set[int] = set()
        """Every process id started here or below (filled at stop; for checks)."""
        self.watchdog: subprocess.Popen | None = None

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        try:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        finally:
            log.close()
        self.add(name, p)
        return p

    def add(self, name: str, p: subprocess.Popen) -> None:
        self.procs.append((name, p))
        self.seen.add(p.pid)
        if self.folder is not None:
            reaper.record(self.folder, [q.pid for _, q in self.procs])
            if self.watchdog is None:
                self.watchdog = reaper.start_watchdog(self.folder, self.env)

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 8.0) -> None:
        direct = [p.pid for _, p in self.procs]
        tree = descendants(direct)
        self.seen.update(tree)
        for _, p in reversed(self.procs):  # the SuperLink / SuperNodes end their own children first
            if p.poll() is None:
                _kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and alive(direct):
            self.seen.update(descendants(direct))
            time.sleep(0.1)
        for pid in alive(self.seen):
            _kill(pid, signal.SIGTERM)
        end = time.monotonic() + 3
        while time.monotonic() < end and alive(self.seen):
            time.sleep(0.1)
        for pid in alive(self.seen):
            _kill(pid, signal.SIGKILL)
        for _, p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 5
        while time.monotonic() < end and alive(self.seen):
            time.sleep(0.1)
        if self.folder is not None:
            (self.folder / reaper.RECORD).unlink(missing_ok=True)
        if self.watchdog is not None:  # nothing left to watch
            self.seen.add(self.watchdog.pid)
            reaper.stop_watchdog(self.watchdog)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_listening(procs: Processes, name: str, proc: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = procs.log_tail(name)
            if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                raise FlowerEngineError(f"{name}: port {port} on 127.0.0.1 is in use")
            raise FlowerEngineError(f"{name} exited with code {proc.returncode}: {tail.splitlines()[-1] if tail else 'no output'}")
        if reachable("127.0.0.1", port, 0.5):
            return
        time.sleep(0.2)
    raise FlowerEngineError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:g} s")


# -- the engine entry ------------------------------------------------------------------------------------


def run_flower_deploy(
    cfg: RunConfig,
    superlink: str | None = None,
    *,
    on_round: RoundCallback | None = None,
    port: int | None = None,
    workdir: str | Path | None = None,
    timeout_s: float | None = None,
    started: list[int] | None = None,
    echo: Callable[[str], None] | None = None,
    root_certificates: str | Path | None = None,
    adapters_root: str | Path | None = None,
    checkpoint: ServerCheckpoint | None = None,
) -> list[MethodResult]:
    """Run ``cfg.methods`` on a deployed federation; see the module docstring.

    ``superlink``: HOST:PORT of an existing SuperLink (its SuperNodes must be running), or None to
    start a loopback federation (SuperLink on ``port``, default a free one). ``workdir`` keeps the
    generated app, logs and client state (default: a temporary folder, removed afterwards).
    ``started`` receives the ids of every process started here or below them (for checks).
    ``echo`` gets every line of the run's log stream. ``root_certificates``: a PEM CA file for an
    existing SuperLink that uses TLS (default: an insecure connection, as the loopback one is).
    ``adapters_root``: where the loopback federation's ServerApp writes each method's global
    adapter (each node writes its own client's under its state folder, ``STATE/adapters``).
    ``checkpoint``: the ServerApp checkpoints after every round into ``checkpoint.path`` (written
    by the ServerApp itself on loopback, by this process from the log stream with ``superlink``);
    a resumed one continues its run, on a new loopback federation whose nodes use the same state
    folders (``workdir/state/node-K``: give the same ``workdir``), or on the same SuperLink.
    """
    try:  # node-local data: no pooled method; a loopback federation hands node K the file of client K
        nodedata.check_run(cfg, files_needed=not superlink)
    except UserError as e:
        raise FlowerEngineError(str(e)) from None
    node_files = catalogue.client_files(cfg.task) if nodedata.node_mode(cfg) and not superlink else []
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="pf2lora-flower-deploy-")
        work = Path(tmp)
    else:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    bindir = str(Path(sys.executable).parent)  # the SuperLink starts flower-superexec from PATH
    environ = env.child_env(
        FLWR_HOME=str(home),
        PYTHONUNBUFFERED="1",
        PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
        # how often a SuperExec asks for work (Flower's default: every 1 s; one local call each)
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"),
    )
    reaper.reap(work)  # a federation of a killed run in this folder (its watchdog killed too) goes first
    procs = Processes(logs, environ, folder=work)
    try:
        if superlink:
            host, link_port = parse_address(superlink)
            if not reachable(host, link_port, 3.0):
                raise FlowerEngineError(f"cannot reach a SuperLink at {host}:{link_port} (is it running? is the port right?)")
            result_path = None
        else:
            host = "127.0.0.1"
            link_port = port or free_port()
            if port_in_use(link_port):
                raise FlowerEngineError(f"port {link_port} on 127.0.0.1 is in use: pick another or leave it to pf2lora")
            result_path = work / "results.json"
            link = procs.start("superlink", [_bin("flower-superlink"), "--insecure", "--host", host, "--port", str(link_port)])
            _wait_listening(procs, "superlink", link, link_port, 60)
            n = cfg.task.num_clients
            for i in range(n):
                state = work / "state" / f"node-{i}"
                state.mkdir(parents=True, exist_ok=True)
                node_cfg = work / f"node-{i}.toml"
                data = f"{nodedata.DATA_PATH} = {json.dumps(str(Path(node_files[i]).expanduser().resolve()))}\n" if node_files else ""
                node_cfg.write_text(f"partition-id = {i}\nnum-partitions = {n}\nstate-dir = {json.dumps(str(state))}\n{data}")
                procs.start(
                    f"supernode-{i}",
                    [
                        _bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"{host}:{link_port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        str(node_cfg),
                    ],
                )
        tls = f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}\n" if root_certificates else "insecure = true\n"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{host}:{link_port}"\n{tls}'
        )
        # the app carries no client's file: with node-local data each node has its own data-path
        app = write_app(
            work,
            nodedata.server_view(cfg),
            result_path,
            Path(adapters_root) if adapters_root and not superlink else None,
            checkpoint,
            remote=bool(superlink),
        )
        keep = checkpoint.path if checkpoint is not None and superlink else None
        return _submit(cfg, app, environ, procs, result_path, on_round, timeout_s, echo, keep)
    finally:
        if not superlink:  # the nodes' workers end with their SuperNodes; named here so stop() makes sure
            procs.seen.update(pid for i in range(cfg.task.num_clients) if (pid := nodeworker.worker_pid(work / "state" / f"node-{i}")))
        procs.stop()
        if started is not None:
            started.extend(sorted(procs.seen))
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _submit(
    cfg: RunConfig,
    app: Path,
    environ: dict[str, str],
    procs: Processes,
    result_path: Path | None,
    on_round: RoundCallback | None,
    timeout_s: float | None,
    echo: Callable[[str], None] | None,
    checkpoint_path: Path | None = None,
) -> list[MethodResult]:
    """``flwr run --stream`` of ``app``; the tagged lines of the ServerApp's log: round records to
    ``on_round``, checkpoints into ``checkpoint_path`` (a ServerApp on another machine), results."""
    run = subprocess.Popen(
        [_bin("flwr"), "run", str(app), CONNECTION, "--stream"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=environ,
        start_new_session=True,
    )
    procs.add("flwr-run", run)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    results_payload: str | None = None
    error: str | None = None
    tail: list[str] = []
    assert run.stdout is not None
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(run.stdout, selectors.EVENT_READ)
    buffer = ""
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise FlowerEngineError(f"flower-deploy: the run did not finish within {timeout_s:g} s")
        if not sel.select(timeout=0.5):
            if run.poll() is not None:
                break
            continue
        chunk = os.read(run.stdout.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            if line.startswith(CHECKPOINT_TAG):  # neither echoed nor kept in the tail: one line can be megabytes
                if checkpoint_path is not None:
                    atomic_write(checkpoint_path, base64.b64decode(line[len(CHECKPOINT_TAG) :]), fsync=False)
                continue
            if echo is not None:
                echo(line)
            tail = (tail + [line])[-30:]
            if line.startswith(ROUND_TAG) and on_round is not None:
                on_round(json.loads(line[len(ROUND_TAG) :]))
            elif line.startswith(HOLDING):  # test-only (resume.HOLD_ENV): the ServerApp holds; say so here
                print(line, file=sys.stderr, flush=True)
            elif line.startswith(RESULT_TAG):
                results_payload = line[len(RESULT_TAG) :]
            elif line.startswith(ERROR_TAG):
                error = line[len(ERROR_TAG) :]
    run.wait()
    if result_path is not None and result_path.exists():
        results_payload = result_path.read_text()
    if results_payload is None:
        if error:
            if error.startswith("RoundFailure: "):
                raise RoundFailure(error[len("RoundFailure: ") :])
            raise FlowerEngineError(f"flower-deploy: the ServerApp failed: {error}")
        last = next((t for t in reversed(tail) if t.strip() and not t.startswith(ROUND_TAG)), "no output")
        raise FlowerEngineError(f"flower-deploy: the run ended without results (flwr run exit {run.returncode}): {last[:300]}")
    results = [MethodResult(**r) for r in json.loads(results_payload)]
    if len(results) != len(cfg.methods):
        raise FlowerEngineError(f"flower-deploy: results for {len(results)} of {len(cfg.methods)} methods")
    return results

"""A deployed node's model cache: one long-lived worker process per SuperNode state folder that
keeps the task (model, tokenizer, data) and the methods in memory between messages.

Flower 1.41's deployment runtime starts a new ClientApp process for every message a SuperNode
gets, so without the worker each message imports torch and rebuilds the task (seconds with a tiny
model, more with a real one). With it (``flower.node_cache``, on by default) the ClientApp
process imports only Flower and this module, hands the message's content to the worker and
returns its reply. The worker answers with the same code a ClientApp runs in-process
(:class:`.runtime.ClientRuntime`), as Flower's simulation runtime does in its long-lived Ray
actors; client state still goes to disk after every message (:mod:`.store`), so a worker that
dies loses nothing and the next message starts a new one.

Lifetime: the first message starts the worker (under a file lock, so two never start); it ends
when the SuperNode above the ClientApp that started it ends (checked twice a second), after
``flower.node_cache_idle_s`` without a message, or on :func:`shutdown`.

Local only: a Unix socket (no port) in a private folder (mode 0700) of the temporary directory,
named by a hash of the state folder (socket paths are limited to ~100 bytes). Contents travel as
Flower's own protobuf, the rest as JSON; nothing is unpickled. Linux / macOS (``AF_UNIX``,
``fcntl``); elsewhere the node builds its task in the ClientApp process as before.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pf2lora.engines.flower import env

env.apply()

from flwr.app import RecordDict

START_TIMEOUT_S = 300.0
"""How long a ClientApp waits for a new worker to listen (it imports torch and builds the task lazily, so this is mostly Python start-up)."""

CACHED_TASKS = 2
"""Tasks a worker keeps (least recently used goes first): one run's, and the next run's while it starts."""


class WorkerError(RuntimeError):
    """The worker answered with an error (its reason), or could not be reached or started."""


def available() -> bool:
    return hasattr(socket, "AF_UNIX") and sys.platform != "win32"


def _home() -> Path:
    home = Path(tempfile.gettempdir()) / f"pf2lora-nodes-{os.getuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    if home.stat().st_uid != os.getuid() or home.stat().st_mode & 0o077:
        raise WorkerError(f"{home} is not a private folder of this user: refusing to put a node's socket there")
    return home


def _name(folder: str | Path) -> Path:
    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:20]
    return _home() / digest


# -- framing ---------------------------------------------------------------------------------------


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(struct.pack(">Q", len(frame)) + frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def _to_bytes(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return bytes(recorddict_to_proto(content).SerializeToString())


def _from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# -- the ClientApp's side --------------------------------------------------------------------------


def call(folder: str | Path, request: dict[str, Any], content: RecordDict, idle_s: float) -> RecordDict:
    """The worker's reply content to ``content`` (``request``: kind, partition, the run's and the
    node's data config as TOML, the state folder), starting the worker first if none listens.

    A worker that ends while answering (killed, or ending as the connection came in) is replaced
    and asked once more: a message's work is idempotent (training starts from the committed
    state and overwrites the pending one; an evaluation changes nothing)."""
    frames = (json.dumps(request).encode(), _to_bytes(content))
    for attempt in (1, 2):
        try:
            with _connect(folder, idle_s) as sock:
                _send(sock, *frames)
                head = json.loads(_recv(sock))
                body = _recv(sock)
            break
        except OSError as e:
            if attempt == 2:
                raise WorkerError(f"the node's worker ended while answering ({e}; see {Path(folder) / 'node-worker.log'})") from None
    if head.get("error"):
        raise WorkerError(str(head["error"]))
    return _from_bytes(body)


def _try(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


def _connect(folder: str | Path, idle_s: float) -> socket.socket:
    import fcntl

    base = _name(folder)
    sock_path = base.with_suffix(".sock")
    found = _try(sock_path)
    if found is not None:
        return found
    with open(base.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker; the others wait and connect
        found = _try(sock_path)
        if found is not None:
            return found
        sock_path.unlink(missing_ok=True)  # a dead worker's socket
        log_path = Path(folder) / "node-worker.log"
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            argv = [sys.executable, "-m", __name__, "--socket", str(sock_path), "--folder", str(folder)]
            argv += ["--watch", str(_supernode_pid()), "--idle-s", str(idle_s)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _try(sock_path)
            if found is not None:
                return found
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise WorkerError(f"the node's worker exited with code {proc.returncode}: {tail[0][:300]}")
            time.sleep(0.05)
        proc.kill()
        raise WorkerError(f"the node's worker did not listen within {START_TIMEOUT_S:g} s (log: {log_path})")


def _supernode_pid() -> int:
    """The SuperNode above this ClientApp process (the worker ends with it), else this process."""
    pid = os.getpid()
    for _ in range(8):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
            cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            break
        if b"flower-supernode" in cmdline:
            return parent
        if parent <= 1:
            break
        pid = parent
    return os.getpid()


def worker_pid(folder: str | Path) -> int | None:
    """The process id of the worker serving ``folder``, if one runs (checked against its command
    line, so a reused pid is never mistaken for it)."""
    base = _name(folder)
    try:
        pid = int(base.with_suffix(".pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if __name__.encode() in argv and str(base.with_suffix(".sock")).encode() in argv else None


def shutdown(folder: str | Path, timeout_s: float = 10.0) -> bool:
    """Ask the worker of ``folder`` to end; True if one was running (it has ended when this returns, or timeout_s passed)."""
    sock_path = _name(folder).with_suffix(".sock")
    sock = _try(sock_path)
    if sock is None:
        return False
    with sock:
        _send(sock, json.dumps({"kind": "shutdown"}).encode(), b"")
        try:
            _recv(sock)
        except OSError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sock_path.exists():
        time.sleep(0.05)
    return True


# -- the worker ------------------------------------------------------------------------------------


class _Worker:
    """Serves one connection at a time (a node handles one message at a time)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.runtimes: OrderedDict[str, Any] = OrderedDict()

    def runtime(self, run_toml: str, data_toml: str, stamp: str) -> Any:
        from pf2lora import config as config_mod
        from pf2lora.engines.flower.runtime import ClientRuntime, cached_task

        key = hashlib.sha256("\0".join((run_toml, data_toml, stamp)).encode()).hexdigest()
        if key not in self.runtimes:
            cfg, data = config_mod.loads(run_toml, "the run's config"), config_mod.loads(data_toml, "the node's data config")
            self.runtimes[key] = ClientRuntime(cfg, cached_task(data), self.folder)
            while len(self.runtimes) > CACHED_TASKS:
                self.runtimes.popitem(last=False)
        self.runtimes.move_to_end(key)
        return self.runtimes[key]

    def answer(self, request: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            if request.get("kind") not in ("train", "evaluate"):
                raise ValueError(f"unknown request {request.get('kind')!r}")
            rt = self.runtime(request["run_cfg"], request["data_cfg"], request.get("stamp", ""))
            reply = getattr(rt, request["kind"])(_from_bytes(body), int(request["partition"]))
            return {"error": None}, _to_bytes(reply)
        except Exception as e:  # noqa: BLE001 - the ClientApp turns it into the message's error reply
            return {"error": f"{type(e).__name__}: {e}"[:500]}, b""


def serve(sock_path: Path, folder: str, watch: int, idle_s: float) -> None:
    """Answer requests on ``sock_path`` until ``watch`` ends, ``idle_s`` pass without one, or shutdown."""
    from pf2lora.engines.flower.reaper import alive

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    server.listen(8)
    server.settimeout(0.5)
    pid_path = sock_path.with_suffix(".pid")
    pid_path.write_text(str(os.getpid()))
    print(f"pf2lora node worker {os.getpid()}: serving {folder}; ends with process {watch} or after {idle_s:g} s idle", flush=True)
    worker, last = _Worker(folder), time.monotonic()
    try:
        while alive([watch]) and time.monotonic() - last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    request, body = json.loads(_recv(conn)), _recv(conn)
                except (OSError, ValueError):
                    continue
                if request.get("kind") == "shutdown":
                    _send(conn, b"{}", b"")
                    return
                head, reply = worker.answer(request, body)
                try:
                    _send(conn, json.dumps(head).encode(), reply)
                except OSError:
                    pass  # the ClientApp went away (Flower ended the run): its client state is on disk anyway
            last = time.monotonic()
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        pid_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="pf2lora: a deployed node's model cache (started by its ClientApp)")
    p.add_argument("--socket", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--watch", type=int, required=True)
    p.add_argument("--idle-s", type=float, default=600.0)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # ends through serve's cleanup (socket, pid file)
    serve(Path(a.socket), a.folder, a.watch, a.idle_s)


if __name__ == "__main__":
    main()

"""A deployed node's model cache (:mod:`pf2lora.engines.flower.nodeworker`): one worker process
per state folder keeps the task between messages, answers as an in-process ClientApp does, and a
worker that dies is replaced by the next message without losing a client's state."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'pf2lora[flower]')")

from conftest import methods_override, small_task, wait_for
from pf2lora.engines.flower import nodeworker
from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.inprocess import InProcessGrid
from pf2lora.engines.flower.reaper import alive
from pf2lora.engines.flower.server import FlowerServer
from pf2lora.engines.local import LocalEngine

pytestmark = pytest.mark.skipif(not nodeworker.available(), reason="the node worker needs Unix sockets")


def _workers(folder: Path) -> list[int]:
    """The worker processes serving ``folder`` (by their command line)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"pf2lora.engines.flower.nodeworker" in argv and str(folder).encode() in argv and state not in ("Z", "X"):
            out.append(int(entry))
    return out


def test_one_worker_serves_every_message_and_a_killed_one_is_replaced(tmp_path):
    """Three nodes sharing one state folder, pf2lora, 3 rounds with an evaluation after each: the
    local engine's numbers; one worker answers all messages; killed after round 1, the next
    message starts a new one, and the run's numbers do not change; shutdown ends it."""
    cfg, task = small_task(
        "rounds=3", "task.num_clients=3", "task.private_ranks=[0,1,2]", "num_threads=1", "eval.every=1", methods_override(["pf2lora"])
    )
    folder = tmp_path / "nodes"
    seen: list[list[int]] = []

    def on_round(record):
        seen.append(_workers(folder))
        if record["round"] == 1:
            for pid in seen[-1]:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(seen[-1]), "the killed worker to end", timeout=20)

    try:
        app = make_client_app(cfg, folder, node_cache=True)
        (flower,) = FlowerServer(cfg, task, InProcessGrid(app, len(task.clients)), on_round=on_round).run()
        after = _workers(folder)
    finally:
        nodeworker.shutdown(folder)
    (local,) = [LocalEngine(cfg, task, progress=False).run("pf2lora")]
    assert flower.rounds == local.rounds
    assert flower.clients == local.clients
    assert len(seen[0]) == 1 and len(seen[1]) == len(seen[2]) == 1 and seen[1] != seen[0]  # a new one after the kill
    assert after == seen[2]  # the same worker to the end
    wait_for(lambda: not _workers(folder), "the worker to end on shutdown", timeout=20)


def test_a_worker_error_is_the_message_error_and_the_worker_stays(tmp_path):
    """A message the worker cannot answer (a client this node does not play) comes back as the
    message's one-line error; the worker keeps serving."""
    from flwr.app import Message

    from pf2lora.engines.flower.messages import EvaluateIns

    cfg, task = small_task("rounds=1", "task.num_clients=2", "task.private_ranks=[0,1]", "num_threads=1", methods_override(["pf2lora"]))
    folder = tmp_path / "node"
    grid = InProcessGrid(make_client_app(cfg, folder, node_cache=True), 2)
    try:
        ins = EvaluateIns("pf2lora", "run", "client_1", 1, -1, {}, state_of="client_1")
        (reply,) = grid.send_and_receive([Message(ins.content(), dst_node_id=1000, message_type="evaluate")])
        assert reply.has_error() and "does not serve client 'client_1'" in reply.error.reason
        assert "\n" not in reply.error.reason
        (first,) = _workers(folder)
        (again,) = grid.send_and_receive([Message(ins.content(), dst_node_id=1000, message_type="evaluate")])
        assert again.has_error() and _workers(folder) == [first]
    finally:
        nodeworker.shutdown(folder)


def test_a_worker_that_ends_as_a_message_arrives_is_replaced_and_asked_again(tmp_path):
    """A worker that accepts the connection and ends without answering (killed at that moment):
    the ClientApp starts a new worker and asks again, so the message gets its answer."""
    import socket
    import threading

    from flwr.app import Message

    from pf2lora.engines.flower.messages import EvaluateIns

    cfg, _ = small_task("rounds=1", "task.num_clients=2", "task.private_ranks=[0,1]", "num_threads=1", methods_override(["pf2lora"]))
    folder = tmp_path / "node"
    path = nodeworker._name(folder).with_suffix(".sock")
    path.unlink(missing_ok=True)
    dying = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dying.bind(str(path))
    dying.listen(1)

    def die() -> None:  # take the connection, then end without a word
        conn, _ = dying.accept()
        # as a process's death does: the listener is gone by the time the client sees its
        # connection end (closed the other way round, the client's second try could connect to
        # the still-listening socket and be reset with it: a race the test lost under load)
        dying.close()
        path.unlink(missing_ok=True)
        conn.close()

    thread = threading.Thread(target=die, daemon=True)
    thread.start()
    grid = InProcessGrid(make_client_app(cfg, folder, node_cache=True), 2)
    try:
        ins = EvaluateIns("pf2lora", "run", "client_1", 1, -1, {}, state_of="client_1")
        (reply,) = grid.send_and_receive([Message(ins.content(), dst_node_id=1000, message_type="evaluate")])
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert reply.has_error() and "does not serve client 'client_1'" in reply.error.reason  # answered by a real worker
        assert len(_workers(folder)) == 1
    finally:
        nodeworker.shutdown(folder)

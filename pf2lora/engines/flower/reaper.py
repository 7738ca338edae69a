"""The processes of a loopback federation end with the ``pf2lora run`` that started them.

Flower's SuperLink, SuperNodes and ``flwr run`` are started in sessions of their own, and so are
the SuperExec, ServerApp and ClientApp processes they start: none of them dies with their parent.
``deploy.Processes.stop`` ends them all when the run ends, fails or is interrupted; this module
covers the case where it cannot run (``pf2lora run`` killed with SIGKILL):

* a **watchdog** (:func:`watch`, a small process of its own started with the federation) learns the
  process tree every 0.2 s from the pids ``Processes`` records in ``WORKDIR/processes.json``, and
  when its parent dies it freezes and kills the whole tree;
* the same watchdog, told no folder, guards ``flower-sim``: it kills what appeared below the
  ``pf2lora run`` process after it started (Ray's processes, whose agents outlive a killed driver);
* a new federation in the same folder (``pf2lora run --resume``) first ends whatever the record
  still names (:func:`reap`), should the watchdog have been killed too.

A recorded process is identified by (pid, start time), so a pid the system has since reused is
never touched. Light to import (no torch, no Flower): the watchdog starts in a blink. Linux only
(``/proc``), as the loopback federation's process handling already is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

RECORD = "processes.json"
"""The file, in the federation's work folder, naming the processes it started (pid -> start time)."""


def proc_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, start time) of every process (Linux /proc)."""
    table: dict[int, tuple[int, str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def descendants(roots: Iterable[int], table: dict[int, tuple[int, str, int]] | None = None) -> set[int]:
    """``roots`` and every live process below them."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def alive(pids: Iterable[int]) -> list[int]:
    """The processes among ``pids`` that still run (zombies count as ended)."""
    table = proc_table()
    return [p for p in pids if p in table and table[p][1] not in ("Z", "X")]


def start_time(pid: int) -> int | None:
    entry = proc_table().get(pid)
    return None if entry is None else entry[2]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(known: dict[int, int]) -> None:
    """Kill every process of ``known`` (pid -> start time) that is still that process, and every
    process below them: frozen first (SIGSTOP, so none starts another meanwhile), then SIGKILL."""
    me = os.getpid()
    tree: set[int] = set()
    for _ in range(50):
        table = proc_table()
        live = {p for p, (_, state, _) in table.items() if state not in ("Z", "X") and p != me}
        mine = {p for p, t in known.items() if p in live and table[p][2] == t}
        tree = descendants(mine, table) & live
        if not tree:
            return
        for p in tree:
            known.setdefault(p, table[p][2])
            _signal(p, signal.SIGSTOP)
        table = proc_table()
        grown = {p for p in descendants(tree, table) if table.get(p, (0, "Z", 0))[1] not in ("Z", "X")} - tree
        if not grown:  # nothing new below the frozen tree: end it
            for p in tree:
                _signal(p, signal.SIGKILL)
        time.sleep(0.05)
    for p in tree:  # still growing after 50 tries (never seen): kill what there is
        _signal(p, signal.SIGKILL)


def record(folder: Path, pids: Iterable[int]) -> None:
    """Name ``pids`` (and their start times) in ``folder/processes.json``, atomically."""
    from pf2lora.io import atomic_write

    table = proc_table()
    known = {str(p): table[p][2] for p in pids if p in table}
    atomic_write(folder / RECORD, json.dumps({"parent": os.getpid(), "processes": known}), fsync=False)


def recorded(folder: Path, parent: int | None = None) -> dict[int, int]:
    """The processes ``folder``'s record names (pid -> start time); with ``parent``, only if that
    process wrote it (a new federation in the same folder writes its own)."""
    try:
        data = json.loads((folder / RECORD).read_text())
        if parent is not None and int(data.get("parent", -1)) != parent:
            return {}
        return {int(p): int(t) for p, t in data.get("processes", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def reap(folder: Path) -> None:
    """End what a previous federation in ``folder`` left running (its ``pf2lora run`` was killed,
    and its watchdog too). A record whose writer still runs is left alone."""
    try:
        writer = int(json.loads((folder / RECORD).read_text()).get("parent", -1))
    except (OSError, ValueError, AttributeError, TypeError):
        return
    if writer != os.getpid() and alive([writer]):
        return
    known = recorded(folder)
    if known:
        kill_tree(known)
    (folder / RECORD).unlink(missing_ok=True)


def watch(parent: int, folder: Path | None, poll_s: float = 0.2) -> None:
    """The watchdog: while ``parent`` lives, learn the tree below the processes recorded in
    ``folder`` (None: every process that appears below ``parent`` after the watchdog started, e.g.
    Ray's); once the parent is gone, kill that tree. Ends by itself when the parent removed the record."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    me = os.getpid()
    table = proc_table()
    before = {(p, table[p][2]) for p in descendants([parent], table) if p in table}
    known: dict[int, int] = {}
    while os.getppid() == parent:
        table = proc_table()
        if folder is None:
            roots = {p: table[p][2] for p in descendants([parent], table) if p in table and (p, table[p][2]) not in before}
        else:
            roots = recorded(folder, parent)
            if not roots and known:
                return  # the parent stopped its federation itself (its record is gone)
        live = {p for p, t in {**known, **roots}.items() if p in table and table[p][2] == t}
        for p in descendants(live, table):
            if p in table and p not in (me, parent):
                known.setdefault(p, table[p][2])
        time.sleep(poll_s)
    kill_tree({**known, **(recorded(folder, parent) if folder is not None else {})})


def start_watchdog(folder: Path | None, environ: dict[str, str] | None = None) -> subprocess.Popen:
    """Start :func:`watch` over ``folder`` (None: over what this process starts from now on) for this process."""
    code = (
        "import sys; from pathlib import Path; from pf2lora.engines.flower.reaper import watch; "
        "watch(int(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(os.getpid()), str(folder) if folder is not None else ""],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environ,
        start_new_session=True,
    )


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    """End a watchdog whose parent ended what it watched itself."""
    watchdog.terminate()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()

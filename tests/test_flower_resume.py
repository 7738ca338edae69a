"""Resume on the Flower engines: the server checkpoints after every round, a resumed server continues
from it with the nodes' own saved states, and the run ends as an uninterrupted one.

Fast tests drive the real ServerApp / ClientApp code through the in-process Grid, interrupted at a
chosen point; slow ones kill a real ``pf2lora run --engine flower-*`` and resume it with the CLI.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'pf2lora[flower]')")

import torch

from conftest import SYNTH_CFG, free_port, methods_override, read_metrics, read_summary, sets, small_task, start_run_holding, wait_for
from pf2lora import checkpoint
from pf2lora.engines.flower import FlowerEngineError
from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.inprocess import InProcessGrid
from pf2lora.engines.flower.reaper import alive
from pf2lora.engines.flower.resume import ServerCheckpoint, decode, encode
from pf2lora.engines.flower.runtime import register_task
from pf2lora.engines.flower.server import FlowerServer
from pf2lora.engines.flower.store import NodeStateMismatch, NodeStore

HEADER = {"version": 1, "engine": "flower-sim"}
CHAOS = (
    "rounds=4",
    "task.num_clients=6",
    "task.private_ranks=[0,1,2]",
    "num_threads=1",
    "seed=5",
    "client_fraction=0.8",
    "faults.dropout_prob=0.15",
    "faults.crash_prob=0.15",
    'faults.poison_clients=["client_1"]',
    "eval.every=1",
)
"""Sampling, dropouts, crashes and a NaN client every round: which round each client last counted differs."""


class Interrupted(Exception):
    pass


class StopAfter(ServerCheckpoint):
    """A checkpoint whose run dies at ``METHOD:ROUND``: right after writing it (``before=False``), or
    after that round's evaluation but before its checkpoint is written (``before=True``: the nodes
    have already committed that round)."""

    def __init__(self, *args, stop: str, before: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop, self.before = stop, before

    def on_state(self, state):
        here = f"{state.method}:{state.round}" == self.stop
        if here and self.before:
            raise Interrupted(self.stop)
        super().on_state(state)
        if here:
            raise Interrupted(self.stop)


def _server(cfg, task, state_dir, checkpoint=None):
    register_task(cfg, task)
    return FlowerServer(cfg, task, InProcessGrid(make_client_app(cfg, state_dir), len(task.clients)), checkpoint=checkpoint)


def _same(a, b):
    assert [r.method for r in a] == [r.method for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.rounds == y.rounds, x.method
        assert x.faults == y.faults, x.method
        assert x.clients == y.clients, x.method  # the same float operations: bit for bit
        assert x.privacy == y.privacy, x.method


@pytest.mark.parametrize("before", [False, True], ids=["after-checkpoint", "after-evaluation-before-checkpoint"])
def test_a_resumed_server_ends_as_an_uninterrupted_run(tmp_path, before):
    """Interrupted in the second method's round 2 (with its checkpoint written, or after the nodes
    committed that round but before its checkpoint), a new server from the checkpoint file with new
    client apps over the same state folder gives the uninterrupted run's records and per-client
    metrics bit for bit; the finished method's result comes from the checkpoint."""
    cfg, task = small_task(*CHAOS, methods_override(["pf2lora", "hetlora", "fdlora"]))
    reference = _server(cfg, task, tmp_path / "ref").run()
    assert any(f["fault"] in ("dropped", "crashed") for r in reference for f in r.faults)

    path = tmp_path / "checkpoint.pt"
    first = StopAfter(HEADER, path=path, stop="hetlora:2", before=before)
    with pytest.raises(Interrupted):
        _server(cfg, task, tmp_path / "state", first).run()
    saved = torch.load(path, weights_only=True)
    assert saved["engine"] == "flower-sim" and saved["run_key"] == first.run_key
    assert [r["method"] for r in saved["completed"]] == ["pf2lora"]
    assert saved["current"]["method"] == "hetlora" and saved["current"]["round"] == (1 if before else 2)
    assert saved["current"]["clients"] == {}  # client states stay on the nodes
    assert saved["current"]["accepted"]

    again = ServerCheckpoint.resumed(saved, HEADER, path=path)
    _same(reference, _server(cfg, task, tmp_path / "state", again).run())
    done = torch.load(path, weights_only=True)
    assert [r["method"] for r in done["completed"]] == cfg.methods and done["current"] is None


def test_a_node_without_the_runs_state_stops_the_resumed_run_with_one_line(tmp_path):
    """Resumed over an empty state folder (the nodes' files lost, or another folder), the first node
    asked for a counted round refuses, and the run stops naming the client instead of training
    from the initial state."""
    cfg, task = small_task(*CHAOS, methods_override(["pf2lora"]))
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted):
        _server(cfg, task, tmp_path / "state", StopAfter(HEADER, path=path, stop="pf2lora:2")).run()
    again = ServerCheckpoint.resumed(torch.load(path, weights_only=True), HEADER, path=path)
    with pytest.raises(FlowerEngineError, match=r"pf2lora round 3: the node of client_\d cannot continue: .*no saved state") as e:
        _server(cfg, task, tmp_path / "elsewhere", again).run()
    assert "\n" not in str(e.value)


def test_the_node_store_steps_back_one_commit_and_refuses_anything_else(tmp_path):
    store = NodeStore(tmp_path)
    a, b, c = ({"private:x": torch.full((2,), float(v))} for v in (1, 2, 3))
    store.save_pending("run", "m", "c", 1, a)
    store.resolve("run", "m", "c", 1)
    store.save_pending("run", "m", "c", 3, b)
    store.resolve("run", "m", "c", 3)  # committed round 3 (an evaluation after it, say) ...
    assert store.committed_round("run", "m", "c") == 3
    store.resolve("run", "m", "c", 1)  # ... but the server resumed from its checkpoint of round 2
    assert store.committed_round("run", "m", "c") == 1 and torch.equal(store.load("run", "m", "c")["private:x"], a["private:x"])
    store.save_pending("run", "m", "c", 3, c)
    store.resolve("run", "m", "c", 3)
    assert torch.equal(store.load("run", "m", "c")["private:x"], c["private:x"])
    with pytest.raises(NodeStateMismatch, match="saved state of round 3 .* last counted its round 0"):
        store.resolve("run", "m", "c", 0)  # two commits back: not kept, refused
    with pytest.raises(NodeStateMismatch, match="no saved state"):
        store.resolve("run", "m", "other", 2)
    # a first commit the server never saw: back to the initial state
    store.save_pending("run", "m", "d", 1, a)
    store.resolve("run", "m", "d", 1)
    store.resolve("run", "m", "d", -1)
    assert store.load("run", "m", "d") is None


def test_a_checkpoint_travels_as_one_ascii_line():
    payload = {"version": 1, "current": {"server": {"shared:w": torch.arange(3.0)}, "round": 2}, "completed": []}
    line = encode(payload)
    assert b"\n" not in line and line.isascii()
    back = decode(line.decode())
    assert torch.equal(back["current"]["server"]["shared:w"], payload["current"]["server"]["shared:w"])


# -- the CLI, killed and resumed ------------------------------------------------------------------

DEPLOY = (
    "rounds=2",
    "task.num_clients=2",
    "task.dim=8",
    "task.shared_rank=2",
    "task.private_ranks=[0,1]",
    "task.train_samples=32",
    "task.test_samples=32",
    "lora.rank=2",
    "lora.alpha=2.0",
    "lora.private_rank=1",
    "lora.private_alpha=1.0",
    "num_threads=1",
    'methods=["pf2lora"]',
)


def _tree(pid: int) -> list[int]:
    from pf2lora.engines.flower.reaper import alive, descendants

    return [p for p in alive(descendants([pid])) if p != pid]


def _same_summary(local_dir, flower_dir, engine):
    a, b = read_summary(local_dir), read_summary(flower_dir)
    assert b["engine"] == engine
    assert a["methods"].keys() == b["methods"].keys()
    for name, m in a["methods"].items():
        for cid, metrics in m["clients"].items():
            for k, v in metrics.items():
                w = b["methods"][name]["clients"][cid][k]
                assert w == pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else w == v, (name, cid, k)
    la, lb = read_metrics(local_dir), read_metrics(flower_dir)
    assert [(r["method"], r["round"]) for r in la] == [(r["method"], r["round"]) for r in lb]
    assert [r["train_loss"] for r in la] == pytest.approx([r["train_loss"] for r in lb], rel=1e-5)


@pytest.mark.slow
def test_sigkill_of_a_flower_deploy_run_then_resume_gives_the_uninterrupted_summary(tmp_path):
    """`pf2lora run --engine flower-deploy` (a loopback SuperLink + 2 SuperNodes) killed with SIGKILL
    while its ServerApp holds after checkpointing round 1: its watchdog ends every Flower process;
    `pf2lora run --resume` (no --engine: read from the run) starts a new loopback federation whose
    nodes find their state, and writes the summary of an uninterrupted run (the local engine's, which
    an uninterrupted flower-deploy run equals: tests/test_flower.py); nothing is left running."""
    from pf2lora.cli import main

    assert main(["run", SYNTH_CFG, "--quiet", *sets(*DEPLOY), "--out", str(tmp_path / "local")]) == 0
    out = tmp_path / "killed"
    proc = start_run_holding([SYNTH_CFG, "--quiet", *sets(*DEPLOY), "--engine", "flower-deploy", "--out", str(out)], hold="pf2lora:1")
    flower_procs = _tree(proc.pid)
    assert len(flower_procs) >= 5  # SuperLink, 2 SuperNodes, flwr run, the watchdog (and what they started)
    saved = checkpoint.load(out)
    assert saved["engine"] == "flower-deploy" and saved["current"]["round"] == 1 and len(saved["metrics_lines"]) == 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_for(lambda: not alive(flower_procs), "the killed run's Flower processes to exit", timeout=30)
    assert not (out / "summary.json").exists()

    before = set(_tree(os.getpid()))
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_summary(tmp_path / "local", out, "flower-deploy")
    assert sorted(p.name for p in (out / "flower" / "state").iterdir()) == ["node-0", "node-1"]
    wait_for(lambda: set(_tree(os.getpid())) <= before, "the resumed run's Flower processes to exit", timeout=30)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # Ray's notice about accelerator env vars
def test_sigkill_of_a_flower_sim_run_then_resume_gives_the_uninterrupted_summary(tmp_path):
    """The same on flower-sim: the simulated nodes' states live in RUN/flower/state (checkpointing
    on, no flower.state_dir), so the resumed simulation finds them; no Ray process left behind."""
    from pf2lora.cli import main

    run = [SYNTH_CFG, "--quiet", *sets(*DEPLOY, "rounds=3")]
    assert main(["run", *run, "--out", str(tmp_path / "local")]) == 0
    out = tmp_path / "killed"
    proc = start_run_holding([*run, "--engine", "flower-sim", "--out", str(out)], hold="pf2lora:2")
    ray_procs = _tree(proc.pid)
    assert checkpoint.load(out)["current"]["round"] == 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_for(lambda: not alive(ray_procs), "the killed run's Ray processes to exit", timeout=60)

    before = set(_tree(os.getpid()))
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _same_summary(tmp_path / "local", out, "flower-sim")
    assert (out / "flower" / "state").is_dir()
    wait_for(lambda: set(_tree(os.getpid())) <= before, "Ray's processes to exit", timeout=60)


def test_resume_keeps_the_runs_engine(tmp_path, capsys):
    """A run continues on the engine it was started with: --resume with another --engine is one line."""
    from pf2lora.cli import main

    out = tmp_path / "run"
    assert main(["run", SYNTH_CFG, "--quiet", *sets(*DEPLOY), "--out", str(out)]) == 0
    assert checkpoint.load(out)["engine"] == "local"
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--engine", "flower-sim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started with --engine local" in err[0]


@pytest.mark.slow
def test_a_run_on_an_existing_superlink_resumes_on_it(tmp_path):
    """`--superlink`: the ServerApp runs under a SuperLink started elsewhere (here: by the test, on
    loopback, with 2 SuperNodes and their own state-dir), so its checkpoints come back through its
    log. Killed while the ServerApp holds after round 1, `pf2lora run --resume` submits to the same
    SuperLink (its address read from the checkpoint), whose nodes kept their state: the summary of an
    uninterrupted run."""
    import sys

    from pf2lora.cli import main
    from pf2lora.engines.flower import env
    from pf2lora.engines.flower.deploy import Processes, _bin, _wait_listening

    (tmp_path / "logs").mkdir()
    environ = env.child_env(
        FLWR_HOME=str(tmp_path / "home"),
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.5",
        PF2LORA_TEST_HOLD_AFTER="pf2lora:1",  # the ServerApp runs under the SuperLink: it holds there
    )
    federation = Processes(tmp_path / "logs", environ)
    try:
        port = free_port()
        link = federation.start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)])
        _wait_listening(federation, "superlink", link, port, 60)
        for i in range(2):
            node = f'partition-id={i} num-partitions=2 state-dir="{tmp_path / f"node-{i}"}"'
            federation.start(
                f"supernode-{i}",
                [
                    _bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node,
                ],
            )
        assert main(["run", SYNTH_CFG, "--quiet", *sets(*DEPLOY), "--out", str(tmp_path / "local")]) == 0
        out = tmp_path / "run"
        args = [SYNTH_CFG, "--quiet", *sets(*DEPLOY), "--engine", "flower-deploy", "--superlink", f"127.0.0.1:{port}", "--out", str(out)]
        proc = start_run_holding(args, hold="pf2lora:1")
        saved = checkpoint.load(out)
        assert saved["superlink"] == f"127.0.0.1:{port}" and saved["current"]["round"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert main(["run", "--resume", str(out), "--quiet"]) == 0
        _same_summary(tmp_path / "local", out, "flower-deploy")
        assert list((tmp_path / "node-0").glob(f"{saved['run_key']}/pf2lora/client_0.pt"))  # the same run key's state
    finally:
        federation.stop()
    wait_for(lambda: not alive(federation.seen), "the federation's processes to exit", timeout=30)

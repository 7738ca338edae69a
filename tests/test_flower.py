"""The Flower engine: same numbers as the local engine, only shared tensors travel, bad uploads are
rejected and the round carries on, a deployed federation leaves no process behind.

Fast tests drive the real ServerApp / ClientApp code through an in-process Grid; a few run
Flower's simulation runtime (Ray) and one (slow) a loopback deployment (SuperLink + 2 SuperNodes).
"""

from __future__ import annotations

import math
import os
import socket

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install 'pf2lora[flower]')")

import torch

from conftest import ALL_METHODS, SYNTH_CFG, free_port, methods_override, read_summary, sets, small_task, wait_for
from pf2lora import state as st
from pf2lora.engines.flower import FlowerEngineError
from pf2lora.engines.flower.client import make_client_app
from pf2lora.engines.flower.inprocess import InProcessGrid
from pf2lora.engines.flower.runtime import register_task
from pf2lora.engines.flower.server import FlowerServer
from pf2lora.engines.flower.store import NodeStore
from pf2lora.engines.local import LocalEngine, RoundFailure
from pf2lora.engines.rounds import mean_of

TINY = ("rounds=2", "task.num_clients=3", "task.private_ranks=[0,1,2]", "num_threads=1")


def _local(cfg, task):
    return [LocalEngine(cfg, task, progress=False).run(m) for m in cfg.methods]


def _inprocess(cfg, task, tmp_path, grid_factory=None):
    register_task(cfg, task)
    app = make_client_app(cfg, tmp_path)
    grid = grid_factory(app) if grid_factory else InProcessGrid(app, len(task.clients))
    return FlowerServer(cfg, task, grid).run()


def _faults(result):
    return [(f["round"], f["client"], f["fault"]) for f in result.faults]


def _assert_close(a, b, tol=1e-5):
    """Per-client metrics equal to ``tol`` (numbers), exactly otherwise."""
    assert a.keys() == b.keys()
    for cid in a:
        assert a[cid].keys() == b[cid].keys(), cid
        for k, v in a[cid].items():
            w = b[cid][k]
            if isinstance(v, float) and isinstance(w, float) and not (math.isnan(v) and math.isnan(w)) or isinstance(v, list):
                assert w == pytest.approx(v, rel=tol, abs=tol), (cid, k)
            else:
                assert v == w or (isinstance(v, float) and math.isnan(v) and math.isnan(w)), (cid, k)


# -- the server and client apps in-process: every method, faults, validation ----------------------


def test_every_method_matches_the_local_engine(tmp_path):
    cfg, task = small_task(*TINY, methods_override(ALL_METHODS), "eval.every=1", "client_fraction=0.7")
    for a, b in zip(_local(cfg, task), _inprocess(cfg, task, tmp_path), strict=True):
        assert a.rounds == b.rounds, a.method
        _assert_close(a.clients, b.clients, tol=0.0)  # the same float operations: bit for bit


def test_nodes_keep_their_clients_adapters_and_the_server_writes_only_the_global_one(tmp_path):
    """The personalised adapters a node writes are the ones the local engine writes (same bytes);
    the server's folder holds the global adapter and nothing of any client."""
    from pf2lora.engines.rounds import save_adapters
    from pf2lora.methods import registry

    cfg, task = small_task(*TINY, methods_override(["pf2lora", "homlora"]))
    register_task(cfg, task)
    nodes, server_root = tmp_path / "nodes", tmp_path / "server"
    FlowerServer(cfg, task, InProcessGrid(make_client_app(cfg, nodes), len(task.clients)), adapters_root=server_root).run()
    for name in cfg.methods:
        states = []
        LocalEngine(cfg, task, progress=False).run(name, on_state=states.append)
        s = states[-1]
        local_root = tmp_path / "local"
        save_adapters(local_root, cfg, task, registry()[name](cfg, task), s.server, s.clients, s.round)
        assert sorted(p.name for p in (server_root / name).iterdir()) == ["global"]
        for c in task.clients:
            for f in ("adapter_model.safetensors", "adapter_config.json"):
                node_file = nodes / "adapters" / name / c.client_id / f
                assert node_file.read_bytes() == (local_root / name / c.client_id / f).read_bytes(), (name, c.client_id, f)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (server_root / name / "global" / f).read_bytes() == (local_root / name / "global" / f).read_bytes()


@pytest.mark.parametrize(
    "overrides",
    [
        (
            methods_override(["pf2lora", "hetlora", "fdlora"]),
            "task.num_clients=6",
            "seed=5",
            "client_fraction=0.8",
            "faults.dropout_prob=0.15",
            "faults.crash_prob=0.15",
        ),
        (methods_override(["centralized", "perfedavg"]), "client_fraction=0.7"),
    ],
)
def test_method_strategy_through_flowers_own_start_gives_the_local_numbers(tmp_path, overrides):
    """MethodStrategy is Flower's typed Strategy interface over the same round code: Flower's own
    ``Strategy.start`` drives it, and every method's rounds, faults and per-client metrics equal
    the local engine's (a pooled method too: its clients are all evaluated on node 0)."""
    from flwr.app import ArrayRecord

    from pf2lora.engines.flower.strategy import MethodStrategy

    cfg, task = small_task(*TINY, "eval.every=1", *overrides)
    register_task(cfg, task)
    grid = InProcessGrid(make_client_app(cfg, tmp_path), len(task.clients))
    runs = _local(cfg, task)
    if any(o.startswith("faults.") for o in overrides):
        assert any(r.faults for r in runs)  # the faults path is exercised
    for local in runs:
        strategy = MethodStrategy(cfg, local.method, task)
        flwr_result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds)
        mine = strategy.result()
        assert mine.rounds == local.rounds, local.method
        assert _faults(mine) == _faults(local)
        _assert_close(local.clients, mine.clients, tol=0.0)
        assert sorted(flwr_result.train_metrics_clientapp) == list(range(1, cfg.rounds + 1))
        assert set(flwr_result.arrays) == set(strategy.server_state)
        final = flwr_result.evaluate_metrics_clientapp[cfg.rounds]
        assert final[f"mean_{task.primary_metric}"] == pytest.approx(mean_of(local.clients, task.primary_metric))


def test_method_strategy_refuses_secure_aggregation():
    from pf2lora.engines.flower.strategy import MethodStrategy

    cfg, task = small_task(*TINY, "server.secure_aggregation=true")
    with pytest.raises(ValueError, match="secure_aggregation"):
        MethodStrategy(cfg, "homlora", task)


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "task.num_clients=6",
            "seed=5",
            "rounds=4",
            "faults.dropout_prob=0.15",
            "faults.crash_prob=0.15",
            "faults.straggler_prob=0.2",
            "faults.straggler_delay_s=5.0",
            "faults.deadline_s=2.0",
            'faults.poison_clients=["client_1"]',
        ),
        ("server.dp_noise_multiplier=0.5", "server.aggregator=median"),
        ('faults.poison_clients=["client_0"]', "faults.poison=scale", "server.clip_norm=0.5", "server.aggregator=trimmed-mean"),
    ],
)
def test_faults_and_robust_aggregation_match_the_local_engine(tmp_path, overrides):
    cfg, task = small_task(*TINY, methods_override(["pf2lora", "hetlora", "flexlora"]), *overrides)
    for a, b in zip(_local(cfg, task), _inprocess(cfg, task, tmp_path), strict=True):
        assert a.rounds == b.rounds and a.clients == b.clients and a.privacy == b.privacy, a.method
        assert _faults(a) == _faults(b)


def test_a_restarted_node_keeps_its_private_state(tmp_path):
    """A fresh ClientApp (a new process, as a deployed SuperNode runs one per message) for every
    message: the private state lives on disk, so the numbers do not change."""
    cfg, task = small_task(*TINY, "rounds=3", methods_override(["pf2lora", "hetlora"]))

    class FreshAppGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            self.app = make_client_app(cfg, tmp_path / "state")
            return super().send_and_receive(messages, timeout=timeout)

    flower = _inprocess(cfg, task, tmp_path / "state", lambda app: FreshAppGrid(app, len(task.clients)))
    for a, b in zip(_local(cfg, task), flower, strict=True):
        assert a.rounds == b.rounds and a.clients == b.clients


class TamperingGrid(InProcessGrid):
    """Replaces chosen clients' uploads in chosen rounds (a malicious or broken node)."""

    def __init__(self, app, n, attacks):
        super().__init__(app, n)
        self.attacks = attacks  # (round, client) -> function(arrays dict) -> arrays dict
        self.seen: list = []

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Array, ArrayRecord

        replies = super().send_and_receive(messages, timeout=timeout)
        sent = {m.metadata.dst_node_id: m for m in messages}
        for r in replies:
            if r.has_error() or r.metadata.message_type != "train":
                continue
            c = sent[r.metadata.src_node_id].content["config"]
            attack = self.attacks.get((int(c["round"]), str(c["client_id"])))
            if attack is not None:
                arrays = {k: v.numpy() for k, v in r.content["arrays"].items()}
                r.content["arrays"] = ArrayRecord({k: Array(v) for k, v in attack(arrays).items()})
        return replies


def test_the_server_rejects_private_keys_wrong_shapes_and_nan_and_carries_on(tmp_path):
    import numpy as np

    cfg, task = small_task(*TINY, "rounds=4", methods_override(["pf2lora", "hetlora"]))

    def leak(a):
        return {**a, "private:proj.lora_A.private": np.zeros((1, 8), np.float32)}

    def reshape(a):
        k = next(k for k in a if ".lora_A." in k)
        return {**a, k: np.zeros((a[k].shape[0], a[k].shape[1] + 1), np.float32)}

    def nan(a):
        return {k: np.full_like(v, np.nan) for k, v in a.items()}

    def rename(a):
        return {k.replace("shared:", "private:"): v for k, v in a.items()}

    attacks = {(1, "client_0"): leak, (2, "client_1"): reshape, (3, "client_2"): nan, (4, "client_0"): rename}
    results = _inprocess(cfg, task, tmp_path, lambda app: TamperingGrid(app, len(task.clients), attacks))
    for result in results:
        assert len(result.rounds) == 4  # the run carried on
        rejected = {(f["round"], f["client"]): f["reason"] for f in result.faults if f["fault"] == "rejected"}
        assert set(rejected) == set(attacks), result.method
        assert "outside 'shared:'" in rejected[(1, "client_0")]
        assert "shape" in rejected[(2, "client_1")]
        assert "non-finite" in rejected[(3, "client_2")]
        assert "outside 'shared:'" in rejected[(4, "client_0")]
        assert [r["participants"] for r in result.rounds] == [2, 2, 2, 2]
        assert all(math.isfinite(m["test_mse"]) for m in result.clients.values())

    # min_clients is enforced on what survives validation
    cfg3, task3 = small_task(*TINY, methods_override(["pf2lora"]), "server.min_clients=3")
    with pytest.raises(RoundFailure, match="fewer than server.min_clients = 3"):
        _inprocess(cfg3, task3, tmp_path / "b", lambda app: TamperingGrid(app, 3, {(1, "client_1"): nan}))


def test_a_rejected_upload_leaves_the_client_state_at_its_last_good_round(tmp_path):
    """NaN uploads of client_1 in every round: the run equals the local engine's with the same
    client poisoned (whose state also never advances)."""
    import numpy as np

    cfg, task = small_task(*TINY, "rounds=3", methods_override(["pf2lora"]))
    attacks = {(r, "client_1"): (lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}) for r in (1, 2, 3)}
    flower = _inprocess(cfg, task, tmp_path, lambda app: TamperingGrid(app, len(task.clients), attacks))
    cfg_p, _ = small_task(*TINY, "rounds=3", methods_override(["pf2lora"]), 'faults.poison_clients=["client_1"]')
    (local,) = _local(cfg_p, task)
    assert flower[0].clients == local.clients


def test_the_evaluation_after_a_round_rides_on_the_next_train_message(tmp_path):
    """eval.every=1: one message per client and round (what a client is sent to train in round
    R+1 is what it would be sent to evaluate after round R, so it evaluates first), an evaluate
    message only for the clients not sampled and for the final evaluation; with injected crashes
    (after the evaluation) the local engine's round records and metrics, bit for bit."""
    cfg, task = small_task(*TINY, "rounds=4", "eval.every=1", "client_fraction=0.7", "faults.crash_prob=0.3", methods_override(["pf2lora"]))
    sent: list[tuple[str, str, int, int]] = []  # (type, client, round, evaluate_round) of every message

    class Counting(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type in ("train", "evaluate"):
                    c = m.content["config"]
                    sent.append((m.metadata.message_type, str(c["client_id"]), int(c["round"]), int(c.get("evaluate_round", -1))))
            return super().send_and_receive(messages, timeout=timeout)

    (flower,) = _inprocess(cfg, task, tmp_path, lambda app: Counting(app, len(task.clients)))
    (local,) = _local(cfg, task)
    assert flower.rounds == local.rounds and all("eval" in r for r in flower.rounds[:3])
    _assert_close(local.clients, flower.clients, tol=0.0)
    assert any(f["fault"] == "crashed" for f in flower.faults)  # seeded: some folded messages crashed after evaluating
    trained = [(cid, r, e) for kind, cid, r, e in sent if kind == "train"]
    assert [e for _, r, e in trained] == [r - 1 if r > 1 else -1 for _, r, _ in trained]
    everyone = {c.client_id for c in task.clients}
    evaluated = {r: sorted(cid for kind, cid, rr, _ in sent if kind == "evaluate" and rr == r) for r in (1, 2, 3, 4)}
    for r in (1, 2, 3):
        in_next = {cid for cid, rr, _ in trained if rr == r + 1}
        assert in_next and evaluated[r] == sorted(everyone - in_next), r
    assert evaluated[4] == sorted(everyone)  # the final evaluation: every client


@pytest.mark.parametrize("every", [0, 1])
def test_a_lost_reply_counts_as_a_crash_and_keeps_the_state(tmp_path, monkeypatch, every):
    """client_0 trains in round 2 but its reply never arrives: the same numbers as a local run in
    which client_0 crashed in round 2 (its state stays at round 1). With eval.every=1 that reply
    also carried client_0's evaluation after round 1: it is asked for again on its own."""
    cfg, task = small_task(*TINY, "rounds=3", f"eval.every={every}", methods_override(["pf2lora"]))

    class Lossy(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            sent = {m.metadata.dst_node_id: m.content["config"] for m in messages}
            return [
                r
                for r in replies
                if not (
                    r.metadata.message_type == "train"
                    and sent[r.metadata.src_node_id]["client_id"] == "client_0"
                    and int(sent[r.metadata.src_node_id]["round"]) == 2
                )
            ]

    (flower,) = _inprocess(cfg, task, tmp_path, lambda app: Lossy(app, len(task.clients)))
    from pf2lora.engines import local as local_engine

    with monkeypatch.context() as m:
        real = local_engine.injected_fault
        m.setattr(local_engine, "injected_fault", lambda cfg, cid, r: ("crash", 0.0) if (cid, r) == ("client_0", 2) else real(cfg, cid, r))
        (local,) = _local(cfg, task)
    assert flower.clients == local.clients
    assert flower.rounds == local.rounds
    assert _faults(flower) == _faults(local) == [(2, "client_0", "crashed")]


def test_the_client_gate_stops_a_private_tensor_before_it_leaves(tmp_path, monkeypatch):
    from pf2lora.methods.base import ClientUpdate
    from pf2lora.methods.pf2lora import PF2LoRA

    original = PF2LoRA.client_update

    def leaky(self, ctx, received, client_state):
        update, new_state = original(self, ctx, received, client_state)
        if ctx.client.client_id == "client_2":  # a buggy method hands a private tensor to the engine
            private = {k: v for k, v in new_state.items() if k.startswith("private:")}
            update = ClientUpdate(update.client_id, {**update.shared, **private}, update.num_examples, update.metrics)
        return update, new_state

    monkeypatch.setattr(PF2LoRA, "client_update", leaky)
    cfg, task = small_task(*TINY, methods_override(["pf2lora"]))
    received: list = []

    class Recording(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            received.extend(replies)
            return replies

    (result,) = _inprocess(cfg, task, tmp_path, lambda app: Recording(app, len(task.clients)))
    crashed = [f for f in result.faults if f["fault"] == "crashed"]
    assert {f["client"] for f in crashed} == {"client_2"} and all("PrivacyViolation" in f["reason"] for f in crashed)
    for r in received:
        if r.has_content() and "arrays" in r.content:
            assert not [k for k in r.content["arrays"] if not k.startswith("shared:")]


def test_node_store_commits_only_accepted_rounds(tmp_path):
    store = NodeStore(tmp_path)
    a, b = {"private:x": torch.ones(2)}, {"private:x": torch.zeros(2)}
    assert store.load("run", "m", "c") is None
    store.save_pending("run", "m", "c", 1, a)
    store.resolve("run", "m", "c", 1)  # round 1 counted: committed
    assert torch.equal(store.load("run", "m", "c")["private:x"], a["private:x"])
    store.save_pending("run", "m", "c", 2, b)
    store.resolve("run", "m", "c", 1)  # round 2 not counted (rejected, lost): stays at round 1
    assert torch.equal(store.load("run", "m", "c")["private:x"], a["private:x"])
    store.resolve("run", "m", "c", 1)  # the same news again changes nothing
    assert torch.equal(store.load("run", "m", "c")["private:x"], a["private:x"])
    store.save_pending("run", "m", "c", 3, b)
    store.resolve("run", "m", "c", 3)
    assert torch.equal(store.load("run", "m", "c")["private:x"], b["private:x"])
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".pending.pt"))]


# -- errors ---------------------------------------------------------------------------------------


def test_deploy_errors_are_one_line(tmp_path):
    from pf2lora.engines.flower.deploy import run_flower_deploy

    cfg, _ = small_task(*TINY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(FlowerEngineError, match=f"port {busy} on 127.0.0.1 is in use"):
            run_flower_deploy(cfg, port=busy, workdir=tmp_path / "a")
    free = free_port()
    with pytest.raises(FlowerEngineError, match=f"cannot reach a SuperLink at 127.0.0.1:{free}"):
        run_flower_deploy(cfg, superlink=f"127.0.0.1:{free}", workdir=tmp_path / "b")
    with pytest.raises(FlowerEngineError, match="expected HOST:PORT"):
        run_flower_deploy(cfg, superlink="localhost", workdir=tmp_path / "c")


# -- Flower's runtimes ------------------------------------------------------------------------------


def _live_children() -> list[int]:
    from pf2lora.engines.flower.deploy import alive, descendants

    return [p for p in alive(descendants([os.getpid()])) if p != os.getpid()]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # Ray's notice about accelerator env vars
def test_flower_sim_matches_local_and_only_shared_tensors_travel():
    """Flower's simulation runtime (Ray), pf2lora and hetlora (heterogeneous ranks), client_2
    sending NaN every round: same per-client metrics as the local engine, every reply the server
    received holds only shared tensors, client_2 is rejected each round and the run carries on."""
    from pf2lora.engines.flower import run_flower_sim

    cfg, task = small_task(*TINY, methods_override(["pf2lora", "hetlora"]), 'faults.poison_clients=["client_2"]')
    before = set(_live_children())
    replies: list = []
    flower = run_flower_sim(cfg, task, on_reply=lambda kind, msg: replies.append((kind, msg)), num_cpus=2)
    local = _local(cfg, task)
    for a, b in zip(local, flower, strict=True):
        assert a.method == b.method
        _assert_close(a.clients, b.clients)
        assert [r["train_loss"] for r in a.rounds] == pytest.approx([r["train_loss"] for r in b.rounds], rel=1e-5)
        assert _faults(a) == _faults(b) == [(r, "client_2", "rejected") for r in (1, 2)]
        assert [r["participants"] for r in b.rounds] == [2, 2]
    train = [m for kind, m in replies if kind == "train" and not m.has_error()]
    assert len(train) == 2 * 2 * 3  # methods x rounds x clients
    for msg in train:
        keys = list(msg.content["arrays"].keys())
        assert keys and all(k.startswith(st.SHARED + ":") for k in keys), keys
    ranks = {tuple(m.content["arrays"][k].shape) for m in train for k in m.content["arrays"] if ".lora_A." in k}
    assert len(ranks) > 1  # hetlora's clients uploaded different ranks
    wait_for(lambda: set(_live_children()) <= before, "Ray's processes to exit")  # Ray is shut down


@pytest.mark.slow
def test_method_strategy_on_flowers_simulation_runtime(tmp_path):
    """MethodStrategy in a user's own ServerApp on Flower's simulation runtime (Ray): per-round
    records and per-client metrics equal the local engine's, a pooled method included (its
    evaluation sends every client's message to node 0 in one exchange)."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from pf2lora.engines.flower import MethodStrategy

    cfg, task = small_task(*TINY, methods_override(["pf2lora", "centralized"]), "eval.every=1", "client_fraction=0.7")
    got: dict = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name in cfg.methods:
            strategy = MethodStrategy(cfg, name, task)
            strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=cfg.rounds)
            got[name] = strategy.result()

    before = set(_live_children())
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"include_dashboard": False, "num_cpus": 2}}
    try:
        run_simulation(app, make_client_app(cfg, tmp_path), num_supernodes=len(task.clients), backend_config=backend)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    for local in _local(cfg, task):
        mine = got[local.method]
        assert mine.rounds == local.rounds, local.method
        _assert_close(local.clients, mine.clients, tol=0.0)
    wait_for(lambda: set(_live_children()) <= before, "Ray's processes to exit")


@pytest.mark.slow
def test_flower_deploy_on_loopback_matches_local_and_leaves_no_process(tmp_path):
    from pf2lora.engines.flower.deploy import alive, run_flower_deploy

    cfg, task = small_task(*TINY, "task.num_clients=2", "task.private_ranks=[0,1]", "eval.every=1", methods_override(["pf2lora"]))
    started: list[int] = []
    rounds: list[dict] = []
    (flower,) = run_flower_deploy(cfg, on_round=rounds.append, started=started, workdir=tmp_path, timeout_s=300)
    (local,) = _local(cfg, task)
    _assert_close(local.clients, flower.clients)
    assert rounds == flower.rounds and len(rounds) == 2 and "eval" in rounds[0]
    assert [r["train_loss"] for r in local.rounds] == pytest.approx([r["train_loss"] for r in flower.rounds], rel=1e-5)
    assert len(started) >= 4  # flwr run, SuperLink, 2 SuperNodes (and what they started)
    wait_for(lambda: alive(started) == [], f"the started processes to exit: {alive(started)}")
    for node in ("node-0", "node-1"):  # the node's model cache: one worker served all of its messages (5), then ended
        lines = (tmp_path / "state" / node / "node-worker.log").read_text().splitlines()
        assert len([line for line in lines if "serving" in line]) == 1, lines
    from pf2lora.engines.flower import nodeworker

    wait_for(lambda: all(nodeworker.worker_pid(tmp_path / "state" / n) is None for n in ("node-0", "node-1")), "the workers to end")


@pytest.mark.slow
def test_cli_flower_sim_gives_the_local_summary(tmp_path):
    """`pf2lora run ... --engine flower-sim` writes the same summary.json as `--engine local`."""
    from pf2lora.cli import main

    common = [
        "run",
        SYNTH_CFG,
        "--quiet",
        *sets(
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
            'methods=["pf2lora","hetlora"]',
        ),
    ]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--engine", "flower-sim", "--out", str(tmp_path / "sim")]) == 0
    a = read_summary(tmp_path / "local")
    b = read_summary(tmp_path / "sim")
    assert b["engine"] == "flower-sim"
    for name in ("pf2lora", "hetlora"):
        for cid, metrics in a["methods"][name]["clients"].items():
            for k, v in metrics.items():
                if isinstance(v, float):
                    assert math.isclose(v, b["methods"][name]["clients"][cid][k], rel_tol=1e-5, abs_tol=1e-7), (name, cid, k)


@pytest.mark.parametrize("args", [["--engine", "nope"], ["--superlink", "127.0.0.1:1"]])
def test_cli_engine_errors_are_one_line(tmp_path, capsys, args):
    from pf2lora.cli import main

    assert main(["run", SYNTH_CFG, *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("engine" in err[0] or "superlink" in err[0])
    assert not (tmp_path / "x").exists()

"""FFA-LoRA (A frozen, B averaged), FedSA-LoRA (A averaged, B private) and pFedLoRA (private part and
shared adapter trained in alternating phases): what each one trains, keeps and sends."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pf2lora.methods.base as base_module
from conftest import SYNTH_CFG, client_context, read_summary, record_client_updates, run_cli, tiny_task
from pf2lora import config, lora
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine, generator
from pf2lora.methods import ClientUpdate
from pf2lora.methods.base import params_of
from pf2lora.methods.fedsa_lora import FedSALoRA
from pf2lora.methods.ffa_lora import FFALoRA
from pf2lora.methods.pfedlora import PFedLoRA

torch.set_num_threads(1)

NEW_METHODS = ["ffa-lora", "fedsa-lora", "pfedlora"]


def _keys(task, adapter: str, role: str, which: str) -> set[str]:
    """The A (which="A") or B keys of ``adapter`` held with ``role`` on every target."""
    i = {"A": 0, "B": 1}[which]
    return {lora.adapter_keys(t, adapter, role)[i] for t in task.targets}


def _record_servers(monkeypatch, cls, servers: list[dict]) -> None:
    """Keep every server state aggregate returns (servers[0] is set by the test to the init)."""
    original = cls.aggregate

    def wrapper(self, server, updates):
        new = original(self, server, updates)
        servers.append(st.clone(new))
        return new

    monkeypatch.setattr(cls, "aggregate", wrapper)


# -- FFA-LoRA --------------------------------------------------------------------------------------


def test_ffa_lora_a_never_changes_b_trained_only_b_uploaded(monkeypatch):
    cfg, task = tiny_task("rounds=4")
    a_keys, b_keys = _keys(task, lora.COMMON, st.SHARED, "A"), _keys(task, lora.COMMON, st.SHARED, "B")
    init = FFALoRA(cfg, task).init_server(generator(cfg.seed, "init", "server"))  # what the engine draws
    assert set(init) == a_keys | b_keys
    assert all(float(init[k].abs().sum()) > 0 for k in a_keys) and all(float(init[k].abs().sum()) == 0 for k in b_keys)
    calls: list[dict] = []
    servers: list[dict] = []
    record_client_updates(monkeypatch, FFALoRA, calls)
    _record_servers(monkeypatch, FFALoRA, servers)
    trained_keys: list[set[str]] = []
    real_adamw = base_module.adamw

    def spy_adamw(params, *args, **kwargs):
        trained_keys.append(set(params))
        return real_adamw(params, *args, **kwargs)

    monkeypatch.setattr(base_module, "adamw", spy_adamw)
    result = LocalEngine(cfg, task, progress=False).run("ffa-lora")

    assert trained_keys and all(keys == b_keys for keys in trained_keys)  # A is not even trained locally

    assert len(calls) == cfg.rounds * cfg.task.num_clients and len(servers) == cfg.rounds
    for c in calls:
        update: ClientUpdate = c["update"]
        assert set(update.shared) == b_keys, sorted(update.shared)  # never A
        for k in a_keys:  # every client, every round, trains with the init A
            assert torch.equal(c["received"][k], init[k])
        for k in b_keys:
            assert not torch.equal(update.shared[k], c["received"][k]), "B was not trained"
        assert update.num_bytes == sum(4 * cfg.lora.rank * t.out_features for t in task.targets)
    for server in servers:
        assert set(server) == a_keys | b_keys
        for k in a_keys:
            assert torch.equal(server[k], init[k])
    for k in b_keys:  # the server's B moved away from zero
        assert float(servers[-1][k].abs().sum()) > 0
    b_bytes = sum(4 * cfg.lora.rank * t.out_features for t in task.targets)
    assert all(r["upload_bytes_per_client"] == b_bytes for r in result.rounds)


def test_ffa_lora_aggregate_averages_b_keeps_a_and_rejects_an_uploaded_a():
    cfg, task = tiny_task()
    method = FFALoRA(cfg, task)
    a_keys, b_keys = _keys(task, lora.COMMON, st.SHARED, "A"), _keys(task, lora.COMMON, st.SHARED, "B")
    server = method.init_server(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    b1 = {k: torch.randn(server[k].shape, generator=g) for k in b_keys}
    b2 = {k: torch.randn(server[k].shape, generator=g) for k in b_keys}
    new = method.aggregate(server, [ClientUpdate("c0", st.outgoing(b1), 10), ClientUpdate("c1", st.outgoing(b2), 30)])
    assert set(new) == a_keys | b_keys
    for k in a_keys:
        assert torch.equal(new[k], server[k])
    for k in b_keys:
        torch.testing.assert_close(new[k], 0.25 * b1[k] + 0.75 * b2[k])
    bad = {**b1, **{k: server[k] + 1.0 for k in a_keys}}
    with pytest.raises(ValueError, match="frozen A"):
        method.aggregate(server, [ClientUpdate("c0", st.outgoing(bad), 10)])


# -- FedSA-LoRA ------------------------------------------------------------------------------------


def test_fedsa_lora_b_private_persistent_per_client_a_averaged(monkeypatch):
    cfg, task = tiny_task("rounds=3")
    a_keys = _keys(task, lora.COMMON, st.SHARED, "A")
    b_keys = _keys(task, lora.COMMON, st.PRIVATE, "B")
    assert all(k.startswith("private:") and k.endswith(".lora_B.common") for k in b_keys)
    calls: list[dict] = []
    servers: list[dict] = []
    used_b: dict[tuple[int, str], dict] = {}
    current: list[tuple[int, str]] = []
    _record_servers(monkeypatch, FedSALoRA, servers)
    real_steps, real_update = FedSALoRA.train_steps, FedSALoRA.client_update

    def spy_steps(method, ctx, trained, fixed, opt, step=None):
        used_b[current[-1]] = {k: trained[k].clone() for k in b_keys}  # the B training starts from
        return real_steps(method, ctx, trained, fixed, opt, step)

    def tag(self, ctx, received, client_state):
        current.append((ctx.round, ctx.client.client_id))
        return real_update(self, ctx, received, client_state)

    monkeypatch.setattr(FedSALoRA, "train_steps", spy_steps)
    monkeypatch.setattr(FedSALoRA, "client_update", tag)
    record_client_updates(monkeypatch, FedSALoRA, calls)  # wraps `tag`
    LocalEngine(cfg, task, progress=False).run("fedsa-lora")

    assert len(calls) == cfg.rounds * cfg.task.num_clients
    by = {(c["round"], c["client"]): c for c in calls}
    for c in calls:
        update: ClientUpdate = c["update"]
        assert set(update.shared) == a_keys, sorted(update.shared)  # A only: no B of any role
        assert not any(".lora_B." in k for k in update.shared)
        assert update.num_bytes == sum(4 * cfg.lora.rank * t.in_features for t in task.targets)
        assert set(params_of(c["new_state"])) == b_keys
        r, cid = c["round"], c["client"]
        for k in b_keys:
            if r == 1:
                assert float(c["state"][k].abs().sum()) == 0  # B starts at zero on every client
            else:  # what round r starts from is exactly what round r - 1 left, for this client
                assert torch.equal(c["state"][k], by[(r - 1, cid)]["new_state"][k])
            assert torch.equal(used_b[(r, cid)][k], c["state"][k])
            assert not torch.equal(c["new_state"][k], c["state"][k]), "B was not trained"
    # B differs between clients
    last = cfg.rounds
    ids = [c.client_id for c in task.clients]
    for k in b_keys:
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                assert not torch.allclose(by[(last, ids[i])]["new_state"][k], by[(last, ids[j])]["new_state"][k])
    # A is the FedAvg (equal num_examples: plain mean) of the uploads, and is what the next round receives
    for r in range(1, cfg.rounds + 1):
        ups = [by[(r, cid)]["update"] for cid in ids]
        for k in a_keys:
            mean = sum(u.shared[k] for u in ups) / len(ups)
            torch.testing.assert_close(servers[r - 1][k], mean)
            if r < cfg.rounds:
                for cid in ids:
                    torch.testing.assert_close(by[(r + 1, cid)]["received"][k], servers[r - 1][k], rtol=0, atol=0)
    # the private B never equals anything that left a client
    uploads = [t for c in calls for t in c["update"].shared.values()]
    privates = [v for c in calls for k, v in c["new_state"].items() if k.startswith("private:")]
    assert not any(p.shape == u.shape and torch.equal(p, u) for p in privates for u in uploads)


# -- pFedLoRA -------------------------------------------------------------------------------------


def _pfedlora_setup(*overrides: str):
    cfg, task = tiny_task("local_steps=4", *overrides)
    method = PFedLoRA(cfg, task)
    server = method.init_server(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    received = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in server.items()}  # B non-zero too
    state = method.init_client(task.clients[0].client_id, torch.Generator().manual_seed(1))
    return cfg, task, method, received, state


def test_pfedlora_phase_steps():
    cfg, task = tiny_task("local_steps=5")
    assert PFedLoRA(cfg, task).phase_steps(5) == (2, 3)
    cfg, task = tiny_task("local_steps=5", "pfedlora.private_steps=4")
    assert PFedLoRA(cfg, task).phase_steps(5) == (4, 1)
    assert PFedLoRA(cfg, task).phase_steps(3) == (3, 0)  # never more than local_steps


def test_pfedlora_phases_freeze_the_other_part(monkeypatch):
    """Phase 1 trains only the private part against the received shared adapter; phase 2 trains
    only the shared adapter against the private part phase 1 left."""
    cfg, task, method, received, state = _pfedlora_setup()
    shared_keys = set(received)
    private_keys = set(params_of(state))
    assert shared_keys == _keys(task, lora.COMMON, st.SHARED, "A") | _keys(task, lora.COMMON, st.SHARED, "B")
    assert private_keys == _keys(task, lora.PRIVATE, st.PRIVATE, "A") | _keys(task, lora.PRIVATE, st.PRIVATE, "B")
    steps: list[set[str]] = []
    losses: list[tuple[dict, dict]] = []
    real_adamw, real_loss = base_module.adamw, PFedLoRA.loss

    def spy_adamw(params, grads, opt, *args, **kwargs):
        steps.append(set(params))
        return real_adamw(params, grads, opt, *args, **kwargs)

    def spy_loss(self, batch, *states):
        merged = {k: v.detach().clone() for s in states for k, v in s.items()}
        losses.append(({k: merged[k] for k in shared_keys}, {k: merged[k] for k in private_keys}))
        return real_loss(self, batch, *states)

    monkeypatch.setattr(base_module, "adamw", spy_adamw)
    monkeypatch.setattr(PFedLoRA, "loss", spy_loss)
    update, new_state = method.client_update(client_context(cfg, task), st.clone(received), state)

    n1, n2 = method.phase_steps(cfg.local_steps)
    assert (n1, n2) == (2, 2)
    assert steps == [private_keys] * n1 + [shared_keys] * n2
    assert len(losses) == n1 + n2
    after_phase1 = {k: new_state[k] for k in private_keys}
    for shared, _ in losses[:n1]:  # phase 1: shared frozen at what was received
        assert all(torch.equal(shared[k], received[k]) for k in shared_keys)
    for _, private in losses[n1:]:  # phase 2: private frozen at phase 1's result
        assert all(torch.equal(private[k], after_phase1[k]) for k in private_keys)
    assert any(not torch.equal(after_phase1[k], state[k]) for k in private_keys), "phase 1 trained nothing"
    # only the shared adapter goes up, and it is phase 2's result (changed from what was received)
    assert set(update.shared) == shared_keys
    assert any(not torch.equal(update.shared[k], received[k]) for k in shared_keys)
    assert update.num_bytes == sum(4 * cfg.lora.rank * (t.in_features + t.out_features) for t in task.targets)
    # separate optimizer states, both persisted
    assert int(new_state["opt/private/step"]) == n1 and int(new_state["opt/shared/step"]) == n2
    assert {k for k in new_state if k.startswith("opt/private/m/")} == {f"opt/private/m/{k}" for k in private_keys}
    assert {k for k in new_state if k.startswith("opt/shared/m/")} == {f"opt/shared/m/{k}" for k in shared_keys}


def test_pfedlora_phase_functions_directly():
    cfg, task, method, received, state = _pfedlora_setup()
    private = params_of(state)
    before_shared, before_private = st.clone(received), st.clone(private)
    new_private, _, _ = method.train_private(client_context(cfg, task, steps=3), received, private, {})
    assert set(new_private) == set(private)
    assert any(not torch.equal(new_private[k], private[k]) for k in private)
    new_shared, _, _ = method.train_shared(client_context(cfg, task, steps=3), received, new_private, {})
    assert set(new_shared) == set(received)
    assert any(not torch.equal(new_shared[k], received[k]) for k in received)
    for k in received:  # nothing mutated in place
        assert torch.equal(received[k], before_shared[k])
    for k in private:
        assert torch.equal(private[k], before_private[k])


def test_pfedlora_all_private_steps_leaves_the_shared_adapter_as_received():
    cfg, task, method, received, state = _pfedlora_setup("pfedlora.private_steps=4")
    update, new_state = method.client_update(client_context(cfg, task), st.clone(received), state)
    assert all(torch.equal(update.shared[k], received[k]) for k in received)
    assert not any(k.startswith("opt/shared/m/") for k in new_state)
    assert math.isfinite(update.metrics["train_loss"])


def test_pfedlora_private_state_persists_and_is_never_uploaded(monkeypatch):
    cfg, task = tiny_task("local_steps=4")
    calls: list[dict] = []
    record_client_updates(monkeypatch, PFedLoRA, calls)
    LocalEngine(cfg, task, progress=False).run("pfedlora")
    by = {(c["round"], c["client"]): c for c in calls}
    for c in calls:
        assert all(k.startswith("shared:") and k.endswith(".common") for k in c["update"].shared)
        if c["round"] > 1:
            prev = by[(c["round"] - 1, c["client"])]["new_state"]
            assert set(c["state"]) == set(prev) and all(torch.equal(c["state"][k], prev[k]) for k in prev)


# -- heads (tiny-text has a trained classifier head) ------------------------------------------------


@pytest.fixture(scope="module")
def text_tasks():
    from pf2lora.tasks import build_task

    base = [
        'task.kind="tiny-text"',
        "task.num_clients=2",
        "task.train_samples=32",
        "task.test_samples=16",
        "task.seq_len=12",
        "batch_size=8",
        "local_steps=2",
        "lora.rank=2",
        "lora.private_rank=1",
    ]
    out = {}
    for head in ("shared", "private"):
        cfg = config.load(None, [*base, f'lora.head="{head}"'])
        out[head] = (cfg, build_task(cfg))
    return out


@pytest.mark.parametrize("head", ["shared", "private"])
@pytest.mark.parametrize("cls", [FFALoRA, FedSALoRA, PFedLoRA])
def test_head_role_follows_config(text_tasks, cls, head):
    cfg, task = text_tasks[head]
    method = cls(cfg, task)
    server = method.init_server(torch.Generator().manual_seed(0))
    state = method.init_client(task.clients[0].client_id, torch.Generator().manual_seed(1))
    head_keys = {k for k in {**server, **state} if ".lora_" not in k}
    assert head_keys == {f"{head}:classifier.weight", f"{head}:classifier.bias"}
    update, new_state = method.client_update(client_context(cfg, task), st.clone(method.broadcast(server, "c")), state)
    if head == "shared":
        assert head_keys <= set(update.shared)
        assert not torch.equal(update.shared["shared:classifier.weight"], server["shared:classifier.weight"])
    else:
        assert not any("classifier" in k for k in update.shared)
        assert not torch.equal(new_state["private:classifier.weight"], state["private:classifier.weight"])


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_METHODS)
def test_runs_end_to_end_with_finite_mse(name):
    cfg, task = tiny_task()
    result = LocalEngine(cfg, task, progress=False).run(name)
    assert len(result.clients) == cfg.task.num_clients
    for cid, m in result.clients.items():
        assert math.isfinite(m["test_mse"]), (cid, m)
    assert all(r["upload_bytes_per_client"] > 0 for r in result.rounds)


def test_cli_runs_all_three_with_expected_upload_bytes(tmp_path):
    out = tmp_path / "run"
    methods = json.dumps(NEW_METHODS)
    proc = run_cli(
        "run", SYNTH_CFG, "--set", f"methods={methods}", "--set", "rounds=2", "--set", "task.train_samples=64", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out)
    cfg = config.load(SYNTH_CFG)
    r, d = cfg.lora.rank, cfg.task.dim  # one adapted d x d layer, float32
    expected = {"ffa-lora": 4 * r * d, "fedsa-lora": 4 * r * d, "pfedlora": 4 * r * 2 * d}
    assert set(summary["methods"]) == set(NEW_METHODS)
    for name, want in expected.items():
        entry = summary["methods"][name]
        assert entry["upload_bytes_per_client_per_round"] == want, name
        assert all(math.isfinite(c["test_mse"]) for c in entry["clients"].values())

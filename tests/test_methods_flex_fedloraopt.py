"""FlexLoRA (heterogeneous ranks, dense averaging, SVD redistribution) and FedLoRA-Optimizer
(magnitude/direction reparametrisation, global then local stage): the properties each relies on."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SYNTH_CFG, read_metrics, read_summary, record_client_updates, run_cli, sets, tiny_task
from pf2lora import config, lora
from pf2lora import state as st
from pf2lora.config import resolved_rank_range
from pf2lora.engines.local import LocalEngine, generator
from pf2lora.methods import ClientUpdate, registry
from pf2lora.methods.base import ClientContext, resource_rank
from pf2lora.methods.fedlora_opt import (
    A_DIRECTION,
    A_MAGNITUDE,
    B_DIRECTION,
    B_MAGNITUDE,
    FedLoRAOptimizer,
    part_key,
)
from pf2lora.methods.flexlora import FlexLoRA, delta_key

BASE = ("local_steps=4", "lora.rank=3", "lora.alpha=3.0")
ALPHA = 3.0


def _setup(*overrides: str):
    return tiny_task(*BASE, *overrides)


def _ctx(task, k: int = 0, round_: int = 1, steps: int = 4, batch_size: int = 16) -> ClientContext:
    client = task.clients[k]
    return ClientContext(client, task, generator(0, "test", client.client_id, round_), round_, steps, batch_size)


def _layer(task) -> lora.LoRALinear:
    layer = task.model.get_submodule(task.targets[0].path)
    assert isinstance(layer, lora.LoRALinear)
    return layer


def _applied(task, adapter, role=st.SHARED) -> torch.Tensor:
    """Delta W exactly as the client's LoRA layer applies it (scale alpha / rows of A)."""
    k_a, k_b = lora.adapter_keys(task.targets[0], lora.COMMON, role)
    return _layer(task).delta_weight({lora.COMMON: adapter[k_a]}, {lora.COMMON: adapter[k_b]})


# == FlexLoRA ======================================================================================

FLEX = ("lora.rank=3", "lora.private_rank=2", "task.dim=8")  # client ranks in [1, 5]


def _flex(*overrides: str) -> FlexLoRA:
    cfg, task = _setup(*FLEX, *overrides)
    return FlexLoRA(cfg, task)


def _id_with_rank(m: FlexLoRA, rank: int) -> str:
    for i in range(2000):
        cid = f"probe_{i}"
        if m.assigned_rank(cid) == rank:
            return cid
    raise AssertionError(f"no client id with rank {rank}")


def _upload(m: FlexLoRA, A: torch.Tensor, B: torch.Tensor, n: int, cid: str = "c") -> ClientUpdate:
    k_a, k_b = lora.adapter_keys(m.task.targets[0], lora.COMMON, st.SHARED)
    return ClientUpdate(cid, st.outgoing({k_a: A, k_b: B}), n)


def _server_with(m: FlexLoRA, updates: list[ClientUpdate]) -> st.Tensors:
    return m.aggregate(m.init_server(torch.Generator().manual_seed(0)), updates)


def test_flexlora_client_ranks_differ_and_are_the_resource_ranks():
    m = _flex("task.num_clients=8")
    lo, hi = resolved_rank_range(m.cfg, m.cfg.flexlora)
    assert (lo, hi) == (1, 5)
    ranks = {c.client_id: m.assigned_rank(c.client_id) for c in m.task.clients}
    assert len(set(ranks.values())) > 1, ranks
    assert all(lo <= r <= hi for r in ranks.values())
    assert all(ranks[c] == resource_rank(m.cfg.seed, c, lo, hi) for c in ranks)
    server = m.init_server(torch.Generator().manual_seed(0))
    k_a, k_b = lora.adapter_keys(m.task.targets[0], lora.COMMON, st.SHARED)
    for cid, r in ranks.items():
        received = m.broadcast(server, cid)
        assert received[k_a].shape == (r, 8) and received[k_b].shape == (8, r)
        assert not any(k.startswith("meta/") or k.endswith(".delta_weight") for k in received)
        assert m.describe_client(server, m.init_client(cid, torch.Generator())) == {"client_rank": r}


def test_flexlora_first_round_is_a_lora_init_nested_across_ranks():
    m = _flex()
    server = m.init_server(torch.Generator().manual_seed(0))
    assert torch.count_nonzero(server[delta_key(m.task.targets[0])]) == 0
    k_a, k_b = lora.adapter_keys(m.task.targets[0], lora.COMMON, st.SHARED)
    small, large = m.broadcast(server, _id_with_rank(m, 2)), m.broadcast(server, _id_with_rank(m, 5))
    for rec in (small, large):
        assert torch.count_nonzero(rec[k_b]) == 0
        assert bool((rec[k_a].norm(dim=1) > 0).all())
    assert torch.equal(small[k_a], large[k_a][:2])
    # The init can learn: one client update gives a non-zero B and Delta W.
    cid = m.task.clients[0].client_id
    update, state = m.client_update(_ctx(m.task), st.clone(m.broadcast(server, cid)), m.init_client(cid, torch.Generator()))
    assert torch.count_nonzero(update.shared[k_b]) > 0
    assert update.shared[k_a].shape[0] == m.assigned_rank(cid) and update.metrics["rank"] == m.assigned_rank(cid)
    assert int(state["meta/rank"]) == m.assigned_rank(cid)


def _low_rank_updates(m: FlexLoRA, ranks: list[int], total_rank: int, seed: int = 0) -> list[ClientUpdate]:
    """Client uploads of the given ranks whose Delta W all live in one rank-``total_rank`` pair of subspaces."""
    g = torch.Generator().manual_seed(seed)
    d = m.task.targets[0].in_features
    P = torch.linalg.qr(torch.randn(d, total_rank, generator=g))[0].T  # total_rank x d_in
    Q = torch.linalg.qr(torch.randn(d, total_rank, generator=g))[0]  # d_out x total_rank
    out = []
    for i, r in enumerate(ranks):
        A = torch.randn(r, total_rank, generator=g) @ P
        B = Q @ torch.randn(total_rank, r, generator=g)
        out.append(_upload(m, A, B, n=10 * (i + 1), cid=f"c{i}"))
    return out


def test_flexlora_aggregate_is_the_weighted_mean_of_scaled_deltas():
    m = _flex()
    ups = _low_rank_updates(m, [1, 4, 5], total_rank=5)
    server = _server_with(m, ups)
    k_a, k_b = lora.adapter_keys(m.task.targets[0], lora.COMMON, st.SHARED)
    want = sum((u.num_examples / 60) * (ALPHA / r) * (u.shared[k_b] @ u.shared[k_a]) for u, r in zip(ups, [1, 4, 5], strict=True))
    torch.testing.assert_close(server[delta_key(m.task.targets[0])], want, rtol=1e-5, atol=1e-6)
    # Each client's contribution is what its layer applied.
    for u in ups:
        torch.testing.assert_close(m.client_delta(u.shared, m.task.targets[0]), _applied(m.task, u.shared))


def test_flexlora_redistribution_is_exact_when_the_rank_suffices():
    """Clients of ranks 2 and 3 whose updates share a rank-2 subspace: their average has rank 2, so
    any client of rank >= 2 gets it back exactly, whatever its own alpha / r_k scale."""
    m = _flex()
    ups = _low_rank_updates(m, [2, 3], total_rank=2)
    server = _server_with(m, ups)
    dense = server[delta_key(m.task.targets[0])]
    assert torch.linalg.matrix_rank(dense).item() == 2 and float(dense.norm()) > 0.5
    for r in (2, 3, 4, 5):
        got = _applied(m.task, m.broadcast(server, _id_with_rank(m, r)))
        assert float((got - dense).abs().max()) < 1e-5, r
    # A rank-1 client cannot hold it: the check above had teeth.
    got = _applied(m.task, m.broadcast(server, _id_with_rank(m, 1)))
    assert float((got - dense).abs().max()) > 1e-2


def test_flexlora_redistribution_is_the_optimal_truncation():
    m = _flex()
    ups = _low_rank_updates(m, [3, 5, 4], total_rank=8, seed=3)
    server = _server_with(m, ups)
    dense = server[delta_key(m.task.targets[0])].double()
    s = torch.linalg.svdvals(dense)
    assert float(s[-1]) > 1e-3  # full rank: every client truncates
    for r in (1, 2, 3, 4, 5):
        got = _applied(m.task, m.broadcast(server, _id_with_rank(m, r))).double()
        err = float((dense - got).norm())
        tail = float(s[r:].square().sum().sqrt())
        assert err == pytest.approx(tail, rel=1e-4, abs=1e-5), r
        assert torch.linalg.matrix_rank(got, rtol=1e-5).item() == r
        # Spectrum of the client's update = the top r singular values (Eckart-Young).
        torch.testing.assert_close(torch.linalg.svdvals(got)[:r], s[:r], rtol=1e-4, atol=1e-5)


def test_flexlora_scale_is_consistent_across_client_ranks():
    """Through the real forward pass: a client of rank r computes W0 u + trunc_r(Delta W) u, and a
    client that uploads what it received unchanged gives back the same Delta W (round trip)."""
    m = _flex()
    ups = _low_rank_updates(m, [2, 3], total_rank=2, seed=5)
    server = _server_with(m, ups)
    dense = server[delta_key(m.task.targets[0])]
    batch = {k: v[:8] for k, v in m.task.clients[0].test.items()}
    want = batch["inputs"] @ (_layer(m.task).base.weight + dense).T
    for r in (2, 3, 4, 5):
        cid = _id_with_rank(m, r)
        received = m.broadcast(server, cid)
        out = m.task.forward(st.model_params(received), batch)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        back = m.aggregate(server, [ClientUpdate(cid, st.outgoing(received), 7)])
        torch.testing.assert_close(back[delta_key(m.task.targets[0])], dense, rtol=1e-5, atol=1e-6)


def test_flexlora_heterogeneous_uploads_have_their_own_sizes(monkeypatch):
    cfg, task = _setup(*FLEX, "rounds=2", "task.num_clients=6")
    calls: list[dict] = []
    record_client_updates(monkeypatch, FlexLoRA, calls)
    res = LocalEngine(cfg, task, progress=False).run("flexlora")
    m = FlexLoRA(cfg, task)
    d = cfg.task.dim
    sizes = {}
    for c in calls:
        r = m.assigned_rank(c["client"])
        assert c["update"].num_bytes == 4 * r * (d + d)
        sizes[c["client"]] = c["update"].num_bytes
    assert len(set(sizes.values())) > 1
    for rec in res.rounds:
        assert rec["upload_bytes_per_client"] == pytest.approx(sum(sizes.values()) / len(sizes))
        assert rec["download_bytes_per_client"] == pytest.approx(sum(sizes.values()) / len(sizes))
    for cid, metrics in res.clients.items():
        assert metrics["client_rank"] == m.assigned_rank(cid)


# == FedLoRA-Optimizer ==============================================================================


def _opt(*overrides: str) -> FedLoRAOptimizer:
    cfg, task = _setup(*overrides)
    return FedLoRAOptimizer(cfg, task)


def _assert_unit(m: FedLoRAOptimizer, shared: st.Tensors) -> None:
    t = m.task.targets[0]
    torch.testing.assert_close(shared[part_key(t, A_DIRECTION)].norm(dim=1), torch.ones(m.cfg.lora.rank), rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[part_key(t, B_DIRECTION)].norm(dim=0), torch.ones(m.cfg.lora.rank), rtol=0, atol=1e-5)


def _with_b_magnitude(m: FedLoRAOptimizer, state: st.Tensors, seed: int = 0) -> st.Tensors:
    k = part_key(m.task.targets[0], B_MAGNITUDE)
    return {**state, k: torch.randn(m.cfg.lora.rank, generator=torch.Generator().manual_seed(seed))}


def test_fedlora_opt_init_is_a_lora_init_with_unit_directions():
    m = _opt()
    t = m.task.targets[0]
    server = m.init_server(torch.Generator().manual_seed(0))
    _assert_unit(m, server)
    state = m.init_client("client_0", torch.Generator())
    assert torch.count_nonzero(state[part_key(t, B_MAGNITUDE)]) == 0
    assert part_key(t, B_MAGNITUDE).startswith("private:")
    composed = m.compose(server, state)
    k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.PRIVATE)
    assert torch.count_nonzero(composed[k_b]) == 0  # B = 0 at start
    torch.testing.assert_close(composed[k_a], server[part_key(t, A_MAGNITUDE)][:, None] * server[part_key(t, A_DIRECTION)])
    assert float(composed[k_a].norm()) > 0


def test_fedlora_opt_directions_stay_unit_norm_after_training_and_aggregation():
    m = _opt("optim.lr=0.2")  # large steps: without re-normalisation the norms would drift
    t = m.task.targets[0]
    server = m.init_server(torch.Generator().manual_seed(0))
    ups = []
    for k, c in enumerate(m.task.clients):
        state = _with_b_magnitude(m, m.init_client(c.client_id, torch.Generator()), seed=k)
        upd, _ = m.client_update(_ctx(m.task, k, steps=6), st.clone(server), state)
        _assert_unit(m, upd.shared)
        assert not torch.equal(upd.shared[part_key(t, A_DIRECTION)], server[part_key(t, A_DIRECTION)])
        ups.append(upd)
    raw_mean = sum(u.shared[part_key(t, A_DIRECTION)] for u in ups) / len(ups)
    assert float((raw_mean.norm(dim=1) - 1).abs().max()) > 1e-3  # the plain mean is not unit-norm
    new = m.aggregate(server, ups)
    _assert_unit(m, new)
    assert set(new) == set(server)


def test_fedlora_opt_uploads_only_the_shared_parts(monkeypatch):
    cfg, task = _setup("rounds=2")
    calls: list[dict] = []
    record_client_updates(monkeypatch, FedLoRAOptimizer, calls)
    res = LocalEngine(cfg, task, progress=False).run("fedlora-opt")
    t = task.targets[0]
    expect_keys = {part_key(t, A_DIRECTION), part_key(t, A_MAGNITUDE), part_key(t, B_DIRECTION)}
    r, d = cfg.lora.rank, cfg.task.dim
    assert len(calls) == cfg.rounds * cfg.task.num_clients
    for c in calls:
        assert set(c["update"].shared) == expect_keys
        assert not any(B_MAGNITUDE in k for k in c["update"].shared)
        assert all(k.startswith("shared:") for k in c["update"].shared)
        assert part_key(t, B_MAGNITUDE) in c["new_state"]
        assert c["update"].num_bytes == 4 * (r * d + r + d * r)
    assert all(rec["upload_bytes_per_client"] == 4 * (r * d + r + d * r) for rec in res.rounds)


def test_fedlora_opt_b_magnitude_persists_per_client(monkeypatch):
    cfg, task = _setup("rounds=3")
    calls: list[dict] = []
    record_client_updates(monkeypatch, FedLoRAOptimizer, calls)
    LocalEngine(cfg, task, progress=False).run("fedlora-opt")
    k = part_key(task.targets[0], B_MAGNITUDE)
    by = {(c["round"], c["client"]): c for c in calls}
    ends = []
    for c in task.clients:
        cid = c.client_id
        assert torch.count_nonzero(by[(1, cid)]["state"][k]) == 0  # starts at zero
        for rnd in (1, 2):
            out, nxt = by[(rnd, cid)]["new_state"][k], by[(rnd + 1, cid)]["state"][k]
            assert torch.equal(out, nxt) and torch.count_nonzero(out) > 0
        ends.append(by[(3, cid)]["new_state"][k])
    assert not torch.equal(ends[0], ends[1])  # each client has its own magnitudes

    # The method starts from the magnitude it is given (not from zero or from the server): with a
    # negligible learning rate the local stage returns it almost unchanged ...
    m = FedLoRAOptimizer(config.load(None, [*BASE, "optim.lr=1e-8"]), task)
    server = m.init_server(torch.Generator().manual_seed(0))
    state = _with_b_magnitude(m, m.init_client("client_0", torch.Generator()), seed=7)
    _, new = m.client_update(_ctx(task), st.clone(server), state)
    torch.testing.assert_close(new[k], state[k], rtol=0, atol=1e-6)
    # ... and the personalised model uses it: B = B_D diag(B_M).
    t = task.targets[0]
    personal = m.personalized(_ctx(task), st.clone(server), new)
    _, k_b = lora.adapter_keys(t, lora.COMMON, st.PRIVATE)
    torch.testing.assert_close(personal[k_b], server[part_key(t, B_DIRECTION)] * new[k][None, :])


def test_fedlora_opt_stage_split():
    m = _opt()
    assert m.stage_steps(4) == (2, 2)
    assert m.stage_steps(1) == (0, 1)
    assert _opt("fedlora_opt.local_stage_steps=3").stage_steps(4) == (1, 3)
    assert _opt("fedlora_opt.local_stage_steps=9").stage_steps(4) == (0, 4)


def test_fedlora_opt_global_stage_freezes_b_magnitude_and_local_stage_trains_only_it():
    m = _opt()
    t = m.task.targets[0]
    kb = part_key(t, B_MAGNITUDE)
    server = m.init_server(torch.Generator().manual_seed(0))
    private = _with_b_magnitude(m, m.init_client("client_0", torch.Generator()))
    private_before = st.clone(private)

    shared, _, losses = m.global_stage(_ctx(m.task), st.clone(server), private, {}, 3)
    assert len(losses) == 3
    assert torch.equal(private[kb], private_before[kb])  # B_M untouched by the global stage
    for part in (A_DIRECTION, A_MAGNITUDE, B_DIRECTION):
        assert not torch.equal(shared[part_key(t, part)], server[part_key(t, part)]), part

    shared_before = st.clone(shared)
    new_private, _, _ = m.local_stage(_ctx(m.task, round_=2), shared, private, {}, 3)
    assert set(new_private) == {kb}
    assert not torch.equal(new_private[kb], private_before[kb])  # the local stage trains B_M
    assert all(torch.equal(shared[k], shared_before[k]) for k in shared)  # and nothing shared

    # Through client_update: a round that is all local stage uploads exactly what it received.
    m2 = _opt("fedlora_opt.local_stage_steps=4")
    received = st.clone(server)
    upd, new_state = m2.client_update(_ctx(m2.task), received, private)
    assert all(torch.equal(upd.shared[k], server[k]) for k in server)
    assert not torch.equal(new_state[kb], private[kb])


def test_fedlora_opt_client_update_changes_b_magnitude_only_in_the_local_stage(monkeypatch):
    """With the local stage replaced by the identity, a whole client update returns B_M as given;
    with the global stage replaced by the identity, it uploads what it received."""
    m = _opt("local_steps=6")
    kb = part_key(m.task.targets[0], B_MAGNITUDE)
    server = m.init_server(torch.Generator().manual_seed(0))
    private = _with_b_magnitude(m, m.init_client("client_0", torch.Generator()), seed=3)

    def keep_private(self, ctx, shared, priv, opt, steps):
        return priv, opt, [0.0] * steps

    def keep_shared(self, ctx, shared, priv, opt, steps):
        return shared, opt, [0.0] * steps

    with monkeypatch.context() as mp:
        mp.setattr(FedLoRAOptimizer, "local_stage", keep_private)
        upd, new_state = m.client_update(_ctx(m.task, steps=6), st.clone(server), private)
        assert torch.equal(new_state[kb], private[kb])
        assert not torch.equal(upd.shared[part_key(m.task.targets[0], A_DIRECTION)], server[part_key(m.task.targets[0], A_DIRECTION)])
    with monkeypatch.context() as mp:
        mp.setattr(FedLoRAOptimizer, "global_stage", keep_shared)
        upd, new_state = m.client_update(_ctx(m.task, steps=6), st.clone(server), private)
        assert all(torch.equal(upd.shared[k], server[k]) for k in server)
        assert not torch.equal(new_state[kb], private[kb])


# == both: end to end ===============================================================================


@pytest.mark.parametrize("name", ["flexlora", "fedlora-opt"])
def test_runs_end_to_end_on_the_synthetic_task(name):
    cfg, task = _setup("rounds=6", "local_steps=6")
    res = LocalEngine(cfg, task, progress=False).run(name)
    assert name in registry() and registry()[name].description
    assert sorted(res.clients) == [c.client_id for c in task.clients]
    for cid, metrics in res.clients.items():
        assert math.isfinite(metrics["test_mse"]) and metrics["test_mse"] > 0, cid
    assert res.rounds[-1]["train_loss"] < res.rounds[0]["train_loss"]
    if name == "flexlora":
        assert all("global_test_mse" in m and "client_rank" in m for m in res.clients.values())
    else:
        assert all(m["b_magnitude_norm"] > 0 for m in res.clients.values())


def test_cli_run_reports_each_methods_upload(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "run",
        SYNTH_CFG,
        *sets('methods=["flexlora","fedlora-opt"]', "rounds=2", "task.train_samples=64"),
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = config.load(out / "config.toml")
    summary = read_summary(out)
    assert list(summary["methods"]) == ["flexlora", "fedlora-opt"]
    d, r = cfg.task.dim, cfg.lora.rank
    lo, hi = resolved_rank_range(cfg, cfg.flexlora)
    ranks = {f"client_{k}": resource_rank(cfg.seed, f"client_{k}", lo, hi) for k in range(cfg.task.num_clients)}
    flex_bytes = sum(4 * rk * (d + d) for rk in ranks.values()) / len(ranks)
    opt_bytes = 4 * (r * d + r + d * r)
    flex, opt = summary["methods"]["flexlora"], summary["methods"]["fedlora-opt"]
    assert flex["upload_bytes_per_client_per_round"] == pytest.approx(flex_bytes)
    assert opt["upload_bytes_per_client_per_round"] == opt_bytes
    assert opt["download_bytes_per_client_per_round"] == opt_bytes
    for cid, rk in ranks.items():
        assert flex["clients"][cid]["client_rank"] == rk
    for entry in (flex, opt):
        assert all(math.isfinite(c["test_mse"]) for c in entry["clients"].values())
    records = read_metrics(out)
    assert [(x["method"], x["round"]) for x in records] == [("flexlora", 1), ("flexlora", 2), ("fedlora-opt", 1), ("fedlora-opt", 2)]
    for x in records:
        assert x["upload_bytes_per_client"] == pytest.approx(flex_bytes if x["method"] == "flexlora" else opt_bytes)

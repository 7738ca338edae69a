"""FDLoRA: fusion search in bounds with its L1 pull, a persistent private personal adapter, the
server's outer (Nesterov) SGD, a holdout kept out of training, and end-to-end runs."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import pf2lora.methods.base as base_mod
from conftest import SYNTH_CFG, read_summary, record_client_updates, run_cli, tiny_task
from pf2lora import config, lora
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.engines.rounds import client_context
from pf2lora.methods import ClientUpdate, registry
from pf2lora.methods.base import weighted_mean
from pf2lora.methods.fdlora import FDLoRA, fuse, fusion_search
from pf2lora.tasks.synthetic import SyntheticRankTask

torch.set_num_threads(1)


FDLORA = ("rounds=4", "fdlora.personal_every=2")


def make(*overrides: str) -> tuple[config.RunConfig, SyntheticRankTask, FDLoRA]:
    cfg, task = tiny_task(*FDLORA, *overrides)
    return cfg, task, FDLoRA(cfg, task)


def _target_keys(task, adapter, role):
    (t,) = task.targets
    return lora.adapter_keys(t, adapter, role)


def true_shared_adapter(task: SyntheticRankTask, cfg, factor: float = 1.0) -> st.Tensors:
    """A common adapter whose update is ``factor`` times the task's true shared component."""
    k_a, k_b = _target_keys(task, lora.COMMON, st.SHARED)
    U, S, Vh = torch.linalg.svd(task.shared_delta)
    r = cfg.lora.rank
    scale = cfg.lora.alpha / r
    return {k_a: Vh[:r].clone(), k_b: factor * U[:, :r] * S[:r] / scale}


def zero_personal(task, cfg) -> st.Tensors:
    k_a, k_b = _target_keys(task, lora.PRIVATE, st.PRIVATE)
    d = cfg.task.dim
    return {k_a: torch.randn(cfg.lora.rank, d, generator=torch.Generator().manual_seed(3)), k_b: torch.zeros(d, cfg.lora.rank)}


# -- registration ----------------------------------------------------------------------------------


def test_registered_with_a_one_line_description():
    cls = registry()["fdlora"]
    assert cls is FDLoRA
    assert cls.description and "\n" not in cls.description
    doc = sys.modules[FDLoRA.__module__].__doc__
    assert doc and "Choices" in doc  # the module states its choices


# -- fusion search -----------------------------------------------------------------------------------


def test_fusion_search_stays_in_bounds_when_the_optimum_is_outside():
    calls = []

    def objective(w1, w2):
        calls.append((w1, w2))
        return (w1 - 3.0) ** 2 + (w2 + 0.4) ** 2  # unconstrained optimum (3, -0.4), outside in w1

    res = fusion_search(objective, bound=1.5, budget=60)
    assert 0 < len(calls) <= 60 and len(res.evaluated) == len(calls)
    assert all(-1.5 <= a <= 1.5 and -1.5 <= b <= 1.5 for a, b in calls)
    assert res.w1 == pytest.approx(1.5)  # the constrained optimum lies on the bound
    assert res.w2 == pytest.approx(-0.4, abs=0.01)
    assert res.value == min(v for _, _, v in res.evaluated)


def test_fusion_search_finds_an_interior_optimum_and_respects_the_budget():
    for budget in (1, 2, 5, 13, 60):
        calls = []

        def objective(w1, w2, calls=calls):
            calls.append((w1, w2))
            return (w1 - 0.3) ** 2 + 2 * (w2 + 0.8) ** 2 + 0.5 * w1 * w2

        res = fusion_search(objective, bound=1.5, budget=budget)
        assert len(calls) <= budget and len(set(calls)) == len(calls)  # no point evaluated twice
        if budget == 1:
            assert (res.w1, res.w2) == (1.0, 1.0)  # the start point only
    # true minimiser of the quadratic
    h = torch.tensor([[2.0, 0.5], [0.5, 4.0]], dtype=torch.float64)
    opt = torch.linalg.solve(h, torch.tensor([0.6, -3.2], dtype=torch.float64))
    assert res.w1 == pytest.approx(float(opt[0]), abs=0.01) and res.w2 == pytest.approx(float(opt[1]), abs=0.01)


def test_fusion_weights_clip_to_bounds_on_a_real_client():
    """The global adapter holds a third of the true update: the best w1 (3) lies outside [-1.5, 1.5]."""
    cfg, task, m = make("fdlora.fusion_l1=0.0")
    client = task.clients[0]  # private rank 0: the truth is the shared component alone
    _, hold = m.split(client)
    personal = zero_personal(task, cfg)
    for sign in (1.0, -1.0):
        glob = true_shared_adapter(task, cfg, sign / 3.0)
        res = m.fit_fusion(hold, glob, personal)
        assert all(abs(a) <= 1.5 and abs(b) <= 1.5 for a, b, _ in res.evaluated)
        assert len(res.evaluated) <= cfg.fdlora.fusion_evals
        assert res.w1 == pytest.approx(sign * 1.5)
    # with a wider box the unconstrained optimum (about 3) is reached: the bound was what clipped it
    cfg2, task2, m2 = make("fdlora.fusion_l1=0.0", "fdlora.fusion_bound=4.0")
    res = m2.fit_fusion(m2.split(task2.clients[0])[1], true_shared_adapter(task2, cfg2, 1 / 3), zero_personal(task2, cfg2))
    assert 2.5 < res.w1 < 3.5


def test_l1_pulls_a_useless_adapters_weight_to_zero():
    """The personal adapter contributes nothing (B = 0): without L1 its weight is arbitrary (the
    search keeps the start, 1); with L1 it is driven to 0, while the useful global weight stays large."""
    cfg, task, m = make("fdlora.fusion_l1=0.05")
    _, hold = m.split(task.clients[0])
    glob, personal = true_shared_adapter(task, cfg), zero_personal(task, cfg)
    res = m.fit_fusion(hold, glob, personal)
    assert abs(res.w2) < 1e-3
    assert 0.5 < res.w1 <= 1.0  # the useful weight is only shrunk a little (3-example holdout)
    cfg0, task0, m0 = make("fdlora.fusion_l1=0.0")
    res0 = m0.fit_fusion(m0.split(task0.clients[0])[1], glob, personal)
    assert abs(res0.w2) >= 0.5  # the penalty, not the loss, is what moved w2


def test_fuse_is_the_weighted_sum_of_the_two_updates():
    cfg, task, m = make()
    g = torch.Generator().manual_seed(0)
    k_a, k_b = _target_keys(task, lora.COMMON, st.SHARED)
    p_a, p_b = _target_keys(task, lora.PRIVATE, st.PRIVATE)
    glob = {k_a: torch.randn(2, 8, generator=g), k_b: torch.randn(8, 2, generator=g)}
    pers = {p_a: torch.randn(2, 8, generator=g), p_b: torch.randn(8, 2, generator=g)}
    fused = fuse(glob, pers, 0.7, -1.2)
    (t,) = task.targets
    dw = lora.delta_weights(task.model, task.targets, st.model_params(fused))[t.path]
    expect = 0.7 * (cfg.lora.alpha / 2) * glob[k_b] @ glob[k_a] + (-1.2) * (cfg.lora.private_alpha / 2) * pers[p_b] @ pers[p_a]
    torch.testing.assert_close(dw, expect)
    torch.testing.assert_close(fused[k_b], 0.7 * glob[k_b])
    assert fused[k_a] is glob[k_a] and torch.equal(glob[k_b], glob[k_b].clone())


# -- personal adapter: persistent, refreshed only when due, never uploaded ---------------------------


def _personal(state):
    return {k: v for k, v in state.items() if k.startswith("private:") and k.endswith(".private")}


def test_personal_adapter_persists_is_refreshed_only_when_due_and_never_uploaded(monkeypatch):
    cfg, task, _ = make("rounds=5", "fdlora.personal_every=2")
    calls: list[dict] = []
    record_client_updates(monkeypatch, FDLoRA, calls)
    result = LocalEngine(cfg, task, progress=False).run("fdlora")
    assert len(calls) == 5 * 3
    refresh_rounds = {1, 3, 5}  # first participation, then every 2 rounds
    global_keys = set(_target_keys(task, lora.COMMON, st.SHARED))
    last: dict[str, dict] = {}
    for c in calls:
        before, new = _personal(c["state"]), _personal(c["new_state"])
        assert set(new) == set(_target_keys(task, lora.PRIVATE, st.PRIVATE))
        if c["client"] in last:  # the state the engine handed back is the one this client left
            for k, v in last[c["client"]].items():
                assert torch.equal(c["state"][k], v)
        refreshed = c["round"] in refresh_rounds
        changed = any(not torch.equal(before[k], new[k]) for k in new)
        assert changed == refreshed, (c["round"], c["client"])
        assert c["update"].metrics["refreshed"] == float(refreshed)
        assert int(c["new_state"]["meta/last_refresh"]) == max(r for r in refresh_rounds if r <= c["round"])
        if refreshed and c["round"] > 1:
            # continued from the persisted adapter: A moved by at most ~lr per AdamW step
            k_a = next(k for k in new if ".lora_A." in k)
            assert (new[k_a] - before[k_a]).abs().max() <= 4 * cfg.optim.lr * cfg.local_steps
        # the upload is exactly the global adapter: no private key, no personal tensor
        upload = c["update"].shared
        assert set(upload) == global_keys
        for t in upload.values():
            for p in [*new.values(), *before.values()]:
                assert not (p.shape == t.shape and torch.equal(p, t))
        last[c["client"]] = {k: v.detach().clone() for k, v in c["new_state"].items()}
        # nothing the client received or held was mutated in place
        assert all(torch.equal(c["state"][k], v) for k, v in c["state"].items())
    # fusion weights are stored after each refresh and reported
    for cid, m in result.clients.items():
        assert -1.5 <= m["fusion_w1"] <= 1.5 and -1.5 <= m["fusion_w2"] <= 1.5
        final = [c for c in calls if c["client"] == cid][-1]
        assert m["fusion_w1"] == pytest.approx(float(final["new_state"]["meta/fusion_w1"]))


def test_client_update_does_not_mutate_inputs():
    cfg, task, m = make()
    server = m.init_server(torch.Generator().manual_seed(0))
    state = m.init_client("client_0", torch.Generator().manual_seed(1))
    received, snap_r, snap_s = m.broadcast(server, "client_0"), st.clone(server), st.clone(state)
    upd, new = m.client_update(client_context(cfg, task, task.clients[0], 1, "train", cfg.local_steps), received, state)
    assert all(torch.equal(server[k], snap_r[k]) for k in server)
    assert all(torch.equal(state[k], snap_s[k]) for k in state)
    assert not {t.data_ptr() for t in new.values() if t.numel()} & {t.data_ptr() for t in received.values() if t.numel()}


# -- server outer optimizer ----------------------------------------------------------------------------


def _updates(server, seed, counts=(40, 21, 13)):
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"c{i}", st.outgoing({k: v + torch.randn(v.shape, generator=g) for k, v in server.items()}), n)
        for i, n in enumerate(counts)
    ]


def test_outer_sgd_without_momentum_and_lr_1_is_fedavg():
    cfg, task, m = make("fdlora.server_momentum=0.0", "fdlora.server_lr=1.0")
    server = {k: torch.randn_like(v) for k, v in m.init_server(torch.Generator().manual_seed(0)).items()}
    ups = _updates(server, 1)
    new = m.aggregate(server, ups)
    fedavg = weighted_mean([u.shared for u in ups], [u.num_examples for u in ups])
    assert set(new) == set(fedavg)  # no momentum buffer kept
    for k in fedavg:
        torch.testing.assert_close(new[k], fedavg[k], rtol=1e-6, atol=1e-6)
    assert m.aggregate(server, []) == server


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_sgd_with_momentum_matches_hand_computation_over_two_rounds(nesterov):
    mu, lr = 0.5, 0.7
    cfg, task, m = make(f"fdlora.server_momentum={mu}", f"fdlora.server_lr={lr}", f"fdlora.nesterov={str(nesterov).lower()}")
    x0 = {k: torch.randn_like(v) for k, v in m.init_server(torch.Generator().manual_seed(0)).items()}
    snap = st.clone(x0)
    ups1 = _updates(x0, 1)
    s1 = m.aggregate(x0, ups1)
    assert all(torch.equal(x0[k], snap[k]) for k in x0)  # old server state untouched
    assert any(k.startswith("meta/momentum/") for k in s1)
    assert set(m.broadcast(s1, "c0")) == set(x0)  # momentum never broadcast
    ups2 = _updates({k: s1[k] for k in x0}, 2, counts=(5, 50, 9))
    s2 = m.aggregate(s1, ups2)

    ref = {k: v.clone().requires_grad_(True) for k, v in x0.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=lr, momentum=mu, nesterov=nesterov)
    for k in x0:  # by hand
        x, buf = x0[k].double(), None
        for ups in (ups1, ups2):
            n = sum(u.num_examples for u in ups)
            avg = sum(u.num_examples / n * u.shared[k].double() for u in ups)
            g = x - avg
            buf = g if buf is None else mu * buf + g
            x = x - lr * (g + mu * buf if nesterov else buf)
            if ups is ups1:
                torch.testing.assert_close(s1[k].double(), x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2[k].double(), x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2[f"meta/momentum/{k}"].double(), buf, rtol=1e-5, atol=1e-6)
    for ups in (ups1, ups2):  # and the same as torch's SGD on the pseudo-gradient
        n = sum(u.num_examples for u in ups)
        with torch.no_grad():
            for k, p in ref.items():
                p.grad = p.detach() - sum(u.num_examples / n * u.shared[k] for u in ups)
        opt.step()
    for k in x0:
        torch.testing.assert_close(s2[k], ref[k].detach(), rtol=1e-5, atol=1e-6)


# -- holdout -------------------------------------------------------------------------------------------


def test_holdout_is_deterministic_and_sized():
    cfg, task, m = make()
    c = task.clients[0]
    tr, ho = m.holdout_index(c)
    tr2, ho2 = m.holdout_index(c)
    assert torch.equal(tr, tr2) and torch.equal(ho, ho2)
    assert len(ho) == round(0.05 * 64) == 3
    assert sorted(torch.cat([tr, ho]).tolist()) == list(range(64))
    _, _, m1 = make("fdlora.fusion_holdout=0.001")
    assert len(m1.holdout_index(c)[1]) == 1  # at least one example
    assert not torch.equal(ho, m.holdout_index(task.clients[1])[1])  # per client


def test_holdout_is_excluded_from_training_and_used_for_fusion(monkeypatch):
    cfg, task, m = make("batch_size=32", "local_steps=3", "rounds=3", "fdlora.personal_every=1")
    drawn: list[torch.Tensor] = []
    original = base_mod.sample_batch

    def spy(data, batch_size, generator):
        b = original(data, batch_size, generator)
        drawn.append(b["inputs"])
        return b

    monkeypatch.setattr(base_mod, "sample_batch", spy)
    LocalEngine(cfg, task, progress=False).run("fdlora")
    # global + personal phase, every round, every client
    assert len(drawn) == cfg.rounds * cfg.task.num_clients * cfg.local_steps * 2
    holdouts = torch.cat([m.split(c)[1]["inputs"] for c in task.clients])
    trains = torch.cat([m.split(c)[0].train["inputs"] for c in task.clients])
    seen = torch.cat(drawn)
    hits = (seen[:, None, :] == holdouts[None, :, :]).all(-1)
    assert not hits.any(), "a mini-batch contained a holdout example"
    assert (seen[:, None, :] == trains[None, :, :]).all(-1).any(1).all()  # every row is a training row

    # the fusion objective sees exactly the holdout
    seen_by_loss: list[int] = []
    original_loss = task.loss
    monkeypatch.setattr(task, "loss", lambda params, batch: seen_by_loss.append(len(batch["inputs"])) or original_loss(params, batch))
    server = m.init_server(torch.Generator().manual_seed(0))
    state = m.init_client("client_0", torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.personalized(client_context(cfg, task, task.clients[0], 1, "eval", 1), m.broadcast(server, "client_0"), state)
    assert seen_by_loss and set(seen_by_loss) == {3} and len(seen_by_loss) <= cfg.fdlora.fusion_evals


# -- end to end ----------------------------------------------------------------------------------------


def test_end_to_end_local_engine():
    cfg, task, _ = make()
    result = LocalEngine(cfg, task, progress=False).run("fdlora")
    assert sorted(result.clients) == [f"client_{k}" for k in range(3)]
    for cid, c in result.clients.items():
        assert math.isfinite(c["test_mse"]) and c["test_mse"] > 0, cid
        assert math.isfinite(c["global_test_mse"])
        assert abs(c["fusion_w1"]) <= 1.5 and abs(c["fusion_w2"]) <= 1.5
    expected = 4 * cfg.lora.rank * (cfg.task.dim + cfg.task.dim)
    assert all(r["upload_bytes_per_client"] == expected for r in result.rounds)
    assert result.rounds[-1]["train_loss"] < result.rounds[0]["train_loss"]


def test_cli_run_reports_the_global_adapters_bytes(tmp_path):
    out = tmp_path / "run"
    cfg_path = SYNTH_CFG
    args = ["--set", 'methods=["fdlora"]', "--set", "rounds=2", "--set", "task.train_samples=64"]
    proc = run_cli("run", cfg_path, *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(out)
    entry = summary["methods"]["fdlora"]
    cfg = config.load(cfg_path, [a for a in args if a != "--set"])
    task = SyntheticRankTask(cfg)
    expected = sum(4 * cfg.lora.rank * (t.in_features + t.out_features) for t in task.targets)  # float32 global adapter
    assert expected == 4 * 4 * 64
    assert entry["upload_bytes_per_client_per_round"] == expected
    assert entry["download_bytes_per_client_per_round"] == expected
    assert len(entry["clients"]) == cfg.task.num_clients
    for c in entry["clients"].values():
        assert math.isfinite(c["test_mse"]) and -1.5 <= c["fusion_w1"] <= 1.5 and -1.5 <= c["fusion_w2"] <= 1.5

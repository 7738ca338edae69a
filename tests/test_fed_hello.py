"""Fed-HeLLo: each client trains exactly its allocated layers (no compute, no update and no upload
for the others), every layer is averaged over its trainers only, bytes shrink with the budget, the
geometric and Fisher allocations rank layers the right way round, and a run is reproducible."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import SYNTH_CFG, TINY_TEXT, methods_override, read_metrics, read_summary, record_client_updates, small_task
from pf2lora import lora, plan
from pf2lora import state as st
from pf2lora.cli import main
from pf2lora.engines.local import LocalEngine
from pf2lora.errors import UserError
from pf2lora.methods import ClientUpdate, registry
from pf2lora.methods import base as method_base
from pf2lora.methods import fed_hello as fh
from pf2lora.methods.base import opt_state, with_opt_state
from pf2lora.methods.fed_hello import FedHeLLo
from pf2lora.methods.homlora import HOMLoRA
from pf2lora.robust import validate_update

# Tiny text with every adapted module a layer: 2 blocks x (query, value) = 4 layers, so the
# default budgets 1.0 / 0.75 / 0.5 give 4 / 3 / 2 layers.
MODULES = (*TINY_TEXT, 'fed_hello.layer_unit="module"', 'methods=["fed-hello"]')


def _cfg(*overrides: str):
    return plan.load(None, [*MODULES, *overrides])


@pytest.fixture(scope="module")
def text():
    cfg = _cfg()
    return cfg, plan.build_task(cfg)


def _method(task, *overrides: str) -> FedHeLLo:
    return FedHeLLo(_cfg(*overrides), task)


def _run(task, *overrides: str):
    cfg = _cfg(*overrides)
    return LocalEngine(cfg, task, progress=False).run("fed-hello")


def _random_server(method: FedHeLLo, seed: int = 0) -> st.Tensors:
    """The initial server state with every parameter random (B too, so A gets gradients)."""
    server = method.init_server(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return {k: (0.3 * torch.randn(v.shape, generator=g) if st.is_param(k) else v) for k, v in server.items()}


# -- layers, budgets, priors -----------------------------------------------------------------------


def test_layers_are_blocks_or_modules_in_depth_order(text):
    cfg, task = text
    assert fh.block_of("bert.encoder.layer.11.attention.self.query") == "bert.encoder.layer.11"
    assert fh.block_of("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert fh.block_of("model.layers.0.self_attn.q_proj") == "model.layers.0"
    assert fh.block_of("proj") == "proj"
    blocks = fh.layer_groups(task.targets, "block")
    assert [[t.path.rsplit(".", 1)[-1] for t in g] for g in blocks] == [["query", "value"], ["query", "value"]]
    assert [fh.block_of(g[0].path) for g in blocks] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [len(g) for g in fh.layer_groups(task.targets, "module")] == [1, 1, 1, 1]
    assert _method(task).num_layers == 4 and _method(task, 'fed_hello.layer_unit="block"').num_layers == 2
    _, synth = small_task()
    assert FedHeLLo(small_task()[0], synth).num_layers == 1  # the synthetic task: one adapted layer


def test_budgets_cycle_over_clients_fixed_by_the_seed(text):
    _, task = text
    m = _method(task)
    ids = [f"client_{i}" for i in range(6)]
    budgets = [m.budget(c) for c in ids]
    assert sorted(budgets) == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]  # each tier a third of the clients
    assert budgets[:3] == budgets[3:]  # cycled
    assert budgets == [_method(task).budget(c) for c in ids]  # fixed per client
    rotations = {tuple(_method(task, f"seed={s}").budget(c) for c in ids[:3]) for s in range(12)}
    assert len(rotations) > 1  # the seed decides who gets which budget
    assert [m.layers_for(b) for b in (1.0, 0.75, 0.5, 0.01)] == [4, 3, 2, 1]  # floor(b L), at least one
    blocks = _method(task, 'fed_hello.layer_unit="block"')
    assert [blocks.layers_for(b) for b in (1.0, 0.75, 0.5)] == [2, 1, 1]
    assert m.budget("alice") in (1.0, 0.75, 0.5)


def test_geometric_priors_and_gd_top_k():
    w = {p: fh.pattern_weights(p, 12) for p in fh.PATTERNS}
    assert len(set(w["uniform"])) == 1
    assert all(a > b for a, b in itertools.pairwise(w["triangle"]))  # most weight nearest the input
    assert all(a < b for a, b in itertools.pairwise(w["inverted-triangle"]))  # nearest the output
    assert w["bottleneck"] == w["bottleneck"][::-1] and w["bottleneck"][0] > w["bottleneck"][5]  # both ends
    assert fh.top_k(w["uniform"], 6) == [0, 2, 4, 6, 8, 10]  # ties: evenly spread
    assert fh.top_k(w["triangle"], 3) == [0, 1, 2]
    assert fh.top_k(w["inverted-triangle"], 3) == [9, 10, 11]
    assert fh.top_k(w["bottleneck"], 6) == [0, 1, 2, 9, 10, 11]
    assert fh.top_k(w["bottleneck"], 12) == list(range(12))
    for p in fh.PATTERNS:
        assert fh.pattern_weights(p, 1) == [1.0]


def test_gd_allocation_is_the_same_every_round_rgd_follows_the_prior(text):
    _, task = text
    gd = _method(task, 'fed_hello.allocation="gd"', 'fed_hello.pattern="inverted-triangle"')
    server = gd.init_server(torch.Generator().manual_seed(0))
    for cid in ("client_0", "client_1", "client_2"):
        k = gd.layers_for(gd.budget(cid))
        assert {tuple(gd.allocate(server, cid, r)) for r in range(1, 6)} == {tuple(range(4 - k, 4))}  # the deepest k
    counts = torch.zeros(4)
    rgd = _method(task, 'fed_hello.allocation="rgd"', 'fed_hello.pattern="triangle"')
    cid = next(c for c in ("client_0", "client_1", "client_2") if rgd.layers_for(rgd.budget(c)) == 2)
    for r in range(600):
        layers = rgd.allocate(server, cid, r)
        assert len(layers) == len(set(layers)) == 2
        counts[layers] += 1
    assert counts[0] > counts[1] > counts[3] and counts[0] > counts[2] > counts[3]  # the triangle favours the shallow layers
    picks = [fh.sample_layers([4.0, 3.0, 2.0, 1.0], 2, torch.Generator().manual_seed(s)) for s in range(2000)]
    freq = [sum(i in p for p in picks) for i in range(4)]
    assert freq[0] > freq[1] > freq[2] > freq[3]


# -- Fisher allocation -------------------------------------------------------------------------------


def _brute_force_sse(scores, levels):
    """The least within-cluster sum of squares over every split of the sorted scores into at most
    ``levels`` contiguous clusters."""
    x = sorted(scores)
    best = float("inf")
    for k in range(1, min(levels, len(x)) + 1):
        for cuts in itertools.combinations(range(1, len(x)), k - 1):
            bounds = [0, *cuts, len(x)]
            sse = 0.0
            for a, b in itertools.pairwise(bounds):
                seg = x[a:b]
                mean = sum(seg) / len(seg)
                sse += sum((v - mean) ** 2 for v in seg)
            best = min(best, sse)
    return best


def _sse(scores, level):
    total = 0.0
    for lv in set(level):
        seg = [s for s, l_ in zip(scores, level, strict=True) if l_ == lv]
        total += sum((v - sum(seg) / len(seg)) ** 2 for v in seg)
    return total


def test_fisher_levels_are_optimal_and_ordered_by_score():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 8)
        scores = [rng.choice([rng.random(), rng.random() * 10, 0.5]) for _ in range(n)]
        level = fh.fisher_levels(scores, 3)
        assert _sse(scores, level) == pytest.approx(_brute_force_sse(scores, 3), abs=1e-9)
        for i, j in itertools.product(range(n), repeat=2):
            if scores[i] > scores[j]:
                assert level[i] >= level[j]  # a higher score never gets a lower level
            if scores[i] == scores[j]:
                assert level[i] == level[j]


def test_the_highest_fisher_layers_get_the_highest_probability():
    """The reference code's KMeans labels are arbitrary; here the level follows the centre, in any
    input order: the same scores shuffled give the same weight to each score."""
    scores = [0.02, 9.0, 0.5, 0.01, 8.5, 0.6, 0.03, 0.55]
    weights = fh.fisher_weights(scores, 3)
    assert weights == [1.0, 3.0, 2.0, 1.0, 3.0, 2.0, 1.0, 2.0]
    for seed in range(5):
        perm = list(range(len(scores)))
        random.Random(seed).shuffle(perm)
        shuffled = fh.fisher_weights([scores[i] for i in perm], 3)
        assert shuffled == [weights[i] for i in perm]
    assert fh.fisher_weights([1.0, 1.0, 1.0], 3) == [1.0, 1.0, 1.0]  # no signal: uniform
    picks = [fh.sample_layers(weights, 3, torch.Generator().manual_seed(s)) for s in range(3000)]
    freq = [sum(i in p for p in picks) for i in range(len(scores))]
    assert min(freq[1], freq[4]) > max(freq[2], freq[5], freq[7]) > max(freq[0], freq[3], freq[6])


def test_fim_allocation_uses_the_aggregated_scores(text):
    _, task = text
    m = _method(task, 'fed_hello.allocation="fim"', "fed_hello.fisher_every=1")
    server = m.init_server(torch.Generator().manual_seed(0))
    scores = torch.tensor([0.001, 5.0, 0.002, 0.003])
    scored = {**server, fh.SCORES: scores}
    cid = next(c for c in ("client_0", "client_1", "client_2") if m.layers_for(m.budget(c)) == 2)
    assert fh.fisher_weights(scores.tolist(), 3) == [1.0, 3.0, 2.0, 2.0]
    draws = [m.allocate(scored, cid, r) for r in range(1000)]
    freq = [sum(i in d for d in draws) for i in range(4)]
    assert freq[1] > max(freq[2], freq[3]) and min(freq[2], freq[3]) > freq[0]  # the highest score most often
    g = fh._seeded(m.cfg.seed, "fed-hello", "allocate", cid, 7)
    assert m.allocate(scored, cid, 7) == fh.sample_layers(fh.fisher_weights(scores.tolist(), 3), 2, g)
    g = fh._seeded(m.cfg.seed, "fed-hello", "allocate", cid, 7)
    assert m.allocate(server, cid, 7) == fh.sample_layers(m.prior, 2, g)  # no scores yet: the prior's RGD


def test_clients_compute_fisher_scores_and_the_server_averages_them(monkeypatch, text):
    _, task = text
    calls: list[dict] = []
    record_client_updates(monkeypatch, FedHeLLo, calls)
    result = _run(task, 'fed_hello.allocation="fim"', "fed_hello.fisher_every=2", "rounds=3")
    by_round = {r: [c for c in calls if c["round"] == r] for r in (1, 2, 3)}
    assert not any(fh.FISHER in c["update"].shared for c in by_round[1] + by_round[3])
    sent = [c["update"] for c in by_round[2]]
    assert all(fh.FISHER in u.shared and u.shared[fh.FISHER].shape == (4,) for u in sent)
    assert all(bool((u.shared[fh.FISHER] >= 0).all()) and float(u.shared[fh.FISHER].sum()) > 0 for u in sent)
    # The scores are per-example squared gradients of the received model, averaged: recompute one.
    c = by_round[2][0]
    m = FedHeLLo(_cfg('fed_hello.allocation="fim"', "fed_hello.fisher_every=2"), task)
    client = next(cl for cl in task.clients if cl.client_id == c["client"])
    g = fh._seeded(m.cfg.seed, "fed-hello", "fisher", client.client_id, 2)
    index = torch.randperm(client.num_train, generator=g)[: m.fh.fisher_samples]
    params = m.params(c["received"])
    want = torch.zeros(4, dtype=torch.float64)
    for i in index.tolist():
        batch = {k: v[i : i + 1] for k, v in client.train.items()}
        adapter = {k: v.detach().requires_grad_(True) for k, v in params.items() if lora.is_adapter(k)}
        loss = task.loss(st.model_params(adapter, {k: v for k, v in params.items() if not lora.is_adapter(k)}), batch)
        gs = torch.autograd.grad(loss, list(adapter.values()))
        for k, gk in zip(adapter, gs, strict=True):
            want[m.layer_of[k]] += gk.double().square().sum()
    torch.testing.assert_close(c["update"].shared[fh.FISHER], (want / len(index)).float(), rtol=1e-5, atol=1e-10)
    # The server keeps the sample-weighted mean of the round-2 scores for round 3's allocation.
    assert [r["layers"] for r in result.rounds][2].keys() == {cl.client_id for cl in task.clients}


def test_fim_is_skipped_where_allocation_cannot_matter(text):
    _, task = text
    assert not _method(task, "fed_hello.layer_budgets=[1.0]").uses_fisher
    cfg, synth = small_task('methods=["fed-hello"]')
    assert not FedHeLLo(cfg, synth).uses_fisher  # one layer
    assert _method(task).uses_fisher


def test_server_averages_scores_weighted_by_samples(text):
    _, task = text
    m = _method(task, "fed_hello.fisher_every=1")
    server = _random_server(m)
    received = {cid: m.broadcast(server, cid) for cid in ("client_0", "client_1")}
    ups = []
    for (cid, rec), n, f in zip(received.items(), (10, 30), ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]), strict=True):
        shared = {k: v + 1 for k, v in rec.items() if k in m.upload_spec(rec) and k != fh.FISHER}
        ups.append(ClientUpdate(cid, st.outgoing({**shared, fh.FISHER: torch.tensor(f)}), n))
    new = m.aggregate(server, ups)
    torch.testing.assert_close(new[fh.SCORES], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert int(new[fh.ROUND]) == 1


# -- what a client trains, sends and leaves alone ------------------------------------------------------


def test_each_client_trains_exactly_its_allocated_layers(monkeypatch, text):
    """The allocated layers (and the head) are the only trained tensors; the rest are constants
    that need no gradient, and autograd is asked for no gradient of them."""
    _, task = text
    steps: list[dict] = []
    original_step = FedHeLLo.local_step
    original_grads = method_base.grads
    asked: list[set[str]] = []

    def local_step(self, ctx, trained, fixed, opt):
        steps.append({"client": ctx.client.client_id, "round": ctx.round, "trained": set(trained), "fixed": dict(fixed)})
        return original_step(self, ctx, trained, fixed, opt)

    def grads(loss, wrt, *args, **kwargs):
        asked.append(set(wrt))
        return original_grads(loss, wrt, *args, **kwargs)

    calls: list[dict] = []
    record_client_updates(monkeypatch, FedHeLLo, calls)
    monkeypatch.setattr(FedHeLLo, "local_step", local_step)
    monkeypatch.setattr(method_base, "grads", grads)
    result = _run(task, "rounds=2", 'fed_hello.allocation="rgd"')
    m = _method(task)
    head = {k for k in m.init_server(torch.Generator()) if st.is_param(k) and not lora.is_adapter(k)}
    assert head  # tiny text's classifier is a shared head
    seen_subsets = set()
    for c in calls:
        layers = c["received"][fh.LAYERS].tolist()
        seen_subsets.add(tuple(layers))
        assert len(layers) == m.layers_for(m.budget(c["client"]))
        own = set(m.keys_of(layers))
        mine = [s for s in steps if (s["client"], s["round"]) == (c["client"], c["round"])]
        assert len(mine) == 4  # local_steps = 4
        for s in mine:
            assert s["trained"] == own | head
            assert set(s["fixed"]) == set(m.keys_of([i for i in range(4) if i not in layers]))
            assert not any(t.requires_grad for t in s["fixed"].values())
        upload = c["update"].shared
        assert set(upload) == own | head and m.layers_in(upload) == layers
        assert validate_update(upload, m.upload_spec(c["received"])) is None
    assert all(a <= set(m.keys_of(range(4))) | head for a in asked) and len(asked) == len(steps)
    assert len(seen_subsets) > 1
    assert not any(f["fault"] == "rejected" for f in result.faults)
    # The run's metrics list each client's layers per round, as read from its upload.
    for r in result.rounds:
        assert r["layers"] == {c["client"]: c["received"][fh.LAYERS].tolist() for c in calls if c["round"] == r["round"]}


def test_a_frozen_layer_is_bitwise_unchanged_and_keeps_its_moments(text):
    _, task = text
    m = _method(task)
    server = _random_server(m)
    cid = next(c for c in ("client_0", "client_1", "client_2") if m.layers_for(m.budget(c)) == 2)
    ctx = _ctx(m, cid)
    # Moments for every layer, as if the client had trained all of them before.
    everything = {k: v for k, v in m.params(server).items()}
    _, opt = m.adamw_update(everything, {k: torch.randn_like(v) for k, v in everything.items()}, {})
    state = {**m.init_client(cid, torch.Generator()), **with_opt_state("all", opt)}
    received = {**m.broadcast(server, cid), fh.LAYERS: torch.tensor([1, 3])}
    update, new_state = m.client_update(ctx, st.clone(received), state)
    frozen, own = m.keys_of([0, 2]), m.keys_of([1, 3])
    assert not set(frozen) & set(update.shared)
    new_opt = opt_state(new_state, "all")
    for k in frozen:
        for e in (f"m/{k}", f"v/{k}", f"t/{k}"):
            assert torch.equal(new_opt[e], opt[e])  # untouched moments and step counts
    for k in own:
        assert not torch.equal(new_opt[f"m/{k}"], opt[f"m/{k}"]) and int(new_opt[f"t/{k}"]) == int(opt[f"t/{k}"]) + 4
        assert not torch.equal(update.shared[k], server[k])
    # Aggregated alone, the frozen layers keep the global value bit for bit.
    new = m.aggregate(server, [update])
    for k in frozen:
        assert torch.equal(new[k], server[k])
    for k in own:
        torch.testing.assert_close(new[k], update.shared[k])


def _ctx(m: FedHeLLo, cid: str, round_: int = 1):
    from pf2lora.engines.rounds import client_context

    client = next(c for c in m.task.clients if c.client_id == cid)
    return client_context(m.cfg, m.task, client, round_, "train", m.cfg.local_steps)


def test_aggregate_averages_each_layer_over_its_trainers_only(text):
    _, task = text
    m = _method(task)
    server = _random_server(m)
    head = [k for k in server if st.is_param(k) and not lora.is_adapter(k)]
    plan_ = {"a": ([0, 1], 10), "b": ([1, 2], 30), "c": ([1], 60)}
    g = torch.Generator().manual_seed(5)
    ups, values = [], {}
    for cid, (layers, n) in plan_.items():
        shared = {k: torch.randn(server[k].shape, generator=g) for k in [*m.keys_of(layers), *head]}
        values[cid] = shared
        ups.append(ClientUpdate(cid, st.outgoing(shared), n))
    new = m.aggregate(server, ups)
    for layer in range(4):
        trainers = [(cid, n) for cid, (layers, n) in plan_.items() if layer in layers]
        for k in m.keys_of([layer]):
            if not trainers:
                assert torch.equal(new[k], server[k])  # nobody trained layer 3: the global value, bit for bit
                continue
            total = sum(n for _, n in trainers)
            want = sum(n / total * values[cid][k] for cid, n in trainers)
            torch.testing.assert_close(new[k], want)
            diluted = sum(n / 100 * values[cid].get(k, server[k]) for cid, (_, n) in plan_.items())
            if len(trainers) < 3:
                assert not torch.allclose(new[k], diluted)  # a non-trainer must not pull the mean
    for k in head:
        torch.testing.assert_close(new[k], sum(n / 100 * values[cid][k] for cid, (_, n) in plan_.items()))
    assert int(new[fh.ROUND]) == int(server[fh.ROUND]) + 1


def test_upload_spec_takes_each_clients_own_subset(text):
    _, task = text
    m = _method(task)
    server = _random_server(m)
    for cid in ("client_0", "client_1", "client_2"):
        received = m.broadcast(server, cid)
        spec = m.upload_spec(received)
        layers = received[fh.LAYERS].tolist()
        good = {k: server[k].clone() for k in spec}
        assert validate_update(good, spec) is None
        assert m.layers_in(good) == layers
        others = [i for i in range(4) if i not in layers]
        if others:
            extra = {**good, **{k: server[k].clone() for k in m.keys_of(others[:1])}}
            assert "unexpected" in (validate_update(extra, spec) or "")
        missing = {k: v for k, v in good.items() if k not in m.keys_of(layers[:1])}
        assert "missing" in (validate_update(missing, spec) or "")


def test_bytes_per_round_shrink_with_the_budget(monkeypatch, text):
    _, task = text
    calls: list[dict] = []
    record_client_updates(monkeypatch, FedHeLLo, calls)
    result = _run(task, "rounds=1")
    hom = HOMLoRA(_cfg(), task)
    full = sum(v.numel() * 4 for v in hom.init_server(torch.Generator()).values())
    m = _method(task)
    rank = m.cfg.lora.rank
    module_bytes = {4 * rank * (t.in_features + t.out_features) for t in task.targets}
    assert len(module_bytes) == 1  # every module here has the same size
    (module_bytes,) = module_bytes
    sizes = {}
    for c in calls:
        b = m.budget(c["client"])
        sizes[b] = c["update"].num_bytes
        assert c["update"].num_bytes == full - (4 - m.layers_for(b)) * module_bytes
    assert sizes[1.0] == full > sizes[0.75] > sizes[0.5]
    assert result.rounds[0]["upload_bytes_per_client"] == pytest.approx(sum(sizes.values()) / 3)


# -- the whole method ----------------------------------------------------------------------------------


def test_same_seed_same_run_other_seed_other_layers(text):
    _, task = text
    a, b = _run(task, "rounds=3"), _run(task, "rounds=3")
    assert a.rounds == b.rounds and a.clients == b.clients
    c = _run(task, "rounds=3", "seed=5")
    assert [r["layers"] for r in a.rounds] != [r["layers"] for r in c.rounds]


def test_the_synthetic_task_has_one_layer_every_client_trains(monkeypatch):
    cfg, task = small_task('methods=["fed-hello"]', "rounds=2")
    calls: list[dict] = []
    record_client_updates(monkeypatch, FedHeLLo, calls)
    result = LocalEngine(cfg, task, progress=False).run("fed-hello")
    assert all(r["layers"] == {c.client_id: [0] for c in task.clients} for r in result.rounds)
    assert all(fh.FISHER not in c["update"].shared for c in calls)
    hom = LocalEngine(cfg, task, progress=False).run("homlora")
    assert result.rounds[0]["upload_bytes_per_client"] == hom.rounds[0]["upload_bytes_per_client"]


def test_batched_clients_with_the_same_layers_match_the_sequential_run(text):
    _, task = text
    # gd: clients of one budget train the same layers; 0.5 for all: one group of three
    overrides = ('fed_hello.allocation="gd"', "fed_hello.layer_budgets=[0.5]", "rounds=2")
    seq = _run(task, *overrides)
    cfg = _cfg(*overrides, "parallel_clients=3")
    engine = LocalEngine(cfg, task, progress=False)
    bat = engine.run("fed-hello")
    assert engine.lockstep is not None and engine.lockstep.stacked_groups > 0 and engine.lockstep.sequential_requests == 0
    for cid in seq.clients:
        assert bat.clients[cid]["accuracy"] == pytest.approx(seq.clients[cid]["accuracy"])
        assert bat.clients[cid]["loss"] == pytest.approx(seq.clients[cid]["loss"], rel=1e-5)
    assert [r["layers"] for r in bat.rounds] == [r["layers"] for r in seq.rounds]


def test_client_level_dp_covers_one_release_and_refuses_fisher(text):
    _, task = text
    with pytest.raises(UserError, match="fim"):
        _method(task, "server.dp_noise_multiplier=1.0")
    # With (almost) no noise and no clipping, the DP path is the uniform mean over each layer's trainers.
    m = _method(task, 'fed_hello.allocation="rgd"', "server.dp_noise_multiplier=1e-12", "server.dp_clip_norm=1e3")
    server = _random_server(m)
    head = [k for k in server if st.is_param(k) and not lora.is_adapter(k)]
    g = torch.Generator().manual_seed(3)
    plan_ = {"a": [0, 1], "b": [1], "c": [1, 2]}
    values = {cid: {k: torch.randn(server[k].shape, generator=g) for k in [*m.keys_of(layers), *head]} for cid, layers in plan_.items()}
    m.begin_round(1)
    new = m.aggregate(server, [ClientUpdate(cid, st.outgoing(v), 10 * (i + 1)) for i, (cid, v) in enumerate(values.items())])
    for layer in range(4):
        trainers = [cid for cid, layers in plan_.items() if layer in layers]
        for k in m.keys_of([layer]):
            want = sum(values[c][k] for c in trainers) / len(trainers) if trainers else server[k]
            torch.testing.assert_close(new[k], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(new[m.keys_of([3])[0]], server[m.keys_of([3])[0]])


def test_cli_run_on_the_synthetic_config(tmp_path):
    out = tmp_path / "D"
    assert main(["run", SYNTH_CFG, "--set", methods_override(["fed-hello"]), "--set", "rounds=2", "--out", str(out)]) == 0
    summary = read_summary(out)
    assert "fed-hello" in summary["methods"]
    entry = summary["methods"]["fed-hello"]
    assert entry["upload_bytes_per_client_per_round"] > 0
    assert all("layer_budget" in c and "num_layers" in c for c in entry["clients"].values())
    lines = [r for r in read_metrics(out) if r.get("method") == "fed-hello"]
    assert [r["round"] for r in lines] == [1, 2] and all(isinstance(r["layers"], dict) for r in lines)
    assert "fed-hello" in registry()
    json.dumps(lines)  # the record is JSON


def test_tiny_text_cli_reports_layers_per_client_per_round(tmp_path):
    out = tmp_path / "T"
    args = ["run", "--set", "rounds=2", "--out", str(out)]
    cfg_args = [a for o in MODULES for a in ("--set", o)]
    assert main([*args[:1], SYNTH_CFG, *args[1:], *cfg_args]) == 0
    lines = [r for r in read_metrics(out) if r.get("method") == "fed-hello"]
    summary = read_summary(out)["methods"]["fed-hello"]
    budgets = {cid: c["layer_budget"] for cid, c in summary["clients"].items()}
    for r in lines:
        assert set(r["layers"]) == set(budgets)
        for cid, layers in r["layers"].items():
            assert len(layers) == {1.0: 4, 0.75: 3, 0.5: 2}[budgets[cid]]

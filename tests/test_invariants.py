"""Invariants every method must keep: privacy of private state, no in-place mutation of what a
client received or holds, and FedAvg of identical clients being the identity."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import ALL_METHODS, CORE_METHODS, client_context, small_task
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.methods import ClientUpdate, registry
from pf2lora.methods.base import weighted_mean
from pf2lora.methods.homlora import HOMLoRA


def test_registry_holds_the_core_methods():
    assert set(CORE_METHODS) <= set(registry())
    for name, cls in registry().items():
        assert cls.name == name and cls.description


# -- the privacy gate ----------------------------------------------------------------------------


def test_outgoing_refuses_private_keys():
    shared = {"shared:proj.lora_A.common": torch.ones(2, 3)}
    private = {"private:proj.lora_A.private": torch.ones(1, 3)}
    with pytest.raises(st.PrivacyViolation, match="private:proj.lora_A.private"):
        st.outgoing({**shared, **private})
    with pytest.raises(st.PrivacyViolation):
        st.outgoing(private)
    with pytest.raises(ValueError):  # a key with no role cannot leave either
        st.outgoing({"meta/rank": torch.tensor(3)})


def test_outgoing_returns_detached_copies():
    t = torch.randn(2, 3, requires_grad=True)
    out = st.outgoing({"shared:w": t})
    assert torch.equal(out["shared:w"], t.detach())
    assert out["shared:w"].data_ptr() != t.data_ptr()
    assert not out["shared:w"].requires_grad
    out["shared:w"].add_(1.0)
    assert not torch.equal(out["shared:w"], t.detach())


def _tensors(d):
    return [v for v in d.values() if isinstance(v, torch.Tensor) and v.numel()]


def _recording(monkeypatch, cls, calls: list[dict]):
    """Wrap ``cls.client_update`` so each call's inputs (snapshotted before) and outputs are kept."""
    original = cls.client_update

    @functools.wraps(original)
    def wrapper(self, ctx, received, client_state):
        before_received = st.clone(received)
        before_state = {k: v.detach().clone() for k, v in client_state.items()}
        in_ptrs = {t.data_ptr() for t in [*_tensors(received), *_tensors(client_state)]}
        update, new_state = original(self, ctx, received, client_state)
        calls.append(
            dict(
                round=ctx.round,
                client=ctx.client.client_id,
                received=received,
                before_received=before_received,
                state=client_state,
                before_state=before_state,
                update=update,
                new_state=new_state,
                in_ptrs=in_ptrs,
            )
        )
        return update, new_state

    monkeypatch.setattr(cls, "client_update", wrapper)


PRIVACY_OVERRIDES = ("rounds=2", "lora.private_rank=2", "lora.private_alpha=2.0")  # same shapes as the common adapter


@pytest.mark.parametrize("name", ALL_METHODS)
def test_updates_never_carry_private_state(monkeypatch, name):
    cfg, task = small_task(*PRIVACY_OVERRIDES)
    calls: list[dict] = []
    _recording(monkeypatch, registry()[name], calls)
    LocalEngine(cfg, task, progress=False).run(name)
    assert len(calls) == (cfg.rounds if registry()[name].pools_data else cfg.rounds * cfg.task.num_clients)
    for c in calls:
        update: ClientUpdate = c["update"]
        assert all(k.startswith("shared:") for k in update.shared), sorted(update.shared)
        private = [v for k, v in [*c["new_state"].items(), *c["before_state"].items()] if k.startswith("private:")]
        state_ptrs = {t.data_ptr() for t in _tensors(c["new_state"])} | c["in_ptrs"]
        for k, t in update.shared.items():
            assert t.numel() == 0 or t.data_ptr() not in state_ptrs, f"{name}: {k} aliases a client tensor"
            for p in private:
                assert not (p.shape == t.shape and torch.equal(p, t)), f"{name}: {k} equals a private tensor"
        if name == "local":
            assert update.shared == {} and update.num_bytes == 0
        else:
            assert update.shared and update.num_bytes > 0
    if name in ("pf2lora", "pf2lora-fo", "local"):  # these do hold private adapters: the check had teeth
        assert any(k.startswith("private:") for k in calls[-1]["new_state"])


# -- no in-place mutation --------------------------------------------------------------------------


def _equal_dicts(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_client_update_mutates_neither_received_nor_client_state(monkeypatch, name):
    cfg, task = small_task("rounds=2")
    calls: list[dict] = []
    _recording(monkeypatch, registry()[name], calls)
    LocalEngine(cfg, task, progress=False).run(name)
    assert calls
    for c in calls:
        assert _equal_dicts(c["received"], c["before_received"]), f"{name} mutated what it received"
        assert _equal_dicts(c["state"], c["before_state"]), f"{name} mutated the client state in place"
        new_ptrs = {t.data_ptr() for t in _tensors(c["new_state"])}
        recv_ptrs = {t.data_ptr() for t in _tensors(c["received"])}
        assert not (new_ptrs & recv_ptrs), f"{name}: new client state aliases the received tensors"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_server_state_is_not_changed_by_clients(monkeypatch, name):
    """Snapshot the server at its first broadcast of a round; aggregate must receive it unchanged."""
    cfg, task = small_task("rounds=2")
    cls = registry()[name]
    snap: dict[str, object] = {}
    checked = []
    orig_broadcast, orig_aggregate = cls.broadcast, cls.aggregate

    def broadcast(self, server, client_id):
        if snap.get("obj") is not server:
            snap["obj"], snap["copy"] = server, {k: v.clone() for k, v in server.items()}
        return orig_broadcast(self, server, client_id)

    def aggregate(self, server, updates):
        assert server is snap["obj"] and _equal_dicts(server, snap["copy"]), f"{name}: server state changed by a client"
        shared_before = [st.clone(u.shared) for u in updates]
        new = orig_aggregate(self, server, updates)
        assert _equal_dicts(server, snap["copy"]), f"{name}: aggregate mutated the old server state"
        assert all(_equal_dicts(u.shared, b) for u, b in zip(updates, shared_before, strict=True))
        upd_ptrs = {t.data_ptr() for u in updates for t in _tensors(u.shared)}
        assert not any(t.data_ptr() in upd_ptrs for k, t in new.items() if k.startswith("shared:") and t.numel())
        checked.append(True)
        return new

    monkeypatch.setattr(cls, "broadcast", broadcast)
    monkeypatch.setattr(cls, "aggregate", aggregate)
    LocalEngine(cfg, task, progress=False).run(name)
    assert len(checked) == cfg.rounds


# -- FedAvg ------------------------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"shared:a": torch.randn(3, 4, generator=g), "shared:b": torch.randn(5, 2, generator=g)}


def test_weighted_mean_of_identical_states_is_identity():
    s = _state(0)
    out = weighted_mean([st.clone(s) for _ in range(3)], [1.0, 7.0, 0.25])
    assert set(out) == set(s)
    for k in s:
        torch.testing.assert_close(out[k], s[k], rtol=1e-6, atol=1e-7)


def test_weighted_mean_weights_by_the_given_weights():
    a, b = _state(1), _state(2)
    out = weighted_mean([a, b], [1.0, 3.0])
    for k in a:
        torch.testing.assert_close(out[k], 0.25 * a[k] + 0.75 * b[k])
    with pytest.raises(ValueError):
        weighted_mean([a, {"shared:a": a["shared:a"]}], [1.0, 1.0])
    with pytest.raises(ValueError):
        weighted_mean([a, b], [0.0, 0.0])


def test_base_aggregate_fedavg(cfg_task):
    cfg, task = cfg_task
    method = HOMLoRA(cfg, task)
    server = method.init_server(torch.Generator().manual_seed(0))
    server = {k: torch.randn_like(v) for k, v in server.items()}
    same = [ClientUpdate(f"c{i}", st.outgoing(server), n) for i, n in enumerate((10, 30, 5))]
    new = method.aggregate({k: torch.zeros_like(v) for k, v in server.items()}, same)
    assert set(new) == set(server)
    for k in server:
        torch.testing.assert_close(new[k], server[k], rtol=1e-6, atol=1e-7)
    # Weighted by num_examples: a heavier client pulls the mean towards itself.
    other = {k: v + 1.0 for k, v in server.items()}
    mixed = method.aggregate(server, [ClientUpdate("c0", st.outgoing(server), 10), ClientUpdate("c1", st.outgoing(other), 30)])
    for k in server:
        torch.testing.assert_close(mixed[k], server[k] + 0.75)
    assert method.aggregate(server, []) == server


# -- the key grammar and the shared client mechanics ---------------------------------------------


def test_state_key_grammar_separates_parameters_optimizer_and_meta_entries():
    opt = {"step": torch.tensor(2), "m/shared:w": torch.ones(2)}
    state = {"private:w": torch.zeros(1), st.meta_key("rank"): torch.tensor(3), **st.with_opt_state("all", opt)}
    assert st.opt_state(state, "all") == opt and st.opt_state(state, "other") == {}
    assert list(st.params_of(state)) == ["private:w"]
    assert [k for k in state if st.is_meta(k)] == [st.meta_key("rank")]
    assert st.has_role("private:w", st.PRIVATE) and not st.has_role(st.meta_key("rank"), st.PRIVATE)


def test_upload_passes_the_privacy_gate():
    cfg, task = small_task()
    method = HOMLoRA(cfg, task)
    ctx = client_context(cfg, task)
    t = torch.ones(2, requires_grad=True)
    update = method.upload(ctx, {"shared:w": t}, {"train_loss": 1.0})
    assert update.num_examples == ctx.client.num_train and update.client_id == ctx.client.client_id
    assert not update.shared["shared:w"].requires_grad and update.shared["shared:w"].data_ptr() != t.data_ptr()
    assert method.upload(ctx, {}, {}, num_examples=7).num_examples == 7
    with pytest.raises(st.PrivacyViolation):
        method.upload(ctx, {"private:w": t}, {})


def test_train_steps_reports_each_step_and_the_mean():
    cfg, task = small_task("local_steps=3")
    method = HOMLoRA(cfg, task)
    received = method.init_server(torch.Generator().manual_seed(0))
    run = method.train_steps(client_context(cfg, task), received, {}, {})
    assert len(run.losses) == 3 and run.loss == sum(run.losses) / 3
    assert set(run.params) == set(received) and int(run.opt["step"]) == 3


def test_only_the_exact_hypergradient_needs_double_backward():
    for estimator in ("finite-difference", "exact", "first-order"):
        cfg, _ = small_task(f'pf2lora.estimator="{estimator}"')
        needs = {name for name, cls in registry().items() if cls.needs_double_backward(cfg)}
        assert needs == ({"pf2lora"} if estimator == "exact" else set())


def test_packed_clone_is_a_deep_copy_with_disjoint_tensors(packing):
    """Packed (one buffer per dtype and device) or not, each tensor has its own values: writing one
    changes no other copy and not the source; shapes, dtypes, devices and key order are the source's."""
    src = {
        "shared:b": torch.randn(3, 2, requires_grad=True),
        "shared:a": torch.randn(4),
        "meta/n": torch.tensor(7),
        "shared:h": torch.randn(2, 2, dtype=torch.float64),
        "shared:t": torch.randn(5, 3).t(),  # not contiguous
        "shared:z": torch.zeros(0, 4),
    }
    out = st.packed_clone(src)
    assert list(out) == list(src)
    for k, v in src.items():
        assert torch.equal(out[k], v.detach()) and out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert not out[k].requires_grad
    out["shared:a"].add_(1.0)
    out["shared:b"].zero_()
    assert torch.equal(out["shared:t"], src["shared:t"]) and not torch.equal(src["shared:b"].detach(), out["shared:b"])
    assert torch.equal(out["shared:h"], src["shared:h"]) and int(out["meta/n"]) == 7
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out.values() if t.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))  # no overlap
    src_ptrs = {t.data_ptr() for t in src.values() if t.numel()}
    assert not any(t.data_ptr() in src_ptrs for t in out.values() if t.numel())
    storages = {t.untyped_storage().data_ptr() for k, t in out.items() if t.dtype == torch.float32 and t.numel()}
    assert len(storages) == (1 if packing else 3)  # b, a, t (z is empty): one buffer when packed

"""PF2LoRA's local step around the hypergradient: ``pf2lora.hvp_every`` (a cached, stale H_xy v
reused between refreshes) and the state a round keeps. The estimators themselves: test_hypergrad.py."""

from __future__ import annotations

import pytest
import torch

import pf2lora.methods.pf2lora as pf2lora_module
from conftest import client_context, small_cfg, tiny_task
from pf2lora import batching, plan
from pf2lora import state as st
from pf2lora.methods.pf2lora import HVP_AGE, HVP_PREFIX, PF2LoRA, cached_hvp, without_hvp

STEPS = 7


def _spy(monkeypatch) -> list[tuple[dict | None, dict]]:
    """Record, per bilevel step, the H_xy v it was given (None: it estimates one) and the one it used."""
    calls: list[tuple[dict | None, dict]] = []
    real = pf2lora_module.bilevel_step

    def spy(*args, hvp=None, **kwargs):
        res = real(*args, hvp=hvp, **kwargs)
        calls.append((hvp, res.hvp))
        return res

    monkeypatch.setattr(pf2lora_module, "bilevel_step", spy)
    return calls


def _start(*overrides: str):
    cfg, task = tiny_task(f"local_steps={STEPS}", *overrides)
    method = PF2LoRA(cfg, task)
    g = torch.Generator().manual_seed(0)
    server = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in method.init_server(g).items()}
    state = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in method.init_client(task.clients[0].client_id, g).items()}
    return cfg, task, method, server, state


@pytest.mark.parametrize("every", [1, 3])
def test_hvp_is_estimated_every_kth_step_of_a_round_and_reused_in_between(monkeypatch, every):
    cfg, task, method, server, state = _start(f"pf2lora.hvp_every={every}")
    calls = _spy(monkeypatch)
    for round_ in (1, 2):
        _, state = method.client_update(client_context(cfg, task, 0, round_), st.clone(server), state)
        assert not any("hvp" in k for k in state)  # the cache never outlives a round
    # Each round starts with a fresh estimate (the cache was dropped), then every k-th step.
    assert [hvp is None for hvp, _ in calls] == [i % every == 0 for i in range(STEPS)] * 2
    last: dict = {}
    for given, used in calls:
        if given is None:
            last = used
        else:  # a reuse step takes exactly the product of the last refresh
            assert set(given) == set(last) and all(torch.equal(given[k], last[k]) and torch.equal(used[k], last[k]) for k in last)


def test_default_step_keeps_no_cache_in_the_optimizer_state():
    cfg, task, method, server, state = _start()
    assert cfg.pf2lora.hvp_every == 1
    ctx = client_context(cfg, task, 0)
    _, opt, loss = method.local_step(ctx, {**server, **st.params_of(state)}, {}, {})
    assert loss.dim() == 0 and not loss.requires_grad
    assert opt == without_hvp(opt) and "step" in opt


def test_amortised_step_keeps_the_cache_and_its_age_in_the_optimizer_state():
    cfg, task, method, server, state = _start("pf2lora.hvp_every=2")
    ctx = client_context(cfg, task, 0)
    trained = {**server, **st.params_of(state)}
    x_keys = sorted(st.select(trained, st.SHARED))
    trained, opt, _ = method.local_step(ctx, trained, {}, {})
    assert int(opt[HVP_AGE]) == 0 and sorted(k[len(HVP_PREFIX) :] for k in opt if k.startswith(HVP_PREFIX)) == x_keys
    trained, opt2, _ = method.local_step(ctx, trained, {}, opt)
    assert int(opt2[HVP_AGE]) == 1 and all(torch.equal(opt2[HVP_PREFIX + k], opt[HVP_PREFIX + k]) for k in x_keys)
    _, opt3, _ = method.local_step(ctx, trained, {}, opt2)
    assert int(opt3[HVP_AGE]) == 0 and not all(torch.equal(opt3[HVP_PREFIX + k], opt[HVP_PREFIX + k]) for k in x_keys)
    # AdamW's own entries are what they would be without the cache.
    assert set(without_hvp(opt3)) == {k for k in opt3 if k != HVP_AGE and not k.startswith(HVP_PREFIX)}


def test_refresh_decision_is_the_first_clients_and_the_age_is_per_client():
    hv = {"a": torch.ones(3, 2)}
    opt = {HVP_AGE: torch.tensor([1, 1, 1]), HVP_PREFIX + "a": hv["a"]}
    assert cached_hvp(opt, ["a"], 4) is not None and cached_hvp(opt, ["a"], 2) is None
    assert cached_hvp(opt, ["a"], 1) is None and cached_hvp(opt, ["a", "b"], 4) is None and cached_hvp({}, ["a"], 4) is None
    assert cached_hvp({**opt, HVP_AGE: torch.tensor(2)}, ["a"], 4) is not None
    with batching.stacked(3):
        assert pf2lora_module._age_zero().shape == (3,)
    assert pf2lora_module._age_zero().shape == ()


def test_amortised_round_stays_close_to_the_every_step_round():
    """A stale H_xy v is an approximation, not another method: one round's upload moves little."""
    deltas = {}
    for every in (1, 4):
        cfg, task, method, server, state = _start(f"pf2lora.hvp_every={every}", "optim.lower_lr=0.3")
        update, _ = method.client_update(client_context(cfg, task, 1), st.clone(server), state)
        deltas[every] = torch.cat([(update.shared[k] - server[k]).flatten() for k in sorted(server)])
    rel = float((deltas[4] - deltas[1]).norm() / deltas[1].norm())
    assert 0 < rel < 0.1  # 0.026 here


@pytest.mark.parametrize("kind, head", [("synthetic", "shared"), ("tiny-text", "shared"), ("tiny-text", "private")])
def test_fused_adapters_are_the_same_model(kind, head):
    """The training loss's one rank-(r + r~) adapter per layer gives the loss and gradients of the
    two adapters (rounding apart), a private head included."""
    overrides = ("lora.alpha=3.0", "lora.private_alpha=5.0", f"lora.head={head!r}")
    if kind == "synthetic":
        cfg, task, method, server, state = _start(*overrides)
    else:
        cfg = small_cfg('task.kind="tiny-text"', "task.num_clients=2", "task.test_samples=8", *overrides)
        task = plan.build_task(cfg)
        method = PF2LoRA(cfg, task)
        g = torch.Generator().manual_seed(0)
        server = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in method.init_server(g).items()}
        state = {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in method.init_client(task.clients[0].client_id, g).items()}
        assert len(task.targets) > 1
    # float64, so that what is left is the rounding of a different summation order, not of float32
    # through a BERT (about 1e-5 there).
    task.model.double()
    server, state = ({k: v.double() if v.is_floating_point() else v for k, v in d.items()} for d in (server, state))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in client_context(cfg, task, 0).batch().items()}
    x = {k: v.clone().requires_grad_(True) for k, v in server.items()}
    y = {k: v.clone().requires_grad_(True) for k, v in st.params_of(state).items()}
    xf, yf = method.fused(x, y)
    assert not any(k in yf for k in y if ".lora_" in k) and all(k in yf for k in y if ".lora_" not in k)
    plain, fused = method.loss(batch, x, y, {}), method.loss(batch, xf, yf, {})
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    keys = [*x, *y]
    g_plain = torch.autograd.grad(plain, [{**x, **y}[k] for k in keys])
    g_fused = torch.autograd.grad(fused, [{**x, **y}[k] for k in keys])
    for k, a, b in zip(keys, g_plain, g_fused, strict=True):
        assert float((a - b).norm()) <= 1e-10 * float(a.norm()) + 1e-14, k


class _Draws:
    """A client context that hands out the given batches in turn and counts the draws."""

    def __init__(self, batches):
        self.batches, self.draws = list(batches), 0

    def batch(self):
        self.draws += 1
        return self.batches.pop(0)


@pytest.mark.parametrize("estimator", ["finite-difference", "first-order"])
def test_one_batch_draws_once_and_is_the_two_batch_step_on_that_batch_twice(estimator):
    """``pf2lora.one_batch``: one draw a step, and the step the default takes when both its draws
    are that batch; by default two draws, and different batches give a different step."""
    cfg, task, method, server, state = _start(f"pf2lora.estimator={estimator!r}", "pf2lora.one_batch=true")
    _, _, default, _, _ = _start(f"pf2lora.estimator={estimator!r}")
    source = client_context(cfg, task, 0)
    xi, zeta = source.batch(), source.batch()
    params = {**server, **st.params_of(state)}
    one = _Draws([xi])
    got, _, _ = method.local_step(one, params, {}, {})
    twice = _Draws([xi, xi])
    want, _, _ = default.local_step(twice, params, {}, {})
    assert (one.draws, twice.draws) == (1, 2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    other, _, _ = default.local_step(_Draws([xi, zeta]), params, {}, {})
    assert any(not torch.equal(other[k], want[k]) for k in st.select(want, st.SHARED))

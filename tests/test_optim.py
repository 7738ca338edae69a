"""The functional optimizers against torch's own, and their handling of fresh parameters."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from pf2lora import batching, optim
from pf2lora.optim import adamw, sgd


def _grads(step: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    shapes = {"a": (3, 4), "b": (5,)}
    init = _grads(1000, shapes)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    params, state = {k: v.clone() for k, v in init.items()}, {}
    for step in range(6):
        grads = _grads(step, shapes)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state = adamw(params, grads, state, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    assert int(state["step"]) == 6
    for k in shapes:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-5, atol=1e-6)


def test_adamw_does_not_mutate_inputs():
    p, g = {"a": torch.ones(3)}, {"a": torch.full((3,), 0.5)}
    state = {"step": torch.tensor(2), "m/a": torch.ones(3), "v/a": torch.ones(3)}
    snapshot = {k: v.clone() for k, v in state.items()}
    new_p, new_state = adamw(p, g, state, lr=0.1)
    assert torch.equal(p["a"], torch.ones(3)) and all(torch.equal(state[k], snapshot[k]) for k in state)
    assert not torch.equal(new_p["a"], p["a"]) and int(new_state["step"]) == 3


@pytest.mark.parametrize("global_step", [10, 3000])
def test_a_new_or_reshaped_parameter_starts_fresh(global_step):
    g = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    p = {"w": torch.zeros(4, 3)}
    state = {"step": torch.tensor(global_step), "m/w": torch.ones(5, 3), "v/w": torch.ones(5, 3)}  # old shape
    fresh, _ = adamw(p, g, {}, lr=1e-2)
    late, _ = adamw(p, g, state, lr=1e-2)
    torch.testing.assert_close(late["w"], fresh["w"], rtol=1e-4, atol=1e-7)


def test_sgd():
    out = sgd({"a": torch.ones(2)}, {"a": torch.tensor([1.0, -2.0])}, lr=0.5)
    assert torch.equal(out["a"], torch.tensor([0.5, 2.0]))
    assert sgd({}, {}, lr=0.5) == {}


def _adamw_per_tensor(params, grads, state, lr, betas, eps, weight_decay):
    """AdamW one tensor at a time, the plain arithmetic (what ``adamw`` must equal bit for bit)."""
    b1, b2 = betas
    new_p, new_s = {}, {"step": state["step"] + 1}
    for k, p in params.items():
        g = grads[k]
        t = state[f"t/{k}"] + 1
        m = torch.lerp(state[f"m/{k}"], g, 1 - b1)
        v = state[f"v/{k}"].mul(b2).addcmul_(g, g, value=1 - b2)
        counts = t.reshape(-1).tolist()
        bc1 = torch.tensor([1 - b1**n for n in counts], dtype=p.dtype).reshape(-1, *[1] * (p.dim() - 1))
        bc2 = torch.tensor([math.sqrt(1 - b2**n) for n in counts], dtype=p.dtype).reshape(-1, *[1] * (p.dim() - 1))
        if len(set(counts)) == 1:  # one count: Python floats, as torch.optim.AdamW
            bc1, bc2 = 1 - b1 ** counts[0], math.sqrt(1 - b2 ** counts[0])
        new_p[k] = (p.mul(1 - lr * weight_decay) - (lr / bc1) * (m / ((v.sqrt() / bc2) + eps))).detach()
        new_s[f"m/{k}"], new_s[f"v/{k}"], new_s[f"t/{k}"] = m.detach(), v.detach(), t
    return new_p, new_s


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_equals_the_per_tensor_arithmetic_exactly(stacked, chunk, dtype, monkeypatch):
    """The fused (``_foreach``) update is the same arithmetic: equal to the last bit, also for
    stacked clients at different step counts, for gradients that carry a graph, and cut into
    chunks (``CPU_CHUNK``)."""
    if chunk is not None:
        monkeypatch.setattr(optim, "CPU_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    lead = (4,) if stacked else ()
    shapes = {"a": (*lead, 3, 5), "b": (*lead, 5, 2), "c": (*lead, 7)}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    counts = torch.tensor([0, 2, 2, 5]) if stacked else torch.tensor(3)
    state = {"step": torch.tensor(3)}
    for k, s in shapes.items():
        state[f"m/{k}"], state[f"v/{k}"] = torch.randn(s, generator=gen).to(dtype), torch.rand(s, generator=gen).to(dtype)
        state[f"t/{k}"] = counts.clone()
    state["t/c"] = torch.full_like(counts, 7)  # another count than the others: its own group
    w = torch.randn(5, generator=gen, requires_grad=True)
    grads = {k: (torch.randn(s, generator=gen) * w.sum()).to(dtype) for k, s in shapes.items()}  # part of a graph
    with batching.stacked(4) if stacked else contextlib.nullcontext():
        for _ in range(3):
            got_p, got_s = adamw(params, grads, state, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
            want_p, want_s = _adamw_per_tensor(params, grads, state, 3e-3, (0.9, 0.99), 1e-8, 0.05)
            assert list(got_s) == list(want_s) and list(got_p) == list(params)
            for k in want_p:
                assert torch.equal(got_p[k], want_p[k]), k
                assert not got_p[k].requires_grad
            for k in want_s:
                assert torch.equal(got_s[k], want_s[k]), k
            params, state = got_p, got_s


def test_a_stacked_fresh_state_is_the_stack_of_fresh_states():
    """``adamw_state(stacked, {}, K)`` (one allocation per tensor) equals stacking K fresh states,
    key order included: the lockstep engine builds a round's fresh optimizer state that way."""
    params = [{"a": torch.randn(2, 3), "b": torch.randn(4)} for _ in range(3)]
    one_by_one = batching.stack([optim.adamw_state(p, {}) for p in params])
    together = optim.adamw_state(batching.stack(params), {}, clients=3)
    assert list(together) == list(one_by_one)
    for k in one_by_one:
        assert torch.equal(together[k], one_by_one[k]) and together[k].dtype == one_by_one[k].dtype, k

"""The functional optimizers against torch's own, and their handling of fresh parameters."""

from __future__ import annotations

import pytest
import torch

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

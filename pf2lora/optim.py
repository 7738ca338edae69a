"""Functional optimizers over named tensors.

They return new tensors and a new optimizer state instead of mutating their inputs, so a client's
parameters and moments can be checkpointed, compared and never alias what the server holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pf2lora.state import Tensors


def sgd(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], lr: float) -> Tensors:
    return {k: (v - lr * grads[k]).detach() for k, v in params.items()}


def adamw(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    opt_state: Mapping[str, torch.Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Tensors, Tensors]:
    """One AdamW step (decoupled weight decay, bias correction) as in ``torch.optim.AdamW``.

    ``opt_state`` holds ``step`` and ``m/<key>``, ``v/<key>``, ``t/<key>`` (moments and step count)
    per parameter; a parameter that appears later or changes shape starts fresh.
    """
    b1, b2 = betas
    step = int(opt_state.get("step", torch.tensor(0)).item()) + 1
    new_params: Tensors = {}
    new_state: Tensors = {"step": torch.tensor(step)}
    for k, p in params.items():
        g = grads[k]
        m = opt_state.get(f"m/{k}")
        v = opt_state.get(f"v/{k}")
        t = opt_state.get(f"t/{k}")
        if m is None or v is None or m.shape != p.shape:  # fresh, or the rank changed (HETLoRA pruning)
            m, v, t = torch.zeros_like(p), torch.zeros_like(p), None
        # Each parameter has its own step count, so one that appears later is bias-corrected as new.
        t_k = (int(t) if t is not None else 0) + 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t_k)
        v_hat = v / (1 - b2**t_k)
        new_params[k] = (p * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)).detach()
        new_state[f"m/{k}"] = m.detach()
        new_state[f"v/{k}"] = v.detach()
        new_state[f"t/{k}"] = torch.tensor(t_k)
    return new_params, new_state

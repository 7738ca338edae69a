"""Functional optimizers over named tensors.

They return new tensors and a new optimizer state instead of mutating their inputs, so a client's
parameters and moments can be checkpointed, compared and never alias what the server holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from pf2lora import batching
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
    per parameter; a parameter that appears later or changes shape starts fresh. The step counts
    are tensors, so the same code serves stacked clients (:mod:`pf2lora.batching`), each with its
    own count, and nothing here waits for a device.
    """
    b1, b2 = betas
    state = adamw_state(params, opt_state)
    new_params: Tensors = {}
    new_state: Tensors = {"step": state["step"] + 1}
    for k, p in params.items():
        g = grads[k]
        # Each parameter has its own step count, so one that appears later is bias-corrected as new.
        t_k = state[f"t/{k}"] + 1
        m = torch.lerp(state[f"m/{k}"], g, 1 - b1)
        v = state[f"v/{k}"].mul(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = _bias_corrections(t_k, betas, p)
        denom = (v.sqrt() / bc2).add_(eps)
        step = lr / bc1
        new_params[k] = (p.mul(1 - lr * weight_decay) - step * (m / denom)).detach()
        new_state[f"m/{k}"] = m.detach()
        new_state[f"v/{k}"] = v.detach()
        new_state[f"t/{k}"] = t_k
    return new_params, new_state


def _bias_corrections(t: torch.Tensor, betas: tuple[float, float], like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """``(1 - b1^t, sqrt(1 - b2^t))`` for step count(s) ``t`` (kept on the CPU): Python floats when
    every client is at the same step (one client, or stacked clients that started together: no
    tensor work, no device transfer), else one value per client shaped to broadcast against ``like``."""
    b1, b2 = betas
    counts = t.reshape(-1).tolist()
    if len(set(counts)) == 1:
        n = counts[0]
        return 1 - b1**n, math.sqrt(1 - b2**n)
    table = torch.tensor([[1 - b1**n, math.sqrt(1 - b2**n)] for n in counts], dtype=like.dtype).to(like.device)
    return batching.per_client(table[:, 0], like), batching.per_client(table[:, 1], like)


def adamw_state(params: Mapping[str, torch.Tensor], opt_state: Mapping[str, torch.Tensor]) -> Tensors:
    """``opt_state`` completed for ``params``: every parameter with moments and a step count (zeros:
    fresh, for one that is new or changed shape) and a ``step``. Completing changes no update, and
    makes the states of clients with different histories alike, so they can be stacked."""
    out: Tensors = dict(opt_state)
    out.setdefault("step", torch.tensor(0))
    for k, p in params.items():
        m = opt_state.get(f"m/{k}")
        if m is None or f"v/{k}" not in opt_state or m.shape != p.shape:  # fresh, or the rank changed (HETLoRA pruning)
            out[f"m/{k}"], out[f"v/{k}"] = torch.zeros_like(p), torch.zeros_like(p)
            out[f"t/{k}"] = torch.zeros((), dtype=torch.long)
        else:
            out.setdefault(f"t/{k}", torch.zeros((), dtype=torch.long))
    return out

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

CPU_CHUNK = 1 << 15
"""Elements per fused update on a CPU. A fused operation runs over every tensor of the call before
the next operation starts, so a call must fit the cache: 8 stacked clients' LoRA tensors of
MiniLM-L6's shape, all at once, were 0.67x as fast as one tensor at a time; in chunks 1.0x, and
small tensors 1.1x to 1.2x faster (thread CPU time, 2-core CPU, under load; timed once by hand,
not by a benchmark script: ``accel.py``'s ``optimizer_overhead`` times the chunked update). A GPU
takes them all at once."""


def sgd(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], lr: float) -> Tensors:
    if not params:
        return {}
    with torch.no_grad():  # new tensors, not part of any graph (the inputs may be)
        keys = list(params)
        steps = torch._foreach_mul([grads[k] for k in keys], lr)
        return dict(zip(keys, torch._foreach_sub([params[k] for k in keys], steps), strict=True))


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

    The parameters that share a step count are updated together with ``torch._foreach_*`` ops: one
    call per operation for all of them rather than one per tensor (on a GPU, one kernel launch
    instead of one per tensor; a small model's step is bound by launches), on a CPU in chunks of
    ``CPU_CHUNK`` elements. The arithmetic is the same, operation for operation, so on a CPU the
    numbers are too, to the last bit (tested); on a GPU the fused divide by a number may round its
    reciprocal otherwise than the plain one (one unit in the last place, depending on the version).
    """
    b1, b2 = betas
    state = adamw_state(params, opt_state)
    new_params: Tensors = {}
    new_state: Tensors = {"step": state["step"] + 1}
    groups: dict[tuple[int, ...], list[str]] = {}
    for k in params:
        # Each parameter has its own step count, so one that appears later is bias-corrected as new.
        t_k = state[f"t/{k}"] + 1
        new_state[f"t/{k}"] = t_k
        listed = t_k.tolist()  # a number (one client) or one per stacked client
        groups.setdefault(tuple(listed) if isinstance(listed, list) else (listed,), []).append(k)
    with torch.no_grad():  # new tensors, not part of any graph (the gradients may be)
        for counts, keys in groups.items():
            if len(set(counts)) > 1:  # stacked clients at different steps: per-client corrections
                for k in keys:
                    _adamw_one(k, params[k], grads[k], state, new_params, new_state, lr, betas, eps, weight_decay)
                continue
            bc1, bc2 = 1 - b1 ** counts[0], math.sqrt(1 - b2 ** counts[0])
            for chunk in _chunks(keys, params):
                _adamw_fused(chunk, params, grads, state, new_params, new_state, lr, betas, eps, weight_decay, bc1, bc2)
    ordered: Tensors = {"step": new_state["step"]}  # the key order of a state is part of its signature
    for k in params:
        ordered[f"m/{k}"], ordered[f"v/{k}"], ordered[f"t/{k}"] = new_state[f"m/{k}"], new_state[f"v/{k}"], new_state[f"t/{k}"]
    return {k: new_params[k] for k in params}, ordered


def _adamw_fused(
    keys: list[str],
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    new_params: Tensors,
    new_state: Tensors,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bc1: float,
    bc2: float,
) -> None:
    """:func:`adamw`'s arithmetic for tensors at one step count, each operation one call for all."""
    b1, b2 = betas
    g = [grads[k] for k in keys]
    # out of place wherever a Python number enters: an in-place fused op rounds the number to the
    # tensors' dtype first (bfloat16 on a CPU), the per-tensor ops do not
    m = torch._foreach_lerp([state[f"m/{k}"] for k in keys], g, 1 - b1)
    v = torch._foreach_addcmul(torch._foreach_mul([state[f"v/{k}"] for k in keys], b2), g, g, value=1 - b2)
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v), bc2), eps)
    update = torch._foreach_mul(torch._foreach_div(m, denom), lr / bc1)
    decayed = torch._foreach_mul([params[k] for k in keys], 1 - lr * weight_decay)
    torch._foreach_sub_(decayed, update)
    for k, p_k, m_k, v_k in zip(keys, decayed, m, v, strict=True):
        new_params[k], new_state[f"m/{k}"], new_state[f"v/{k}"] = p_k, m_k, v_k


def _chunks(keys: list[str], params: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """``keys`` in order, cut into runs of at most ``CPU_CHUNK`` elements on a CPU (a larger
    tensor alone); all together elsewhere."""
    if not keys or params[keys[0]].device.type != "cpu":
        return [keys] if keys else []
    out: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = params[k].numel()
        if out[-1] and size + n > CPU_CHUNK:
            out.append([])
            size = 0
        out[-1].append(k)
        size += n
    return out


def _adamw_one(
    k: str,
    p: torch.Tensor,
    g: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    new_params: Tensors,
    new_state: Tensors,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """:func:`adamw`'s arithmetic for one tensor of stacked clients whose step counts differ."""
    b1, b2 = betas
    m = torch.lerp(state[f"m/{k}"], g, 1 - b1)
    v = state[f"v/{k}"].mul(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2 = _bias_corrections(new_state[f"t/{k}"], betas, p)
    denom = (v.sqrt() / bc2).add_(eps)
    new_params[k] = p.mul(1 - lr * weight_decay) - (m / denom) * (lr / bc1)
    new_state[f"m/{k}"], new_state[f"v/{k}"] = m, v


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


def adamw_state(params: Mapping[str, torch.Tensor], opt_state: Mapping[str, torch.Tensor], clients: int = 0) -> Tensors:
    """``opt_state`` completed for ``params``: every parameter with moments and a step count (zeros:
    fresh, for one that is new or changed shape) and a ``step``. Completing changes no update, and
    makes the states of clients with different histories alike, so they can be stacked.
    ``clients = K``: ``params`` stack K clients (:mod:`pf2lora.batching`), and the fresh counts are
    one per client: ``adamw_state(stacked, {}, K)`` equals the stack of K fresh states, built with
    one allocation per tensor rather than K."""
    out: Tensors = dict(opt_state)
    if "step" not in out:  # (not setdefault: that would build the default on every step)
        out["step"] = torch.zeros(clients, dtype=torch.long) if clients else torch.tensor(0)
    for k, p in params.items():
        m = opt_state.get(f"m/{k}")
        if m is None or f"v/{k}" not in opt_state or m.shape != p.shape:  # fresh, or the rank changed (HETLoRA pruning)
            out[f"m/{k}"], out[f"v/{k}"] = torch.zeros_like(p), torch.zeros_like(p)
            out[f"t/{k}"] = torch.zeros(clients, dtype=torch.long) if clients else torch.zeros((), dtype=torch.long)
        elif f"t/{k}" not in out:
            out[f"t/{k}"] = torch.zeros((), dtype=torch.long)
    return out

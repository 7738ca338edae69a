"""One PF2LoRA local step: a lower SGD step on the private adapter and the hypergradient of the
one-step unrolled upper objective with respect to the common adapter (spec, "One local step").

    y+ = y - eta * grad_y f(x, y; xi)
    g  = grad_x f(x, y+; zeta) - eta * H_xy(x, y; xi) v,   v = grad_y f(x, y+; zeta)

``H_xy v`` is estimated by a central (or one-sided) finite difference of ``grad_x f(x, . ; xi)``
along ``v`` (the paper's gradient-difference approximation), computed exactly by double backward,
or dropped (first-order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch

from pf2lora.autodiff import grads, leaves
from pf2lora.state import Tensors

if TYPE_CHECKING:  # a task's batch type; the tasks sit a layer above this module
    from pf2lora.tasks.base import Batch

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], "Batch"], torch.Tensor]
Estimator = Literal["finite-difference", "exact", "first-order"]


@dataclass
class StepResult:
    hypergrad: Tensors
    y_next: Tensors
    loss: torch.Tensor
    """f(x, y; xi) before the step, detached (a tensor: no device synchronisation per step)."""


def _axpy(a: float, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: y[k] + a * x[k] for k in y}


def mixed_hvp(
    loss_fn: LossFn,
    x: Tensors,
    y: Tensors,
    v: Tensors,
    batch: Batch,
    estimator: Estimator,
    eps: float = 1e-3,
    one_sided: bool = False,
    grad_x_at_y: Tensors | None = None,
) -> Tensors:
    """``H_xy v = grad_x <grad_y f(x, y; batch), v>`` by the chosen estimator."""
    if estimator == "first-order":
        return {k: torch.zeros_like(t) for k, t in x.items()}
    if estimator == "exact":
        xl, yl = leaves(x), leaves(y)
        gy = grads(loss_fn(xl, yl, batch), yl, create_graph=True)
        dot = sum((gy[k] * v[k]).sum() for k in yl)
        if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
            return {k: torch.zeros_like(t) for k, t in x.items()}
        return grads(dot, xl)
    if estimator != "finite-difference":
        raise ValueError(f"unknown hypergradient estimator {estimator!r}")
    # v is not empty there, so the sum is a tensor (not the start value 0)
    v_norm = torch.sqrt(cast(torch.Tensor, sum((t.double() ** 2).sum() for t in v.values()))).item() if v else 0.0
    if v_norm == 0.0:
        return {k: torch.zeros_like(t) for k, t in x.items()}
    e = eps / v_norm

    def grad_x(y_shifted: Tensors) -> Tensors:
        xl = leaves(x)
        return grads(loss_fn(xl, y_shifted, batch), xl)

    plus = grad_x(_axpy(e, v, y))
    if one_sided:
        base = grad_x_at_y if grad_x_at_y is not None else grad_x(dict(y))
        return {k: (plus[k] - base[k]) / e for k in x}
    minus = grad_x(_axpy(-e, v, y))
    return {k: (plus[k] - minus[k]) / (2 * e) for k in x}


def bilevel_step(
    loss_fn: LossFn,
    x: Tensors,
    y: Tensors,
    xi: Batch,
    zeta: Batch,
    lower_lr: float,
    estimator: Estimator = "finite-difference",
    eps: float = 1e-3,
    one_sided: bool = False,
) -> StepResult:
    xl, yl = leaves(x), leaves(y)
    loss_xi = loss_fn(xl, yl, xi)
    g_xi = grads(loss_xi, {**xl, **yl})
    y_next = {k: (y[k] - lower_lr * g_xi[k]).detach() for k in y}

    xl2, yl2 = leaves(x), leaves(y_next)
    g_zeta = grads(loss_fn(xl2, yl2, zeta), {**xl2, **yl2})
    v = {k: g_zeta[k] for k in y}
    hv = mixed_hvp(
        loss_fn,
        x,
        y,
        v,
        xi,
        estimator,
        eps=eps,
        one_sided=one_sided,
        grad_x_at_y={k: g_xi[k] for k in x},
    )
    hypergrad = {k: (g_zeta[k] - lower_lr * hv[k]).detach() for k in x}
    return StepResult(hypergrad, y_next, loss_xi.detach())

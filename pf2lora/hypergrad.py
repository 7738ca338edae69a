"""One PF2LoRA local step: a lower SGD step on the private adapter and the hypergradient of the
one-step unrolled upper objective with respect to the common adapter (spec, "One local step").

    y+ = y - eta * grad_y f(x, y; xi)
    g  = grad_x f(x, y+; zeta) - eta * H_xy(x, y; xi) v,   v = grad_y f(x, y+; zeta)

``H_xy v`` is estimated by a one-sided or central finite difference of ``grad_x f(x, . ; xi)``
along ``v`` (the paper's gradient-difference approximation), computed exactly by double backward,
or dropped (first-order). A step costs forward/backward passes (HOMLoRA's step is one): the lower
gradient (1), the upper gradient (1), and for ``H_xy v`` one more (one-sided: it reuses the lower
pass's ``grad_x f(x, y; xi)``), two more (central) or a double backward (exact). A caller may pass
a cached ``H_xy v`` instead (PF2LoRA's ``pf2lora.hvp_every``): then the step is the two passes.

Clients may be stacked along a leading dimension (:mod:`pf2lora.batching`): the loss is then one
value per client, every reduction is per client (:func:`~pf2lora.batching.client_sum`) and the
step size ``e = e0 / ||v||`` is one per client. Nothing reads a value back to the host, so a step
runs without a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from pf2lora.autodiff import grads, leaves
from pf2lora.batching import client_sum, per_client
from pf2lora.state import Tensors

if TYPE_CHECKING:  # a task's batch type; the tasks sit a layer above this module
    from pf2lora.tasks.base import Batch

LossFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], "Batch"], torch.Tensor]
Estimator = Literal["finite-difference", "exact", "first-order"]
ESTIMATORS: tuple[Estimator, ...] = ("finite-difference", "exact", "first-order")


@dataclass
class StepResult:
    hypergrad: Tensors
    y_next: Tensors
    loss: torch.Tensor
    """f(x, y; xi) before the step, detached: a tensor (no device synchronisation per step), one
    value per client when clients are stacked."""
    hvp: Tensors
    """The ``H_xy v`` the hypergradient used (detached): computed this step, or the cached one."""


def _zeros(x: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: torch.zeros_like(t) for k, t in x.items()}


def _check(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown hypergradient estimator {estimator!r}")


def mixed_hvp(
    loss_fn: LossFn,
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    batch: Batch,
    estimator: Estimator,
    eps: float = 1e-3,
    one_sided: bool = False,
    grad_x_at_y: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """``H_xy v = grad_x <grad_y f(x, y; batch), v>`` by the chosen estimator.

    Finite difference: ``e = eps / ||v||`` per client (``||v||`` over all of ``y``'s tensors, in
    float64); a client with ``v = 0`` gets ``H_xy v = 0``. One-sided: ``[grad_x f(x, y + e v) -
    grad_x f(x, y)] / e`` (error O(e), ``grad_x_at_y`` reused when given); central: ``[grad_x f(x,
    y + e v) - grad_x f(x, y - e v)] / (2 e)`` (error O(e^2), one more pass).
    """
    _check(estimator)
    if estimator == "first-order" or not v:
        return _zeros(x)
    if estimator == "exact":
        xl, yl = leaves(x), leaves(y)
        gy = grads(loss_fn(xl, yl, batch), yl, create_graph=True)
        dots = [client_sum(gy[k] * v[k]) for k in yl if gy[k].requires_grad]
        if not dots:  # grad_y f does not depend on x: the mixed derivative is zero
            return _zeros(x)
        return grads(torch.stack(dots).sum(), xl)

    norm = torch.stack([client_sum(t.double() ** 2) for t in v.values()]).sum(0).sqrt()  # ||v||, one per client
    # e = e0 / ||v||; where v = 0 any finite e leaves y as it is, and 1/e = ||v|| / e0 = 0 zeroes the
    # difference: no branch on a value, so nothing is read back to the host.
    e = eps / torch.where(norm > 0, norm, 1.0)
    inv_e = norm / (eps if one_sided else 2 * eps)  # 1/e (1/(2e) for the central difference)
    like = next(iter(y.values()))
    e_y = e.to(like.dtype)  # cast once: the step's tensors share a dtype (the per-key .to is then free)
    inv_e_x = inv_e.to(like.dtype)

    def shifted(sign: float) -> Tensors:
        return {k: torch.add(y[k], per_client(e_y, y[k]).to(y[k].dtype) * v[k], alpha=sign) for k in y}

    def grad_x(y_at: Mapping[str, torch.Tensor]) -> Tensors:
        xl = leaves(x)
        return grads(loss_fn(xl, y_at, batch), xl)

    plus = grad_x(shifted(1.0))
    if one_sided:
        other = grad_x_at_y if grad_x_at_y is not None else grad_x(y)
    else:
        other = grad_x(shifted(-1.0))
    return {k: (plus[k] - other[k]) * per_client(inv_e_x, plus[k]).to(plus[k].dtype) for k in x}


def bilevel_step(
    loss_fn: LossFn,
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    xi: Batch,
    zeta: Batch,
    lower_lr: float,
    estimator: Estimator = "finite-difference",
    eps: float = 1e-3,
    one_sided: bool = False,
    hvp: Mapping[str, torch.Tensor] | None = None,
) -> StepResult:
    """One bilevel step from ``(x, y)`` on mini-batches ``xi`` (lower) and ``zeta`` (upper).

    ``hvp``: an ``H_xy v`` to use instead of estimating one (a stale one, e.g. from an earlier
    local step: an approximation that saves the estimator's passes). Each pass differentiates only
    with respect to what the step uses from it.
    """
    _check(estimator)
    fresh = hvp is None and estimator != "first-order"
    reuse_lower = fresh and estimator == "finite-difference" and one_sided

    # Lower pass: grad_y f(x, y; xi) (and grad_x there, which the one-sided difference reuses).
    yl = leaves(y)
    xl = leaves(x) if reuse_lower else x
    loss_xi = loss_fn(xl, yl, xi)
    g_xi = grads(loss_xi, {**xl, **yl} if reuse_lower else yl)
    y_next = {k: (y[k] - lower_lr * g_xi[k]).detach() for k in y}

    # Upper pass: grad_x f(x, y+; zeta), and v = grad_y f(x, y+; zeta) when H_xy v is estimated.
    xl2 = leaves(x)
    yl2 = leaves(y_next) if fresh else y_next
    g_zeta = grads(loss_fn(xl2, yl2, zeta), {**xl2, **yl2} if fresh else xl2)

    if hvp is not None:
        hv = {k: hvp[k] for k in x}
    elif fresh:
        v = {k: g_zeta[k] for k in y}
        base = {k: g_xi[k] for k in x} if reuse_lower else None
        hv = mixed_hvp(loss_fn, x, y, v, xi, estimator, eps=eps, one_sided=one_sided, grad_x_at_y=base)
    else:
        hv = _zeros(x)
    hypergrad = {k: torch.add(g_zeta[k], hv[k], alpha=-lower_lr).detach() for k in x}
    return StepResult(hypergrad, y_next, loss_xi.detach(), {k: t.detach() for k, t in hv.items()})

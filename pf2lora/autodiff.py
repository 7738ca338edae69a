"""Gradients over dicts of named tensors (a leaf module: imports only torch)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = dict[str, torch.Tensor]


def grads(loss: torch.Tensor, wrt: Mapping[str, torch.Tensor], create_graph: bool = False) -> Tensors:
    """Gradient of ``loss`` with respect to each tensor of ``wrt`` (zeros where unused).

    A vector ``loss`` holds one loss per stacked client (:mod:`pf2lora.batching`): its sum gives
    each client's tensors the gradient of that client's own loss.
    """
    keys = list(wrt)
    gs = torch.autograd.grad(
        loss.sum() if loss.dim() else loss, [wrt[k] for k in keys], create_graph=create_graph, allow_unused=True, retain_graph=create_graph
    )
    return {k: (g if g is not None else torch.zeros_like(wrt[k])) for k, g in zip(keys, gs, strict=True)}


def leaves(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Fresh leaf copies that require grad, so differentiating never touches the originals."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}

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
    """Grad-requiring leaves with ``state``'s values, so differentiating never touches the originals.

    No copy: a detached alias is a tensor object of its own (setting ``requires_grad`` on it leaves
    the original as it was), ``autograd.grad`` writes into no leaf (no ``.grad``), and nothing here
    changes a tensor in place."""
    return {k: v.detach().requires_grad_(True) for k, v in state.items()}

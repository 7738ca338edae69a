"""Per-FedAvg (first-order) on a LoRA adapter: learn a shared initialisation that adapts well in
one step. Local step: w' = w - a grad f(w; D1), then w <- AdamW(w, grad f(w'; D2)). Each client is
evaluated after one adaptation step of size a on a batch of its own training data."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, grads, leaves, params_of, register
from pf2lora.methods.homlora import HOMLoRA
from pf2lora.optim import sgd


@register
class PerFedAvg(HOMLoRA):
    name = "perfedavg"
    description = "first-order Per-FedAvg on a rank-r LoRA: shared init + one local adaptation step"

    def _adapt(self, ctx: ClientContext, w: st.Tensors, fixed: Mapping[str, torch.Tensor]) -> tuple[st.Tensors, torch.Tensor]:
        """One SGD step of size ``perfedavg.inner_lr`` on a fresh batch: (adapted w', loss at w)."""
        wl = leaves(w)
        loss = self.loss(ctx.batch(), wl, fixed)
        return sgd(w, grads(loss, wl), self.cfg.perfedavg.inner_lr), loss.detach()

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """First order: the gradient at the adapted w' (on a second batch) applied to w."""
        adapted, loss = self._adapt(ctx, trained, fixed)
        al = leaves(adapted)
        trained, opt = self.adamw_update(trained, grads(self.loss(ctx.batch(), al, fixed), al), opt)
        return trained, opt, loss

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        adapted, _ = self._adapt(ctx, {**received, **params_of(client_state)}, {})
        return adapted

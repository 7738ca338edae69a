"""PF2LoRA without the bilevel structure: common and private adapters trained jointly on one
mini-batch (AdamW for the common, SGD for the private), no unrolled step and no hypergradient. The
ablation that shows what the bilevel step adds as a whole; the same cost per step as HOMLoRA.
(``pf2lora.estimator = "first-order"`` keeps the unrolled two-batch step and drops only the
hypergradient term: ``benchmarks/pf2lora_ablation.py`` runs both.)"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.methods.base import ClientContext, grads, leaves, register
from pf2lora.methods.pf2lora import PF2LoRA
from pf2lora.optim import sgd


@register
class PF2LoRAFirstOrder(PF2LoRA):
    name = "pf2lora-fo"
    description = "PF2LoRA's two adapters trained jointly by plain gradients (no-bilevel ablation)"

    @classmethod
    def needs_double_backward(cls, cfg: RunConfig) -> bool:
        return False  # plain gradients, whatever pf2lora.estimator says

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """One joint step at one mini-batch: SGD on the private adapter, AdamW on the common one."""
        x, y = st.select(trained, st.SHARED), st.select(trained, st.PRIVATE)
        xl, yl = leaves(x), leaves(y)
        loss = self.loss(ctx.batch(), xl, yl, fixed)
        g = grads(loss, {**xl, **yl})
        y = sgd(y, g, self.cfg.optim.lower_lr)
        x, opt = self.adamw_update(x, {k: g[k] for k in x}, opt)
        return {**x, **y}, opt, loss.detach()

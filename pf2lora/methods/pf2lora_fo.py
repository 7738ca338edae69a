"""PF2LoRA without the bilevel structure: common and private adapters trained jointly on one
mini-batch (AdamW for the common, SGD for the private), no unrolled hypergradient. The ablation
that shows what the bilevel hypergradient adds; the same cost per step as HOMLoRA."""

from __future__ import annotations

from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, grads, leaves, opt_state, params_of, register, with_opt_state
from pf2lora.methods.pf2lora import PF2LoRA
from pf2lora.optim import adamw, sgd


@register
class PF2LoRAFirstOrder(PF2LoRA):
    name = "pf2lora-fo"
    description = "PF2LoRA's two adapters trained jointly by plain gradients (no-bilevel ablation)"

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        o = self.cfg.optim
        x, y = dict(received), params_of(client_state)
        opt = opt_state(client_state, "shared")
        losses = []
        for _ in range(ctx.local_steps):
            xl, yl = leaves(x), leaves(y)
            loss = self.loss(ctx.batch(), xl, yl)
            g = grads(loss, {**xl, **yl})
            y = sgd(y, g, o.lower_lr)
            x, opt = adamw(x, {k: g[k] for k in x}, opt, o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
            losses.append(float(loss.detach()))
        update = ClientUpdate(ctx.client.client_id, st.outgoing(x), ctx.client.num_train, {"train_loss": sum(losses) / len(losses)})
        return update, {**y, **with_opt_state("shared", opt)}

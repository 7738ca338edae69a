"""Per-FedAvg (first-order) on a LoRA adapter: learn a shared initialisation that adapts well in
one step. Local step: w' = w - a grad f(w; D1), then w <- AdamW(w, grad f(w'; D2)). Each client is
evaluated after one adaptation step of size a on a batch of its own training data."""

from __future__ import annotations


from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, grads, leaves, opt_state, params_of, register, with_opt_state
from pf2lora.methods.homlora import HOMLoRA
from pf2lora.optim import adamw, sgd


@register
class PerFedAvg(HOMLoRA):
    name = "perfedavg"
    description = "first-order Per-FedAvg on a rank-r LoRA: shared init + one local adaptation step"

    def _adapt(self, ctx: ClientContext, w: st.Tensors) -> tuple[st.Tensors, st.Tensors, float]:
        wl = leaves(w)
        loss = self.loss(ctx.batch(), wl)
        g = grads(loss, wl)
        return sgd(w, g, self.cfg.perfedavg.inner_lr), g, float(loss.detach())

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        o = self.cfg.optim
        w = {**received, **params_of(client_state)}
        opt = opt_state(client_state, "all")
        losses = []
        for _ in range(ctx.local_steps):
            adapted, _, loss = self._adapt(ctx, w)
            al = leaves(adapted)
            g = grads(self.loss(ctx.batch(), al), al)  # first-order: grad at w' applied to w
            w, opt = adamw(w, g, opt, o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
            losses.append(loss)
        update = ClientUpdate(ctx.client.client_id, st.outgoing(st.select(w, st.SHARED)), ctx.client.num_train, {"train_loss": sum(losses) / len(losses)})
        return update, {**st.select(w, st.PRIVATE), **with_opt_state("all", opt)}

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        adapted, _, _ = self._adapt(ctx, {**received, **params_of(client_state)})
        return adapted



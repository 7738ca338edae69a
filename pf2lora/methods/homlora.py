"""HOMLoRA: FedAvg over one rank-r LoRA adapter shared by all clients (no personalisation)."""

from __future__ import annotations

import torch

from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, grads, leaves, opt_state, params_of, register, with_opt_state
from pf2lora.optim import adamw


def adamw_steps(method: Method, ctx: ClientContext, trained: st.Tensors, fixed: st.Tensors, opt: st.Tensors) -> tuple[st.Tensors, st.Tensors, float]:
    """``ctx.local_steps`` AdamW steps on ``trained`` with ``fixed`` held constant; mean loss."""
    o = method.cfg.optim
    losses = []
    for _ in range(ctx.local_steps):
        xl = leaves(trained)
        loss = method.loss(ctx.batch(), xl, fixed)
        trained, opt = adamw(trained, grads(loss, xl), opt, o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
        losses.append(float(loss.detach()))
    return trained, opt, sum(losses) / len(losses)


@register
class HOMLoRA(Method):
    name = "homlora"
    description = "FedAvg of one homogeneous rank-r LoRA adapter (no personalisation)"
    plain_mean_aggregation = True  # the base FedAvg aggregate

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return self.private_head(generator)

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        private = params_of(client_state)
        trained = {**received, **private}
        trained, opt, loss = adamw_steps(self, ctx, trained, {}, opt_state(client_state, "all"))
        shared = st.select(trained, st.SHARED)
        update = ClientUpdate(ctx.client.client_id, st.outgoing(shared), ctx.client.num_train, {"train_loss": loss})
        return update, {**st.select(trained, st.PRIVATE), **with_opt_state("all", opt)}

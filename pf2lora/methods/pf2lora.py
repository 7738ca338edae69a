"""PF2LoRA (arXiv 2503.03920): a common adapter averaged by the server plus a private adapter per
client, trained as a bilevel problem so each client's effective rank r..r+r~ adapts to its data."""

from __future__ import annotations

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.hypergrad import bilevel_step
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state
from pf2lora.optim import adamw


@register
class PF2LoRA(Method):
    name = "pf2lora"
    description = "two-level LoRA: common adapter (FedAvg, AdamW on the hypergradient) + private adapter (SGD), bilevel"
    plain_mean_aggregation = True  # the base FedAvg aggregate of the common adapter

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return {
            **lora.init_adapter(self.task.targets, lora.PRIVATE, st.PRIVATE, self.cfg.lora.private_rank, generator),
            **self.private_head(generator),
        }

    def _loss(self, x, y, batch):  # noqa: ANN001 - LossFn
        return self.loss(batch, x, y)

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        o, p = self.cfg.optim, self.cfg.pf2lora
        x, y = dict(received), params_of(client_state)
        opt = opt_state(client_state, "shared")
        losses = []
        for _ in range(ctx.local_steps):
            xi, zeta = ctx.batch(), ctx.batch()
            step = bilevel_step(self._loss, x, y, xi, zeta, o.lower_lr, p.estimator, p.fd_eps, p.fd_one_sided)
            x, opt = adamw(x, step.hypergrad, opt, o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
            y = step.y_next
            losses.append(step.loss)
        update = ClientUpdate(ctx.client.client_id, st.outgoing(x), ctx.client.num_train, {"train_loss": sum(losses) / len(losses)})
        return update, {**y, **with_opt_state("shared", opt)}

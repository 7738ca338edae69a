"""HOMLoRA: FedAvg over one rank-r LoRA adapter shared by all clients (no personalisation)."""

from __future__ import annotations

import torch

from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class HOMLoRA(Method):
    name = "homlora"
    description = "FedAvg of one homogeneous rank-r LoRA adapter (no personalisation)"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # the base FedAvg aggregate

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return self.private_head(generator)

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, opt_state(client_state, "all"))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss})
        return update, {**st.select(run.params, st.PRIVATE), **with_opt_state("all", run.opt)}

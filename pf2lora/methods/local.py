"""Local-only LoRA: each client trains its own rank r + r~ adapter and never communicates.

The adapter is a plain LoRA with the common adapter's alpha (scale alpha / (r + r~)), held privately."""

from __future__ import annotations

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class LocalOnly(Method):
    name = "local"
    description = "each client trains its own rank r + r~ LoRA; no communication"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # nothing is uploaded (the engines skip SecAgg+ for an empty upload)

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return {}

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        rank = self.cfg.lora.rank + self.cfg.lora.private_rank
        return {
            **lora.init_adapter(self.task.targets, lora.COMMON, st.PRIVATE, rank, generator),
            **self.head(st.PRIVATE, generator),
        }

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        run = self.train_steps(ctx, params_of(client_state), received, opt_state(client_state, "private"))
        return self.upload(ctx, {}, {"train_loss": run.loss}), {**run.params, **with_opt_state("private", run.opt)}

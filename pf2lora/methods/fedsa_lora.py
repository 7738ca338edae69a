"""FedSA-LoRA (arXiv 2410.01463): share A, keep B private.

Why: the paper finds that A learns general knowledge and B client-specific knowledge, so only A
is averaged while each client keeps its own B, which personalises the update ``B_k A``.

Shared: A of the common adapter (rank ``lora.rank``, Kaiming-uniform init by the server) and the
head if ``lora.head = "shared"``. Private: B (keyed ``private:<layer>.lora_B.common``, zero init per
client, held in the client state across rounds, never uploaded), the head if
``lora.head = "private"``, AdamW moments. Both A and B are trained with AdamW each round.
Upload per round: ``4 r d_in`` bytes per adapted layer (A only, + shared head).
"""

from __future__ import annotations

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class FedSALoRA(Method):
    name = "fedsa-lora"
    description = "A shared and averaged, B private per client (zero init, kept across rounds)"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # the base FedAvg aggregate (of A)

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        adapter = lora.init_adapter(self.task.targets, lora.COMMON, st.SHARED, self.cfg.lora.rank, generator)
        a_keys = {lora.adapter_keys(t, lora.COMMON, st.SHARED)[0] for t in self.task.targets}
        head = self.shared_head(generator)
        return {**{k: v for k, v in adapter.items() if k in a_keys}, **head}

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        b = {lora.adapter_keys(t, lora.COMMON, st.PRIVATE)[1]: torch.zeros(t.out_features, self.cfg.lora.rank) for t in self.task.targets}
        head = self.private_head(generator)
        return {**b, **head}

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, opt_state(client_state, "all"))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss})
        return update, {**st.select(run.params, st.PRIVATE), **with_opt_state("all", run.opt)}

"""FFA-LoRA (arXiv 2403.12313): freeze A, train and average only B.

Why: with A fixed and identical on every client, averaging the B's is exactly averaging the
clients' updates ``B_k A`` (FedAvg of separately averaged A and B is not), and only half of the
adapter travels up. A is drawn once by the server (standard LoRA init, Kaiming-uniform) and is part
of the server state; it is broadcast with B but never trained, never uploaded and never changed by
aggregation. B starts at zero.

Shared: B of the common adapter (rank ``lora.rank``) and the head if ``lora.head = "shared"``
(trained and averaged); A (frozen, server-held). Private: the head if ``lora.head = "private"``,
AdamW moments. Upload per round: ``4 r d_out`` bytes per adapted layer (B only, + head).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class FFALoRA(Method):
    name = "ffa-lora"
    description = "A frozen at a common random init; only B (and a shared head) trained and averaged"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # the mean of the uploaded B's; the server's frozen A is kept

    def frozen_keys(self) -> set[str]:
        """The server-held, never-trained A of every adapted layer."""
        return {lora.adapter_keys(t, lora.COMMON, st.SHARED)[0] for t in self.task.targets}

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return self.private_head(generator)

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        frozen_keys = self.frozen_keys()
        frozen = {k: v for k, v in received.items() if k in frozen_keys}
        trained = {**{k: v for k, v in received.items() if k not in frozen_keys}, **params_of(client_state)}
        run = self.train_steps(ctx, trained, frozen, opt_state(client_state, "all"))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss})  # B (+ shared head), never A
        return update, {**st.select(run.params, st.PRIVATE), **with_opt_state("all", run.opt)}

    def upload_spec(self, received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
        """Only B (and a shared head) travels back: A is frozen and never uploaded."""
        return {k: v for k, v in super().upload_spec(received).items() if k not in self.frozen_keys()}

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        """FedAvg (by ``num_examples``) of the uploaded B's; the server's A is kept as it is."""
        if not updates:
            return dict(server)
        frozen_keys = self.frozen_keys()
        for u in updates:
            if frozen_keys & set(u.shared):
                raise ValueError(f"ffa-lora: client {u.client_id} uploaded the frozen A")
        averaged = self.combine([u.shared for u in updates], [float(u.num_examples) for u in updates], server)
        return {**{k: v for k, v in server.items() if k in frozen_keys}, **averaged}

"""pFedLoRA (arXiv 2310.13283): a private part per client plus a small shared homogeneous LoRA,
trained alternately.

Why: the private part (here a private LoRA adapter of rank ``lora.private_rank``, plus the head if
``lora.head = "private"``) carries the client's own knowledge, while the small common adapter
(rank ``lora.rank``) is the only thing exchanged, so it carries what clients share. Each round,
phase 1 trains the private part with the received shared adapter frozen
(``pfedlora.private_steps`` steps, 0 = ``local_steps // 2``), then phase 2 trains the shared
adapter with the (updated) private part frozen for the remaining steps; only the shared adapter
is averaged (FedAvg by number of examples).

Shared: the common adapter (and the head if ``lora.head = "shared"``). Private: the private
adapter, a private head, and two AdamW states (``opt/private/...``, ``opt/shared/...``) kept in
the client state across rounds. Upload per round: ``4 r (d_in + d_out)`` bytes per adapted layer.
"""

from __future__ import annotations

import dataclasses

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class PFedLoRA(Method):
    name = "pfedlora"
    description = "private LoRA (+ head) and a small shared LoRA trained alternately; only the shared one averaged"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # the base FedAvg aggregate of the shared adapter

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return {
            **lora.init_adapter(self.task.targets, lora.PRIVATE, st.PRIVATE, self.cfg.lora.private_rank, generator),
            **self.private_head(generator),
        }

    def phase_steps(self, local_steps: int) -> tuple[int, int]:
        """(private-phase steps, shared-phase steps) of one round, summing to ``local_steps``."""
        first = self.cfg.pfedlora.private_steps or local_steps // 2
        first = min(first, local_steps)
        return first, local_steps - first

    def train_private(
        self, ctx: ClientContext, shared: st.Tensors, private: st.Tensors, opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, float | None]:
        """Phase 1: ``ctx.local_steps`` AdamW steps on the private part, ``shared`` frozen."""
        if ctx.local_steps == 0:
            return private, opt, None
        run = self.train_steps(ctx, private, shared, opt)
        return run.params, run.opt, run.loss

    def train_shared(
        self, ctx: ClientContext, shared: st.Tensors, private: st.Tensors, opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, float | None]:
        """Phase 2: ``ctx.local_steps`` AdamW steps on the shared adapter, ``private`` frozen."""
        if ctx.local_steps == 0:
            return shared, opt, None
        run = self.train_steps(ctx, shared, private, opt)
        return run.params, run.opt, run.loss

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        n_private, n_shared = self.phase_steps(ctx.local_steps)
        shared, private = dict(received), params_of(client_state)
        private, opt_p, loss_p = self.train_private(
            dataclasses.replace(ctx, local_steps=n_private), shared, private, opt_state(client_state, "private")
        )
        shared, opt_s, loss_s = self.train_shared(
            dataclasses.replace(ctx, local_steps=n_shared), shared, private, opt_state(client_state, "shared")
        )
        phases = [(n, loss) for n, loss in ((n_private, loss_p), (n_shared, loss_s)) if loss is not None]
        metrics = {"train_loss": sum(n * loss for n, loss in phases) / sum(n for n, _ in phases)}
        if loss_p is not None:
            metrics["private_phase_loss"] = loss_p
        if loss_s is not None:
            metrics["shared_phase_loss"] = loss_s
        update = self.upload(ctx, shared, metrics)
        return update, {**private, **with_opt_state("private", opt_p), **with_opt_state("shared", opt_s)}

"""PF2LoRA (arXiv 2503.03920): a common adapter averaged by the server plus a private adapter per
client, trained as a bilevel problem so each client's effective rank r..r+r~ adapts to its data."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.hypergrad import bilevel_step
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state


@register
class PF2LoRA(Method):
    name = "pf2lora"
    description = "two-level LoRA: common adapter (FedAvg, AdamW on the hypergradient) + private adapter (SGD), bilevel"
    plain_mean_aggregation = True  # the base FedAvg aggregate of the common adapter

    @classmethod
    def needs_double_backward(cls, cfg: RunConfig) -> bool:
        """The exact mixed Hessian-vector product differentiates through a gradient."""
        return cfg.pf2lora.estimator == "exact"

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return {
            **lora.init_adapter(self.task.targets, lora.PRIVATE, st.PRIVATE, self.cfg.lora.private_rank, generator),
            **self.private_head(generator),
        }

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """The bilevel step on ``trained`` = common (``shared:``, x) + private (``private:``, y):
        an SGD step on y and an AdamW step on x along the hypergradient, on two mini-batches."""
        o, p = self.cfg.optim, self.cfg.pf2lora
        x, y = st.select(trained, st.SHARED), st.select(trained, st.PRIVATE)
        xi, zeta = ctx.batch(), ctx.batch()
        step = bilevel_step(
            lambda x_, y_, batch: self.loss(batch, x_, y_, fixed),
            x,
            y,
            xi,
            zeta,
            o.lower_lr,
            p.estimator,
            p.fd_eps,
            p.fd_one_sided,
        )
        x, opt = self.adamw_update(x, step.hypergrad, opt)
        return {**x, **step.y_next}, opt, step.loss

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, opt_state(client_state, "shared"))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss})
        return update, {**st.select(run.params, st.PRIVATE), **with_opt_state("shared", run.opt)}

"""PF2LoRA (arXiv 2503.03920): a common adapter averaged by the server plus a private adapter per
client, trained as a bilevel problem so each client's effective rank r..r+r~ adapts to its data.

Choices the paper leaves open, and ours (see :mod:`pf2lora.hypergrad` for the step itself):

* ``H_xy v`` by the one-sided finite difference by default (``pf2lora.fd_one_sided``): three
  forward/backward passes a step instead of the central difference's four; its O(e0) error
  (1e-3 to 1e-2 relative at e0 = 1e-3: 8e-4 on the test MLP, 7e-3 on tiny-text's BERT in float32,
  where the central difference's is 3e-3, mostly rounding) is far below the mini-batch noise of
  the hypergradient.
* ``pf2lora.hvp_every = k`` (default 1) reuses a stale ``H_xy v`` between refreshes: an opt-in
  approximation for a cheaper step.
* The training loss evaluates a layer's two adapters as one LoRA of rank r + r~ (A = [A; C],
  B = [B, D] with the scales folded into B's columns): the same function as the sum of the two
  (:class:`pf2lora.lora.LoRALinear`'s ``sum_a (alpha_a / r_a) B_a A_a``), with half the adapter
  operations in every pass (about 10% of a pass on a small BERT).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from pf2lora import batching, lora
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.hypergrad import bilevel_step
from pf2lora.methods.base import ClientContext, ClientState, ClientUpdate, Method, opt_state, params_of, register, with_opt_state
from pf2lora.tasks.base import Task


@register
class PF2LoRA(Method):
    name = "pf2lora"
    description = "two-level LoRA: common adapter (FedAvg, AdamW on the hypergradient) + private adapter (SGD), bilevel"
    plain_mean_aggregation = True  # the base FedAvg aggregate of the common adapter
    batches = True  # its steps reduce per client (the finite difference's ||v|| too): see Method.batches

    @classmethod
    def needs_double_backward(cls, cfg: RunConfig) -> bool:
        """The exact mixed Hessian-vector product differentiates through a gradient."""
        return cfg.pf2lora.estimator == "exact"

    def __init__(self, cfg: RunConfig, task: Task):
        super().__init__(cfg, task)
        c, p = cfg.lora.alpha, cfg.lora.private_alpha  # what every task injects its LoRA layers with
        self._pairs = [
            (*lora.adapter_keys(t, lora.COMMON, st.SHARED), *lora.adapter_keys(t, lora.PRIVATE, st.PRIVATE), c, p) for t in task.targets
        ]

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def fused(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> tuple[st.Tensors, st.Tensors]:
        """``(x, y)`` with each layer's common and private adapter as one adapter of rank r + r~ in
        the common adapter's place (``y`` keeps its non-adapter tensors, e.g. a private head): the
        same model, fewer operations. Differentiable, so gradients reach every factor."""
        xf, yf = dict(x), dict(y)
        for ka, kb, pa, pb, alpha, private_alpha in self._pairs:
            if not (ka in xf and kb in xf and pa in yf and pb in yf):
                continue
            a, b, c, d = xf[ka], xf[kb], yf.pop(pa), yf.pop(pb)
            r, r_priv = a.shape[-2], c.shape[-2]
            if r_priv == 0:
                continue
            scale = alpha / (r + r_priv)  # what the layer applies to the fused adapter
            xf[ka] = torch.cat([a, c], dim=-2)
            xf[kb] = torch.cat([b * (alpha / r / scale), d * (private_alpha / r_priv / scale)], dim=-1)
        return xf, yf

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        return {
            **lora.init_adapter(self.task.targets, lora.PRIVATE, st.PRIVATE, self.cfg.lora.private_rank, generator),
            **self.private_head(generator),
        }

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """The bilevel step on ``trained`` = common (``shared:``, x) + private (``private:``, y):
        an SGD step on y and an AdamW step on x along the hypergradient, on two mini-batches.

        With ``pf2lora.hvp_every = k > 1`` the mixed Hessian-vector product is estimated on every
        k-th step of a round and reused in between (an approximation: a stale ``H_xy v``, from an
        earlier x, y, v and mini-batch). The cache and its age ride in ``opt`` (:data:`HVP_PREFIX`,
        :data:`HVP_AGE`), so the step stays pure; :meth:`client_update` drops them, so each round
        starts with a fresh product. Stacked clients start a round together, so the first
        client's age decides for all of them.
        """
        o, p = self.cfg.optim, self.cfg.pf2lora
        x, y = st.select(trained, st.SHARED), st.select(trained, st.PRIVATE)
        adam = without_hvp(opt)
        cached = cached_hvp(opt, x, p.hvp_every)
        xi = ctx.batch()
        zeta = xi if p.one_batch else ctx.batch()
        step = bilevel_step(
            lambda x_, y_, batch: self.loss(batch, *self.fused(x_, y_), fixed),
            x,
            y,
            xi,
            zeta,
            o.lower_lr,
            p.estimator,
            p.fd_eps,
            p.fd_one_sided,
            hvp=cached,
        )
        x, adam = self.adamw_update(x, step.hypergrad, adam)
        if p.hvp_every > 1:
            adam.update({HVP_PREFIX + k: t for k, t in step.hvp.items()})
            adam[HVP_AGE] = opt[HVP_AGE] + 1 if cached is not None else _age_zero()
        return {**x, **step.y_next}, adam, step.loss

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, without_hvp(opt_state(client_state, "shared")))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss})
        return update, {**st.select(run.params, st.PRIVATE), **with_opt_state("shared", without_hvp(run.opt))}


HVP_PREFIX = "hvp/"
"""Optimizer-state entries ``hvp/<key>``: the cached ``H_xy v`` of ``pf2lora.hvp_every`` (AdamW's
entries are ``step``, ``m/``, ``v/``, ``t/``: no collision)."""
HVP_AGE = "hvp_age"
"""Local steps since the cached ``H_xy v`` was computed (one per client when stacked)."""


def without_hvp(opt: Mapping[str, torch.Tensor]) -> st.Tensors:
    """``opt`` without the cached Hessian-vector product (what AdamW and a round's end keep)."""
    return {k: v for k, v in opt.items() if k != HVP_AGE and not k.startswith(HVP_PREFIX)}


def cached_hvp(opt: Mapping[str, torch.Tensor], keys: Iterable[str], every: int) -> st.Tensors | None:
    """The cached ``H_xy v`` for ``keys`` if this step reuses it (``every`` = ``pf2lora.hvp_every``),
    else None: refresh when there is none or it is ``every - 1`` steps old. The age is read from
    the first client's entry: stacked clients start a round together, so they decide alike."""
    age = opt.get(HVP_AGE)
    if every <= 1 or age is None or int(age.reshape(-1)[0]) + 1 >= every:
        return None
    keys = list(keys)
    if not all(HVP_PREFIX + k in opt for k in keys):
        return None
    return {k: opt[HVP_PREFIX + k] for k in keys}


def _age_zero() -> torch.Tensor:
    """A fresh cache's age: one per client when clients are stacked. Kept on the CPU, so reading it
    (the refresh decision) does not wait for the device."""
    k = batching.clients()
    return torch.zeros(k, dtype=torch.long) if k else torch.tensor(0)

"""FedLoRA-Optimizer (arXiv 2510.11274): A's direction learned globally, B's magnitude locally.

Why: the paper measures that federated fine-tuning moves the *direction* of LoRA's A much more
than B's (shared knowledge) and the *magnitude* of B far more than A's (personal knowledge). It
therefore reparametrises the adapter as magnitude times unit-norm direction, trains and averages
the global parts across clients, and fine-tunes B's magnitude locally for each client, in a global
stage followed by a local stage every round.

Reparametrisation (per adapted layer, rank r = ``lora.rank``, scale ``alpha / r`` as any LoRA):
``A = diag(A_M) A_D`` (A_D: r x d_in, unit-norm rows; A_M: r row magnitudes) and
``B = B_D diag(B_M)`` (B_D: d_out x r, unit-norm columns; B_M: r column magnitudes). The method
holds these four tensors under its own keys and builds the model's ``<layer>.lora_A.common`` and
``.lora_B.common`` from them differentiably (``A_D`` and ``B_D`` are normalised inside the graph,
so their gradients are the projected, norm-preserving ones) before calling the task's loss.

Shared / private (our split; the paper states only "A's direction global, B's magnitude local"):
- Shared, trained in the global stage and averaged: ``shared:<layer>.A_direction``,
  ``shared:<layer>.A_magnitude``, ``shared:<layer>.B_direction`` (and the head if
  ``lora.head = "shared"``). A's magnitude goes with A (the paper finds it barely moves) and
  B's direction is shared so that only the r magnitudes of B are personal.
- Private, trained in the local stage, persisted per client, never uploaded:
  ``private:<layer>.B_magnitude`` (and the head if ``lora.head = "private"``), AdamW moments of
  both stages (``opt/global``, ``opt/local``).
- Upload per round: ``4 (r d_in + r + d_out r)`` bytes per adapted layer (+ shared head).
- The split is fixed, not a config key: making B_D or A_M private would change what each stage
  trains and is a different method.
- The keys deliberately do not contain ``.lora_``: they are not model parameter paths, and the
  engine evaluates a "global" model from any received keys containing ``.lora_`` as if they were.
  The global model of this method is undefined (B's magnitude never leaves the clients), so no
  ``global_*`` metric is reported for it. ``personalized`` returns the composed adapter keyed
  ``private:<layer>.lora_A.common`` / ``.lora_B.common`` (the composed update is client-specific;
  hence no ``common_rel_error`` either).

Choices where the paper leaves one open (ours, stated):
- Each round: a global stage of ``local_steps - L`` AdamW steps on the shared parts with B_M
  frozen, then a local stage of ``L`` AdamW steps on B_M (and a private head) with the shared
  parts frozen; ``L = fedlora_opt.local_stage_steps``, 0 = ``max(1, local_steps // 2)`` (at least
  one step, so B_M can leave 0 even with ``local_steps = 1``), capped at ``local_steps``. The
  upload is the shared parts after the global stage (the local stage does not change them).
- Both stages use the same AdamW (``optim.*``) as every other method; moments persist across
  rounds per stage, as HOMLoRA's do.
- After every optimizer step and after averaging, A_D's rows and B_D's columns are re-normalised
  to unit norm (projection back onto the sphere); magnitudes are averaged as numbers, so the
  server's A is ``diag(mean A_M) normalise(mean A_D)``, not the mean of the clients' A.
- Init (B = 0 at start, as standard LoRA): the server draws A Kaiming-uniform (as
  ``lora.init_adapter``) and splits it into A_M (row norms) and A_D, and draws B_D as unit-norm
  Gaussian columns; each client starts with ``B_M = 0``. Consequence: in the very first round the
  global stage sees zero gradients (B = 0), so the shared parts only start moving once the local
  stage has made B_M non-zero.
- Aggregation: FedAvg weighted by ``num_examples``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.methods.base import (
    ClientContext,
    ClientState,
    ClientUpdate,
    Method,
    Trained,
    adamw_step,
    opt_state,
    params_of,
    register,
    with_opt_state,
)
from pf2lora.tasks.base import Batch

A_DIRECTION, A_MAGNITUDE, B_DIRECTION, B_MAGNITUDE = "A_direction", "A_magnitude", "B_direction", "B_magnitude"
PARTS = (A_DIRECTION, A_MAGNITUDE, B_DIRECTION, B_MAGNITUDE)
ROLES = {A_DIRECTION: st.SHARED, A_MAGNITUDE: st.SHARED, B_DIRECTION: st.SHARED, B_MAGNITUDE: st.PRIVATE}
_EPS = 1e-12


def part_key(target: lora.LoRATarget, part: str) -> str:
    """State key of reparametrised ``part`` of ``target`` (its role is fixed by :data:`ROLES`)."""
    return st.key(ROLES[part], f"{target.path}.{part}")


def _is_part(k: str) -> bool:
    return k.rsplit(".", 1)[-1] in PARTS


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (the last two dims: a leading client dimension passes through)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def unit_cols(x: torch.Tensor) -> torch.Tensor:
    """Columns scaled to unit norm (the last two dims)."""
    return x / x.norm(dim=-2, keepdim=True).clamp_min(_EPS)


@register
class FedLoRAOptimizer(Method):
    name = "fedlora-opt"
    description = "A = A_M A_D, B = B_D B_M; A's direction (and A_M, B_D) averaged, B's magnitude private; global then local stage"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # normalise(weighted mean): the uploads enter only through the mean

    # -- state -------------------------------------------------------------------------------

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        r = self.cfg.lora.rank
        init = lora.init_adapter(self.task.targets, lora.COMMON, st.SHARED, r, generator)
        out: st.Tensors = {}
        for t in self.task.targets:
            A = init[lora.adapter_keys(t, lora.COMMON, st.SHARED)[0]]
            out[part_key(t, A_MAGNITUDE)] = A.norm(dim=1)
            out[part_key(t, A_DIRECTION)] = unit_rows(A)
            out[part_key(t, B_DIRECTION)] = unit_cols(torch.randn(t.out_features, r, generator=generator))
        head = self.shared_head(generator)
        return {**out, **head}

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        b_m = {part_key(t, B_MAGNITUDE): torch.zeros(self.cfg.lora.rank) for t in self.task.targets}
        head = self.private_head(generator)
        return {**b_m, **head}

    def normalise(self, params: Mapping[str, torch.Tensor]) -> st.Tensors:
        """Directions back to unit norm (A_D rows, B_D columns); other entries unchanged."""
        out = dict(params)
        for t in self.task.targets:
            for part, fn in ((A_DIRECTION, unit_rows), (B_DIRECTION, unit_cols)):
                k = part_key(t, part)
                if k in out:
                    out[k] = fn(out[k]).detach()
        return out

    # -- the model's adapter from the parts --------------------------------------------------

    def compose(self, *states: Mapping[str, torch.Tensor]) -> st.Tensors:
        """Role-keyed model parameters: A = diag(A_M) A_D, B = B_D diag(B_M) per layer, heads as given.

        The composed adapter is keyed ``private:`` (the update it applies is client-specific).
        """
        merged: dict[str, torch.Tensor] = {}
        for s in states:
            merged.update(s)
        out: st.Tensors = {k: v for k, v in merged.items() if not _is_part(k)}
        for t in self.task.targets:
            k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.PRIVATE)
            out[k_a] = merged[part_key(t, A_MAGNITUDE)][..., :, None] * unit_rows(merged[part_key(t, A_DIRECTION)])
            out[k_b] = unit_cols(merged[part_key(t, B_DIRECTION)]) * merged[part_key(t, B_MAGNITUDE)][..., None, :]
        return out

    def loss(self, batch: Batch, *states: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task's loss of the model composed from the parts (:meth:`compose`)."""
        return self.task.objective(st.model_params(self.compose(*states)), batch)

    # -- the two stages ----------------------------------------------------------------------

    def stage_steps(self, local_steps: int) -> tuple[int, int]:
        """(global stage steps, local stage steps) of a round of ``local_steps``."""
        local = self.cfg.fedlora_opt.local_stage_steps or max(1, local_steps // 2)
        local = min(local, local_steps)
        return local_steps - local, local

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """AdamW, then the directions back onto the unit sphere (nothing to do in the local stage)."""
        trained, opt, loss = adamw_step(self, ctx.batch(), trained, fixed, opt)
        return self.normalise(trained), opt, loss

    def global_stage(self, ctx: ClientContext, shared: st.Tensors, private: st.Tensors, opt: st.Tensors, steps: int) -> Trained:
        """AdamW on the shared parts (and shared head) with the private ones (B_M) frozen."""
        return self.train_steps(dataclasses.replace(ctx, local_steps=steps), shared, private, opt)

    def local_stage(self, ctx: ClientContext, shared: st.Tensors, private: st.Tensors, opt: st.Tensors, steps: int) -> Trained:
        """AdamW on B_M (and a private head) with the shared parts frozen."""
        return self.train_steps(dataclasses.replace(ctx, local_steps=steps), private, shared, opt)

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        shared, private = dict(received), params_of(client_state)
        n_global, n_local = self.stage_steps(ctx.local_steps)
        shared, opt_g, losses_g = self.global_stage(ctx, shared, private, opt_state(client_state, "global"), n_global)
        private, opt_l, losses_l = self.local_stage(ctx, shared, private, opt_state(client_state, "local"), n_local)
        losses = losses_g + losses_l
        update = self.upload(
            ctx,
            shared,
            {
                "train_loss": sum(losses) / len(losses),
                "global_stage_loss": sum(losses_g) / max(1, len(losses_g)),
                "local_stage_loss": sum(losses_l) / max(1, len(losses_l)),
            },
        )
        new_state = {**private, **with_opt_state("global", opt_g), **with_opt_state("local", opt_l)}
        return update, new_state

    # -- server and evaluation ---------------------------------------------------------------

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        if not updates:
            return dict(server)
        return self.normalise(self.combine([u.shared for u in updates], [float(u.num_examples) for u in updates], server))

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        return self.compose(received, params_of(client_state))

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        norms = [client_state[part_key(t, B_MAGNITUDE)].norm() for t in self.task.targets if part_key(t, B_MAGNITUDE) in client_state]
        return {"b_magnitude_norm": float(torch.stack(norms).norm())} if norms else {}

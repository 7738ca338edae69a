"""FlexLoRA (arXiv 2402.11505): heterogeneous client ranks, dense aggregation, SVD redistribution.

Why: averaging LoRA factors of different ranks (or the factors at all) is not averaging the
updates they apply, and a federation held to its smallest client's rank wastes the larger ones
("bucket effect"). FlexLoRA lets every client train the rank its resources allow, averages the
clients' full updates ``Delta W_k = (alpha / r_k) B_k A_k`` into one dense ``Delta W`` per adapted
layer, and gives each client back the best rank-``r_k`` approximation of it (truncated SVD).

Shared / private:
- Client k trains and uploads its rank-``r_k`` common adapter ``A_k`` (r_k x d_in), ``B_k``
  (d_out x r_k) (keys ``shared:<layer>.lora_A.common`` / ``.lora_B.common``, their shapes are the
  rank) and the head if ``lora.head = "shared"``. Upload: ``4 r_k (d_in + d_out)`` bytes per
  layer, so it differs per client; the engine reports the mean over participants.
- Private: the head if ``lora.head = "private"``, the AdamW moments (of A, B and the head) and
  ``meta/rank`` (the client's rank, reported by ``describe_client``).
- Server state: the dense aggregate ``shared:<layer>.delta_weight`` (d_out x d_in, the update the
  layer applies, scale included), the shared head, and ``meta/init_A/<layer>``: a rank-``r_max``
  Kaiming-uniform A drawn once by the server (see the first round below). The dense matrix never
  travels: clients receive only their rank-``r_k`` factors.

Choices where the paper leaves one open (ours, stated):
- Client ranks ``r_k = resource_rank(seed, client_id, rank_min, rank_max)``: fixed per client,
  drawn from the seed, independent of its data; ``flexlora.rank_min/rank_max`` default to
  PF2LoRA's range ``[r - r~, r + r~]`` (as HETLoRA here). No pruning: a client's rank never changes.
- Aggregation weights ``n_k / sum_j n_j`` over the round's participants (FedAvg); the new dense
  ``Delta W`` replaces the old one (the aggregate *is* the global LoRA, it is not merged into W0).
- Redistribution split: with ``Delta W = U S V^T``, client k gets ``A_k = V[:, :r_k]^T`` (orthonormal
  rows) and ``B_k = U[:, :r_k] S[:r_k] / (alpha / r_k)``, so ``(alpha / r_k) B_k A_k`` is exactly the
  best rank-``r_k`` approximation (Eckart-Young) whatever ``r_k``: the alpha/r_k scale is applied
  on both sides. The singular values go into B, not split as sqrt(S) into both: a direction with
  a zero singular value then gets ``B`` column 0 and a unit ``A`` row, a valid LoRA init that can
  still learn, while a sqrt split would zero both factors and that rank would never train.
- First round (and any layer whose aggregate is exactly zero): the SVD of 0 carries no
  information, so the client gets the first ``r_k`` rows of the server's random ``meta/init_A``
  and ``B = 0`` (standard LoRA init, nested across ranks). If ``r_k`` exceeds ``min(d_in, d_out)``
  the extra ranks get init rows of A and zero columns of B.
- The SVD runs in float64 and the factors are cast back to the tensor dtype.
- Local training: ``local_steps`` AdamW steps on A, B (and a head), moments kept across rounds
  (``opt/all``) as every other method here does. The server re-factorises ``Delta W`` each
  round, but the factors usually move little between rounds (the SVD's signs are fixed so that
  each left singular vector's largest entry is positive; only an order swap of two singular
  values moves them far), so the moments still roughly fit them. Resetting them every round
  (a fresh optimizer per round) would make a short round sign-SGD-like: the first step moves
  every coordinate by ``lr`` whatever its gradient.
- Evaluation: the client's model is what it receives (the global ``Delta W`` truncated at its
  rank) plus its private head; FlexLoRA is not a personalisation method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.config import FlexLoRAConfig, RunConfig
from pf2lora.methods.base import (
    ClientContext,
    ClientState,
    ClientUpdate,
    HeterogeneousRanks,
    opt_state,
    params_of,
    register,
    with_opt_state,
)

_RANK = HeterogeneousRanks.RANK
_INIT = st.meta_key("init_A/")


def delta_key(target: lora.LoRATarget) -> str:
    """Server-state key of the dense aggregated update of ``target``."""
    return st.key(st.SHARED, f"{target.path}.delta_weight")


@register
class FlexLoRA(HeterogeneousRanks):
    name = "flexlora"
    description = "heterogeneous client ranks; server averages full Delta W, redistributes each rank by truncated SVD"
    batches = True  # its steps reduce per client: see Method.batches
    pads_ranks = True  # default AdamW steps: only the LoRA layers read a rank, and they read each client's

    @classmethod
    def rank_config(cls, cfg: RunConfig) -> FlexLoRAConfig:
        return cfg.flexlora

    # -- state -------------------------------------------------------------------------------

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        init = lora.init_adapter(self.task.targets, lora.COMMON, st.SHARED, self.rank_max, generator)
        out: st.Tensors = {}
        for t in self.task.targets:
            out[delta_key(t)] = torch.zeros(t.out_features, t.in_features)
            out[_INIT + t.path] = init[lora.adapter_keys(t, lora.COMMON, st.SHARED)[0]]
        head = self.shared_head(generator)
        return {**out, **head}

    # -- server -> client: truncated SVD at the client's rank ------------------------------------

    def factorize(self, delta: torch.Tensor, rank: int, init_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of rank ``rank`` with ``(alpha / rank) B A`` = the best rank-``rank`` approximation of ``delta``."""
        d_out, d_in = delta.shape
        if not bool(delta.ne(0).any()):  # nothing aggregated yet: standard LoRA init
            return init_a[:rank].clone(), torch.zeros(d_out, rank, dtype=delta.dtype, device=delta.device)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        # Sign convention: each left singular vector's largest entry is positive, so the factors
        # (and the AdamW moments a client keeps for them) do not flip sign from round to round.
        sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True))).squeeze(0)
        sign[sign == 0] = 1.0
        U, Vh = U * sign, Vh * sign[:, None]
        k = min(rank, S.numel())
        scale = self.alpha / rank
        A = Vh[:k].to(delta.dtype)
        B = (U[:, :k] * S[:k] / scale).to(delta.dtype)
        if k < rank:  # rank above min(d_in, d_out): extra ranks start as a LoRA init
            A = torch.cat([A, init_a[k:rank].to(delta.dtype)])
            B = torch.cat([B, torch.zeros(d_out, rank - k, dtype=delta.dtype, device=delta.device)], dim=1)
        return A.contiguous(), B.contiguous()

    def broadcast(self, server: Mapping[str, torch.Tensor], client_id: str) -> st.Tensors:
        return self.at_rank(server, self.assigned_rank(client_id))

    def at_rank(self, server: Mapping[str, torch.Tensor], rank: int) -> st.Tensors:
        """The aggregated update as a LoRA adapter of rank ``rank`` (its best approximation)."""
        out: st.Tensors = {}
        for t in self.task.targets:
            k_a, k_b = lora.adapter_keys(t, lora.COMMON, st.SHARED)
            out[k_a], out[k_b] = self.factorize(server[delta_key(t)], rank, server[_INIT + t.path])
        dense = {delta_key(t) for t in self.task.targets}
        out.update({k: v for k, v in server.items() if not st.is_meta(k) and k not in dense})
        return out

    # -- client --------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        rank = lora.rank_of(received)
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, opt_state(client_state, "all"))
        update = self.upload(ctx, st.select(run.params, st.SHARED), {"train_loss": run.loss, "rank": float(rank)})
        return update, {**st.select(run.params, st.PRIVATE), _RANK: torch.tensor(rank), **with_opt_state("all", run.opt)}

    # -- clients -> server: dense weighted mean of the full updates -----------------------------

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        if not updates:
            return dict(server)
        weights = [float(u.num_examples) for u in updates]
        # Each client's dense update (and shared head), combined by the configured aggregator.
        dense = [
            {
                **{delta_key(t): self.client_delta(u.shared, t) for t in self.task.targets},
                **{k: v for k, v in u.shared.items() if not lora.is_adapter(k)},
            }
            for u in updates
        ]
        out: st.Tensors = self.combine(dense, weights, server)
        out.update({k: v for k, v in server.items() if k.startswith(_INIT)})
        return out

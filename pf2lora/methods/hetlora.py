"""HETLoRA (arXiv 2401.06432): heterogeneous client ranks set by resources, not data.

The server keeps a rank-r_max adapter; client k trains the first r_k ranks with the rank
regulariser ``lambda * ||B[:, t:]|| * ||A[t:, :]||`` (t = floor(gamma r_k)) and self-prunes to t;
the server zero-pads every upload to r_max and averages with weights ``||Delta W_k||_F``.

Scale consistency (a classic bug): a client of rank r_k applies ``alpha / r_k``, the server's
adapter is held at ``alpha / r_max``. B is converted between the two on the way in and out, so a
client's update Delta W_k means the same thing on both sides.

Pruning choice (stated, configurable): HETLoRA prunes the tail once the regulariser has driven its
norm down; with gamma = 0.99 and ranks below 100 each prune removes a whole rank, and pruning every
round whenever the tail norm decreased collapses small ranks to 1. We prune only when the tail norm
decreased since the client's previous round *and* the tail carries less than ``prune_tol`` of the
adapter's Frobenius norm, i.e. when the regulariser has actually emptied it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pf2lora import batching, lora, robust
from pf2lora import state as st
from pf2lora.config import HETLoRAConfig, RunConfig
from pf2lora.methods.base import (
    ClientContext,
    ClientState,
    ClientUpdate,
    HeterogeneousRanks,
    adamw_step,
    opt_state,
    params_of,
    register,
    with_opt_state,
)

_RANK = HeterogeneousRanks.RANK
_TAIL = st.meta_key("tail_norm")


def _ab_keys(target: lora.LoRATarget) -> tuple[str, str]:
    return lora.adapter_keys(target, lora.COMMON, st.SHARED)


@register
class HETLoRA(HeterogeneousRanks):
    name = "hetlora"
    description = "heterogeneous client ranks, rank regulariser + self-pruning, zero-padded norm-weighted FedAvg"
    batches = True  # its steps reduce per client: see Method.batches
    pads_ranks = True  # clients of any ranks stack: the regulariser reads each one's rank (local_step)

    @classmethod
    def rank_config(cls, cfg: RunConfig) -> HETLoRAConfig:
        return cfg.hetlora

    # -- scale conversion: client rank r at alpha/r  <->  server rank r_max at alpha/r_max ------

    def to_client(self, server: Mapping[str, torch.Tensor], rank: int) -> st.Tensors:
        out: st.Tensors = {}
        for k, v in server.items():
            if st.is_meta(k):
                continue
            if lora.is_b(k):
                out[k] = v[:, :rank] * (rank / self.rank_max)
            elif lora.is_a(k):
                out[k] = v[:rank]
            else:
                out[k] = v
        return out

    at_rank = to_client

    def to_server(self, upload: Mapping[str, torch.Tensor]) -> st.Tensors:
        out: st.Tensors = {}
        for k, v in upload.items():
            if lora.is_b(k):
                rank = v.shape[1]
                padded = torch.zeros(v.shape[0], self.rank_max, dtype=v.dtype, device=v.device)
                padded[:, :rank] = v * (self.rank_max / rank)
                out[k] = padded
            elif lora.is_a(k):
                padded = torch.zeros(self.rank_max, v.shape[1], dtype=v.dtype, device=v.device)
                padded[: v.shape[0]] = v
                out[k] = padded
            else:
                out[k] = v
        return out

    def delta_norm(self, adapter: Mapping[str, torch.Tensor]) -> float:
        total = 0.0
        for t in self.task.targets:
            if adapter[_ab_keys(t)[0]].shape[0]:
                total += float(self.client_delta(adapter, t).square().sum())
        return total**0.5

    # -- the method ------------------------------------------------------------------------------

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return {
            **lora.init_adapter(self.task.targets, lora.COMMON, st.SHARED, self.rank_max, generator),
            **(self.shared_head(generator)),
        }

    def broadcast(self, server: Mapping[str, torch.Tensor], client_id: str) -> st.Tensors:
        rank = server.get(f"{_RANK}/{client_id}")
        return self.to_client(server, int(rank) if rank is not None else self.assigned_rank(client_id))

    def upload_spec(self, received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
        """A client may have pruned its rank: the rank dimension of A and B may be any size."""
        return robust.rank_wildcard_spec(received)

    def _penalty(self, adapter: Mapping[str, torch.Tensor], cut: int | torch.Tensor) -> torch.Tensor:
        """Sum over modules of ``||B[:, cut:]||_F ||A[cut:, :]||_F``; with clients stacked
        (:mod:`pf2lora.batching`), one value per client (the norms are over the last two dims).

        ``cut`` as a tensor: each stacked client's own tail, ``(K, r)`` with 1 on the ranks from
        that client's cut to its own rank (its factors padded to the widest rank by the engine);
        a client with no tail gets 0 and no gradient.
        """
        reg = torch.zeros(())
        for t in self.task.targets:
            k_a, k_b = _ab_keys(t)
            A, B = adapter[k_a], adapter[k_b]
            if isinstance(cut, torch.Tensor):
                mask = cut.to(A.dtype)
                reg = reg + torch.linalg.matrix_norm(B * mask.unsqueeze(-2)) * torch.linalg.matrix_norm(A * mask.unsqueeze(-1))
            else:
                reg = reg + torch.linalg.matrix_norm(B[..., cut:]) * torch.linalg.matrix_norm(A[..., cut:, :])
        return reg

    def _tail(self, adapter: Mapping[str, torch.Tensor], cut: int) -> tuple[torch.Tensor, float]:
        """(the regulariser's penalty, share of the tail in ||Delta W||_F) of one client."""
        tail_sq = full_sq = 0.0
        for t in self.task.targets:
            k_a, k_b = _ab_keys(t)
            A, B = adapter[k_a], adapter[k_b]
            tail_sq += float((B[:, cut:] @ A[cut:]).detach().square().sum())
            full_sq += float((B @ A).detach().square().sum())
        return self._penalty(adapter, cut), (tail_sq / full_sq) ** 0.5 if full_sq > 0 else 1.0

    def cut(self, rank: int) -> int:
        """t = floor(gamma r), at least 1: the ranks from t on are regularised, then pruned."""
        return max(1, int(self.cfg.hetlora.gamma * rank))

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """AdamW on the loss plus ``lambda * sum ||B[:, t:]|| ||A[t:, :]||`` (the loss reported is without it)."""
        reg = self.cfg.hetlora.reg
        ranks = batching.padded_ranks(lora.COMMON)
        if ranks is not None:  # stacked clients of different ranks, padded: each client's own tail
            tails = self._tails(ranks, lora.rank_of(trained))
            return adamw_step(self, ctx.batch(), trained, fixed, opt, regulariser=lambda w: reg * self._penalty(w, tails))
        rank = lora.rank_of(trained)
        cut = self.cut(rank)
        regulariser = (lambda w: reg * self._penalty(w, cut)) if cut < rank else None
        return adamw_step(self, ctx.batch(), trained, fixed, opt, regulariser=regulariser)

    def _tails(self, ranks: torch.Tensor, width: int) -> torch.Tensor:
        """``(K, width)``: True where rank index j is in client k's regularised tail
        ``cut(r_k) <= j < r_k`` (:meth:`cut`, computed on the device: no read-back per step)."""
        cuts = torch.clamp(torch.floor(self.cfg.hetlora.gamma * ranks), min=1)
        j = torch.arange(width, device=ranks.device, dtype=ranks.dtype)
        return (j >= cuts.unsqueeze(-1)) & (j < ranks.unsqueeze(-1))

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        h = self.cfg.hetlora
        rank = lora.rank_of(received)
        cut = self.cut(rank)
        run = self.train_steps(ctx, {**received, **params_of(client_state)}, {}, opt_state(client_state, "all"))
        w = run.params
        new_state: ClientState = {_RANK: torch.tensor(rank)}
        if cut < rank:
            tail, share = self._tail(w, cut)
            previous = client_state.get(_TAIL)
            if previous is not None and float(tail) < float(previous) and share < h.prune_tol:
                w = self._prune(w, rank, cut)
                rank = cut
                new_state[_RANK] = torch.tensor(rank)
            else:
                new_state[_TAIL] = tail.detach()
        update = self.upload(ctx, st.select(w, st.SHARED), {"train_loss": run.loss, "rank": float(rank)})
        return update, {**st.select(w, st.PRIVATE), **new_state, **with_opt_state("all", run.opt)}

    def _prune(self, w: st.Tensors, rank: int, cut: int) -> st.Tensors:
        """Keep the first ``cut`` ranks; rescale B so the kept part's Delta W is unchanged."""
        out = dict(w)
        for t in self.task.targets:
            k_a, k_b = _ab_keys(t)
            out[k_a] = w[k_a][:cut].clone()
            out[k_b] = w[k_b][:, :cut] * (cut / rank)
        return out

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        if not updates:
            return dict(server)
        weights = [self.delta_norm(u.shared) for u in updates]
        if sum(weights) <= 0:
            weights = [float(u.num_examples) for u in updates]
        padded = [self.to_server(u.shared) for u in updates]
        new = self.combine(padded, weights, server)
        ranks = {k: v for k, v in server.items() if k.startswith(f"{_RANK}/")}
        for u in updates:
            ranks[f"{_RANK}/{u.client_id}"] = torch.tensor(lora.rank_of(u.shared))
        return {**new, **ranks}

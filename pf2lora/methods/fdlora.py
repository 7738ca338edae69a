"""FDLoRA (arXiv 2406.07925): a global and a personal LoRA per client, fused by a gradient-free search.

Why: FDLoRA is the dual-LoRA baseline of the personalised federated LoRA literature. Each client
keeps two adapters of the same shape: a *global* one, trained locally and synchronised through the
server with a DiLoCo-style outer optimizer, and a *personal* one that never leaves the client. The
client's final model is ``w1 * global + w2 * personal`` with ``(w1, w2)`` fitted gradient-free on a
small held-out split of its training data (the paper's AdaFusion, after LoraHub). Unlike PF2LoRA the
two adapters are not coupled during training: the only coupling is the two fusion weights.

Choices where the paper leaves one open (all stated here and in docs/methods.md):

* Adapters. The global adapter is the layer's ``common`` adapter (rank ``lora.rank``, scale
  ``lora.alpha / r``), a ``shared:`` tensor. The personal adapter has the *same* rank ``lora.rank``
  and the *same effective scale* ``lora.alpha / r`` as the global one (the paper gives both LoRAs
  one configuration). It lives in the layer's ``private`` slot, whose scale is
  ``lora.private_alpha / r``, so its stored B is held in that slot's units (what the model, the
  diagnostics and the PEFT export read) and is trained through the reparametrisation
  ``B_slot = (alpha / private_alpha) * B_train``: AdamW sees exactly the dynamics of the global
  adapter. Init: standard LoRA (Kaiming-uniform A, B = 0) from the client's own init stream.
* Global training. Each round the client trains its copy of the global adapter (and a trained
  head, see below) alone, without the personal adapter in the forward pass, for ``local_steps``
  AdamW steps (``optim.*``) on its training data minus the fusion holdout, and uploads it. Its AdamW
  moments persist on the client between rounds (DiLoCo's inner optimizer keeps its state).
* Server outer optimizer (DiLoCo, as the paper): pseudo-gradient ``g = x_old - mean_k(x_k)``, the
  mean weighted by the clients' numbers of training examples (holdout excluded); torch-style SGD
  ``b <- mu b + g`` (``b = g`` at the first step), ``step = g + mu b`` (Nesterov) or ``b``,
  ``x <- x_old - lr * step`` with ``fdlora.server_lr``, ``fdlora.server_momentum``,
  ``fdlora.nesterov``. The buffer is server state under ``meta/momentum/<key>`` and is never
  broadcast. Momentum 0 and lr 1 is exactly FedAvg.
* Personal refresh. A client refreshes its personal adapter at its first participation and then
  whenever at least ``fdlora.personal_every`` rounds have passed since its last refresh (so with
  full participation and N = personal_every: rounds 1, 1 + N, 1 + 2N, ...; with partial
  participation a due refresh waits for the client's next round). A refresh *continues* training
  the persisted personal adapter (warm start, its own persisted AdamW moments) for ``local_steps``
  steps with the received global adapter in the forward pass but frozen: the personal adapter
  learns what the current global model misses on this client, so ``(w1, w2) = (1, 1)`` is the
  training-time model, and the fused update can use rank up to 2r. (The alternative, initialising
  the personal adapter from the global one and fine-tuning it alone each refresh, discards the
  personal history and makes the two adapters nearly collinear early on.)
* Fusion (AdaFusion). The paper searches (w1, w2) gradient-free in [-1.5, 1.5] with an L1 penalty
  of 0.05 on a 5% held-out split, as LoraHub does; LoraHub combines the A and B factors separately,
  which adds cross terms. We fuse the *updates*: ``Delta W = w1 * s B_g A_g + w2 * s B_p A_p``,
  implemented by scaling each adapter's B, so the fused model is exactly the weighted sum (and still
  exports as one LoRA of rank 2r). Only LoRA B's are scaled; a trained head is used as is. The
  objective is ``holdout loss + fusion_l1 * (|w1| + |w2|)`` over ``[-fusion_bound, fusion_bound]^2``.
  Search (ours, deterministic, at most ``fusion_evals`` loss evaluations, repeated points are
  cached and not re-evaluated): (1) the start point, the client's last fitted weights or (1, 1);
  (2) a coarse n x n grid over the box, n the largest odd number with n^2 <= (budget - 1) / 2
  (5 x 5 for the default 60, so the grid contains 0 and the bounds); (3) a compass (pattern) search
  from the best point: poll +-s along each axis (clipped to the box), move on strict improvement,
  halve s otherwise, s starting at half the grid spacing, until the budget is spent or s falls
  below 1e-3 * bound. Every evaluated point lies in the box.
* Holdout. ``max(1, round(fusion_holdout * n))`` of a client's n training examples (at most n - 1),
  chosen by a permutation seeded from (seed, client id), so it is the same in every round and in
  evaluation; mini-batches are drawn only from the rest. A client with a single training example
  cannot hold one out and is refused.
* Fusion weights are fitted after every refresh (against the global adapter the client received
  that round) and stored in the client state (``meta/fusion_w1``, ``meta/fusion_w2``, reported by
  ``describe_client``); ``personalized`` refits them against the current global adapter before
  evaluation, starting from the stored ones.
* Heads. A trained head belongs to the global model: with ``lora.head = "shared"`` it is uploaded
  and goes through the outer optimizer with the global adapter; with ``"private"`` it stays on the
  client and is trained with the global adapter. The personal phase holds it fixed.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from pf2lora import lora
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.methods.base import (
    ClientContext,
    ClientState,
    ClientUpdate,
    Method,
    adamw_step,
    opt_state,
    params_of,
    register,
    with_opt_state,
)
from pf2lora.tasks.base import Batch, ClientData, Task, take

MOMENTUM = st.meta_key("momentum/")
W1, W2 = st.meta_key("fusion_w1"), st.meta_key("fusion_w2")
LAST_REFRESH = st.meta_key("last_refresh")


# -- the gradient-free fusion search ------------------------------------------------------------


@dataclass(frozen=True)
class FusionResult:
    w1: float
    w2: float
    value: float
    evaluated: list[tuple[float, float, float]]
    """Every (w1, w2, objective) actually evaluated, in order."""


def fusion_search(
    objective: Callable[[float, float], float],
    bound: float,
    budget: int,
    start: tuple[float, float] = (1.0, 1.0),
) -> FusionResult:
    """Minimise ``objective`` over ``[-bound, bound]^2`` with at most ``budget`` evaluations.

    Start point, then a coarse odd grid, then a compass search from the best point (module doc).
    Deterministic; ties keep the earlier point.
    """
    if budget < 1:
        raise ValueError("the fusion search needs at least one evaluation")

    def clip(p: tuple[float, float]) -> tuple[float, float]:
        return (min(bound, max(-bound, float(p[0]))), min(bound, max(-bound, float(p[1]))))

    cache: dict[tuple[float, float], float] = {}
    evaluated: list[tuple[float, float, float]] = []
    best: list = [None, math.inf]  # [point, value]

    def f(p: tuple[float, float]) -> float | None:
        """The objective at ``p`` (clipped); None when the budget is spent."""
        p = clip(p)
        k = (round(p[0], 12), round(p[1], 12))
        if k in cache:
            return cache[k]
        if len(evaluated) >= budget:
            return None
        v = float(objective(*p))
        if math.isnan(v):
            v = math.inf
        cache[k] = v
        evaluated.append((p[0], p[1], v))
        if v < best[1] or best[0] is None:
            best[0], best[1] = p, v
        return v

    f(start)
    n = int(math.isqrt(max(0, (budget - 1) // 2)))
    if n % 2 == 0:
        n -= 1
    if n >= 1:
        ticks = [0.0] if n == 1 else [-bound + 2 * bound * i / (n - 1) for i in range(n)]
        for a in ticks:
            for b in ticks:
                if f((a, b)) is None:
                    break
    step = bound / 2 if n <= 1 else bound / (n - 1)
    tol = 1e-3 * bound
    while step >= tol and len(evaluated) < budget:
        moved = False
        x = best[0]
        for d in ((step, 0.0), (-step, 0.0), (0.0, step), (0.0, -step)):
            cand = clip((x[0] + d[0], x[1] + d[1]))
            if cand == x:
                continue
            before = best[1]
            if f(cand) is None:
                break
            if best[1] < before:
                moved = True
                break
        if not moved:
            step /= 2
    p, v = best
    return FusionResult(p[0], p[1], v, evaluated)


# -- the method -----------------------------------------------------------------------------------


def _is_personal(key: str) -> bool:
    """A factor of the personal adapter: the layer's ``private`` slot, held privately."""
    parsed = lora.split_path(key)
    return st.has_role(key, st.PRIVATE) and parsed is not None and parsed[2] == lora.PRIVATE


def fuse(global_: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], w1: float, w2: float) -> st.Tensors:
    """``w1 * global + w2 * personal`` as role-keyed parameters: each adapter's B scaled by its weight.

    Tensors that are not LoRA B's (A's, heads) are passed through unchanged (not copied).
    """
    out: st.Tensors = {}
    for k, v in global_.items():
        out[k] = w1 * v if lora.is_b(k) else v
    for k, v in personal.items():
        out[k] = w2 * v if lora.is_b(k) else v
    return out


@register
class FDLoRA(Method):
    name = "fdlora"
    description = "dual LoRA: global (Nesterov outer SGD on the pseudo-gradient) + personal, fused by a gradient-free search"
    batches = True  # its steps reduce per client: see Method.batches
    plain_mean_aggregation = True  # outer SGD on (server - weighted mean): the uploads enter only through the mean

    def __init__(self, cfg: RunConfig, task: Task):
        super().__init__(cfg, task)
        # B_slot = c * B_train: the personal adapter trains at the global adapter's scale alpha / r.
        self.personal_factor = cfg.lora.alpha / cfg.lora.private_alpha

    # -- state ---------------------------------------------------------------------------------

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return self.shared_adapter_and_head(generator)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        head = self.private_head(generator)
        personal = lora.init_adapter(self.task.targets, lora.PRIVATE, st.PRIVATE, self.cfg.lora.rank, generator)
        return {**personal, **head}

    def broadcast(self, server: Mapping[str, torch.Tensor], client_id: str) -> st.Tensors:
        return {k: v for k, v in server.items() if not st.is_meta(k)}

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        return {
            "fusion_w1": float(client_state[W1]) if W1 in client_state else float("nan"),
            "fusion_w2": float(client_state[W2]) if W2 in client_state else float("nan"),
        }

    # -- data split ----------------------------------------------------------------------------

    def holdout_index(self, client: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
        """(training indices, holdout indices) of ``client.train``; fixed per (seed, client)."""
        n = client.num_train
        if n < 2:
            raise ValueError(f"fdlora: client {client.client_id!r} has {n} training example(s); the fusion holdout needs 2")
        k = min(n - 1, max(1, round(self.cfg.fdlora.fusion_holdout * n)))
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.seed}/fdlora-holdout/{client.client_id}".encode()))
        perm = torch.randperm(n, generator=g)
        return perm[k:].sort().values, perm[:k].sort().values

    def split(self, client: ClientData) -> tuple[ClientData, Batch]:
        """The client with its holdout removed from ``train``, and the holdout."""
        train_idx, hold_idx = self.holdout_index(client)
        return dataclasses.replace(client, train=take(client.train, train_idx)), take(client.train, hold_idx)

    # -- personal adapter units ----------------------------------------------------------------

    def _to_slot(self, personal: Mapping[str, torch.Tensor]) -> st.Tensors:
        c = self.personal_factor
        return {k: (c * v if lora.is_b(k) else v) for k, v in personal.items()} if c != 1.0 else dict(personal)

    def _from_slot(self, personal: Mapping[str, torch.Tensor]) -> st.Tensors:
        c = self.personal_factor
        return {k: (v / c if lora.is_b(k) else v) for k, v in personal.items()} if c != 1.0 else dict(personal)

    # -- fusion ----------------------------------------------------------------------------------

    @torch.no_grad()
    def fit_fusion(
        self,
        holdout: Batch,
        global_: Mapping[str, torch.Tensor],
        personal: Mapping[str, torch.Tensor],
        start: tuple[float, float] = (1.0, 1.0),
    ) -> FusionResult:
        """Fusion weights minimising holdout loss + l1 (|w1| + |w2|). ``personal``: slot units."""
        f = self.cfg.fdlora

        def objective(w1: float, w2: float) -> float:
            loss = self.loss(holdout, fuse(global_, personal, w1, w2))
            return float(loss) + f.fusion_l1 * (abs(w1) + abs(w2))

        return fusion_search(objective, f.fusion_bound, f.fusion_evals, start)

    @staticmethod
    def _start(client_state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        if W1 in client_state and W2 in client_state:
            return float(client_state[W1]), float(client_state[W2])
        return 1.0, 1.0

    # -- the algorithm -------------------------------------------------------------------------

    def personal_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """AdamW on the personal adapter in training units (the model sees it in slot units)."""
        return adamw_step(self, ctx.batch(), trained, fixed, opt, objective=lambda b, p, f: self.loss(b, f, self._to_slot(p)))

    def refresh_due(self, round_: int, client_state: Mapping[str, torch.Tensor]) -> bool:
        if LAST_REFRESH not in client_state:
            return True
        return round_ - int(client_state[LAST_REFRESH]) >= self.cfg.fdlora.personal_every

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        train_client, holdout = self.split(ctx.client)
        tctx = dataclasses.replace(ctx, client=train_client)  # mini-batches never see the holdout
        private = params_of(client_state)
        personal = {k: v for k, v in private.items() if _is_personal(k)}
        head = {k: v for k, v in private.items() if not _is_personal(k)}  # a private head, if any

        # Global phase: the client's copy of the global adapter (and head), alone in the model.
        run = self.train_steps(tctx, {**received, **head}, {}, opt_state(client_state, "global"))
        new_global, new_head = st.select(run.params, st.SHARED), st.select(run.params, st.PRIVATE)
        metrics = {"train_loss": run.loss, "refreshed": 0.0}
        new_state: ClientState = {**new_head, **with_opt_state("global", run.opt)}

        if self.refresh_due(ctx.round, client_state):
            fixed = {**received, **new_head}  # the received global adapter, frozen
            p_run = self.train_steps(tctx, self._from_slot(personal), fixed, opt_state(client_state, "personal"), self.personal_step)
            personal = self._to_slot(p_run.params)
            fit = self.fit_fusion(holdout, fixed, personal, self._start(client_state))
            new_state.update(
                {
                    **personal,
                    **with_opt_state("personal", p_run.opt),
                    W1: torch.tensor(fit.w1),
                    W2: torch.tensor(fit.w2),
                    LAST_REFRESH: torch.tensor(ctx.round),
                }
            )
            metrics.update({"refreshed": 1.0, "personal_loss": p_run.loss, "fusion_w1": fit.w1, "fusion_w2": fit.w2})
        else:  # carried over unchanged
            personal_opt = st.opt_prefix("personal")
            new_state.update({k: v for k, v in client_state.items() if _is_personal(k) or k.startswith(personal_opt) or st.is_meta(k)})

        update = self.upload(ctx, new_global, metrics, num_examples=train_client.num_train)
        return update, new_state

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        """Outer SGD (momentum, optionally Nesterov) on the pseudo-gradient ``x_old - mean_k x_k``."""
        if not updates:
            return dict(server)
        f = self.cfg.fdlora
        mean = self.combine([u.shared for u in updates], [float(u.num_examples) for u in updates], server)
        new: st.Tensors = {k: v for k, v in server.items() if st.is_meta(k)}
        mu = f.server_momentum
        for k, avg in mean.items():
            old = server[k]
            g = old - avg
            if mu > 0:
                buf_old = server.get(MOMENTUM + k)
                buf = g if buf_old is None else mu * buf_old + g
                new[MOMENTUM + k] = buf
                step = g + mu * buf if f.nesterov else buf
            else:
                step = g
            new[k] = old - f.server_lr * step
        return new

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        _, holdout = self.split(ctx.client)
        private = params_of(client_state)
        personal = {k: v for k, v in private.items() if _is_personal(k)}
        global_ = {**received, **{k: v for k, v in private.items() if not _is_personal(k)}}
        fit = self.fit_fusion(holdout, global_, personal, self._start(client_state))
        return fuse(global_, personal, fit.w1, fit.w2)

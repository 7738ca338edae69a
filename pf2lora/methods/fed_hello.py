"""Fed-HeLLo (arXiv 2506.12213, TNNLS 2025): heterogeneous LoRA layer allocation.

Why: clients differ in what they can afford to train. Instead of a smaller rank (HETLoRA,
FlexLoRA), a client with fewer resources trains LoRA in fewer of the adapted layers: each round
the server allocates client k a subset of ``k_c`` layers by a heterogeneous LoRA allocation (HLA)
strategy, the client trains only those layers' adapters (the others are held at the global value
in its forward pass) and sends only those, and the server averages every layer over the clients
that trained it.

Shared / private:
- The server holds one rank-``r`` common adapter on every adapted module (and the head if
  ``lora.head = "shared"``) and sends it whole: a client's forward pass needs the global adapter
  on every layer, trained or not. Client k uploads its allocated layers' ``A`` and ``B`` (keys
  ``shared:<module>.lora_A.common`` / ``.lora_B.common``) and the shared head, nothing else:
  bytes up per round are ``4 r (d_in + d_out)`` per *allocated* module, so they shrink with the
  budget. With ``allocation = "fim"`` it adds, in a Fisher round, ``shared:fed_hello.fisher``:
  one float per layer.
- Private: the head if ``lora.head = "private"``, the AdamW moments (``opt/all``, per tensor, so
  a layer's moments wait untouched while it is not allocated), ``meta/fed_hello/budget`` and
  ``meta/fed_hello/num_layers`` (reported by ``describe_client``).
- Server state: the adapter and head, ``meta/fed_hello/round`` (rounds aggregated so far: the
  allocation of the next one is drawn from it) and ``meta/fed_hello/fisher_scores`` (the last
  aggregated per-layer scores). What a client receives also carries ``meta/fed_hello/layers``
  (its allocated layer indices, which fix the keys :meth:`FedHeLLo.upload_spec` accepts) and, in
  a Fisher round, ``meta/fed_hello/fisher_due``; these never reach a model.
- Not a personalisation method (as FlexLoRA): a client's model is the global adapter plus its
  head, so its personalised and global metrics are the same model's.

Choices where the paper leaves one open (ours, stated):
- A "layer" is one transformer block's adapted modules together (``fed_hello.layer_unit =
  "block"``: e.g. block i's query and value, as the reference code groups LoRA by ``layer.<i>``);
  a module's block is its path up to its first numeric component (``bert.encoder.layer.3``,
  ``transformer.h.3``, ``model.layers.3``). ``layer_unit = "module"`` makes every adapted module
  a layer of its own. Layers are ordered by depth (the model's module order). A module with no
  numeric component is a layer of its own: the synthetic task has one adapted module, so one
  layer, and every client trains it whatever its budget (Fed-HeLLo is then FedAvg of that layer).
- Budgets: ``fed_hello.layer_budgets`` (default 1.0 / 0.75 / 0.5, the paper's thirds of clients
  training 12 / 9 / 6 of 12 layers) are cycled over the clients: ``client_<i>`` gets budget
  ``(i + o) mod n`` with an offset ``o`` drawn once from the seed (ids without a number draw a
  budget from the seed and the id). Fixed per client, independent of its data (its resources),
  as HETLoRA's ranks. It trains ``k = floor(budget * L)`` of the ``L`` layers, at least one.
- Geometric priors over depth (``fed_hello.pattern``; layer 0 nearest the input): the pattern is
  the share of clients training each layer, drawn as a stack of layers with the input at the
  bottom. ``uniform`` 1; ``triangle`` ``L - i`` (wide base: most clients train the shallow
  layers); ``inverted-triangle`` ``i + 1`` (most train the deep ones); ``bottleneck``
  ``1 + |2i - (L - 1)|`` (both ends, fewest in the middle: the reference code's bottleneck prior
  is such a V at 3:2:1 levels). We could not read the paper's figure text, only its abstract and
  code, so the triangle's direction is this geometric reading; the names say which end.
- GD-HLA (``allocation = "gd"``): client k trains the ``k`` layers of highest prior weight,
  deterministically (so clients of one budget train the same layers every round and the counts
  per layer form the pattern); among layers of equal weight the ones evenly spread over depth
  (members ``j m // n`` of the ``m`` tied layers, ``n`` still needed): for ``uniform`` this gives
  every other layer, as the reference code's uniform configs.
- RGD-HLA (``allocation = "rgd"``): ``k`` layers sampled without replacement with probabilities
  proportional to the prior (``torch.multinomial``), per client per round, from a generator
  seeded by (seed, client, round): reproducible, and the same whatever the engine.
- FIM-HLA (``allocation = "fim"``, the default): as RGD-HLA with weights from per-layer Fisher
  scores of the global model instead of the prior. Where they are computed (privacy): the server
  holds no data (the reference code computes them on a server-side held-out set), so in Fisher
  rounds (``round % fed_hello.fisher_every == 0``) each participating client computes them
  before training, with the adapter it received, on ``fed_hello.fisher_samples`` of its own
  training examples (drawn from a stream of its own): layer l's score is the empirical Fisher
  trace ``(1/n) sum_i sum_{theta in l} (d loss_i / d theta)^2`` over that layer's A and B
  (per-example gradients, one example at a time). It uploads only these ``L`` scalars; the
  server averages them (weights ``n_k``, through the configured aggregator) and uses them from
  the next round on. Until the first scores arrive, and for the rounds before, the pattern's
  RGD-HLA allocates (the reference code's prior warm-up). Scores become weights as the reference
  code does, with its bug fixed: 1-D k-means into ``fed_hello.fisher_levels`` levels (exact, by
  dynamic programming over the sorted scores; equal scores share a level), the levels numbered by
  ascending centre, level j (1 = lowest) weight j, so the highest-Fisher layers get the highest
  probability (the reference's KMeans labels are arbitrary, so its 1/27, 2/27, 1/9 landed on
  arbitrary clusters). Fisher rounds cost a client ``fisher_samples`` forward/backward passes of
  one example; they are skipped where allocation cannot matter (one layer, or every budget
  covering every layer).
- Why FIM by default: it is the paper's headline strategy and what the authors' own configs
  run (FIM refreshed every few rounds after a bottleneck-prior warm-up); it follows where the
  gradient signal is, and its per-layer scalars cost next to nothing to send. ``rgd`` with a
  prior is the choice for runs too short for a refresh (``rounds <= fisher_every``, where
  ``fim`` is exactly that anyway) or under client-level DP.
- No compute for a frozen layer: the reference code zeroes the learning rate of unallocated
  layers and still computes their gradients and optimizer steps. Here the allocated layers' (and
  the head's) tensors are the only trained tensors; the others are passed to the loss as
  constants (no grad), so autograd computes no gradient for them (it still carries the
  activations' gradient through them down to a trained layer below, as through the frozen base
  weights, and stops below the shallowest trained layer), the optimizer never sees them and
  their AdamW moments and step counts are carried over untouched.
- Aggregation: every layer over only the clients that trained it (``combine`` of their tensors,
  weights ``n_k``, so robust aggregators and clipping act per layer; with ``server.clip_norm``
  each client's whole upload is clipped first, as other methods clip it); a layer nobody trained
  keeps the global value, bit for bit. The shared head is trained and averaged by every client.
  Under client-level DP one ``combine`` releases the mean of all participants' clipped changes
  (an unallocated layer's change is 0) with its noise, and each layer's mean change is scaled by
  ``m / m_l`` (participants over its trainers, public numbers): the Gaussian mechanism on the sum
  of the trainers' changes, post-processed, so the accountant's one release per round holds.
  ``fim`` is refused under DP: the Fisher scores are a release the accountant does not cover.
- Batching (``parallel_clients``): clients are stacked only with clients training the same
  layers (the batched engine groups requests whose trained and fixed tensors have the same keys
  and shapes); different subsets train in separate groups.
- Reporting: each client's budget and layer count (``layer_budget``, ``num_layers``) in the
  summary; each round's record (metrics.jsonl) lists the layers every counted client trained
  (``layers``: client -> layer indices, read from its upload).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pf2lora import lora, robust
from pf2lora import state as st
from pf2lora.autodiff import grads, leaves
from pf2lora.config import RunConfig
from pf2lora.errors import UserError
from pf2lora.methods.base import (
    ClientContext,
    ClientState,
    ClientUpdate,
    Method,
    opt_state,
    params_of,
    register,
    resource_rank,
    with_opt_state,
)
from pf2lora.tasks.base import Task, take

ROUND = st.meta_key("fed_hello/round")
"""Server state: rounds aggregated so far."""
SCORES = st.meta_key("fed_hello/fisher_scores")
"""Server state: the last aggregated per-layer Fisher scores."""
LAYERS = st.meta_key("fed_hello/layers")
"""What a client receives: the indices of the layers it trains this round."""
FISHER_DUE = st.meta_key("fed_hello/fisher_due")
"""What a client receives in a Fisher round: send per-layer Fisher scores."""
BUDGET = st.meta_key("fed_hello/budget")
NUM_LAYERS = st.meta_key("fed_hello/num_layers")
FISHER = st.key(st.SHARED, "fed_hello.fisher")
"""Upload key of a client's per-layer Fisher scores (one float per layer)."""

PATTERNS = ("uniform", "triangle", "inverted-triangle", "bottleneck")


def block_of(path: str) -> str:
    """The transformer block a module belongs to: its path up to its first numeric component
    (the block's index in its layer list), or the whole path if it has none."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


def layer_groups(targets: Sequence[lora.LoRATarget], unit: str) -> list[list[lora.LoRATarget]]:
    """The allocatable layers, in depth order: one per block (``unit = "block"``) or per module."""
    if unit == "module":
        return [[t] for t in targets]
    groups: dict[str, list[lora.LoRATarget]] = {}
    for t in targets:
        groups.setdefault(block_of(t.path), []).append(t)
    return list(groups.values())


def pattern_weights(pattern: str, num_layers: int) -> list[float]:
    """The geometric prior over depth (layer 0 nearest the input), unnormalised, all positive."""
    n = num_layers
    if pattern == "uniform":
        return [1.0] * n
    if pattern == "triangle":
        return [float(n - i) for i in range(n)]
    if pattern == "inverted-triangle":
        return [float(i + 1) for i in range(n)]
    if pattern == "bottleneck":
        return [float(1 + abs(2 * i - (n - 1))) for i in range(n)]
    raise ValueError(f"unknown pattern {pattern!r} (known: {', '.join(PATTERNS)})")


def top_k(weights: Sequence[float], k: int) -> list[int]:
    """GD-HLA: the ``k`` layers of highest weight; among equal weights, evenly spread ones."""
    chosen: list[int] = []
    for w in sorted(set(weights), reverse=True):
        need = k - len(chosen)
        if need <= 0:
            break
        members = [i for i, x in enumerate(weights) if x == w]
        chosen += members if len(members) <= need else [members[j * len(members) // need] for j in range(need)]
    return sorted(chosen)


def sample_layers(weights: Sequence[float], k: int, generator: torch.Generator) -> list[int]:
    """RGD-HLA: ``k`` distinct layers drawn with probabilities proportional to ``weights``."""
    if k >= len(weights):
        return list(range(len(weights)))
    p = torch.tensor(list(weights), dtype=torch.float64)
    return sorted(torch.multinomial(p, k, replacement=False, generator=generator).tolist())


def fisher_levels(scores: Sequence[float], levels: int) -> list[int]:
    """Each score's level, 0 = lowest: the optimal 1-D k-means clustering into at most ``levels``
    clusters (contiguous runs of the sorted scores; equal scores never split), the clusters
    numbered by ascending centre, so a higher score never gets a lower level."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i], i))
    x = [float(scores[i]) for i in order]
    cuts = [0] + [j for j in range(1, n) if x[j - 1] < x[j]] + [n]  # allowed segment boundaries
    k = min(levels, len(cuts) - 1)
    s1, s2 = [0.0], [0.0]
    for v in x:
        s1.append(s1[-1] + v)
        s2.append(s2[-1] + v * v)

    def sse(a: int, b: int) -> float:
        return max(0.0, s2[b] - s2[a] - (s1[b] - s1[a]) ** 2 / (b - a))

    inf = math.inf
    # best[c][j]: least SSE of the first cuts[j] scores in c clusters; back[c][j]: the previous cut.
    best = [[inf] * len(cuts) for _ in range(k + 1)]
    back = [[0] * len(cuts) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(1, len(cuts)):
            for i in range(j):
                if best[c - 1][i] < inf:
                    cost = best[c - 1][i] + sse(cuts[i], cuts[j])
                    if cost < best[c][j]:
                        best[c][j], back[c][j] = cost, i
    level = [0] * n
    j = len(cuts) - 1
    for c in range(k, 0, -1):
        i = back[c][j]
        for pos in range(cuts[i], cuts[j]):
            level[order[pos]] = c - 1
        j = i
    return level


def fisher_weights(scores: Sequence[float], levels: int) -> list[float]:
    """Sampling weights of FIM-HLA: level j (1 = lowest Fisher) has weight j."""
    return [float(lv + 1) for lv in fisher_levels(scores, levels)]


def _seeded(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _param_of(opt_entry: str) -> str | None:
    """The parameter key an AdamW entry (``m/<key>``, ``v/<key>``, ``t/<key>``) belongs to; None for ``step``."""
    return opt_entry.split("/", 1)[1] if "/" in opt_entry else None


@register
class FedHeLLo(Method):
    name = "fed-hello"
    description = "heterogeneous LoRA layer allocation: each client trains a budgeted subset of layers (geometric or Fisher HLA)"
    batches = True  # default AdamW steps; clients with the same layers stack (see the module docstring)

    def __init__(self, cfg: RunConfig, task: Task):
        super().__init__(cfg, task)
        self.fh = cfg.fed_hello
        self.groups = layer_groups(task.targets, self.fh.layer_unit)
        self.layer_keys: list[list[str]] = [[k for t in g for k in lora.adapter_keys(t, lora.COMMON, st.SHARED)] for g in self.groups]
        self.layer_of = {k: i for i, keys in enumerate(self.layer_keys) for k in keys}
        self.num_layers = len(self.groups)
        self.prior = pattern_weights(self.fh.pattern, self.num_layers)
        self.uses_fisher = self.fh.allocation == "fim" and min(self.layers_for(b) for b in self.fh.layer_budgets) < self.num_layers
        if self.uses_fisher and cfg.server.dp_noise_multiplier > 0:
            raise UserError(
                'fed-hello: fed_hello.allocation = "fim" uploads per-layer Fisher scores that client-level DP '
                '(server.dp_noise_multiplier > 0) does not cover; use "rgd" or "gd"'
            )

    # -- budgets and allocation ------------------------------------------------------------------

    def budget(self, client_id: str) -> float:
        """The share of layers client ``client_id``'s resources allow (see the module docstring)."""
        budgets = self.fh.layer_budgets
        n = len(budgets)
        number = re.search(r"(\d+)$", client_id)
        if number is None:
            return budgets[resource_rank(self.cfg.seed, f"fed-hello/{client_id}", 0, n - 1)]
        offset = int(torch.randint(0, n, (1,), generator=_seeded(self.cfg.seed, "fed-hello", "budget-offset")))
        return budgets[(int(number.group(1)) + offset) % n]

    def layers_for(self, budget: float) -> int:
        """How many layers a client of ``budget`` trains: ``floor(budget * L)``, at least one."""
        return min(self.num_layers, max(1, math.floor(budget * self.num_layers + 1e-9)))

    def fisher_due(self, round_: int) -> bool:
        return self.uses_fisher and round_ % self.fh.fisher_every == 0

    def allocate(self, server: Mapping[str, torch.Tensor], client_id: str, round_: int) -> list[int]:
        """The layer indices client ``client_id`` trains in ``round_``."""
        k = self.layers_for(self.budget(client_id))
        if k >= self.num_layers:
            return list(range(self.num_layers))
        if self.fh.allocation == "gd":
            return top_k(self.prior, k)
        weights = self.prior
        if self.fh.allocation == "fim" and SCORES in server:
            weights = fisher_weights(server[SCORES].tolist(), self.fh.fisher_levels)
        return sample_layers(weights, k, _seeded(self.cfg.seed, "fed-hello", "allocate", client_id, round_))

    def allocated(self, received: Mapping[str, torch.Tensor]) -> list[int]:
        """The layers a client was told to train (all of them if the message names none)."""
        return [int(i) for i in received[LAYERS].tolist()] if LAYERS in received else list(range(self.num_layers))

    def layers_in(self, upload: Mapping[str, torch.Tensor]) -> list[int]:
        """The layers an upload holds (the layers its client trained)."""
        return sorted({self.layer_of[k] for k in upload if k in self.layer_of})

    def keys_of(self, layers: Sequence[int]) -> list[str]:
        return [k for i in layers for k in self.layer_keys[i]]

    @staticmethod
    def params(received: Mapping[str, torch.Tensor]) -> st.Tensors:
        """The model parameters of a message (its ``meta/`` entries left out)."""
        return params_of(received)

    # -- state -----------------------------------------------------------------------------------

    def init_server(self, generator: torch.Generator) -> st.Tensors:
        return {**self.shared_adapter_and_head(generator), ROUND: torch.tensor(0)}

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        b = self.budget(client_id)
        return {**self.private_head(generator), BUDGET: torch.tensor(b), NUM_LAYERS: torch.tensor(self.layers_for(b))}

    def broadcast(self, server: Mapping[str, torch.Tensor], client_id: str) -> st.Tensors:
        """The whole global adapter (and head), the client's layers for the next round and, in a
        Fisher round, the request for scores."""
        round_ = int(server[ROUND]) + 1 if ROUND in server else 1
        out = self.params(server)
        out[LAYERS] = torch.tensor(self.allocate(server, client_id, round_), dtype=torch.long)
        if self.fisher_due(round_):
            out[FISHER_DUE] = torch.tensor(True)
        return out

    def upload_spec(self, received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
        """Exactly the allocated layers' A and B, the shared head, and the scores if requested."""
        params = self.params(received)
        keys = set(self.keys_of(self.allocated(received)))
        spec: dict[str, tuple[int | None, ...]] = {
            k: tuple(v.shape) for k, v in params.items() if st.has_role(k, st.SHARED) and (k in keys or not lora.is_adapter(k))
        }
        if FISHER_DUE in received:
            spec[FISHER] = (self.num_layers,)
        return spec

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        """The global adapter (and a private head): Fed-HeLLo does not personalise."""
        return {**self.params(received), **st.select(params_of(client_state), st.PRIVATE)}

    def global_params(self, received: st.Tensors, client_state: ClientState) -> st.Tensors | None:
        return super().global_params(self.params(received), client_state)

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        if BUDGET not in client_state:
            return {}
        return {"layer_budget": float(client_state[BUDGET]), "num_layers": int(client_state[NUM_LAYERS])}

    def round_record(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        return {"layers": {u.client_id: self.layers_in(u.shared) for u in updates}}

    # -- client ----------------------------------------------------------------------------------

    def fisher_scores(self, ctx: ClientContext, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-layer empirical Fisher trace of the received model on a few of the client's own
        training examples: ``(1/n) sum_i sum_{theta in layer} (d loss_i / d theta)^2``."""
        n = min(self.fh.fisher_samples, ctx.client.num_train)
        g = _seeded(self.cfg.seed, "fed-hello", "fisher", ctx.client.client_id, ctx.round)
        index = torch.randperm(ctx.client.num_train, generator=g)[:n]
        adapter = {k: v for k, v in params.items() if k in self.layer_of}
        rest = {k: v for k, v in params.items() if k not in self.layer_of}
        totals = [torch.zeros((), dtype=torch.float64) for _ in self.layer_keys]
        with torch.enable_grad():
            for i in index.tolist():
                xl = leaves(adapter)
                loss = self.loss(take(ctx.client.train, torch.tensor([i])), xl, rest)
                gs = grads(loss, xl)
                for layer, keys in enumerate(self.layer_keys):
                    for k in keys:
                        totals[layer] = totals[layer] + gs[k].detach().double().square().sum()
        return (torch.stack([t.cpu() for t in totals]) / max(1, n)).float()  # one read per layer, not per step

    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]:
        params = self.params(received)
        layers = self.allocated(received)
        own = set(self.keys_of(layers))
        trained = {k: v for k, v in params.items() if k in own or not lora.is_adapter(k)}  # its layers and the shared head
        trained.update(st.select(params_of(client_state), st.PRIVATE))  # a private head
        fixed = {k: v for k, v in params.items() if k not in trained}  # the other layers: constants, no grad
        opt = opt_state(client_state, "all")
        kept = {e: v for e, v in opt.items() if _param_of(e) is not None and _param_of(e) not in trained}
        opt_in = {e: v for e, v in opt.items() if e not in kept}
        scores = self.fisher_scores(ctx, {**params, **trained}) if FISHER_DUE in received else None
        run = self.train_steps(ctx, trained, fixed, opt_in)
        shared = st.select(run.params, st.SHARED)
        if scores is not None:
            shared[FISHER] = scores
        update = self.upload(ctx, shared, {"train_loss": run.loss, "num_layers": float(len(layers))})
        meta = {k: client_state[k] for k in (BUDGET, NUM_LAYERS) if k in client_state}
        return update, {**st.select(run.params, st.PRIVATE), **meta, **with_opt_state("all", {**kept, **run.opt})}

    # -- server ----------------------------------------------------------------------------------

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        """Every layer over only the clients that trained it (weights ``n_k``); untouched layers
        keep the global value; the shared head over everyone; the Fisher scores over their senders."""
        if not updates:
            return dict(server)
        uploads = [{k: v for k, v in u.shared.items() if k != FISHER} for u in updates]
        weights = [float(u.num_examples) for u in updates]
        new: st.Tensors = dict(server)
        if self.cfg.server.dp_noise_multiplier > 0:
            new.update(self._dp_combine(server, uploads, weights))
        else:
            clip = self.cfg.server.clip_norm
            if clip > 0:  # each client's whole change clipped, as a one-combine method clips it
                uploads = [robust.clip_update(s, {k: server[k] for k in s}, clip)[0] for s in uploads]
            for keys in [*self.layer_keys, self._head_keys(server)]:
                members = [(s, w) for s, w in zip(uploads, weights, strict=True) if keys and keys[0] in s]
                if members:
                    new.update(self.combine([{k: s[k] for k in keys} for s, _ in members], [w for _, w in members], server))
        senders = [(u.shared[FISHER], w) for u, w in zip(updates, weights, strict=True) if FISHER in u.shared]
        if senders:
            mean = self.combine([{FISHER: f} for f, _ in senders], [w for _, w in senders])
            new[SCORES] = mean[FISHER].detach().cpu()
        new[ROUND] = torch.tensor(int(server[ROUND]) + 1 if ROUND in server else 1)
        return new

    def _head_keys(self, server: Mapping[str, torch.Tensor]) -> list[str]:
        return [k for k in server if st.has_role(k, st.SHARED) and not lora.is_adapter(k)]

    def _dp_combine(self, server: Mapping[str, torch.Tensor], uploads: list[st.Tensors], weights: list[float]) -> st.Tensors:
        """Client-level DP: one release (an unallocated layer's change is 0), then each layer's
        mean change scaled from all participants to its trainers (post-processing)."""
        keys = [k for k in server if st.has_role(k, st.SHARED)]
        reference = {k: server[k] for k in keys}
        dense = [{k: s.get(k, reference[k]) for k in keys} for s in uploads]
        released = self.combine(dense, weights, reference)
        out: st.Tensors = {}
        for layer_keys in [*self.layer_keys, self._head_keys(server)]:
            trainers = sum(1 for s in uploads if layer_keys and layer_keys[0] in s)
            if trainers:
                scale = len(uploads) / trainers
                out.update({k: reference[k] + scale * (released[k] - reference[k]) for k in layer_keys})
        return out

"""The engine-agnostic algorithm API and the method registry.

A method is three functions over named tensors, called by any engine (the in-process runner, the
Flower apps):

* ``client_update(ctx, received, client_state) -> (ClientUpdate, new_client_state)``
* ``aggregate(server_state, updates) -> new_server_state``
* ``personalized(ctx, received, client_state) -> parameters to evaluate client k with``

Methods never import an engine, engines never know a method by name. Methods must not mutate
``received``, the server state or a client state in place: they return new ones.

The mechanics every method shares live here, so a method file holds only what makes it different:
local training is :meth:`Method.train_steps`, a loop over the pure per-step
:meth:`Method.local_step` (by default :func:`adamw_step`, with the run's ``optim.*`` in
:meth:`Method.adamw_update`); a client's message is built by :meth:`Method.upload`, through
:func:`pf2lora.state.outgoing`; heterogeneous client ranks are :class:`HeterogeneousRanks`.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, cast

import torch

from pf2lora import batching, lora, privacy, robust
from pf2lora import state as st
from pf2lora.autodiff import grads, leaves
from pf2lora.config import FlexLoRAConfig, HETLoRAConfig, RunConfig, resolved_rank_range
from pf2lora.optim import adamw
from pf2lora.state import opt_state, params_of, with_opt_state  # noqa: F401  (re-exported: the methods' API)
from pf2lora.tasks.base import Batch, ClientData, Task, batch_indices, data_device, index_to, on_host, sample_batch

ClientState = dict[str, torch.Tensor]
"""A client's persistent state: ``private:`` parameters, optimizer entries (:func:`opt_state`) and
method metadata (:func:`pf2lora.state.meta_key`)."""


@dataclass
class ClientContext:
    """What a client update may use: its data, the task's loss, and its own random stream."""

    client: ClientData
    task: Task
    generator: torch.Generator
    round: int
    local_steps: int
    batch_size: int

    def batch(self) -> Batch:
        return sample_batch(self.client.train, self.batch_size, self.generator)


@dataclass
class StackedContext(ClientContext):
    """Several clients' contexts as one, for a step run on their stacked tensors
    (:mod:`pf2lora.batching`): :meth:`batch` stacks each client's own draw from its own stream.

    The per-client fields (``client``, ``generator``) are the first client's; a step that may run
    stacked (:attr:`Method.batches`) reads only ``batch()``, ``round`` and ``local_steps``.
    """

    contexts: Sequence[ClientContext] = ()
    pooled: Batch | None = None
    """The clients' training sets one after another (:func:`pool`), when they have the same
    size: then a step's mini-batches are one gather, not one per client."""
    offsets: torch.Tensor | None = field(default=None, repr=False)
    """Where each client's rows start in ``pooled``, a ``(k, 1)`` column (made on the first draw)."""

    @classmethod
    def of(cls, contexts: Sequence[ClientContext], pooled: Batch | None = None) -> StackedContext:
        c = contexts[0]
        return cls(c.client, c.task, c.generator, c.round, c.local_steps, c.batch_size, contexts, pooled)

    def batch(self) -> Batch:
        if self.pooled is None:
            return batching.stack([c.batch() for c in self.contexts])
        n, clients = self.client.num_train, len(self.contexts)
        if self.offsets is None:  # where each client's rows start in the pool, one row per client
            self.offsets = torch.arange(0, clients * n, n).unsqueeze(1)
        # each client's own draw from its own stream (a group shares one batch size), as rows of the pool
        index = (batch_indices(n, self.batch_size, [c.generator for c in self.contexts]) + self.offsets).view(-1)
        on_device = index_to(index, data_device(self.pooled))  # one transfer a step, not one per field
        return {k: v.index_select(0, index if on_host(k) else on_device).view(clients, -1, *v.shape[1:]) for k, v in self.pooled.items()}


def pool(contexts: Sequence[ClientContext]) -> Batch | None:
    """The clients' training sets concatenated (client-major), or None if they differ in size."""
    trains = [c.client.train for c in contexts]
    shapes = {tuple((k, tuple(v.shape)) for k, v in t.items()) for t in trains}
    return {k: torch.cat([t[k] for t in trains]) for k in trains[0]} if len(shapes) == 1 else None


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back. ``shared`` only ever comes from :func:`pf2lora.state.outgoing`."""

    client_id: str
    shared: st.Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shared.values())


Objective = Callable[[Batch, st.Tensors, Mapping[str, torch.Tensor]], torch.Tensor]
"""``(batch, trained, fixed) -> loss``: the loss a local step differentiates with respect to the
trained tensors (grad-requiring leaves), ``fixed`` held constant."""

Regulariser = Callable[[st.Tensors], torch.Tensor]
"""A term added to the loss of a step before differentiating, not to the loss it reports."""

LocalStep = Callable[[ClientContext, st.Tensors, Mapping[str, torch.Tensor], st.Tensors], tuple[st.Tensors, st.Tensors, torch.Tensor]]
"""``(ctx, trained, fixed, opt) -> (trained, opt, loss)``: one local step (see :meth:`Method.local_step`)."""


class Trained(NamedTuple):
    """What a run of local steps leaves: the trained tensors, the optimizer state, each step's loss."""

    params: st.Tensors
    opt: st.Tensors
    losses: list[float]

    @property
    def loss(self) -> float:
        """Mean loss over the steps, summed in step order (every method's ``train_loss``)."""
        return sum(self.losses) / len(self.losses)


class Method(ABC):
    """Base class: plain FedAvg of the shared state, personalised state kept by the client."""

    name: ClassVar[str]
    description: ClassVar[str]
    pools_data: ClassVar[bool] = False
    """True for a centralised reference: the engine trains one client on everyone's data."""
    batches: ClassVar[bool] = False
    """True if its local steps may run for many clients at once on stacked tensors (the batched
    in-process engine, ``parallel_clients``): every step it trains with reduces per client
    (:func:`pf2lora.batching.client_sum`, or a loss/norm over trailing dimensions only) and reads
    nothing per client but ``ctx.batch()``. Set it only with a test that the batched engine gives
    the sequential numbers (tests/test_batched.py)."""
    pads_ranks: ClassVar[bool] = False
    """True if clients whose LoRA factors differ only in rank may be stacked into one step with the
    factors zero-padded to the largest rank (:func:`pf2lora.batching.padded_ranks`): the step reads
    a client's rank nowhere but there and in the LoRA layers. Otherwise each rank is a group of
    its own. Set it only with a test that such a group gives the sequential numbers."""
    plain_mean_aggregation: ClassVar[bool] = False
    """True if ``aggregate`` uses the uploads only through one ``combine`` of all of them, weighted
    by ``num_examples``, with the default aggregator: same keys and shapes from every client, so
    ``aggregate(server, [one update holding that mean])`` gives the same result. Then the
    upload can be secure-aggregated (``server.secure_aggregation``): the server gets only the
    mean. Set it only after checking ``aggregate`` (and everything it calls) says so."""

    def __init__(self, cfg: RunConfig, task: Task):
        self.cfg = cfg
        self.task = task

    @classmethod
    def needs_double_backward(cls, cfg: RunConfig) -> bool:
        """Whether local training under ``cfg`` differentiates through a gradient (double backward).

        A task reads it to pick an attention implementation that supports that (PyTorch's fused
        SDPA kernels do not on CPU); plain first-order methods leave the fast default alone.
        """
        return False

    # -- state ---------------------------------------------------------------------------------

    @abstractmethod
    def init_server(self, generator: torch.Generator) -> st.Tensors:
        """The server's initial shared state (``shared:`` keys only; empty for no communication)."""

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        """A client's initial private state (``private:`` keys and optimizer entries)."""
        return {}

    def broadcast(self, server: Mapping[str, torch.Tensor], client_id: str) -> st.Tensors:
        """What the server sends client ``client_id`` (a copy is made by the engine)."""
        return dict(server)

    def global_broadcast(self, server: Mapping[str, torch.Tensor], first_client: str) -> st.Tensors:
        """The global model as the server holds it, in the form a client receives (what the
        exported ``global`` adapter is made of): by default what ``first_client`` is sent; a
        method with per-client ranks sends it at the server's full rank, so the export does not
        depend on which client comes first."""
        return self.broadcast(server, first_client)

    # -- the algorithm -------------------------------------------------------------------------

    @abstractmethod
    def client_update(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> tuple[ClientUpdate, ClientState]: ...

    def aggregate(self, server: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> st.Tensors:
        """FedAvg weighted by the clients' numbers of training examples."""
        if not updates:
            return dict(server)
        combined = self.combine([u.shared for u in updates], [float(u.num_examples) for u in updates], server)
        return {**server, **combined}

    # -- server-side combination: the one place robust aggregation, clipping and DP apply -------

    def begin_round(self, round_: int) -> None:
        """Called by the engine before ``aggregate``: seeds this round's DP noise."""
        self._round = round_
        self._combine_calls = 0

    def combine(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> st.Tensors:
        """Combine same-keyed client states into one (what every method's aggregate builds on).

        ``reference`` holds the server's previous values of those keys: clipping and client-level
        DP act on each client's change from it. Per ``cfg.server``: client-level DP (clip, uniform
        mean, Gaussian noise), else optional norm clipping then the mean, median or trimmed mean.
        """
        sc = self.cfg.server
        ref = None
        if reference is not None:
            ref = {
                k: reference[k] if k in reference and reference[k].shape == v.shape else torch.zeros_like(v) for k, v in states[0].items()
            }
        if sc.dp_noise_multiplier > 0:
            calls = getattr(self, "_combine_calls", 0)
            self._combine_calls = calls + 1
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.seed}/dp-noise/{getattr(self, '_round', 0)}/{calls}".encode()))
            zeros = {k: torch.zeros_like(v) for k, v in states[0].items()}
            return privacy.dp_aggregate(ref if ref is not None else zeros, list(states), sc.dp_clip_norm, sc.dp_noise_multiplier, g)
        if sc.clip_norm > 0 and ref is not None:
            states = [robust.clip_update(s, ref, sc.clip_norm)[0] for s in states]
        return robust.AGGREGATORS[sc.aggregator](list(states), list(weights), sc.trim_fraction)

    def upload_spec(self, received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
        """Keys and shapes a valid upload has (None: any size on that dim). Default: the shared
        entries the client received, unchanged in shape."""
        return robust.default_upload_spec(received)

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        """The role-keyed parameters client k is evaluated with (its personalised model)."""
        return {**received, **st.select(params_of(client_state), st.PRIVATE)}

    def global_params(self, received: st.Tensors, client_state: ClientState) -> st.Tensors | None:
        """The global model as evaluated on client k: the shared state alone (None if nothing is
        shared). A private head, if any, is kept: without it the model has no output layer."""
        shared = st.select(received, st.SHARED)
        a_keys = [k for k in shared if lora.is_a(k)]
        if not a_keys or any(lora.b_of(k) not in shared for k in a_keys):
            return None  # no complete shared adapter (e.g. FedSA-LoRA keeps B private)
        heads = {k: v for k, v in st.select(params_of(client_state), st.PRIVATE).items() if not lora.is_adapter(k)}
        return {**shared, **heads}

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        """Method-specific per-client figures for the summary (e.g. HETLoRA's client rank)."""
        return {}

    def round_record(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Method-specific entries of the round's record (a line of metrics.jsonl; JSON values),
        from the uploads the server accepted this round (e.g. Fed-HeLLo's layers per client)."""
        return {}

    # -- helpers for subclasses ----------------------------------------------------------------

    def head(self, role: str, generator: torch.Generator) -> st.Tensors:
        return self.task.init_head(role, generator)

    def shared_adapter_and_head(self, generator: torch.Generator, rank: int | None = None) -> st.Tensors:
        """The common adapter (rank ``lora.rank`` unless given), plus the head when it is shared."""
        adapter = lora.init_adapter(self.task.targets, lora.COMMON, st.SHARED, rank or self.cfg.lora.rank, generator)
        return {**adapter, **self.shared_head(generator)}

    def shared_head(self, generator: torch.Generator) -> st.Tensors:
        return self.head(st.SHARED, generator) if self.cfg.lora.head == "shared" else {}

    def private_head(self, generator: torch.Generator) -> st.Tensors:
        return self.head(st.PRIVATE, generator) if self.cfg.lora.head == "private" else {}

    def loss(self, batch: Batch, *states: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task's training loss of the model with ``states`` (per client when stacked)."""
        return self.task.objective(st.model_params(*states), batch)

    # -- local training: every method's steps go through here ----------------------------------

    def adamw_update(self, params: st.Tensors, gradients: Mapping[str, torch.Tensor], opt: st.Tensors) -> tuple[st.Tensors, st.Tensors]:
        """The AdamW step every method takes, with the run's ``optim.*`` (lr, betas, weight decay)."""
        o = self.cfg.optim
        return adamw(params, gradients, opt, o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)

    def local_step(
        self, ctx: ClientContext, trained: st.Tensors, fixed: Mapping[str, torch.Tensor], opt: st.Tensors
    ) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
        """One local step: new ``trained`` and ``opt``, and the step's loss (detached, a tensor).

        Default: one AdamW step on a fresh mini-batch (:func:`adamw_step`). A method whose step is
        not that overrides it (PF2LoRA's bilevel step, Per-FedAvg's look-ahead gradient, HETLoRA's
        regulariser). It must stay pure: nothing but ``ctx``'s batch stream is read or changed.
        """
        return adamw_step(self, ctx.batch(), trained, fixed, opt)

    def train_steps(
        self,
        ctx: ClientContext,
        trained: st.Tensors,
        fixed: Mapping[str, torch.Tensor],
        opt: st.Tensors,
        step: LocalStep | None = None,
    ) -> Trained:
        """``ctx.local_steps`` local steps (``step``, default :meth:`local_step`) on ``trained``
        with ``fixed`` held constant."""
        step = step or self.local_step
        engine = batching.lockstep()
        if engine is not None:  # a batched engine trains this client with others of the same kind
            return cast(Trained, engine.train(self, ctx, trained, fixed, opt, step))
        losses: list[torch.Tensor] = []
        for _ in range(ctx.local_steps):
            trained, opt, loss = step(ctx, trained, fixed, opt)
            losses.append(loss)
        # one read of the losses for the whole run, not one device synchronisation per step
        return Trained(trained, opt, torch.stack(losses).tolist() if losses else [])

    def upload(
        self,
        ctx: ClientContext,
        shared: Mapping[str, torch.Tensor],
        metrics: dict[str, float],
        num_examples: int | None = None,
    ) -> ClientUpdate:
        """The client's message: ``shared`` through :func:`pf2lora.state.outgoing` (the one gate for
        client-to-server tensors), weighted by ``num_examples`` (default: its training examples)."""
        n = ctx.client.num_train if num_examples is None else num_examples
        return ClientUpdate(ctx.client.client_id, st.outgoing(shared), n, metrics)


def adamw_step(
    method: Method,
    batch: Batch,
    trained: st.Tensors,
    fixed: Mapping[str, torch.Tensor],
    opt: st.Tensors,
    objective: Objective | None = None,
    regulariser: Regulariser | None = None,
) -> tuple[st.Tensors, st.Tensors, torch.Tensor]:
    """One AdamW step on ``trained`` at ``batch``, ``fixed`` held constant; the loss, detached.

    The loss is ``objective(batch, trained, fixed)`` (default: ``method.loss(batch, trained, fixed)``;
    FDLoRA's personal phase uses a reparametrised one); ``regulariser(trained)`` is added before
    differentiating. Pure, and the loss stays a tensor, so a batched engine can run the step for
    many clients without a device synchronisation per step.
    """
    xl = leaves(trained)
    loss = objective(batch, xl, fixed) if objective is not None else method.loss(batch, xl, fixed)
    total = loss if regulariser is None else loss + regulariser(xl)
    trained, opt = method.adamw_update(trained, grads(total, xl), opt)
    return trained, opt, loss.detach()


class HeterogeneousRanks(Method):
    """A method whose clients train the rank their resources allow (HETLoRA, FlexLoRA).

    Ranks lie in ``[rank_min, rank_max]`` (the method's config section, defaulting to PF2LoRA's
    range); every client's adapter keeps the common ``lora.alpha``, so its scale is ``alpha / r_k``.
    """

    RANK: ClassVar[str] = st.meta_key("rank")
    """Client-state key of the client's current rank."""

    def __init__(self, cfg: RunConfig, task: Task):
        super().__init__(cfg, task)
        self.rank_min, self.rank_max = resolved_rank_range(cfg, self.rank_config(cfg))
        self.alpha = cfg.lora.alpha

    @classmethod
    @abstractmethod
    def rank_config(cls, cfg: RunConfig) -> HETLoRAConfig | FlexLoRAConfig:
        """The config section holding this method's ``rank_min`` / ``rank_max``."""

    def assigned_rank(self, client_id: str) -> int:
        """The rank a client's resources allow: drawn once per client from the seed, not the data."""
        return resource_rank(self.cfg.seed, client_id, self.rank_min, self.rank_max)

    @abstractmethod
    def at_rank(self, server: Mapping[str, torch.Tensor], rank: int) -> st.Tensors:
        """The server's model as a client of rank ``rank`` receives it."""

    def global_broadcast(self, server: Mapping[str, torch.Tensor], first_client: str) -> st.Tensors:
        """At the server's full rank (``rank_max``), whichever client comes first."""
        return self.at_rank(server, self.rank_max)

    def init_client(self, client_id: str, generator: torch.Generator) -> ClientState:
        """A private head (if any) and the client's assigned rank."""
        return {**self.private_head(generator), self.RANK: torch.tensor(self.assigned_rank(client_id))}

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        return {"client_rank": int(client_state[self.RANK])} if self.RANK in client_state else {}

    def client_delta(self, adapter: Mapping[str, torch.Tensor], target: lora.LoRATarget) -> torch.Tensor:
        """The update a client's common adapter applies on ``target``: ``(alpha / r_k) B_k A_k``
        (r_k = rows of A_k), comparable across ranks."""
        k_a, k_b = lora.adapter_keys(target, lora.COMMON, st.SHARED)
        A, B = adapter[k_a], adapter[k_b]
        return (self.alpha / A.shape[0]) * (B @ A)


def resource_rank(seed: int, client_id: str, lo: int, hi: int) -> int:
    """A client's rank as set by its resources: drawn once per client from the seed, not the data."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/resource-rank/{client_id}".encode()))
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> st.Tensors:
    """Key-wise weighted mean; every state must have the same keys and shapes."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("clients sent different key sets")
    # states is not empty (states[0] above), so each sum is a tensor (not the start value 0)
    return {k: cast(torch.Tensor, sum((w / total) * s[k] for s, w in zip(states, weights, strict=True))) for k in states[0]}


# -- registry ----------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    return dict(_REGISTRY)

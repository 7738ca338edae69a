"""The engine-agnostic algorithm API and the method registry.

A method is three functions over named tensors, called by any engine (the in-process runner, the
Flower apps):

* ``client_update(ctx, received, client_state) -> (ClientUpdate, new_client_state)``
* ``aggregate(server_state, updates) -> new_server_state``
* ``personalized(ctx, received, client_state) -> parameters to evaluate client k with``

Methods never import an engine, engines never know a method by name. Methods must not mutate
``received``, the server state or a client state in place: they return new ones.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from pf2lora import lora
from pf2lora.autodiff import grads, leaves  # noqa: F401  (re-exported for methods)
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.tasks.base import Batch, ClientData, Task, sample_batch

ClientState = dict[str, torch.Tensor]
"""A client's persistent state: ``private:`` parameters and optimizer entries (``opt/...``)."""


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


class Method(ABC):
    """Base class: plain FedAvg of the shared state, personalised state kept by the client."""

    name: ClassVar[str]
    description: ClassVar[str]
    pools_data: ClassVar[bool] = False
    """True for a centralised reference: the engine trains one client on everyone's data."""
    plain_mean_aggregation: ClassVar[bool] = False
    """True if ``aggregate`` uses the uploads only through one ``combine`` of all of them, weighted
    by ``num_examples``, with the default aggregator: same keys and shapes from every client, so
    ``aggregate(server, [one update holding that mean])`` gives the same result. Then the
    upload can be secure-aggregated (``server.secure_aggregation``): the server gets only the
    mean. Set it only after checking ``aggregate`` (and everything it calls) says so."""

    def __init__(self, cfg: RunConfig, task: Task):
        self.cfg = cfg
        self.task = task

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

    # -- the algorithm -------------------------------------------------------------------------

    @abstractmethod
    def client_update(
        self, ctx: ClientContext, received: st.Tensors, client_state: ClientState
    ) -> tuple[ClientUpdate, ClientState]: ...

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
        self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> st.Tensors:
        """Combine same-keyed client states into one (what every method's aggregate builds on).

        ``reference`` holds the server's previous values of those keys: clipping and client-level
        DP act on each client's change from it. Per ``cfg.server``: client-level DP (clip, uniform
        mean, Gaussian noise), else optional norm clipping then the mean, median or trimmed mean.
        """
        from pf2lora import privacy, robust

        sc = self.cfg.server
        ref = None
        if reference is not None:
            ref = {k: reference[k] if k in reference and reference[k].shape == v.shape else torch.zeros_like(v) for k, v in states[0].items()}
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
        return {k: tuple(v.shape) for k, v in received.items() if k.startswith(st.SHARED + ":")}

    def personalized(self, ctx: ClientContext, received: st.Tensors, client_state: ClientState) -> st.Tensors:
        """The role-keyed parameters client k is evaluated with (its personalised model)."""
        return {**received, **st.select(params_of(client_state), st.PRIVATE)}

    def global_params(self, received: st.Tensors, client_state: ClientState) -> st.Tensors | None:
        """The global model as evaluated on client k: the shared state alone (None if nothing is
        shared). A private head, if any, is kept: without it the model has no output layer."""
        shared = st.select(received, st.SHARED)
        a_keys = [k for k in shared if ".lora_A." in k]
        if not a_keys or any(k.replace(".lora_A.", ".lora_B.") not in shared for k in a_keys):
            return None  # no complete shared adapter (e.g. FedSA-LoRA keeps B private)
        heads = {k: v for k, v in st.select(params_of(client_state), st.PRIVATE).items() if ".lora_" not in k}
        return {**shared, **heads}

    def describe_client(self, server: Mapping[str, torch.Tensor], client_state: ClientState) -> dict[str, float]:
        """Method-specific per-client figures for the summary (e.g. HETLoRA's client rank)."""
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
        return self.task.loss(st.model_params(*states), batch)


def resource_rank(seed: int, client_id: str, lo: int, hi: int) -> int:
    """A client's rank as set by its resources: drawn once per client from the seed, not the data."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/resource-rank/{client_id}".encode()))
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def params_of(client_state: Mapping[str, torch.Tensor]) -> st.Tensors:
    """The role-keyed parameters in a client state (leaving optimizer entries out)."""
    return {k: v for k, v in client_state.items() if k.startswith((st.SHARED + ":", st.PRIVATE + ":"))}


def opt_state(client_state: Mapping[str, torch.Tensor], prefix: str) -> st.Tensors:
    p = f"opt/{prefix}/"
    return {k[len(p) :]: v for k, v in client_state.items() if k.startswith(p)}


def with_opt_state(prefix: str, opt: Mapping[str, torch.Tensor]) -> st.Tensors:
    return {f"opt/{prefix}/{k}": v for k, v in opt.items()}


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> st.Tensors:
    """Key-wise weighted mean; every state must have the same keys and shapes."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("clients sent different key sets")
    return {k: sum((w / total) * s[k] for s, w in zip(states, weights, strict=True)) for k in states[0]}


def adapter(
    task: Task, name: str, role: str, rank: int, generator: torch.Generator
) -> st.Tensors:
    return lora.init_adapter(task.targets, name, role, rank, generator)


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


Factory = Callable[[RunConfig, Task], Method]

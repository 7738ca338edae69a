"""Clients stacked along a leading dimension, so that one step serves many clients at once.

A batched engine trains K clients in lockstep: their tensors are stacked (``(K, *shape)``), their
mini-batches too (``(K, batch, ...)``), and one forward/backward over the shared frozen base serves
them all (:class:`pf2lora.lora.LoRALinear` applies each client's adapter to its own rows). The
step code is the same as for one client; it only has to reduce *per client* where it reduces at
all (a norm, a loss). While a stacked step runs, :func:`clients` says how many clients are
stacked, and :func:`client_sum` / :func:`per_client` do the per-client reductions and broadcasts
that read the same for one client (no leading dimension) and for K.

Why a context variable rather than a flag passed down: the same method code must serve both
engines, and the step functions' signatures are the methods' API. The engine sets it around a
stacked step only (:func:`stacked`); everywhere else it is 0 and every helper is the identity of
the one-client case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import torch

from pf2lora import state as st
from pf2lora.state import Tensors

_CLIENTS: ContextVar[int] = ContextVar("pf2lora_stacked_clients", default=0)
_RANKS: ContextVar[Mapping[str, torch.Tensor] | None] = ContextVar("pf2lora_stacked_ranks", default=None)
_LOCKSTEP: ContextVar[Lockstep | None] = ContextVar("pf2lora_lockstep", default=None)


def clients() -> int:
    """How many clients the tensors of the current step stack (0: one client, no client dimension)."""
    return _CLIENTS.get()


@contextlib.contextmanager
def stacked(k: int, ranks: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Within this block, tensors carry a leading dimension of ``k`` clients.

    ``ranks``: for adapters whose clients have different ranks, zero-padded to the largest (see
    :func:`padded_ranks`), each client's own rank per adapter name, a ``(k,)`` tensor.
    """
    token, ranks_token = _CLIENTS.set(k), _RANKS.set(dict(ranks) if ranks else None)
    try:
        yield
    finally:
        _RANKS.reset(ranks_token)
        _CLIENTS.reset(token)


def padded_ranks(adapter: str) -> torch.Tensor | None:
    """Each stacked client's own rank of ``adapter`` where the clients' ranks differ (their factors
    are zero-padded to the largest: the rows of A and columns of B past a client's rank are zero,
    get zero gradients and so stay zero), else None (every client has the factors' rank).

    A LoRA layer scales client i's update by ``alpha / ranks[i]`` (not the padded width), and a
    step that reads a rank from a factor's shape must read it here instead.
    """
    ranks = _RANKS.get()
    return ranks.get(adapter) if ranks else None


def client_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over everything but the client dimension: shape ``(K,)`` when stacked, else a scalar."""
    return t.flatten(1).sum(1) if clients() else t.sum()


def per_client(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` (one value per client) shaped to broadcast against ``like`` (a per-client tensor)."""
    return x.reshape(-1, *([1] * (like.dim() - 1))) if clients() and x.dim() else x


def stack(states: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """One tensor per key with the clients along a new leading dimension (same keys and shapes)."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def unstack(state: Mapping[str, torch.Tensor], k: int) -> list[Tensors]:
    """The inverse of :func:`stack`: ``k`` states, each with tensors of its own (copied, so no
    client's state is a view into the stacked storage or the others'; one copy per client and
    dtype, :func:`pf2lora.state.packed_clone`)."""
    rows = {key: v.unbind(0) for key, v in state.items()}  # k views per key in one call, not k indexings
    return [st.packed_clone({key: r[i] for key, r in rows.items()}) for i in range(k)]


class Lockstep(Protocol):
    """What a batched engine offers a client's training: ``train`` runs its local steps together
    with the other clients' steps of the same kind and returns the client's own result."""

    def train(self, method: Any, ctx: Any, trained: Tensors, fixed: Mapping[str, torch.Tensor], opt: Tensors, step: Any) -> Any: ...


def lockstep() -> Lockstep | None:
    """The batched engine serving this thread's client, if any (see :meth:`Method.train_steps`)."""
    return _LOCKSTEP.get()


def serve(engine: Lockstep | None) -> None:
    """Make ``engine`` serve the calling thread's local training (a worker thread's first call)."""
    _LOCKSTEP.set(engine)

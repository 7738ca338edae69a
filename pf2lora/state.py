"""Named tensor state and the one place where "shared" and "private" are decided.

Every trainable tensor a method holds is keyed ``"<role>:<model parameter path>"`` where role is
``shared`` (may leave the client, is aggregated by the server) or ``private`` (never leaves the
client). The role is part of the name, so it is visible in every checkpoint, log and message, and
:func:`outgoing` is the single gate every client-to-server message passes through.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensors = dict[str, torch.Tensor]

SHARED = "shared"
PRIVATE = "private"
ROLES = (SHARED, PRIVATE)


class PrivacyViolation(RuntimeError):
    """A private tensor was about to leave its client."""


def key(role: str, path: str) -> str:
    """The state key of model parameter ``path`` held with ``role``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return f"{role}:{path}"


def role_of(state_key: str) -> str:
    role, sep, _ = state_key.partition(":")
    if not sep or role not in ROLES:
        raise ValueError(f"state key {state_key!r} does not start with 'shared:' or 'private:'")
    return role


def path_of(state_key: str) -> str:
    role_of(state_key)
    return state_key.split(":", 1)[1]


def select(state: Mapping[str, torch.Tensor], role: str) -> Tensors:
    """The entries of ``state`` with ``role`` (no copy)."""
    return {k: v for k, v in state.items() if role_of(k) == role}


def outgoing(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The only way a client builds a message for the server.

    Raises :class:`PrivacyViolation` if any entry is private; returns detached copies so the
    receiver can never alias (and later mutate) the client's own tensors.
    """
    leaked = [k for k in state if role_of(k) != SHARED]
    if leaked:
        raise PrivacyViolation(f"private tensors in an outgoing message: {sorted(leaked)[:3]}")
    return clone(state)


def clone(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached deep copy: the guard against state-dict aliasing between clients and server."""
    return {k: v.detach().clone() for k, v in state.items()}


def model_params(*states: Mapping[str, torch.Tensor]) -> Tensors:
    """Merge role-keyed states into model parameter paths, as ``functional_call`` expects."""
    merged: Tensors = {}
    for state in states:
        for k, v in state.items():
            path = path_of(k)
            if path in merged:
                raise ValueError(f"parameter {path!r} held twice (as shared and private)")
            merged[path] = v
    return merged

"""Named tensor state and the one place where "shared" and "private" are decided.

Every trainable tensor a method holds is keyed ``"<role>:<model parameter path>"`` where role is
``shared`` (may leave the client, is aggregated by the server) or ``private`` (never leaves the
client). The role is part of the name, so it is visible in every checkpoint, log and message, and
:func:`outgoing` is the single gate every client-to-server message passes through.

Besides role-keyed parameters, a state may hold bookkeeping that is never a model parameter:
optimizer entries ``opt/<name>/...`` (client states) and method metadata ``meta/...`` (e.g. a
client's rank, a server momentum buffer). This module owns that key grammar; nothing else spells
the prefixes out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]

SHARED = "shared"
PRIVATE = "private"
ROLES = (SHARED, PRIVATE)
OPT = "opt"
"""Prefix of optimizer entries in a client state: ``opt/<name>/<optimizer key>``."""
META = "meta"
"""Prefix of method metadata (never a model parameter, never broadcast as one): ``meta/<name>``."""


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


def has_role(state_key: str, role: str) -> bool:
    """Whether ``state_key`` is a parameter held with ``role`` (False, not an error, for any other key)."""
    return state_key.startswith(role + ":")


def is_param(state_key: str) -> bool:
    """Whether ``state_key`` is a role-keyed parameter (not an ``opt/`` or ``meta/`` entry)."""
    return any(has_role(state_key, role) for role in ROLES)


def meta_key(name: str) -> str:
    """The key of metadata ``name`` (``meta/<name>``)."""
    return f"{META}/{name}"


def is_meta(state_key: str) -> bool:
    return state_key.startswith(META + "/")


BYTES = "bytes"
"""Path prefix of an opaque byte payload: ``<role>:bytes/<name>``."""


def bytes_key(role: str, name: str) -> str:
    """The key of opaque byte payload ``name`` (e.g. serialized ciphertexts): a 1-D ``uint8``
    tensor that travels, and is counted, byte for byte like any tensor, but is no model parameter."""
    return key(role, f"{BYTES}/{name}")


def is_bytes(state_key: str) -> bool:
    return state_key.partition(":")[2].startswith(BYTES + "/")


def opt_prefix(name: str) -> str:
    """The prefix of optimizer ``name``'s entries in a client state (``opt/<name>/``)."""
    return f"{OPT}/{name}/"


def params_of(client_state: Mapping[str, torch.Tensor]) -> Tensors:
    """The role-keyed parameters in a client state (leaving optimizer and meta entries out)."""
    return {k: v for k, v in client_state.items() if is_param(k)}


def opt_state(client_state: Mapping[str, torch.Tensor], name: str) -> Tensors:
    """Optimizer ``name``'s state as stored in ``client_state``, prefix stripped (empty if none)."""
    p = opt_prefix(name)
    return {k[len(p) :]: v for k, v in client_state.items() if k.startswith(p)}


def with_opt_state(name: str, opt: Mapping[str, torch.Tensor]) -> Tensors:
    """Optimizer ``name``'s state ``opt`` keyed for a client state (inverse of :func:`opt_state`)."""
    return {opt_prefix(name) + k: v for k, v in opt.items()}


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
    return packed_clone(state)


def clone(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached deep copy: the guard against state-dict aliasing between clients and server."""
    return {k: v.detach().clone() for k, v in state.items()}


PACK_ON_CPU = False
"""Whether :func:`packs` says yes on a CPU too; ``benchmarks/op_count.py`` sets it to count, on a
CPU, the operations a GPU run dispatches (and tests, to exercise the packed paths)."""


def packs(device: torch.device) -> bool:
    """Whether many small tensors on ``device`` are copied and reduced as one buffer rather than one
    by one: off the CPU, where every per-tensor operation is a kernel launch (a small model's GPU
    round is bound by launches). On a CPU a per-tensor copy is a plain memcpy, and packing costs
    more than it saves (24 LoRA tensors of MiniLM-L6's shape: a packed copy 2.5x slower, a packed
    mean of 8 clients 2x; timed by hand, interleaved, on the 2-core CPU under load)."""
    return device.type != "cpu" or PACK_ON_CPU


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' values one after another in one 1-D tensor (a view of a lone tensor where it can)."""
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of :func:`flatten`: views into ``flat`` shaped as ``like``."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def packed_clone(state: Mapping[str, torch.Tensor]) -> Tensors:
    """A detached deep copy like :func:`clone`, made with one copy per dtype and device where
    :func:`packs` says so (one per tensor elsewhere). The packed copies are disjoint views into one
    new buffer, so none aliases the source or another copy's values; they do share a storage,
    which is why safetensors files are written from copies (:mod:`pf2lora.export`)."""
    if not any(packs(v.device) for v in state.values()):
        return clone(state)
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for k, v in state.items():
        groups.setdefault((v.dtype, v.device), []).append(k)
    out: Tensors = {}
    with torch.no_grad():
        for (_, device), keys in groups.items():
            if len(keys) == 1 or not packs(device):
                out.update({k: state[k].detach().clone() for k in keys})
                continue
            like = [state[k] for k in keys]
            out.update(zip(keys, unflatten(flatten(like), like), strict=True))
    return {k: out[k] for k in state}


def to_device(state: Mapping[str, torch.Tensor], device: torch.device | str) -> Tensors:
    """``state`` with its floating-point tensors on ``device`` (those already there are kept, not
    copied). Integer tensors (step counts, ranks, rounds) stay where they are, on the CPU: they are
    read on the host (see :mod:`pf2lora.optim`), and a CPU scalar mixes with device tensors."""
    return {k: v.to(device) if v.is_floating_point() else v for k, v in state.items()}


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

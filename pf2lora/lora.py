"""A LoRA layer with named adapters of any rank, and its injection into transformers models.

The layer holds no trained values of its own: each adapter is registered as an empty (rank 0)
parameter, and the values a client trains are passed in at call time (:class:`ParameterSlots`,
``torch.func.functional_call`` made cheap). One frozen base model thus serves every simulated
client, and an adapter's rank is simply the shape of the tensors passed in (heterogeneous ranks
need no special case). The scale of adapter ``name`` is ``alpha[name] / rank``, the convention
peft uses.

Key grammar: adapter ``a``'s factors on the module at ``path`` are the model parameters
``<path>.lora_A.<a>`` (rank x d_in) and ``<path>.lora_B.<a>`` (d_out x rank), the names the
:class:`LoRALinear` parameter dicts give them. The key functions below (:func:`a_path`,
:func:`is_a`, :func:`split_path`, ...) are the only places that spell them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from pf2lora import batching
from pf2lora import state as st

COMMON = "common"
PRIVATE = "private"
ADAPTERS = (COMMON, PRIVATE)

# Attention projections adapted by default, as in the LoRA and PF2LoRA papers. ``inject`` matches a
# module's last name component: MPNet's "q" / "v" are its ``attention.attn.q`` / ``.v`` (no other
# MPNet module ends so).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "mpnet": ("q", "v"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}

_A, _B = ".lora_A.", ".lora_B."  # LoRALinear's parameter dicts ``lora_A`` / ``lora_B``


def a_path(module_path: str, adapter: str) -> str:
    """Model parameter path of adapter ``adapter``'s A on the module at ``module_path``."""
    return f"{module_path}{_A}{adapter}"


def b_path(module_path: str, adapter: str) -> str:
    """Model parameter path of adapter ``adapter``'s B on the module at ``module_path``."""
    return f"{module_path}{_B}{adapter}"


def is_a(key: str) -> bool:
    """Whether ``key`` (a parameter path or a state key) names a LoRA A factor."""
    return _A in key


def is_b(key: str) -> bool:
    """Whether ``key`` (a parameter path or a state key) names a LoRA B factor."""
    return _B in key


def is_adapter(key: str) -> bool:
    """Whether ``key`` names a LoRA factor (A or B) rather than, e.g., a head tensor."""
    return is_a(key) or is_b(key)


def is_lora_tensor(key: str) -> bool:
    """Whether ``key`` names any LoRA tensor: ours (A, B) or another kind in a peft file
    (``lora_embedding_A``, DoRA's ``lora_magnitude_vector``, ...)."""
    return ".lora_" in key


def b_of(a_key: str) -> str:
    """The key of the B that goes with the A keyed ``a_key`` (same role, module and adapter)."""
    return a_key.replace(_A, _B)


def split_path(key: str) -> tuple[str, str, str] | None:
    """``(module part, "A" | "B", adapter)`` of a LoRA factor's key, else None (a head tensor)."""
    for part, marker in (("A", _A), ("B", _B)):
        if marker in key:
            module, adapter = key.rsplit(marker, 1)
            return module, part, adapter
    return None


def rank_of(adapter: Mapping[str, torch.Tensor]) -> int:
    """The rank of the first LoRA A in ``adapter`` (its rows): one client's rank, which all its
    modules share (with clients stacked, see :mod:`pf2lora.batching`, the rows are dim -2)."""
    return next(v.shape[-2] for k, v in adapter.items() if is_a(k))


def per_client_rows(u: torch.Tensor, k: int) -> torch.Tensor:
    """``u``'s rows as ``(k, rows per client, features)``: a stacked batch keeps each client's
    examples together (client-major), so client i's rows are the i-th block."""
    return u.reshape(k, -1, u.shape[-1])


class LoRALinear(nn.Module):
    """``base(u) + sum_a (alpha_a / r_a) * B_a A_a u`` over named adapters ``a``.

    ``fan_in_fan_out`` marks GPT-2's ``Conv1D`` whose weight is stored (d_in, d_out).
    """

    def __init__(self, base: nn.Module, alphas: Mapping[str, float], fan_in_fan_out: bool = False):
        super().__init__()
        self.base = base
        self.fan_in_fan_out = fan_in_fan_out
        weight = cast(torch.Tensor, base.weight)  # nn.Linear / Conv1D
        self.in_features: int
        self.out_features: int
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        self.alpha = dict(alphas)
        dtype, device = weight.dtype, weight.device
        self.lora_A = nn.ParameterDict(
            {a: nn.Parameter(torch.zeros(0, self.in_features, dtype=dtype, device=device), requires_grad=False) for a in alphas}
        )
        self.lora_B = nn.ParameterDict(
            {a: nn.Parameter(torch.zeros(self.out_features, 0, dtype=dtype, device=device), requires_grad=False) for a in alphas}
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = self.base(u)
        for name, A in self.lora_A.items():
            rank = A.shape[-2]
            if rank == 0:
                continue
            B, scale = self.lora_B[name], self.alpha[name] / rank
            if A.dim() == 3:  # K clients stacked: client i's adapter on client i's rows (one bmm each)
                rows = per_client_rows(u, A.shape[0])
                ranks = batching.padded_ranks(name)  # ranks zero-padded to one width: each client's own scale
                per = scale if ranks is None else (self.alpha[name] / ranks).to(A.dtype).reshape(-1, 1, 1)
                out = out + (torch.bmm(torch.bmm(rows, A.transpose(1, 2)), B.transpose(1, 2)) * per).reshape(out.shape)
            else:
                out = out + (u @ A.T) @ B.T * scale
        return out

    def delta_weight(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of scaled ``B @ A`` over the given adapters, shaped (d_out, d_in)."""
        w = cast(torch.Tensor, self.base.weight)
        delta = torch.zeros(self.out_features, self.in_features, dtype=w.dtype, device=w.device)
        for name in A:
            rank = A[name].shape[0]
            if rank:
                delta = delta + (self.alpha[name] / rank) * (B[name] @ A[name])
        return delta


class ClientLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same names) that also takes a stacked weight
    ``(K, out, in)`` and bias ``(K, out)``: a trained head, each client's applied to its own rows."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return super().forward(u)
        rows = per_client_rows(u, self.weight.shape[0])
        out = torch.bmm(rows, self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.reshape(*u.shape[:-1], out.shape[-1])


def stackable_heads(model: nn.Module, parameter_names: Iterable[str]) -> None:
    """Let the linear layers owning ``parameter_names`` (a task's trained head) take stacked
    clients' weights: they become :class:`ClientLinear`, which holds exactly what they held."""
    owners = {name.rsplit(".", 1)[0] for name in parameter_names if "." in name}
    for path in owners:
        module = model.get_submodule(path)
        if type(module) is nn.Linear:
            module.__class__ = ClientLinear


class ParameterSlots:
    """A model called with other tensors in place of some of its parameters: what
    ``torch.func.functional_call`` does, with each parameter's owning module found once.

    Why not ``functional_call`` itself: it walks the whole module tree on every call (to find the
    modules and untie shared weights): a forward and backward of a 6-layer BERT of hidden 32 took
    1.21x the host time this way (``benchmarks/accel.py``, ``call_overhead``), on a GPU time the
    kernels wait for. Here a call is one dict write per tensor passed, and one to put the original
    back. A tensor passed for a tied weight (one parameter under two names) goes through
    ``functional_call``, which gives it both names. Build it once the model's modules are final
    (after :func:`inject` and :func:`stackable_heads`); one call at a time per model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        first_name: dict[int, str] = {}
        self._tied: set[str] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            self._slots[name] = (model.get_submodule(owner), attr)
            if id(p) in first_name:
                self._tied |= {name, first_name[id(p)]}
            else:
                first_name[id(p)] = name

    def call(self, params: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]) -> Any:
        """``model(**kwargs)`` with ``params`` (parameter paths) in place of those parameters."""
        unknown = [k for k in params if k not in self._slots]
        if unknown:  # silently ignored, a misspelt tensor would stay untrained
            raise KeyError(f"not parameters of the model: {sorted(unknown)[:3]}")
        if self._tied and not self._tied.isdisjoint(params):
            return functional_call(self.model, dict(params), args=(), kwargs=dict(kwargs), strict=False)
        originals: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for name, tensor in params.items():
                owner, attr = self._slots[name]
                table = owner._parameters
                originals.append((table, attr, table[attr]))
                table[attr] = tensor  # type: ignore[assignment]  # what functional_call writes
            return self.model(**kwargs)
        finally:
            for table, attr, original in reversed(originals):
                table[attr] = original


@dataclass(frozen=True)
class LoRATarget:
    """One adapted module: its path in the model and its input/output sizes."""

    path: str
    in_features: int
    out_features: int


def default_targets(model_type: str) -> tuple[str, ...]:
    try:
        return DEFAULT_TARGETS[model_type]
    except KeyError:
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}; "
            f"set lora.target_modules (known defaults: {sorted(DEFAULT_TARGETS)})"
        ) from None


def inject(model: nn.Module, target_names: Iterable[str], alphas: Mapping[str, float]) -> list[LoRATarget]:
    """Wrap every linear module whose last name component is in ``target_names``.

    Freezes the whole model first: only tensors passed in at call time are trained.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = set(target_names)
    found: list[LoRATarget] = []
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in names or isinstance(module, LoRALinear):
            continue
        conv1d = type(module).__name__ == "Conv1D"
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        wrapped = LoRALinear(module, alphas, fan_in_fan_out=conv1d)
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        setattr(parent, leaf, wrapped)
        found.append(LoRATarget(path, wrapped.in_features, wrapped.out_features))
    if not found:
        raise ValueError(f"no linear module named any of {sorted(names)} in {type(model).__name__}")
    return found


def adapter_keys(target: LoRATarget, adapter: str, role: str) -> tuple[str, str]:
    """State keys of adapter ``adapter``'s A and B on ``target``, held with ``role``."""
    return st.key(role, a_path(target.path, adapter)), st.key(role, b_path(target.path, adapter))


def init_adapter(targets: Iterable[LoRATarget], adapter: str, role: str, rank: int, generator: torch.Generator) -> st.Tensors:
    """Standard LoRA init: A ~ Kaiming-uniform (a = sqrt 5, as nn.Linear and peft), B = 0."""
    out: st.Tensors = {}
    for t in targets:
        k_a, k_b = adapter_keys(t, adapter, role)
        bound = 1.0 / t.in_features**0.5  # kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) matrix
        out[k_a] = (torch.rand(rank, t.in_features, generator=generator) * 2 - 1) * bound
        out[k_b] = torch.zeros(t.out_features, rank)
    return out


def delta_weights(model: nn.Module, targets: Iterable[LoRATarget], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per target, the dense update ``sum_a scale_a B_a A_a`` that ``params`` (model paths) apply."""
    deltas: dict[str, torch.Tensor] = {}
    for t in targets:
        layer = model.get_submodule(t.path)
        assert isinstance(layer, LoRALinear)
        A = {a: params[a_path(t.path, a)] for a in layer.alpha if a_path(t.path, a) in params and b_path(t.path, a) in params}
        B = {a: params[b_path(t.path, a)] for a in A}
        deltas[t.path] = layer.delta_weight(A, B).detach()
    return deltas

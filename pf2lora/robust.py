"""Server-side safety for client uploads: validation, norm clipping and robust aggregation.

Pure functions over dicts of named tensors (the ``shared`` part of a
:class:`~pf2lora.methods.base.ClientUpdate`), usable by any engine; nothing here imports an engine,
a method or Flower. A typical round on the server::

    spec = default_upload_spec(received)            # or rank_wildcard_spec(received) for HETLoRA
    ok = [u for u in updates if validate_update(u.shared, spec) is None]
    clipped = [clip_update(u.shared, received, max_norm)[0] for u in ok]
    new = AGGREGATORS["median"](clipped, [u.num_examples for u in ok], 0.0)

Every function returns new tensors and never mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch

from pf2lora import lora
from pf2lora import state as st

Tensors = dict[str, torch.Tensor]
Spec = Mapping[str, tuple[int | None, ...]]
"""Expected upload: key -> shape, where ``None`` on a dimension accepts any size >= 1."""

_SHOWN = 3  # keys named in a reason


# ---------------------------------------------------------------------------------------------
# Validation


def _name(key: object) -> str:
    """A key for a one-line message: repr'd (no raw newlines) and cut short."""
    text = repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _names(keys: Sequence[object]) -> str:
    shown = sorted(_name(k) for k in keys)
    more = f" (+{len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
    return ", ".join(shown[:_SHOWN]) + more


def default_upload_spec(received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
    """The expected upload for a client that received ``received``: its ``shared:`` entries with
    their exact shapes (homogeneous methods upload what they were sent)."""
    return {k: tuple(v.shape) for k, v in received.items() if isinstance(k, str) and st.has_role(k, st.SHARED)}


def rank_wildcard_spec(received: Mapping[str, torch.Tensor]) -> dict[str, tuple[int | None, ...]]:
    """As :func:`default_upload_spec`, with the LoRA rank dimension left free (``lora_A``: dim 0,
    ``lora_B``: dim 1), for methods whose clients may upload a smaller rank (HETLoRA self-pruning).
    Upper bounds on the rank are the method's business."""
    spec: dict[str, tuple[int | None, ...]] = {}
    for k, shape in default_upload_spec(received).items():
        dims: list[int | None] = list(shape)
        if lora.is_a(k) and len(dims) == 2:
            dims[0] = None
        elif lora.is_b(k) and len(dims) == 2:
            dims[1] = None
        spec[k] = tuple(dims)
    return spec


def validate_update(
    shared: Mapping[str, torch.Tensor],
    spec: Spec,
    dtype: torch.dtype | None = torch.float32,
) -> str | None:
    """``None`` if ``shared`` is a well-formed upload for ``spec``, else a one-line reason.

    Checks, in order: it is a mapping with string keys; no key outside ``shared:`` (a private
    tensor leaving its client); exactly the keys of ``spec``; each value a dense tensor with the
    spec's number of dimensions and sizes (``None`` = any size >= 1), of ``dtype`` (``None`` = any
    floating-point dtype; ``uint8`` for a byte payload, :func:`pf2lora.state.bytes_key`), and finite
    everywhere. Never raises: anything unexpected is a reason.
    """
    try:
        return _validate(shared, spec, dtype)
    except Exception as e:  # noqa: BLE001 - a malformed upload must never crash the server
        return f"could not validate the update ({type(e).__name__}: {_name(str(e))})"


def _validate(shared: object, spec: Spec, dtype: torch.dtype | None) -> str | None:
    if not isinstance(shared, Mapping):
        return f"update is a {type(shared).__name__}, not a mapping of named tensors"
    keys = list(shared.keys())
    not_str = [k for k in keys if not isinstance(k, str)]
    if not_str:
        return f"{len(not_str)} key(s) are not strings: {_names(not_str)}"
    private = [k for k in keys if not st.has_role(k, st.SHARED)]
    if private:
        return f"{len(private)} key(s) outside 'shared:' (private tensors must not leave a client): {_names(private)}"
    missing = [k for k in spec if k not in shared]
    extra = [k for k in keys if k not in spec]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s): {_names(extra)}")
        return "wrong key set: " + "; ".join(parts)
    checked: list[str] = []  # the keys whose values are left to check, in order
    for k in sorted(keys):
        v = shared[k]
        where = f"key {_name(k)}"
        if not isinstance(v, torch.Tensor):
            return f"{where}: value is a {type(v).__name__}, not a tensor"
        if v.layout is not torch.strided:
            return f"{where}: not a dense tensor (layout {v.layout})"
        if v.device.type == "meta":
            return f"{where}: a meta tensor (no data)"
        if st.is_bytes(k):  # an opaque payload (state.bytes_key): bytes, not numbers
            if v.dtype != torch.uint8:
                return f"{where}: dtype {v.dtype}, expected torch.uint8 (a byte payload)"
        elif dtype is None:
            if not v.is_floating_point():
                return f"{where}: dtype {v.dtype} is not floating point"
        elif v.dtype != dtype:
            return f"{where}: dtype {v.dtype}, expected {dtype}"
        expected = tuple(spec[k])
        shape = tuple(v.shape)
        if len(shape) != len(expected):
            return f"{where}: {len(shape)} dim(s) {list(shape)}, expected {len(expected)} {_shape_text(expected)}"
        for size, want in zip(shape, expected, strict=True):
            if (want is None and size < 1) or (want is not None and size != want):
                return _non_finite(shared, checked) or f"{where}: shape {list(shape)}, expected {_shape_text(expected)}"
        checked.append(k)
    return _non_finite(shared, checked)


def _non_finite(shared: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str | None:
    """The first of ``keys`` whose value is not finite everywhere, as a reason, or None. On a GPU
    the common case, all finite, is one reduction over all the tensors and one read to the host
    (key by key it was hundreds of launches and synchronisations a round)."""
    numbers = [shared[k] for k in keys if not st.is_bytes(k) and shared[k].numel()]
    if not any(st.packs(t.device) for t in numbers):  # on a CPU, key by key is as fast: no launches
        return _first_non_finite(shared, keys)
    peaks = torch._foreach_norm([t.detach() for t in numbers], ord=math.inf)  # max |x|: inf or nan where any is
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in peaks:
        by_device.setdefault(p.device, []).append(p.float())
    if all(bool(torch.isfinite(torch.stack(group)).all()) for group in by_device.values()):
        return None
    return _first_non_finite(shared, keys)  # something is not: name the first, as key by key would


def _first_non_finite(shared: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str | None:
    for k in keys:
        v = shared[k]
        if st.is_bytes(k) or bool(torch.isfinite(v).all()):  # the common case in one reduction and read
            continue
        bad = int((~torch.isfinite(v)).sum())
        return f"key {_name(k)}: {bad} non-finite value(s) of {v.numel()}"
    return None


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def screen(
    uploads: Sequence[Mapping[str, torch.Tensor]], spec: Spec, dtype: torch.dtype | None = torch.float32
) -> tuple[list[int], dict[int, str]]:
    """Indices of the valid uploads, and index -> reason for the rejected ones."""
    accepted: list[int] = []
    rejected: dict[int, str] = {}
    for i, upload in enumerate(uploads):
        reason = validate_update(upload, spec, dtype)
        if reason is None:
            accepted.append(i)
        else:
            rejected[i] = reason
    return accepted, rejected


# ---------------------------------------------------------------------------------------------
# Clipping


def _check_same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b), key=str)
        raise ValueError(f"{what}: key sets differ ({_names(diff)})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what}: key {_name(k)} has shape {list(a[k].shape)} vs {list(b[k].shape)}")


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all entries together (accumulated in float64)."""
    total = 0.0
    for v in tensors.values():
        total += float(v.detach().to(torch.float64).square().sum())
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_norm: float) -> tuple[Tensors, float]:
    """Clip the delta ``update - reference`` to global L2 norm ``max_norm``.

    Returns ``(reference + delta * min(1, max_norm / ||delta||), ||delta||)`` as new tensors; an
    update whose delta is already within ``max_norm`` comes back as an unchanged copy. Raises
    ``ValueError`` for mismatched keys or shapes, a non-positive ``max_norm`` or a non-finite delta
    (validate uploads first).
    """
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    _check_same(update, reference, "clip_update")
    delta = {k: _wide(update[k]) - _wide(reference[k]) for k in update}  # float64: no overflow
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("clip_update: the update's delta is not finite")
    if norm <= max_norm:
        return {k: v.detach().clone() for k, v in update.items()}, norm
    scale = max_norm / norm
    return {k: (_wide(reference[k]) + delta[k] * scale).to(update[k].dtype) for k in update}, norm


# ---------------------------------------------------------------------------------------------
# Aggregation


def _check_states(states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(states) == 0:
        raise ValueError("no states to aggregate")
    for i, s in enumerate(states[1:], start=1):
        _check_same(states[0], s, f"aggregation (state 0 vs state {i})")


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Key-wise weighted mean, as :func:`pf2lora.methods.base.weighted_mean` (FedAvg), with the
    inputs checked (same keys and shapes, one finite weight >= 0 per state, positive total) and
    accumulated in float64 (the result has the states' dtype)."""
    _check_states(states)
    w = [float(x) for x in weights]
    if len(w) != len(states):
        raise ValueError(f"{len(states)} states but {len(w)} weights")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"aggregation weights must be finite and >= 0, got {w}")
    total = float(sum(w))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    # Where st.packs says so (a GPU), floating tensors of one dtype and device are summed as one flat
    # vector per state: the same arithmetic element by element, in a handful of operations rather
    # than a few per tensor (each a kernel launch). The results are views into one new buffer.
    groups: dict[tuple[torch.dtype, torch.device] | str, list[str]] = {}
    for k, v in states[0].items():
        groups.setdefault((v.dtype, v.device) if v.is_floating_point() and st.packs(v.device) else k, []).append(k)
    out: Tensors = {}
    for keys in groups.values():
        flats = [st.flatten([s[k].detach() for k in keys]) for s in states]
        # states is not empty (checked above), so the sum is a tensor, never the start value 0
        acc = cast(torch.Tensor, sum((x / total) * _wide(f) for f, x in zip(flats, w, strict=True)))
        like = [states[0][k] for k in keys]
        out.update(zip(keys, st.unflatten(acc.to(like[0].dtype), like), strict=True))
    return {k: out[k] for k in states[0]}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors are accumulated in float64, so a mean of finite values stays finite."""
    t = t.detach()
    return t.to(torch.float64) if t.is_floating_point() else t


def _stacked(states: Sequence[Mapping[str, torch.Tensor]], k: str) -> torch.Tensor:
    return torch.stack([s[k].detach() for s in states])


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Coordinate-wise median (unweighted); an even count takes the mean of the two middle values."""
    _check_states(states)
    n = len(states)
    out: Tensors = {}
    for k in states[0]:
        ordered = _stacked(states, k).sort(dim=0).values
        if n % 2:
            out[k] = ordered[n // 2].clone()
        else:
            out[k] = ((_wide(ordered[n // 2 - 1]) + _wide(ordered[n // 2])) / 2).to(ordered.dtype)
    return out


def trim_count(n: int, trim_fraction: float) -> int:
    """k = floor(trim_fraction * n) values dropped at each end; raises unless n - 2k >= 1."""
    if not (isinstance(trim_fraction, (int, float)) and 0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:
        raise ValueError(f"trim_fraction {trim_fraction} drops all {n} values")
    return k


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> Tensors:
    """Coordinate-wise trimmed mean (unweighted): per coordinate drop the ``k = floor(trim_fraction
    * n)`` largest and ``k`` smallest values and average the rest. ``trim_fraction`` in [0, 0.5)."""
    _check_states(states)
    n = len(states)
    k = trim_count(n, trim_fraction)
    out: Tensors = {}
    for key in states[0]:
        ordered = _stacked(states, key).sort(dim=0).values
        out[key] = _wide(ordered[k : n - k]).mean(dim=0).to(ordered.dtype)
    return out


Aggregator = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float], float], Tensors]
"""``(states, weights, trim_fraction) -> state``; the robust ones ignore ``weights``."""


def _mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim_fraction: float = 0.0) -> Tensors:
    return weighted_mean(states, weights)


def _median(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim_fraction: float = 0.0) -> Tensors:
    return coordinate_median(states)


def _trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim_fraction: float = 0.0) -> Tensors:
    return trimmed_mean(states, trim_fraction)


AGGREGATORS: dict[str, Aggregator] = {"mean": _mean, "median": _median, "trimmed-mean": _trimmed_mean}


def aggregate(name: str, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], trim_fraction: float = 0.0) -> Tensors:
    """Aggregate with the aggregator called ``name`` (a key of :data:`AGGREGATORS`)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r} (known: {', '.join(AGGREGATORS)})")
    return AGGREGATORS[name](states, weights, trim_fraction)

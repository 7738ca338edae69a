"""Export to, and import from, standard PEFT LoRA adapters.

A client's personalised adapter is the common adapter (rank r, scale s1 = alpha / r) plus its private
one (rank r~, scale s2 = alpha~ / r~). Both fold exactly into one plain LoRA of rank r + r~:

    A = [A_common; A_private]            (rows,    (r + r~, d_in))
    B = [s1 B_common, s2 B_private]      (columns, (d_out, r + r~))

saved with ``r = lora_alpha = r + r~`` so that peft's scale is 1 and ``B A`` is exactly the update
our layer applies. The common adapter alone exports the same way (rank r). A trained task head
(e.g. ``classifier.weight``) goes into ``modules_to_save``. The result loads with
``peft.PeftModel.from_pretrained(base_model, out_dir)`` and reproduces our logits.

LoRA A/B are stored (r, d_in) / (d_out, r) for every layer type; GPT-2's ``Conv1D`` only needs
``fan_in_fan_out=True`` in the config (it matters to peft when merging).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pf2lora import lora
from pf2lora import state as st
from pf2lora.io import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


PEFT_ADAPTER = "weight"
"""peft saves adapter factors as ``<module>.lora_A.weight`` / ``.lora_B.weight`` (no adapter name)."""


def fold(
    model: nn.Module, targets: Iterable[lora.LoRATarget], params: Mapping[str, torch.Tensor]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split role-keyed ``params`` into one scaled ``(A, B)`` per target and the head tensors.

    Returns ``({target path: (A, B)}, {model parameter path: head tensor})``; ``B @ A`` is the
    target's whole update (scale included). Targets without any adapter in ``params`` are left out.
    """
    paths = st.model_params(params)  # strips the roles; a path held twice raises
    by_target: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    heads: dict[str, torch.Tensor] = {}
    for path, value in paths.items():
        parsed = lora.split_path(path)
        if parsed is None:
            heads[path] = value
        else:
            target, part, adapter = parsed
            by_target.setdefault(target, {}).setdefault(adapter, {})[part] = value
    target_paths = {t.path for t in targets}
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, adapters in by_target.items():
        if target not in target_paths:
            raise ValueError(f"LoRA tensors for {target!r}, which is not a LoRA target of this model")
        layer = model.get_submodule(target)
        assert isinstance(layer, lora.LoRALinear)
        unknown = sorted(set(adapters) - set(layer.alpha))
        if unknown:
            raise ValueError(f"{target!r} has no adapter named {unknown[0]!r} (has {sorted(layer.alpha)})")
        As, Bs = [], []
        for name in [a for a in layer.alpha if a in adapters]:  # the layer's order: common, private
            pair = adapters[name]
            if set(pair) != {"A", "B"}:
                raise ValueError(f"adapter {name!r} of {target!r} has lora_{'A' if 'A' not in pair else 'B'} missing")
            A, B = pair["A"].detach(), pair["B"].detach()
            rank = A.shape[0]
            if A.shape != (rank, layer.in_features) or B.shape != (layer.out_features, rank):
                raise ValueError(
                    f"adapter {name!r} of {target!r}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit "
                    f"({layer.in_features} -> {layer.out_features})"
                )
            if rank == 0:
                continue
            As.append(A)
            Bs.append(B * (layer.alpha[name] / rank))
        if As:
            folded[target] = (torch.cat(As, dim=0), torch.cat(Bs, dim=1))
    for path, value in heads.items():
        module_path, _, name = path.rpartition(".")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"head tensor {path!r} names no module of the model") from None
        if not hasattr(module, name) or getattr(module, name).shape != value.shape:
            raise ValueError(f"head tensor {path!r} does not match the model's parameter of that name")
    return folded, {k: v.detach() for k, v in heads.items()}


def export_peft(
    model: nn.Module,
    targets: Iterable[lora.LoRATarget],
    params: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = True,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``params`` (role-keyed: common, or common + private, plus any trained head) as one PEFT
    LoRA adapter in ``out_dir`` (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``model`` is the model with our LoRA layers injected (it gives the adapters' alphas and the
    head modules' untrained tensors); ``task_type`` is peft's (``None`` works for any model and is
    what :func:`peft.PeftModel.from_pretrained` needs no more than; ``"SEQ_CLS"``, ``"CAUSAL_LM"``
    give the task-specific ``PeftModel`` subclasses). ``extra_files`` (name: text) are written
    beside the adapter, inside the same atomic replacement of the directory.
    """
    from peft import LoraConfig

    targets = list(targets)
    folded, heads = fold(model, targets, params)
    if not folded:
        raise ValueError("no LoRA adapter with rank > 0 in params: nothing to export")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, (A, B) in folded.items():
        tensors[PREFIX + lora.a_path(path, PEFT_ADAPTER)] = A.contiguous().clone()
        tensors[PREFIX + lora.b_path(path, PEFT_ADAPTER)] = B.contiguous().clone()
        ranks[path] = A.shape[0]
    # A head module is saved whole (peft's ModulesToSaveWrapper replaces the whole module): the
    # trained tensors, and the model's own values for the rest (e.g. an untrained bias).
    head_modules = sorted({p.rpartition(".")[0] for p in heads})
    for module_path in head_modules:
        for name, value in model.get_submodule(module_path).named_parameters(recurse=True):
            full = f"{module_path}.{name}"
            tensors[f"{PREFIX}{full}"] = heads.get(full, value).detach().contiguous().clone()

    layers = {t.path: model.get_submodule(t.path) for t in targets}
    exported = sorted(folded)
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in exported})
    # Leaf names (the usual peft form) when they select exactly the exported layers; else full paths.
    all_with_leaf = {p for p in layers if p.rsplit(".", 1)[-1] in leaf_names}
    target_modules = leaf_names if all_with_leaf == set(exported) else exported
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {p: k for p, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),  # alpha = rank everywhere: scale 1
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(layers[p].fan_in_fan_out for p in exported),
        modules_to_save=head_modules or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    if task_type is None:
        base_cls = type(model)
        config.auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    with atomic_dir(out_dir) as tmp:  # built aside, then moved into place in one rename
        config.save_pretrained(str(tmp))
        _stable_config(tmp / CONFIG_NAME)
        # copies: safetensors refuses tensors that share a storage (the engine's packed states do)
        save_file({k: v.detach().clone() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def _stable_config(path: Path) -> None:
    """peft keeps ``target_modules`` as a set, so its saved order follows the process's string
    hashing: sorted here, so the same adapter is the same bytes in every process."""
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _pattern_value(pattern: Mapping[str, float], path: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: a key matches a module path ending in it."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def import_peft(
    model: nn.Module,
    targets: Iterable[lora.LoRATarget],
    adapter_dir: str | Path,
    *,
    adapter: str = lora.COMMON,
    role: str = st.SHARED,
    head_role: str | None = None,
) -> st.Tensors:
    """Read a PEFT LoRA adapter into role-keyed tensors of our adapter ``adapter`` (rank = the
    adapter's rank, B rescaled to our scale ``alpha / rank``), plus its ``modules_to_save`` tensors
    keyed with ``head_role`` (default: ``role``).

    ``task.forward(st.model_params(imported), batch)`` then reproduces the adapter's outputs.
    Only plain LoRA adapters (no DoRA, no LoRA bias) on our target layers are accepted.
    """
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (peft_type {cfg.get('peft_type')!r})")
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ValueError(f"{adapter_dir}: DoRA and LoRA bias are not supported")
    weights = load_file(str(adapter_dir / WEIGHTS_NAME))
    weights = {k.removeprefix(PREFIX): v for k, v in weights.items()}
    head_role = head_role or role
    by_path = {t.path: t for t in targets}
    out: st.Tensors = {}
    used: set[str] = set()
    for path, t in by_path.items():
        k_a, k_b = lora.a_path(path, PEFT_ADAPTER), lora.b_path(path, PEFT_ADAPTER)
        if k_a not in weights:
            continue
        A, B = weights[k_a], weights[k_b]
        used |= {k_a, k_b}
        rank = A.shape[0]
        r = _pattern_value(cfg.get("rank_pattern") or {}, path, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg["lora_alpha"])
        peft_scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        layer = model.get_submodule(path)
        assert isinstance(layer, lora.LoRALinear)
        ours = layer.alpha[adapter] / rank
        key_a, key_b = lora.adapter_keys(t, adapter, role)
        out[key_a] = A.clone()
        out[key_b] = B * (peft_scale / ours)
    saved_modules = cfg.get("modules_to_save") or []
    for key in sorted(set(weights) - used):
        module_path = key.rpartition(".")[0]
        if not lora.is_lora_tensor(key) and any(module_path == m or module_path.endswith("." + m) for m in saved_modules):
            out[st.key(head_role, key)] = weights[key].clone()
            used.add(key)
    left = sorted(set(weights) - used)
    if left:
        raise ValueError(f"{adapter_dir}: tensors for modules that are not LoRA targets here: {left[:3]}")
    if not any(lora.is_a(k) for k in out):
        raise ValueError(f"{adapter_dir}: none of its LoRA tensors is on this model's targets")
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every injected :class:`~pf2lora.lora.LoRALinear` by the module it wraps, in place:
    the plain base model again (e.g. to ``save_pretrained`` the base an export goes with)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, lora.LoRALinear):
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, module.base)
    return model

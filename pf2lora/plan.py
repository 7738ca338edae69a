"""The run plan: checks that span modules, and the task built for the methods that will train on it.

:mod:`pf2lora.config` checks each key on its own (types, ranges) and imports nothing else of
pf2lora; what needs another module's knowledge (is a method registered? is ``task.dataset`` in the
data catalogue? may these methods be secure-aggregated? does a method need double backward?) is
decided here, in one place, before anything is built. The CLI, the benchmarks and the engines
load configs and build tasks through this module.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from pf2lora import config, secagg, tasks
from pf2lora.config import RunConfig
from pf2lora.data import catalogue
from pf2lora.errors import UserError
from pf2lora.methods import registry
from pf2lora.tasks import Task


def validate(cfg: RunConfig, source: str = "config") -> None:
    """One-line :class:`~pf2lora.errors.UserError` (naming ``source``) for a config that no single
    section can judge on its own, or whose ``device`` this machine lacks."""
    methods = registry()
    for m in cfg.methods:
        if m not in methods:
            raise UserError(f"{source}: unknown method {m!r} (known: {', '.join(sorted(methods))})")
    catalogue.check(cfg.task, source)
    secagg.check_config(cfg, [m for m in cfg.methods if not methods[m].plain_mean_aggregation], source)
    device = resolve_device(cfg.device, source)
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f'{source}: precision = "bf16": {device_name(device)} has no bfloat16 support; use precision = "fp32"')
    if cfg.precision == "bf16" and "pf2lora" in cfg.methods and cfg.pf2lora.estimator == "finite-difference":
        warnings.warn(
            f'{source}: precision = "bf16" with pf2lora.estimator = "finite-difference": bfloat16 rounding swamps the '
            "finite difference (its step pf2lora.fd_eps is below bfloat16's resolution), so the hypergradient is mostly noise; "
            'use pf2lora.estimator = "exact"',
            UserWarning,
            stacklevel=2,
        )


def resolve_device(spec: str, source: str = "config") -> torch.device:
    """The torch device that ``device = spec`` (:attr:`RunConfig.device`) names on this machine:
    ``auto`` is CUDA when present, else the CPU. A device this machine lacks is a one-line
    :class:`~pf2lora.errors.UserError` (naming ``source``), never a CUDA error mid-run."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f'{source}: device = {spec!r} is not a device (use "auto", "cpu", "cuda", "cuda:N" or "mps")') from None
    use = 'use device = "cpu" or "auto"'
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = f"torch {torch.__version__} built without CUDA" if torch.version.cuda is None else "no CUDA GPU found"
            raise UserError(f"{source}: device = {spec!r}: CUDA is not available on this machine ({why}); {use}")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise UserError(f"{source}: device = {spec!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        if device.index is None:  # the current one, named: tensors and summaries then say cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{source}: device = {spec!r}: MPS (Apple GPU) is not available on this machine; {use}")
        # Aggregation (robust means, DP, norms), FlexLoRA's SVD and the finite difference's norm
        # accumulate in float64, which MPS lacks: refuse before the run rather than fail in round 1.
        raise UserError(f"{source}: device = {spec!r}: MPS is not supported yet (pf2lora accumulates in float64, which MPS lacks); {use}")
    return device


def device_name(device: torch.device) -> str:
    """What ``device`` is, for summaries: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model() or platform.processor() or "cpu"


def _cpu_model() -> str | None:
    """The CPU's model name where the OS says it (Linux: /proc/cpuinfo; platform.processor() there
    gives only the architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """:func:`pf2lora.config.load` and :func:`validate`: a config ready to run."""
    cfg = config.load(path, overrides)
    validate(cfg, config.source_of(path, overrides))
    return cfg


def double_backward(cfg: RunConfig) -> bool:
    """Whether any method of the run differentiates through a gradient (its class says so)."""
    methods = registry()
    return any(methods[name].needs_double_backward(cfg) for name in cfg.methods)


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``, set up for the methods that will train on it (e.g. eager attention
    when one needs double backward), its model and clients' data on ``cfg.device``, computing in
    ``cfg.precision``."""
    task = tasks.build_task(cfg, double_backward=double_backward(cfg))
    task.precision = cfg.precision
    return task.to(resolve_device(cfg.device))

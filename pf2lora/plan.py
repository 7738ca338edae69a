"""The run plan: checks that span modules, and the task built for the methods that will train on it.

:mod:`pf2lora.config` checks each key on its own (types, ranges) and imports nothing else of
pf2lora; what needs another module's knowledge (is a method registered? is ``task.dataset`` in the
data catalogue? may these methods be secure-aggregated? does a method need double backward?) is
decided here, in one place, before anything is built. The CLI, the benchmarks and the engines
load configs and build tasks through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pf2lora import config, secagg, tasks
from pf2lora.config import RunConfig
from pf2lora.data import catalogue
from pf2lora.errors import UserError
from pf2lora.methods import registry
from pf2lora.tasks import Task


def validate(cfg: RunConfig, source: str = "config") -> None:
    """One-line :class:`~pf2lora.errors.UserError` (naming ``source``) for a config that no single
    section can judge on its own."""
    methods = registry()
    for m in cfg.methods:
        if m not in methods:
            raise UserError(f"{source}: unknown method {m!r} (known: {', '.join(sorted(methods))})")
    catalogue.check(cfg.task, source)
    secagg.check_config(cfg, [m for m in cfg.methods if not methods[m].plain_mean_aggregation], source)


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
    when one needs double backward)."""
    return tasks.build_task(cfg, double_backward=double_backward(cfg))

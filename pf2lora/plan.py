"""The run plan: checks that span modules, and the task built for the methods that will train on it.

:mod:`pf2lora.config` checks each key on its own (types, ranges) and imports nothing else of
pf2lora; what needs another module's knowledge (is ``task.dataset`` in the data catalogue? does a
method need double backward?) is decided here, in one place, before anything is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pf2lora import config
from pf2lora.config import RunConfig

if TYPE_CHECKING:
    from pf2lora.tasks import Task


def validate(cfg: RunConfig, source: str = "config") -> None:
    """One-line :class:`~pf2lora.errors.UserError` (naming ``source``) for a config that no single
    section can judge on its own."""
    from pf2lora.data import catalogue

    catalogue.check(cfg.task, source)
    # The method and SecAgg checks (known methods, which configs SecAgg+ accepts) belong here too.


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """:func:`pf2lora.config.load` and :func:`validate`: a config ready to run."""
    cfg = config.load(path, list(overrides))
    source = "defaults" if path is None else str(Path(path))  # named as config.load names it
    validate(cfg, source if not overrides else f"{source} (with --set)")
    return cfg


def double_backward(cfg: RunConfig) -> bool:
    """Whether any method of the run differentiates through a gradient (its class says so)."""
    from pf2lora.methods import registry

    methods = registry()
    for name in cfg.methods:
        # getattr: Method.needs_double_backward is being added alongside; a plain call once it is in.
        needs = getattr(methods[name], "needs_double_backward", None)
        if needs is not None and needs(cfg):
            return True
    return False


def build_task(cfg: RunConfig) -> Task:
    """The task of ``cfg``, set up for the methods that will train on it (e.g. eager attention
    when one needs double backward)."""
    from pf2lora import tasks

    return tasks.build_task(cfg, double_backward=double_backward(cfg))

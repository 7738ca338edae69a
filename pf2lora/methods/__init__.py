"""Federated LoRA methods, one file each. Importing this package imports every module in it, and
each module registers its method(s) with ``@register``: adding a file adds a method."""

import importlib
import pkgutil

from pf2lora.methods.base import ClientContext, ClientUpdate, Method, register, registry

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ClientContext", "ClientUpdate", "Method", "register", "registry"]

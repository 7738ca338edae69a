"""Federated LoRA methods. Importing this package registers every method."""

from pf2lora.methods import centralized, hetlora, homlora, local, perfedavg, pf2lora, pf2lora_fo  # noqa: F401
from pf2lora.methods.base import ClientContext, ClientUpdate, Method, register, registry

__all__ = ["ClientContext", "ClientUpdate", "Method", "register", "registry"]

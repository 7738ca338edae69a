"""Centralised LoRA on the pooled data of all clients: the reference for the global model.

Not federated (it needs everyone's data in one place); the engine trains it as one client holding
the union of the training sets, with as many gradient steps per round as the federation takes."""

from __future__ import annotations

from pf2lora.methods.base import register
from pf2lora.methods.homlora import HOMLoRA


@register
class Centralized(HOMLoRA):
    name = "centralized"
    description = "one rank-r LoRA trained on all clients' pooled data (non-private reference)"
    pools_data = True
    plain_mean_aggregation = False  # one pooled client holding everyone's raw data: no aggregate to secure

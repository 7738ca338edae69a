"""Light shared names of the Flower engine (no torch import)."""

from __future__ import annotations


class FlowerEngineError(RuntimeError):
    """The federation cannot run (SuperLink unreachable, nodes missing, a port in use, ...)."""


ROUND_TAG = "PF2LORA_ROUND "
"""Log line prefix of a deployed ServerApp's per-round record (JSON follows)."""
RESULT_TAG = "PF2LORA_RESULT "
"""Log line prefix of a deployed ServerApp's results (JSON list of MethodResult dicts)."""
ERROR_TAG = "PF2LORA_ERROR "
"""Log line prefix of a deployed ServerApp's failure (one line)."""
CHECKPOINT_TAG = "PF2LORA_CHECKPOINT "
"""Log line prefix of a deployed ServerApp's checkpoint after a round (base64 of its bytes), sent
back this way when the ServerApp runs on another machine (an existing SuperLink)."""

"""Named tensors <-> Flower records. Only numpy arrays travel (no pickle on either side).

numpy has no bfloat16: such tensors are sent as float32 and cast back on arrival (the original
dtype travels in the message's config). Every conversion copies, so a message never aliases a
tensor the sender keeps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pf2lora.engines.flower import env

env.apply()

from flwr.app import Array, ArrayRecord

UPCAST = {torch.bfloat16: torch.float32}
"""dtypes numpy lacks, and the dtype they travel as."""
_DTYPES = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)}


def upcast(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Key -> original dtype of the tensors that travel upcast (see :data:`UPCAST`)."""
    return {k: str(v.dtype) for k, v in tensors.items() if v.dtype in UPCAST}


def to_record(tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, str]:
    """(the arrays, a JSON map key -> original dtype for the tensors that were upcast)."""
    arrays: dict[str, Array] = {}
    for k, v in tensors.items():
        t = v.detach().cpu()
        t = t.to(UPCAST.get(t.dtype, t.dtype))
        arrays[k] = Array(np.ascontiguousarray(t.numpy()).copy())
    return ArrayRecord(arrays), json.dumps(upcast(tensors))


def from_record(record: ArrayRecord, cast_json: str = "{}") -> dict[str, torch.Tensor]:
    """The tensors of ``record``, cast back to their original dtypes."""
    cast = json.loads(cast_json or "{}")
    out: dict[str, torch.Tensor] = {}
    for k, arr in record.items():
        t = torch.from_numpy(np.array(arr.numpy(), copy=True))
        if k in cast and cast[k] in _DTYPES:
            t = t.to(_DTYPES[cast[k]])
        out[k] = t
    return out


def dumps(obj: Any) -> str:
    """JSON of metrics (NaN / inf allowed: floats round-trip exactly)."""
    return json.dumps(obj)


def loads(text: str) -> Any:
    return json.loads(text)

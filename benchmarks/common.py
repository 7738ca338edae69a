"""What every benchmark script shares: where results go and how they are written."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from pf2lora.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a figure was measured on (no host names or paths)."""
    return {"cpu_count": os.cpu_count(), **extra, "platform": platform.platform(), "python": platform.python_version()}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically: an interrupted benchmark never leaves a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def seeds_parser(description: str, default_out: Path, methods_default: str) -> argparse.ArgumentParser:
    """The options every multi-seed comparison takes: seeds, methods, parallel jobs, output, --table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help=f"default: {methods_default}")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (each on one thread)")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    return parser


def trained_params(method, task) -> dict[str, int]:
    """Tensors one client trains (what it receives plus its own state), split into LoRA and head."""
    from pf2lora import state as st
    from pf2lora.engines.local import generator
    from pf2lora.methods.base import HeterogeneousRanks

    server = method.init_server(generator(0, "init", "server"))
    cid = task.clients[-1].client_id
    received = method.broadcast(server, cid)
    client = method.init_client(cid, generator(0, "init", cid))
    tensors = {
        **{k: v for k, v in received.items() if ":" in k},
        **{k: v for k, v in client.items() if k.startswith(("shared:", "private:"))},
    }
    names = {n for n, _ in task.model.named_parameters()}  # model parameters only (not e.g. she-lora's shared:she/*)
    tensors = {k: v for k, v in tensors.items() if st.is_param(k) and st.path_of(k) in names}
    lora = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    head = sum(t.numel() for t in tensors.values()) - lora
    if lora == 0 and isinstance(method, HeterogeneousRanks):  # factors drawn by the client itself (she-lora)
        lora = sum(method.assigned_rank(cid) * (t.in_features + t.out_features) for t in task.targets)
    return {"lora": int(lora), "head": int(head)}

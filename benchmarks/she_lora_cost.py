"""What SHE-LoRA's encryption costs: bytes and client / server time per round against plaintext
FlexLoRA and against encrypting every column, in one run on one setting.

Setting (default): the synthetic task with one realistic 384 x 384 adapted layer (a MiniLM-size
attention projection), 8 clients of 256 examples, FlexLoRA's heterogeneous ranks (lora.rank 8,
private_rank 2: ranks 6 to 10), 5 local steps of batch 32 per round, 4 rounds. Variants:

* ``flexlora``: plaintext Delta-W aggregation (the server also takes each client's SVD);
* ``she-lora``: the default column budgets (5 / 10 / 20 % of the input columns, cycled);
* ``she-lora-all``: ``she_lora.column_budgets = [1.0]``, every column encrypted.

Per round: the bytes one client uploads and downloads (the engine's counts, serialized
ciphertexts included), one client's time (``client_update``: decrypting and re-assembling the
aggregate, the SVD, training, encrypting; its training and its CKKS calls apart), the server's time (``aggregate``
plus the round's ``broadcast`` calls, where FlexLoRA's per-client SVDs run; its ciphertext
additions apart). SHE-LoRA's round 1 is the negotiation (votes only): figures are the medians over
rounds 2 on, with round 1 reported apart. Ratios are against FlexLoRA in the same run.

    python benchmarks/she_lora_cost.py [--rounds 4] [--dim 384] [--out benchmarks/results/she_lora_cost.json]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, machine, write_json
from pf2lora import plan
from pf2lora.engines.local import LocalEngine
from pf2lora.methods import she_lora as she
from pf2lora.methods.flexlora import FlexLoRA

CONFIG = "configs/synthetic_rank.toml"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "flexlora": ("flexlora", []),
    "she-lora": ("she-lora", []),
    "she-lora-all": ("she-lora", ["she_lora.column_budgets=[1.0]"]),
}


@contextmanager
def timed(events: list[tuple[str, float]]) -> Iterator[None]:
    """Record (what, seconds) of every client_update, aggregate, broadcast and CKKS call, in order."""
    patches: list[tuple[Any, str, Callable[..., Any]]] = []

    def wrap(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def timing(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((kind, time.perf_counter() - t0))

        patches.append((owner, name, original))
        setattr(owner, name, timing)

    wrap(FlexLoRA, "train_steps", "client_train")  # she-lora inherits it: wrapped once
    for cls in (FlexLoRA, she.SHELoRA):
        wrap(cls, "client_update", "client")
        wrap(cls, "aggregate", "server")
        wrap(cls, "broadcast", "broadcast")
    wrap(she, "encrypt", "client_ckks")
    wrap(she, "decrypt", "client_ckks")
    wrap(she, "add", "server_ckks")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def per_round(events: list[tuple[str, float]], clients: int) -> list[dict[str, float]]:
    """The events cut into rounds (each ends with its aggregate); final evaluation left out."""
    rounds, current = [], {"client": 0.0, "client_train": 0.0, "client_ckks": 0.0, "server": 0.0, "broadcast": 0.0, "server_ckks": 0.0}
    for kind, seconds in events:
        current[kind] += seconds
        if kind == "server":
            rounds.append(
                {
                    "client_s": current["client"] / clients,
                    "client_train_s": current["client_train"] / clients,
                    "client_ckks_s": current["client_ckks"] / clients,
                    "server_s": current["server"] + current["broadcast"],
                    "server_ckks_s": current["server_ckks"],
                }
            )
            current = dict.fromkeys(current, 0.0)
    return rounds


def run_variant(name: str, overrides: list[str]) -> dict[str, Any]:
    method, extra = VARIANTS[name]
    cfg = plan.load(CONFIG, [*overrides, *extra, f'methods=["{method}"]'])
    task = plan.build_task(cfg)
    events: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with timed(events):
        result = LocalEngine(cfg, task, progress=False).run(method)
    wall = time.perf_counter() - t0
    rounds = per_round(events, cfg.task.num_clients)
    records = result.rounds
    steady = list(range(1, len(records)))  # rounds 2..R
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    out: dict[str, Any] = {
        "upload_bytes_per_client_per_round": med([records[i]["upload_bytes_per_client"] for i in steady]),
        "download_bytes_per_client_per_round": med([records[i]["download_bytes_per_client"] for i in steady]),
        "ciphertext_bytes_per_client_per_round": med([records[i].get("ciphertext_bytes_per_client", 0.0) for i in steady]),
        "client_s_per_round": med([rounds[i]["client_s"] for i in steady]),
        "client_train_s_per_round": med([rounds[i]["client_train_s"] for i in steady]),
        "client_ckks_s_per_round": med([rounds[i]["client_ckks_s"] for i in steady]),
        "server_s_per_round": med([rounds[i]["server_s"] for i in steady]),
        "server_ckks_s_per_round": med([rounds[i]["server_ckks_s"] for i in steady]),
        "round_1": {
            "upload_bytes_per_client": records[0]["upload_bytes_per_client"],
            "download_bytes_per_client": records[0]["download_bytes_per_client"],
            "client_s": rounds[0]["client_s"],
            "server_s": rounds[0]["server_s"],
        },
        "mean_test_mse": sum(c["test_mse"] for c in result.clients.values()) / len(result.clients),
        "wall_time_s": wall,
    }
    if method == "she-lora":
        slots = cfg.she_lora.poly_modulus_degree // 2
        t = task.targets[0]
        per_client = []
        for k in range(cfg.task.num_clients):
            f = cfg.she_lora.column_budgets[k % len(cfg.she_lora.column_budgets)]
            values = sum(x.out_features * she.column_count(x, f) for x in task.targets)
            per_client.append({"budget": f, "columns": she.column_count(t, f), "values": values, "ciphertexts": -(-values // slots)})
        out["encrypted_per_client"] = per_client
        out["slot_utilisation"] = sum(c["values"] for c in per_client) / (slots * sum(c["ciphertexts"] for c in per_client))
        out["mean_ciphertext_bytes_per_client_per_round_incl_negotiation"] = sum(
            c["ciphertext_bytes_per_client_per_round"] for c in result.clients.values()
        ) / len(result.clients)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--out", type=Path, default=RESULTS / "she_lora_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    overrides = [
        f"rounds={args.rounds}",
        f"task.dim={args.dim}",
        "task.num_clients=8",
        "task.train_samples=256",
        "task.test_samples=256",
        "lora.rank=8",
        "lora.alpha=8.0",
        "lora.private_rank=2",
        "local_steps=5",
        "batch_size=32",
        "num_threads=1",
        "checkpoint=false",
    ]
    variants = {name: run_variant(name, overrides) for name in VARIANTS}
    keys = ("upload_bytes_per_client_per_round", "download_bytes_per_client_per_round", "client_s_per_round", "server_s_per_round")
    ratio = lambda a, b: {k: variants[a][k] / variants[b][k] for k in keys}
    exe = os.path.relpath(sys.executable)
    result = {
        "benchmark": "SHE-LoRA's cost per round against plaintext FlexLoRA and against encrypting every column (one run)",
        "command": " ".join(shlex.quote(a) for a in [exe if not exe.startswith("..") else sys.executable, *sys.argv]),
        "machine": machine(torch_threads=torch.get_num_threads(), load_average_1m_at_end=os.getloadavg()[0]),
        "setup": {
            "config": CONFIG,
            "overrides": overrides,
            "layer": f"one adapted {args.dim} x {args.dim} layer",
            "ckks": {
                "poly_modulus_degree": 8192,
                "coeff_mod_bit_sizes": list(she.COEFF_MOD_BITS),
                "scale_bits": she.SCALE_BITS,
                "fixed_point_bits": 24,
            },
            "figures": "medians over rounds 2 on (SHE-LoRA's round 1 negotiates: votes only, reported under round_1)",
        },
        "variants": variants,
        "ratios": {
            "she-lora / flexlora": ratio("she-lora", "flexlora"),
            "she-lora-all / flexlora": ratio("she-lora-all", "flexlora"),
            "she-lora / she-lora-all": ratio("she-lora", "she-lora-all"),
        },
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    res = main()
    for pair, r in res["ratios"].items():
        print(pair, {k: round(v, 2) for k, v in r.items()})

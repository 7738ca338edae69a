"""Tensor operations per local step and per round: what sets the pace of a small model on a GPU.

    python benchmarks/op_count.py [--out benchmarks/results/op_count.json]

On a GPU a small model's step is bound by kernel launches and the host's work around them, not by
arithmetic (``accel_gpu.json``: a round of MiniLM-L6's shape took about as long per step whether
the batch was 16 or 128). This counts what the host dispatches, on the CPU, with a
``TorchDispatchMode``: every aten operation that is not a view or an allocation, in the engine's
main thread (where the lockstep engine runs the steps and the round's bookkeeping), with the
copies and means packed as on a GPU (:func:`pf2lora.state.packs`), for HOMLoRA
with 8 clients batched, one after another, and one centralized LoRA job of the same total batch.
Two runs per variant, with 10 and 20 local steps, give the operations per local step (their
difference) and the rest of a round (aggregation, copies, checks: the round's overhead). The
counts are deterministic, so unlike a timing they can be compared across machines and commits;
shapes do not change them, so a tiny model of MiniLM-L6's depth stands in.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pf2lora import plan
from pf2lora import state as st
from pf2lora.engines.local import LocalEngine
from pf2lora.tasks.tiny_text import TinyTextTask

SHAPE = {"hidden_size": 24, "num_layers": 6, "num_heads": 2, "intermediate_size": 48}
"""MiniLM-L6's depth (the count of operations per step depends on the layers, not their width)."""
TASK = ["task.kind=tiny-text", "task.num_clients=8", "task.seq_len=16", "task.train_samples=256", "task.test_samples=32"]
TASK += ["batch_size=16", "lora.rank=8", "lora.alpha=8.0", "num_threads=1", "rounds=2", "eval.every=0", "checkpoint=false"]
VARIANTS = {
    "batched": ("homlora", ["parallel_clients=8"], 1, 1),
    "sequential": ("homlora", ["parallel_clients=1"], 8, 8),
    "centralized": ("centralized", ["batch_size=128"], 8, 1),
}
"""name: (method, overrides, model steps a round per local step, model steps per 128 examples). A
centralized round takes the federation's total steps (8 x local_steps), each of batch 128."""
PF2LORA_STEPS = (
    ("homlora", "homlora", []),
    ("pf2lora", "pf2lora", []),
    ("pf2lora_hvp_every_4", "pf2lora", ["pf2lora.hvp_every=4"]),
    ("pf2lora_hvp_every_8", "pf2lora", ["pf2lora.hvp_every=8"]),
    ("pf2lora_first_order", "pf2lora", ['pf2lora.estimator="first-order"']),
    ("pf2lora-fo", "pf2lora-fo", []),
)
"""(label, method, overrides) of the per-step comparison, 8 clients batched."""
NOT_COUNTED = {
    "view", "as_strided", "_unsafe_view", "_reshape_alias", "alias", "detach", "lift_fresh", "t", "transpose",
    "expand", "permute", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "unbind",
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like",
}  # fmt: skip
"""Views and bare allocations: no kernel runs for them."""


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name not in NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(method: str, overrides: list[str], local_steps: int) -> collections.Counter[str]:
    cfg = plan.load(
        str(ROOT / "configs" / "synthetic_rank.toml"), [*TASK, *overrides, f"local_steps={local_steps}", f'methods=["{method}"]']
    )
    torch.set_num_threads(1)
    task = TinyTextTask(
        cfg,
        hidden_size=SHAPE["hidden_size"],
        num_layers=SHAPE["num_layers"],
        num_heads=SHAPE["num_heads"],
        intermediate_size=SHAPE["intermediate_size"],
    )
    engine = LocalEngine(cfg, task, progress=False)
    with _Count() as counter:
        engine.run(method)
    return counter.ops


def synthetic_round_ops(parallel: int) -> int:
    """Top-level operations (those not called from inside another) of round 2 of 3 of
    ``configs/synthetic_rank.toml``'s HOMLoRA on the CPU path (nothing packed), in every thread
    (the batched engine's clients upload from theirs): on this 32 x 32 model a round's time
    follows this count."""
    from torch.profiler import ProfilerActivity, profile

    cfg = plan.load(
        str(ROOT / "configs" / "synthetic_rank.toml"),
        ["rounds=3", "eval.every=0", "checkpoint=false", "device=cpu", f"parallel_clients={parallel}", 'methods=["homlora"]'],
    )
    torch.set_num_threads(1)
    engine = LocalEngine(cfg, plan.build_task(cfg), progress=False)
    prof = profile(activities=[ProfilerActivity.CPU])
    ends = 0

    def on_round(_record: object) -> None:
        nonlocal ends
        ends += 1
        if ends == 1:
            prof.__enter__()
        elif ends == 2:
            prof.__exit__(None, None, None)

    engine.run("homlora", on_round=on_round)

    def is_op(name: str) -> bool:
        return name.startswith(("aten::", "autograd::")) or "Backward" in name

    def top(ev: Any) -> bool:
        p = ev.cpu_parent
        while p is not None and not is_op(p.name):
            p = p.cpu_parent
        return p is None

    return sum(1 for ev in prof.events() if is_op(ev.name) and top(ev))


def main() -> None:
    st.PACK_ON_CPU = True  # count what a GPU run dispatches: its copies and means are packed (state.packs)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "op_count.json"))
    args = p.parse_args()
    results: dict[str, Any] = {}
    for name, (method, overrides, per_local, per_128) in VARIANTS.items():
        short, long = count(method, overrides, 10), count(method, overrides, 20)
        n_short, n_long = sum(short.values()), sum(long.values())
        per_step = (n_long - n_short) / (2 * 10 * per_local)  # 2 rounds, 10 more local steps each
        per_round = n_short / 2 - per_step * 10 * per_local  # the run's end (its evaluation) shared out over the 2 rounds
        results[name] = {
            "method": method,
            "overrides": overrides,
            "ops_per_model_step": per_step,
            "ops_per_round_besides_steps": per_round,
            "ops_per_128_examples": per_step * per_128 + per_round / (10 * per_local / per_128),
            "most_common_in_10_step_run": dict(short.most_common(12)),
        }
        print(f"{name}: {per_step:.0f} ops a model step, {per_round:.0f} a round besides them")
    # PF2LoRA's step against HOMLoRA's, batched: three dependent forward/backward passes (or two,
    # where H_xy v is reused or dropped) plus its own arithmetic (the fused adapters, the lower SGD
    # step, the finite difference)
    steps: dict[str, Any] = {}
    for label, method, extra in PF2LORA_STEPS:
        short, long = count(method, ["parallel_clients=8", *extra], 10), count(method, ["parallel_clients=8", *extra], 20)
        steps[label] = (sum(long.values()) - sum(short.values())) / 20
        print(f"{label}: {steps[label]:.0f} ops a batched step")
    pf2lora_steps = {k: {"ops_per_step": v, "over_homlora": v / steps["homlora"]} for k, v in steps.items()}
    st.PACK_ON_CPU = False  # the synthetic task on a CPU: what a CPU run dispatches
    synthetic = {"sequential": synthetic_round_ops(1), "batched": synthetic_round_ops(8)}
    print(f"synthetic, 8 clients, CPU path: {synthetic['sequential']} ops a sequential round, {synthetic['batched']} batched")
    fed = results["batched"]["ops_per_128_examples"]
    out = {
        "command": "python benchmarks/op_count.py",
        "about": "aten operations (not views or allocations) the engine's main thread dispatches; per 128 examples "
        "trained: one local step of all 8 clients (batched: one model step; sequential: 8), one centralized step "
        "of batch 128, each with its share of the round's other operations (a round: 10 local steps)",
        "shape": SHAPE,
        "machine": {"torch": torch.__version__, "python": platform.python_version()},
        "results": results,
        "batched_over_centralized_ops": fed / results["centralized"]["ops_per_128_examples"],
        "pf2lora_step_ops": pf2lora_steps,
        "synthetic_8_cpu_round_ops": {**synthetic, "sequential_over_batched": synthetic["sequential"] / synthetic["batched"]},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

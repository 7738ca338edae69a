"""How much faster the accelerated in-process engine is: every figure a ratio measured in one run.

* **Round time, sequential vs batched** (``parallel_clients = 1`` vs ``K``): the synthetic task of
  ``configs/synthetic_rank.toml`` with 8 and with 64 clients, and real text
  (``configs/rt_compare.toml``: paraphrase-MiniLM-L3-v2, Rotten Tomatoes, 8 clients), for HOMLoRA
  and PF2LoRA; for real text also what ``parallel_clients = 0`` (auto) picks.
* **Federated throughput vs one centralized job**: client examples trained per second by the
  federation (HOMLoRA, K = 8 clients x batch B = 16, batched) against the ``centralized`` method
  training one LoRA on the pooled data with batch K x B = 128, the same model (it takes K times
  the local steps per round: the federation's total).
* **Host cost of a call with the clients' tensors** (:class:`pf2lora.lora.ParameterSlots` vs
  ``torch.func.functional_call``): one forward and backward of a 6-layer BERT with LoRA on query
  and value (hidden 32 and 4 x 8 tokens on a CPU, where it isolates the host's work; MiniLM-L6's shape and
  16 x 64 tokens on a GPU).
* **One AdamW step over 8 stacked clients' LoRA tensors** (MiniLM-L6's: 6 layers x query, value x
  A, B), the fused update of :func:`pf2lora.optim.adamw` (``torch._foreach_*``) against the same
  arithmetic one tensor at a time.
* **PF2LoRA step cost per estimator**, relative to HOMLoRA: see ``benchmarks/step_cost.py`` (its
  own JSON); not repeated here.

A round's time is the wall time between the ends of consecutive rounds (the first round, which
warms caches up, is left out; evaluation is off). The variants of one comparison run
interleaved, ``--reps`` times each, and the median is reported, so load on the machine hits them
alike. How far each variant's final per-client metric is from the first variant's is reported
(``max_rel_diff_vs_*``); tests/test_batched.py is where agreement is required.

    python benchmarks/accel.py [--quick] [--device auto] [--reps 3] [--out benchmarks/results/accel.json]

On a GPU (``--device cuda``, or ``auto`` where CUDA is present) it writes
``benchmarks/results/accel_gpu.json`` unless ``--out`` says otherwise, and adds settings on random
models of MiniLM-L6's and roberta-base's shapes (the tiny-text task's BERT at those sizes; speed does
not depend on the weights, and the GPU machine needs no offline assets): batched vs sequential,
PF2LoRA vs HOMLoRA per round, bf16 vs fp32, federated vs centralized throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, write_json
from pf2lora import plan
from pf2lora.engines import lockstep
from pf2lora.engines.local import LocalEngine
from pf2lora.engines.lockstep import parallel_clients
from pf2lora.tasks.tiny_text import TinyTextTask

SYNTH = str(ROOT / "configs" / "synthetic_rank.toml")
DEFAULT_THREADS = torch.get_num_threads()
"""torch's default, for configs with ``num_threads = 0`` (a setting's threads must not leak into the next)."""
TEXT = str(ROOT / "configs" / "rt_compare.toml")


@dataclass
class Setting:
    """One comparison: a config, overrides, a method, and the variants (extra overrides) to time."""

    name: str
    config: str
    method: str
    overrides: list[str]
    variants: dict[str, list[str]]
    rounds: int
    examples_per_round: int = 0
    shape: dict[str, int] | None = None
    """A tiny-text model of this size (random weights: speed does not depend on them) in place of
    the config's task; for the GPU settings, which must not need the offline assets."""
    times: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, list[float]] = field(default_factory=dict)
    """Per variant and run: seconds a round spent in the stacked steps (:func:`stacked_train`), the
    rest of a batched round being the clients' threads and the round's bookkeeping."""
    finals: dict[str, dict[str, float]] = field(default_factory=dict)
    picked: dict[str, int] = field(default_factory=dict)


def run_once(s: Setting, variant: str, device: str) -> None:
    overrides = [*s.overrides, *s.variants[variant], f"rounds={s.rounds}", "eval.every=0", "checkpoint=false", f"device={device}"]
    overrides.append(f'methods=["{s.method}"]')
    cfg = plan.load(s.config, overrides)
    torch.set_num_threads(cfg.num_threads or DEFAULT_THREADS)
    if s.shape is None:
        task = plan.build_task(cfg)
    else:
        task = TinyTextTask(cfg, **s.shape)
        task.precision = cfg.precision
        task.to(plan.resolve_device(cfg.device))
    ends: list[float] = []
    in_steps = [0.0]
    per_round: list[float] = []

    def on_round(_record: object) -> None:
        ends.append(time.perf_counter())
        per_round.append(in_steps[0])
        in_steps[0] = 0.0

    engine = LocalEngine(cfg, task, progress=False)
    with _timed_steps(in_steps):
        result = engine.run(s.method, on_round=on_round)
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    s.times.setdefault(variant, []).append(statistics.median(gaps))
    if any(per_round):  # the lockstep engine ran: the same rounds as the gaps (the first left out)
        s.steps.setdefault(variant, []).append(statistics.median(per_round[1:]))
    s.picked[variant] = parallel_clients(cfg, task, len(task.clients))
    metric = task.primary_metric
    s.finals[variant] = {cid: float(row[metric]) for cid, row in result.clients.items() if isinstance(row.get(metric), (int, float))}


@contextlib.contextmanager
def _timed_steps(total: list[float]) -> Iterator[None]:
    """Adds to ``total[0]`` the seconds spent in the lockstep engine's stacked steps."""
    real = lockstep.stacked_train

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    lockstep.stacked_train = timed
    try:
        yield
    finally:
        lockstep.stacked_train = real


def measure(s: Setting, reps: int, device: str) -> dict[str, Any]:
    for rep in range(reps):
        order = list(s.variants) if rep % 2 == 0 else list(reversed(s.variants))
        for variant in order:  # interleaved, the order reversed every other time: load and warm-up hit every variant alike
            run_once(s, variant, device)
    base = next(iter(s.variants))
    med = {v: statistics.median(t) for v, t in s.times.items()}
    out: dict[str, Any] = {
        "config": str(Path(s.config).relative_to(ROOT)),
        "method": s.method,
        "overrides": s.overrides,
        "variants": s.variants,
        "rounds_timed": s.rounds - 1,
        "round_time_s": med,
        "speedup_vs_" + base: {v: med[base] / med[v] for v in med},
        "parallel_clients_used": s.picked,
        "max_rel_diff_vs_" + base: {v: _max_rel_diff(s.finals[base], s.finals[v]) for v in s.finals},
    }
    if s.examples_per_round:
        out["examples_per_s"] = {v: s.examples_per_round / med[v] for v in med}
    if s.steps:  # a batched round: its stacked steps, and the rest (the clients' threads, the bookkeeping)
        out["stacked_steps_s_per_round"] = {v: statistics.median(t) for v, t in s.steps.items()}
    return out


def _max_rel_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max((abs(a[k] - b[k]) / max(1e-12, abs(a[k])) for k in a if k in b), default=0.0)


def settings(quick: bool, gpu: bool) -> list[Setting]:
    r = 3 if quick else 6
    out = [
        Setting("synthetic_8_homlora", SYNTH, "homlora", [], {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=8"]}, r),
        Setting("synthetic_8_pf2lora", SYNTH, "pf2lora", [], {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=8"]}, r),
        Setting(  # clients of different ranks (2 to 6 by default): one group, zero-padded to the widest
            "synthetic_8_hetlora",
            SYNTH,
            "hetlora",
            [],
            {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=8"]},
            r,
        ),
        Setting(
            "synthetic_64_homlora",
            SYNTH,
            "homlora",
            ["task.num_clients=64", "task.train_samples=500", "task.test_samples=100"],
            {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=64"]},
            r,
        ),
    ]
    if gpu:  # the GPU machine has no offline assets: random models of real shapes instead
        return [*out, *gpu_settings(quick)]
    text = ["local_steps=5"] if not quick else ["local_steps=3", "task.train_samples=100", "task.test_samples=40"]
    out.append(
        Setting(
            "minilm_l3_text_8_homlora",
            TEXT,
            "homlora",
            text,
            {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=8"], "auto": ["parallel_clients=0"]},
            3 if quick else 4,
        )
    )
    # throughput: 8 clients x batch 16 federated (batched) vs one centralized job with batch 128
    steps = 3
    fed = Setting(
        "throughput_minilm_l3",
        TEXT,
        "homlora",
        [f"local_steps={steps}", *text[1:]],
        {"federated_batched": ["parallel_clients=8"]},
        3 if quick else 4,
        examples_per_round=8 * 16 * steps,
    )
    central = Setting(
        "throughput_minilm_l3_centralized",
        TEXT,
        "centralized",
        [f"local_steps={steps}", "batch_size=128", *text[1:]],
        {"centralized": []},
        3 if quick else 4,
        examples_per_round=128 * steps * 8,  # a pooled run takes the federation's total steps per round
    )
    return [*out, fed, central]


# Random models of real shapes: MiniLM-L6 (6 layers, hidden 384) and roberta-base (12 layers, 768).
L6_SHAPE = {"hidden_size": 384, "num_layers": 6, "num_heads": 12, "intermediate_size": 1536}
BASE_SHAPE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072}
GPU_TASK = ["task.kind=tiny-text", "task.num_clients=8", "task.seq_len=64", "task.train_samples=256", "task.test_samples=32"]
GPU_TASK += ["batch_size=16", "local_steps=10", "lora.rank=8", "lora.alpha=8.0", "lora.private_rank=2", "num_threads=0"]


GPU_TEXT_MODEL = ROOT / ".gpu_assets" / "all-MiniLM-L6-v2-fp16"
"""The real MiniLM-L6 that ``make gpu-assets`` prepares for the device machine (with Rotten Tomatoes
in its cache): where it was carried, the GPU figures include real text."""


def gpu_settings(quick: bool) -> list[Setting]:
    """The GPU figures the issue asks for: batched vs sequential (8 clients), PF2LoRA vs HOMLoRA
    per round, bf16 vs fp32, federated vs centralized throughput; at MiniLM-L6's and
    roberta-base's shapes; and, where the real MiniLM-L6 was carried (:data:`GPU_TEXT_MODEL`),
    real text (Rotten Tomatoes, padded texts) batched vs sequential."""
    r = 3 if quick else 5
    seq_bat = {"sequential": ["parallel_clients=1"], "batched": ["parallel_clients=8"]}
    out: list[Setting] = []
    if GPU_TEXT_MODEL.is_dir():
        model = GPU_TEXT_MODEL.relative_to(ROOT)  # (run from the repository root, as gpu_check.sh does)
        text = [f"task.model={model}", "local_steps=5", "task.train_samples=100", "task.test_samples=40"]
        out.append(Setting("l6_rt_text_8_homlora", TEXT, "homlora", text, {**seq_bat, "auto": ["parallel_clients=0"]}, r))
    for tag, shape in (("l6_shape", L6_SHAPE), ("base_shape", BASE_SHAPE)):
        out.append(Setting(f"{tag}_8_homlora", SYNTH, "homlora", GPU_TASK, seq_bat, r, shape=shape))
        # the amortized step (a stale H_xy v, refreshed every 4th or 8th step): the approximation that
        # can go below three dependent passes; at L6 shape only, to fit one session's device time
        amortized = (
            {f"batched_hvp_every_{k}": ["parallel_clients=8", f"pf2lora.hvp_every={k}"] for k in (4, 8)} if tag == "l6_shape" else {}
        )
        out.append(Setting(f"{tag}_8_pf2lora", SYNTH, "pf2lora", GPU_TASK, {**seq_bat, **amortized}, r, shape=shape))
        out.append(
            Setting(
                f"{tag}_8_precision",
                SYNTH,
                "homlora",
                GPU_TASK,
                {"fp32": ["parallel_clients=8"], "bf16": ["parallel_clients=8", "precision=bf16"]},
                r,
                shape=shape,
            )
        )
        out.append(
            Setting(f"{tag}_throughput", SYNTH, "homlora", GPU_TASK, {"federated_batched": ["parallel_clients=8"]}, r, 8 * 16 * 10, shape)
        )
        out.append(
            Setting(
                f"{tag}_throughput_centralized",
                SYNTH,
                "centralized",
                [*GPU_TASK, "batch_size=128"],
                {"centralized": []},
                r,
                128 * 10 * 8,
                shape,
            )
        )
    return out


def interleaved(calls: dict[str, Callable[[], object]], n: int, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed ``n`` calls at a time, interleaved (the
    order reversed every other repetition, so load hits them alike); a GPU is synchronised around
    each timing."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(max(3, reps) * 2 + 1):
        for name in calls if rep % 2 == 0 else reversed(list(calls)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(n):
                calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def call_overhead(device: torch.device, reps: int) -> dict[str, Any]:
    """Forward + backward through ``functional_call`` and through :class:`ParameterSlots`,
    interleaved (the order reversed every other repetition); median seconds per call."""
    from torch.func import functional_call
    from transformers import BertConfig, BertForSequenceClassification

    from pf2lora import lora

    shape = dict(L6_SHAPE) if device.type == "cuda" else {**L6_SHAPE, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"],
    )
    model = BertForSequenceClassification(config).to(device).eval()
    targets = lora.inject(model, ["query", "value"], {lora.COMMON: 8.0})
    params = {}
    for t in targets:
        params[lora.a_path(t.path, lora.COMMON)] = torch.randn(8, t.in_features, device=device, requires_grad=True)
        params[lora.b_path(t.path, lora.COMMON)] = torch.randn(t.out_features, 8, device=device, requires_grad=True)
    batch = (16, 64) if device.type == "cuda" else (4, 8)  # on a CPU, little compute: the host's part shows
    inputs = {"input_ids": torch.randint(0, 1000, batch, device=device)}
    slots = lora.ParameterSlots(model)
    calls = {
        "functional_call": lambda: functional_call(model, params, args=(), kwargs=inputs, strict=False).logits,
        "parameter_slots": lambda: slots.call(params, inputs).logits,
    }
    med = interleaved(
        {name: lambda c=c: torch.autograd.grad(c().square().sum(), list(params.values())) for name, c in calls.items()}, 20, reps, device
    )
    return {
        "shape": shape,
        "batch": list(inputs["input_ids"].shape),
        "forward_backward_s": med,
        "functional_call_over_parameter_slots": med["functional_call"] / med["parameter_slots"],
    }


def optimizer_overhead(device: torch.device, reps: int) -> dict[str, Any]:
    """:func:`pf2lora.optim.adamw` (fused over the tensors) against its per-tensor arithmetic
    (``optim._adamw_one`` for each tensor), interleaved; median seconds per step."""
    from pf2lora import optim

    gen = torch.Generator().manual_seed(0)
    k, r, d = 8, 8, L6_SHAPE["hidden_size"]
    params: dict[str, torch.Tensor] = {}
    for layer in range(L6_SHAPE["num_layers"]):
        for proj in ("query", "value"):
            params[f"l{layer}.{proj}.A"] = torch.randn(k, r, d, generator=gen).to(device)
            params[f"l{layer}.{proj}.B"] = torch.randn(k, d, r, generator=gen).to(device)
    grads = {name: torch.randn(p.shape, generator=gen).to(device) for name, p in params.items()}
    state = optim.adamw_state(params, {})

    def per_tensor() -> None:
        new_params: dict[str, torch.Tensor] = {}
        new_state: dict[str, torch.Tensor] = {"step": state["step"] + 1}
        for name in params:
            new_state[f"t/{name}"] = state[f"t/{name}"] + 1
            optim._adamw_one(name, params[name], grads[name], state, new_params, new_state, 1e-3, (0.9, 0.999), 1e-8, 0.0)

    steps = {"fused": lambda: optim.adamw(params, grads, state, 1e-3), "per_tensor": per_tensor}
    med = interleaved(steps, 50, reps, device)
    return {"tensors": len(params), "clients": k, "step_s": med, "per_tensor_over_fused": med["per_tensor"] / med["fused"]}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The derived ratios the README quotes (each from figures of this one run)."""
    out: dict[str, float] = {}
    for fed, central in (
        ("throughput_minilm_l3", "throughput_minilm_l3_centralized"),
        ("l6_shape_throughput", "l6_shape_throughput_centralized"),
        ("base_shape_throughput", "base_shape_throughput_centralized"),
    ):
        if fed in results and central in results:
            out[f"{fed}_federated_over_centralized"] = (
                results[fed]["examples_per_s"]["federated_batched"] / results[central]["examples_per_s"]["centralized"]
            )
    for tag in ("synthetic_8", "l6_shape_8", "base_shape_8"):
        hom, pf2 = results.get(f"{tag}_homlora"), results.get(f"{tag}_pf2lora")
        if hom and pf2:
            for v in ("sequential", "batched"):
                out[f"{tag}_pf2lora_over_homlora_round_{v}"] = pf2["round_time_s"][v] / hom["round_time_s"][v]
            for k in (4, 8):
                if f"batched_hvp_every_{k}" in pf2["round_time_s"]:
                    out[f"{tag}_pf2lora_hvp_every_{k}_over_homlora_round_batched"] = (
                        pf2["round_time_s"][f"batched_hvp_every_{k}"] / hom["round_time_s"]["batched"]
                    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller text data (a smoke run)")
    p.add_argument("--only", nargs="*", help="run only these settings (names as in the JSON)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = plan.resolve_device(args.device, "--device")
    gpu = device.type == "cuda"
    out_path = args.out or RESULTS / ("accel_gpu.json" if gpu else "accel.json")
    results: dict[str, Any] = {}
    todo = [s for s in settings(args.quick, gpu) if not args.only or s.name in args.only]
    name = plan.device_name(device)

    def save(complete: bool) -> None:
        """After every setting, so that a run cut short (a device call's time limit) keeps what it measured."""
        results["ratios"] = ratios(results)
        write_json(
            out_path,
            {
                "command": "python " + shlex.join(["benchmarks/accel.py", *sys.argv[1:]]),
                "machine": machine(device=str(device), device_name=name, torch=torch.__version__, default_threads=DEFAULT_THREADS),
                "seed": 0,
                "complete": complete,
                "results": results,
            },
        )

    if not args.only or "call_overhead" in args.only:
        results["call_overhead"] = call_overhead(device, args.reps)
        print(f"call_overhead: {results['call_overhead']['functional_call_over_parameter_slots']:.2f}x", flush=True)
        save(not todo)
    if not args.only or "optimizer_overhead" in args.only:
        results["optimizer_overhead"] = optimizer_overhead(device, args.reps)
        print(f"optimizer_overhead: {results['optimizer_overhead']['per_tensor_over_fused']:.2f}x", flush=True)
        save(not todo)
    for s in todo:
        t0 = time.perf_counter()
        results[s.name] = measure(s, args.reps, str(device))
        print(f"{s.name}: {results[s.name]['round_time_s']} ({time.perf_counter() - t0:.0f} s)", flush=True)
        save(s is todo[-1])
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

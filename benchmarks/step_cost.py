"""Wall time of one local step of PF2LoRA (per hypergradient estimator) relative to HOMLoRA.

One local step = ``method.client_update`` with ``local_steps = L`` (default 4), divided by L (for
PF2LoRA: the lower SGD step, the upper gradient on a second mini-batch, the mixed Hessian-vector
product, the AdamW step); L is a multiple of ``pf2lora.hvp_every`` so the amortised variant is
timed over whole refresh cycles. Every variant runs on the same model and the same mini-batch (both
of PF2LoRA's mini-batches are that batch), from the same starting state, so only the algorithm
differs. Attention is "eager" for every variant (the exact estimator needs it).

Models (``--model``):

* ``tiny-bert`` (default): a BERT-like encoder built from a config (no download): the
  ``tiny-text`` task's model at hidden 128, 2 layers, 2 heads, intermediate 512, sequence length
  64, batch 16 (one step of HOMLoRA takes tens of milliseconds on a laptop CPU);
* ``minilm-l3``: the pretrained paraphrase-MiniLM-L3-v2 (3 layers, hidden 384) through the
  ``text-classification`` task on Rotten Tomatoes as configs/rt_compare.toml loads it (needs
  ``make assets``), batch 16 of texts cut at 64 tokens.

LoRA on query/value with r = 8, r~ = 2. Repetitions are interleaved (round-robin over the
variants) after a warm-up, so load on the machine hits all variants alike; the median is reported.
The fastest repetition is reported too (``min_ms``): on a shared machine a long step is preempted
more often than a short one, which inflates the ratios of medians; the minima are the least
disturbed figures. Also reported: the trained parameter counts (the adapters alone, and with the classifier head) and
the bytes one client uploads per round.

    python benchmarks/step_cost.py [--model tiny-bert|minilm-l3] [--reps 20] [--warmup 3] [--threads N] [--local-steps 4] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pf2lora import state as st
from pf2lora.config import load
from pf2lora.methods import registry
from pf2lora.methods.base import ClientContext
from pf2lora.tasks import build_task
from pf2lora.tasks.base import Batch, Task
from pf2lora.tasks.tiny_text import TinyTextTask

MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 512}
SEQ_LEN, BATCH = 64, 16
MINILM = "paraphrase-MiniLM-L3-v2"

HVP_EVERY = 4
"""``pf2lora.hvp_every`` of the amortised variant."""

# name -> (method, config overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "homlora": ("homlora", []),
    "pf2lora[finite-difference, central]": ("pf2lora", ["pf2lora.estimator=finite-difference", "pf2lora.fd_one_sided=false"]),
    "pf2lora[finite-difference, one-sided]": ("pf2lora", ["pf2lora.estimator=finite-difference", "pf2lora.fd_one_sided=true"]),
    f"pf2lora[finite-difference, one-sided, hvp_every={HVP_EVERY}]": (
        "pf2lora",
        ["pf2lora.estimator=finite-difference", "pf2lora.fd_one_sided=true", f"pf2lora.hvp_every={HVP_EVERY}"],
    ),
    "pf2lora[exact]": ("pf2lora", ["pf2lora.estimator=exact"]),
    "pf2lora[first-order]": ("pf2lora", ["pf2lora.estimator=first-order"]),
    "pf2lora-fo": ("pf2lora-fo", []),
}


@dataclass
class FixedBatchContext(ClientContext):
    """A client context whose every mini-batch is the same one."""

    fixed: Batch = field(default_factory=dict)

    def batch(self) -> Batch:
        return self.fixed


def _numel(tensors: dict[str, torch.Tensor], lora_only: bool | None = None) -> int:
    return sum(v.numel() for k, v in tensors.items() if lora_only is None or ((".lora_" in k) == lora_only))


def _nonzero(state: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Give zero-initialised B matrices small random values, as after some training (so no
    estimator takes a zero-vector shortcut)."""
    return {
        k: (0.01 * torch.randn(v.shape, generator=g) if ".lora_B." in k else v) if k.startswith(("shared:", "private:")) else v
        for k, v in state.items()
    }


def _exe() -> str:
    """The interpreter as typed from the repository root, where possible."""
    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


MODELS = ("tiny-bert", "minilm-l3")
DEFAULT_OUT = {"tiny-bert": "benchmarks/results/step_cost.json", "minilm-l3": "benchmarks/results/step_cost_minilm_l3.json"}


def _task(model: str, local_steps: int) -> tuple[list[str], Task, str]:
    """The base config overrides, the task (eager attention) and a description of the model."""
    common = [f"batch_size={BATCH}", f"local_steps={local_steps}", "task.num_clients=1", "task.test_samples=1"]
    if model == "tiny-bert":
        base = [*common, 'task.kind="tiny-text"', f"task.train_samples={BATCH}", f"task.seq_len={SEQ_LEN}"]
        return base, TinyTextTask(load(None, base), **MODEL), f"BertForSequenceClassification from BertConfig (random, frozen), {MODEL}"
    base = [
        *common,
        'task.kind="text-classification"',
        f'task.model="{MINILM}"',
        'task.dataset="rotten-tomatoes"',
        'task.partition="iid"',
        f"task.train_samples={BATCH}",
        f"task.max_length={SEQ_LEN}",
    ]
    task = build_task(load(None, base), double_backward=True)  # eager attention, as for tiny-bert
    return base, task, f"{MINILM} (pretrained, frozen) via the text-classification task on rotten-tomatoes (as configs/rt_compare.toml)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="tiny-bert", help="the frozen base model (see the module docstring)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repetitions per variant first")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument(
        "--local-steps", type=int, default=HVP_EVERY, help=f"local steps per timed client_update (a multiple of hvp_every = {HVP_EVERY})"
    )
    ap.add_argument("--out", default=None, help="default: benchmarks/results/step_cost.json (tiny-bert), step_cost_minilm_l3.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.local_steps

    base, task, model_desc = _task(args.model, steps)
    cfg0 = load(None, base)
    client = task.clients[0]
    batch = {k: v[:BATCH] for k, v in client.train.items()}
    if hasattr(task.model, "set_attn_implementation"):
        task.model.set_attn_implementation("eager")

    runs = {}
    params = {}
    for name, (method_name, overrides) in VARIANTS.items():
        cfg = load(None, [*base, f'methods=["{method_name}"]', *overrides])
        method = registry()[method_name](cfg, task)
        g = torch.Generator().manual_seed(0)
        server = _nonzero(method.init_server(g), g)
        client_state = _nonzero(method.init_client(client.client_id, g), g)
        ctx = FixedBatchContext(
            client=client, task=task, generator=torch.Generator().manual_seed(0), round=1, local_steps=steps, batch_size=BATCH, fixed=batch
        )
        runs[name] = (method, ctx, server, client_state)
        update, _ = method.client_update(ctx, st.clone(server), client_state)
        params[name] = {
            "adapter_params": _numel(server, True) + _numel(client_state, True),
            "head_params": _numel({k: v for k, v in {**server, **client_state}.items() if k.startswith(("shared:", "private:"))}, False),
            "shared_adapter_params": _numel(server, True),
            "private_adapter_params": _numel({k: v for k, v in client_state.items() if k.startswith("private:")}, True),
            "upload_bytes_per_round": update.num_bytes,
        }
        params[name]["total_trained_params"] = params[name]["adapter_params"] + params[name]["head_params"]
    default_cfg = load(None, [*base, 'methods=["pf2lora"]']).pf2lora
    default = next(n for n, (m, o) in VARIANTS.items() if m == "pf2lora" and load(None, [*base, *o]).pf2lora == default_cfg)

    def once(name: str) -> float:
        method, ctx, server, client_state = runs[name]
        received = st.clone(server)
        start = time.perf_counter()
        method.client_update(ctx, received, client_state)
        return (time.perf_counter() - start) / steps

    for _ in range(args.warmup):
        for name in VARIANTS:
            once(name)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order
            times[name].append(once(name))

    median = {n: statistics.median(t) for n, t in times.items()}
    hom = median["homlora"]
    hp = params["homlora"]
    pp = params[default]
    cfg = cfg0
    result = {
        "benchmark": f"wall time of one local step (client_update with local_steps={steps}, divided by {steps}), same model and batch",
        "command": " ".join(shlex.quote(a) for a in [_exe(), *sys.argv]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "setup": {
            "model": f"{model_desc}, eager attention",
            "model_option": args.model,
            "base_model_params": sum(p.numel() for n, p in task.model.named_parameters() if ".lora_" not in n),
            "seq_len": int(batch["attention_mask"].sum(1).max()) if "attention_mask" in batch else SEQ_LEN,
            "local_steps_per_timed_call": steps,
            "batch_size": BATCH,
            "lora_targets": [t.path for t in task.targets],
            "rank": cfg.lora.rank,
            "private_rank": cfg.lora.private_rank,
            "head": f"{cfg.lora.head} classifier ({task.model.classifier.out_features} labels)",
            "warmup": args.warmup,
            "reps": args.reps,
        },
        "pf2lora_default_variant": default,
        "median_ms": {n: round(1e3 * m, 3) for n, m in median.items()},
        "iqr_ms": {
            n: round(1e3 * (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]), 3) if len(t) > 1 else 0.0
            for n, t in times.items()
        },
        "time_relative_to_homlora": {n: round(m / hom, 3) for n, m in median.items()},
        "min_ms": {n: round(1e3 * min(t), 3) for n, t in times.items()},
        "min_relative_to_homlora": {n: round(min(t) / min(times["homlora"]), 3) for n, t in times.items()},
        "params": params,
        "param_ratios": {
            "adapters_pf2lora_over_homlora": pp["adapter_params"] / hp["adapter_params"],
            "adapters_expected_(r+r~)/r": (cfg.lora.rank + cfg.lora.private_rank) / cfg.lora.rank,
            "adapters_extra_pf2lora_over_homlora": (pp["adapter_params"] - hp["adapter_params"]) / hp["adapter_params"],
            "adapters_expected_extra_r~/r": cfg.lora.private_rank / cfg.lora.rank,
            "total_with_head_pf2lora_over_homlora": pp["total_trained_params"] / hp["total_trained_params"],
            "upload_pf2lora_over_homlora": pp["upload_bytes_per_round"] / hp["upload_bytes_per_round"],
        },
    }
    out = Path(args.out or DEFAULT_OUT[args.model])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, median))
    for n in VARIANTS:
        print(f"{n:<{width}}  {1e3 * median[n]:8.2f} ms  x{median[n] / hom:5.2f}{'  (default)' if n == default else ''}")
    print(f"adapters: pf2lora/homlora = {result['param_ratios']['adapters_pf2lora_over_homlora']:.3f}; wrote {out}")
    return result


if __name__ == "__main__":
    main()

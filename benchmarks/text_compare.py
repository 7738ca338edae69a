"""Personalised federated methods on real text: several seeds, one JSON, the README table.

Runs every method of a real-data config (default ``configs/vader_compare.toml``: VADER sentiment,
8 clients by domain, MiniLM-L3 encoder) for each seed on the in-process engine and writes JSON
(default ``benchmarks/results/text_compare.json``) with, per method, the mean and std over seeds of
the clients' mean personalised accuracy, macro-F1 and balanced accuracy, the worst client's
accuracy, the global model's accuracy, trained parameters per client (LoRA adapters and head),
bytes uploaded per client per round and wall time; plus the clients' majority-class accuracy as the
reference row. ``--table`` prints the README table from that JSON.

Same tuning effort for every method: each runs with the config's values and its own documented
defaults; nothing is tuned per method. The seed changes initialisation, client sampling and
mini-batches; the data split (``task.data_seed``) is fixed. The JSON is rewritten (atomically) after
every finished run, so an interrupted benchmark keeps what it measured.

    .venv/bin/python benchmarks/text_compare.py --seeds 0 1 2 --jobs 2
    .venv/bin/python benchmarks/text_compare.py --table
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from common import machine, seeds_parser, trained_params, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/vader_compare.toml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "text_compare.json"
PER_CLIENT = ("accuracy", "macro_f1", "balanced_accuracy", "global_accuracy", "majority_accuracy")


def run_one(config: str, seed: int, method_name: str, overrides: list[str]) -> dict:
    import torch

    from pf2lora import plan
    from pf2lora.engines.local import LocalEngine
    from pf2lora.methods import registry

    torch.set_num_threads(1)
    cfg = plan.load(ROOT / config, [f"seed={seed}", f'methods=["{method_name}"]', *overrides])
    torch.manual_seed(cfg.seed)
    task = plan.build_task(cfg)
    result = LocalEngine(cfg, task, progress=False).run(method_name)
    clients = result.clients
    per_client = {
        cid: {k: c[k] for k in PER_CLIENT if isinstance(c.get(k), (int, float))} | {"num_train": c["num_train"]}
        for cid, c in clients.items()
    }
    acc = [c["accuracy"] for c in per_client.values()]
    rounds = result.rounds

    def mean(key: str) -> float | None:
        vals = [c[key] for c in per_client.values() if key in c]
        return sum(vals) / len(vals) if vals else None

    return {
        "config": config,
        "seed": seed,
        "method": method_name,
        **{f"mean_{k}": mean(k) for k in PER_CLIENT},
        "worst_accuracy": min(acc),
        "worst_client": min(per_client, key=lambda cid: per_client[cid]["accuracy"]),
        "params_per_client": trained_params(registry()[method_name](cfg, task), task),
        "upload_bytes_per_client_per_round": sum(r["upload_bytes_per_client"] for r in rounds) / len(rounds),
        "train_loss_per_round": [r["train_loss"] for r in rounds],
        "wall_time_s": result.wall_time_s,
        "clients": per_client,
    }


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for method in sorted({r["method"] for r in runs}):
        rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])

        def ms(key: str, rs: list[dict] = rs) -> dict | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                return None
            return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}

        out[method] = {
            "seeds": [r["seed"] for r in rs],
            **{f"mean_{k}": ms(f"mean_{k}") for k in PER_CLIENT},
            "worst_accuracy": ms("worst_accuracy"),
            "params_per_client": rs[0]["params_per_client"],
            "upload_bytes_per_client_per_round": ms("upload_bytes_per_client_per_round")["mean"],
            "wall_time_s": ms("wall_time_s"),
        }
    return out


def _pm(x: dict | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def table(data: dict) -> str:
    res = data["results"]
    lines = [
        "| method | accuracy | macro-F1 | balanced acc. | worst client acc. | global model acc. | LoRA / head params per client | upload KB/client/round | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted(res.items(), key=lambda kv: -kv[1]["mean_accuracy"]["mean"]):
        p = m["params_per_client"]
        lines.append(
            f"| {name} | {_pm(m['mean_accuracy'])} | {_pm(m['mean_macro_f1'])} | {_pm(m['mean_balanced_accuracy'])} "
            f"| {_pm(m['worst_accuracy'])} | {_pm(m['mean_global_accuracy'])} | {p['lora']:,} / {p['head']:,} "
            f"| {m['upload_bytes_per_client_per_round'] / 1000:.0f} | {m['wall_time_s']['mean']:.0f} |"
        )
    majority = next(iter(res.values()))["mean_majority_accuracy"]
    worst_majority = data.get("worst_majority_accuracy")
    lines.append(
        f"| *majority class (reference)* | {majority['mean']:.3f} | | | {worst_majority:.3f} | | | | |"
        if worst_majority is not None
        else f"| *majority class (reference)* | {majority['mean']:.3f} | | | | | | | |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = seeds_parser(__doc__.split("\n")[0], DEFAULT_OUT, "the config's methods")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (quick checks only)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    sys.path.insert(0, str(ROOT))
    from pf2lora import plan

    cfg = plan.load(ROOT / args.config, args.set)  # the data set checked before any job starts
    methods = args.methods or list(cfg.methods)
    # The costliest method first, so the pool does not end waiting on it.
    order = sorted(methods, key=lambda m: (not m.startswith("pf2lora"), methods.index(m)))
    jobs = [(s, m) for m in order for s in args.seeds]
    tc = cfg.task
    sizes = f"{tc.train_samples_min}..{tc.train_samples}" if tc.train_samples_min > 0 else f"up to {tc.train_samples}"
    setup = (
        f"{cfg.task.dataset}, {cfg.task.num_clients} clients ({cfg.task.partition} partition), "
        f"{sizes} training examples per client, model {cfg.task.model}, "
        f"{cfg.rounds} rounds x {cfg.local_steps} local steps, batch {cfg.batch_size}, LoRA r={cfg.lora.rank}, "
        f"r~={cfg.lora.private_rank}, AdamW lr {cfg.optim.lr:g}, lower-level SGD lr {cfg.optim.lower_lr:g}"
    )
    data: dict = {
        "benchmark": "personalised federated methods on real text, several seeds",
        "command": "python " + " ".join(["benchmarks/text_compare.py", *sys.argv[1:]]),
        "config": args.config,
        "overrides": args.set,
        "setup": setup,
        "machine": machine(torch_threads_per_job=1, jobs=args.jobs),
        "tuning": "none per method: config values and each method's documented defaults",
        "complete": False,
        "runs": [],
    }
    start = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, args.config, s, m, args.set): (s, m) for s, m in jobs}
        for i, f in enumerate(as_completed(futures), 1):
            r = f.result()
            data["runs"].append(r)
            data["runs"].sort(key=lambda x: (x["method"], x["seed"]))
            data["results"] = summarize(data["runs"])
            data["total_wall_time_s"] = time.time() - start
            write_json(args.out, data)
            print(
                f"[{i}/{len(jobs)}] seed {r['seed']} {r['method']}: accuracy {r['mean_accuracy']:.3f}, "
                f"worst {r['worst_accuracy']:.3f} ({r['wall_time_s']:.0f} s)",
                flush=True,
            )
    majority = [c["majority_accuracy"] for c in data["runs"][0]["clients"].values()]
    data["worst_majority_accuracy"] = min(majority)
    data["complete"] = True
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

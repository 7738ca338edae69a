"""Every registered method on the synthetic rank-recovery task, both data regimes, several seeds.

Writes JSON (default ``benchmarks/results/synthetic_compare.json``) with, per config and method,
the mean and std over seeds of the clients' mean test MSE, the worst client's test MSE, the
fraction of clients whose effective rank equals the true rank, adapter parameters and bytes
uploaded per client per round, and wall time. ``--table`` prints the README table from that JSON.

Same tuning effort for every method: each runs with the config's values (shared AdamW lr, local
steps, batch, rounds) and its own documented defaults; nothing is tuned per method. The seed
changes initialisation, client sampling and mini-batches; the data (``task.data_seed``) is fixed.

    .venv/bin/python benchmarks/synthetic_compare.py --seeds 0 1 2 --jobs 2
    .venv/bin/python benchmarks/synthetic_compare.py --table
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import machine, seeds_parser, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/synthetic_rank.toml", "configs/synthetic_rank_lowdata.toml"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "synthetic_compare.json"


def run_one(config: str, seed: int, method: str, rounds: int | None) -> dict:
    import torch

    from pf2lora import config as cfg_mod
    from pf2lora.engines.local import LocalEngine
    from pf2lora.tasks.synthetic import SyntheticRankTask

    torch.set_num_threads(1)
    overrides = [f"seed={seed}", f'methods=["{method}"]'] + ([f"rounds={rounds}"] if rounds else [])
    cfg = cfg_mod.load(ROOT / config, overrides)
    task = SyntheticRankTask(cfg)
    result = LocalEngine(cfg, task, progress=False).run(method)
    clients = result.clients.values()
    mse = [c["test_mse"] for c in clients]
    rounds_ = result.rounds
    return {
        "config": config,
        "seed": seed,
        "method": method,
        "mean_test_mse": sum(mse) / len(mse),
        "worst_test_mse": max(mse),
        "rank_matched": sum(c["rank_matched"] or 0.0 for c in clients) / len(mse),
        "upload_bytes_per_client_per_round": sum(r["upload_bytes_per_client"] for r in rounds_) / len(rounds_),
        "wall_time_s": result.wall_time_s,
    }


def adapter_params(method: str) -> int:
    """Trained LoRA parameters one client holds (shared + private), on the default synthetic task."""
    from pf2lora import config as cfg_mod
    from pf2lora.engines.local import generator
    from pf2lora.methods import registry
    from pf2lora.tasks.synthetic import SyntheticRankTask

    cfg = cfg_mod.load(ROOT / CONFIGS[0], [f'methods=["{method}"]'])
    task = SyntheticRankTask(cfg)
    m = registry()[method](cfg, task)
    server = m.init_server(generator(0, "init", "server"))
    cid = task.clients[-1].client_id
    received = m.broadcast(server, cid)
    client = m.init_client(cid, generator(0, "init", cid))
    tensors = {
        **{k: v for k, v in received.items() if ":" in k},
        **{k: v for k, v in client.items() if k.startswith(("shared:", "private:"))},
    }
    return int(sum(t.numel() for k, t in tensors.items() if not k.endswith("delta_weight")))


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for config in CONFIGS:
        per_method: dict = {}
        for method in sorted({r["method"] for r in runs if r["config"] == config}):
            rs = [r for r in runs if r["config"] == config and r["method"] == method]

            def ms(key: str, rs: list[dict] = rs) -> dict:
                vals = [r[key] for r in rs]
                return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}

            per_method[method] = {
                "seeds": sorted(r["seed"] for r in rs),
                "mean_test_mse": ms("mean_test_mse"),
                "worst_test_mse": ms("worst_test_mse"),
                "rank_matched": ms("rank_matched"),
                "upload_bytes_per_client_per_round": ms("upload_bytes_per_client_per_round")["mean"],
                "wall_time_s": ms("wall_time_s"),
            }
        out[config] = per_method
    return out


def table(data: dict) -> str:
    lines = []
    for config, methods in data["results"].items():
        lines += [
            f"**{config}** ({data['setup'][config]})",
            "",
            "| method | mean test MSE | worst client MSE | rank matched | adapter params/client | upload B/client/round | wall time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, m in sorted(methods.items(), key=lambda kv: kv[1]["mean_test_mse"]["mean"]):
            lines.append(
                f"| {name} | {m['mean_test_mse']['mean']:.4f} ± {m['mean_test_mse']['std']:.4f} "
                f"| {m['worst_test_mse']['mean']:.4f} | {m['rank_matched']['mean']:.2f} "
                f"| {data['adapter_params'][name]} | {m['upload_bytes_per_client_per_round']:.0f} "
                f"| {m['wall_time_s']['mean']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = seeds_parser(__doc__.split("\n")[0], DEFAULT_OUT, "every registered method")
    parser.add_argument("--rounds", type=int, help="override the configs' rounds (quick checks only)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    sys.path.insert(0, str(ROOT))
    from pf2lora import config as cfg_mod
    from pf2lora.methods import registry

    methods = args.methods or sorted(registry())
    jobs = [(c, s, m) for c in CONFIGS for s in args.seeds for m in methods]
    start = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, c, s, m, args.rounds) for c, s, m in jobs]
        runs = []
        for i, f in enumerate(futures, 1):
            runs.append(f.result())
            r = runs[-1]
            print(
                f"[{i}/{len(jobs)}] {r['config']} seed {r['seed']} {r['method']}: mse {r['mean_test_mse']:.4f} ({r['wall_time_s']:.0f} s)",
                flush=True,
            )
    setup = {}
    for c in CONFIGS:
        cfg = cfg_mod.load(ROOT / c, [f"rounds={args.rounds}"] if args.rounds else [])
        setup[c] = (
            f"{cfg.task.num_clients} clients, {cfg.task.train_samples} train samples each, {cfg.rounds} rounds x "
            f"{cfg.local_steps} steps, batch {cfg.batch_size}, r={cfg.lora.rank}, r~={cfg.lora.private_rank}, "
            f"AdamW lr {cfg.optim.lr:g}, noise floor {cfg.task.noise**2:.4f}"
        )
    data = {
        "benchmark": "synthetic rank recovery: every method, both regimes, several seeds",
        "command": "python " + " ".join(["benchmarks/synthetic_compare.py", *sys.argv[1:]]),
        "machine": machine(torch_threads_per_job=1, jobs=args.jobs),
        "tuning": "none per method: config values and each method's documented defaults",
        "total_wall_time_s": time.time() - start,
        "setup": setup,
        "adapter_params": {m: adapter_params(m) for m in methods},
        "results": summarize(runs),
        "runs": runs,
    }
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the in-process engine for 8 and for 64 clients of the same real-data config.

The in-process runner holds one frozen base model whatever the number of clients; each client adds
only its own state (adapters, optimiser moments) and its data. For each client count and method
this runs, in a fresh process, one round of one local step on every client plus the final
evaluation, samples the resident set size (RSS) every 5 ms, and records the peak above the RSS
after the task (model + data) was built, the bytes of every client's state after the round, and
the bytes of its tokenised data. Writes JSON (default ``benchmarks/results/memory.json``).

    .venv/bin/python benchmarks/memory.py                # 8 and 64 clients, pf2lora and homlora
    .venv/bin/python benchmarks/memory.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory.json"
CONFIG = "configs/vader_demo.toml"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def measure(clients: int, method: str) -> dict:
    """One measurement, in this (fresh) process."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT))
    from pf2lora import plan
    from pf2lora.engines.local import LocalEngine

    torch.set_num_threads(1)
    per_domain = clients // 4
    cfg = plan.load(
        ROOT / CONFIG,
        [
            f'methods=["{method}"]',
            "rounds=1",
            "local_steps=1",
            "eval.every=0",
            f"task.num_clients={clients}",
            f"task.clients_per_group={per_domain}",
            "task.train_samples=100",
            "task.train_samples_min=100",
            "task.test_samples=16",
        ],
    )
    task = plan.build_task(cfg)
    gc.collect()
    base = rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    states: dict = {}
    sampler.start()
    t0 = time.perf_counter()
    LocalEngine(cfg, task, progress=False).run(method, on_state=lambda rs: states.update(rs.clients))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    # What stays allocated after the round: glibc keeps freed activation memory mapped (the peak
    # includes that fragmentation), so trim it back before reading the live size.
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    live = rss()
    model_bytes = sum(p.numel() * p.element_size() for p in task.model.parameters())
    return {
        "clients": clients,
        "method": method,
        "model": cfg.task.model,
        "rss_after_task_built_bytes": base,
        "peak_rss_bytes": peak[0],
        "peak_above_task_bytes": peak[0] - base,
        "live_after_round_above_task_bytes": live - base,
        "client_state_bytes_total": tensor_bytes(states),
        "client_state_bytes_per_client": tensor_bytes(states) / max(1, len(states)),
        "client_data_bytes_per_client": sum(tensor_bytes([c.train, c.test]) for c in task.clients) / len(task.clients),
        "base_model_bytes": model_bytes,
        "wall_time_s": wall,
    }


def table(data: dict) -> str:
    lines = [
        "| method | clients | RSS, model + data (MB) | peak RSS in the round (MB) | live after the round, above model + data (MB) | state + data per client (KB) |",
        "|---|---|---|---|---|---|",
    ]
    for method in data["growth"]:
        for r in (x for x in data["runs"] if x["method"] == method):
            lines.append(
                f"| {method} | {r['clients']} | {r['rss_after_task_built_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                f"| {r['live_after_round_above_task_bytes'] / 1e6:.1f} "
                f"| {(r['client_state_bytes_per_client'] + r['client_data_bytes_per_client']) / 1e3:.0f} |"
            )
    lines += [
        "",
        "| method | growth per added client: live (KB) | state + data (KB) | peak RSS (KB) | base model (MB) |",
        "|---|---|---|---|---|",
    ]
    for method, g in data["growth"].items():
        lines.append(
            f"| {method} | {g['live_growth_per_client_bytes'] / 1e3:.0f} | {g['state_plus_data_per_client_bytes'] / 1e3:.0f} "
            f"| {g['peak_growth_per_client_bytes'] / 1e3:.0f} | {g['base_model_bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--methods", nargs="+", default=["pf2lora", "homlora"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("CLIENTS", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1])))
        return 0
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    runs = []
    for method in args.methods:
        for n in args.clients:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), method], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(
                f"{method} {n} clients: peak {r['peak_rss_bytes'] / 1e6:.0f} MB, above model+data "
                f"{r['peak_above_task_bytes'] / 1e6:.1f} MB, state/client {r['client_state_bytes_per_client'] / 1e3:.0f} KB",
                flush=True,
            )
    lo, hi = args.clients
    growth = {}
    for method in args.methods:
        a, b = (next(r for r in runs if r["method"] == method and r["clients"] == n) for n in (lo, hi))
        growth[method] = {
            "peak_growth_per_client_bytes": (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (hi - lo),
            "live_growth_per_client_bytes": (b["live_after_round_above_task_bytes"] - a["live_after_round_above_task_bytes"]) / (hi - lo),
            "state_plus_data_per_client_bytes": b["client_state_bytes_per_client"] + b["client_data_bytes_per_client"],
            "base_model_bytes": a["base_model_bytes"],
            "peak_growth_per_client_over_model": (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (hi - lo) / a["base_model_bytes"],
        }
    data = {
        "benchmark": "peak memory of the in-process engine, 8 vs 64 clients",
        "command": "python " + " ".join(["benchmarks/memory.py", *sys.argv[1:]]),
        "config": CONFIG + " with 100 training and 16 test examples per client, 1 round x 1 local step",
        "machine": machine(),
        "runs": runs,
        "growth": growth,
    }
    write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

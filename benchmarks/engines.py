"""Cost of the Flower engines relative to the local engine on the same work, measured in one run.

The work: the synthetic rank-recovery config (``configs/synthetic_rank.toml``) cut down to
``--clients`` clients (default 2), ``--rounds`` rounds (default 3), one method (default pf2lora),
one torch thread. Each engine runs it once, in this order: ``local`` (in-process loop),
``flower-sim`` (Flower's simulation runtime on Ray, in this process) and ``flower-deploy`` (a
loopback federation: a SuperLink and one SuperNode per client on 127.0.0.1, the app submitted with
``flwr run``; everything started is stopped afterwards).

Reported per engine:

- ``wall_s``: the engine call, start to end (Ray start-up, process start-up, teardown included);
- ``round_s``: wall seconds between consecutive round records (the first from the engine call's
  start, so it carries the start-up: Ray / SuperLink / SuperNodes / the first ClientApp process);
  ``steady_round_s`` is the mean over rounds 2.., ``startup_s`` = wall_s - rounds x steady_round_s;
- ``peak_rss_self_mb``: the peak resident memory of the process that drives the engine (each engine
  runs in a fresh Python process started by this script, so one engine's imports never count for
  the next; sampled every 50 ms with psutil; task building and imports included);
- ``peak_rss_tree_mb``: the peak of the sum over that process and every process below it (Ray's
  workers and daemons; the SuperLink, SuperNodes, SuperExec, ServerApp, ClientApp processes and
  ``flwr run``), sampled the same way. A process that lives less than one sampling period can be
  missed; shared pages are counted once per process (RSS), so the sum is an upper bound.

Ratios are against ``local``. The client metrics of the three engines are also compared (they must
agree to float tolerance: same seed, same work).

    python benchmarks/engines.py [--clients 2] [--rounds 3] [--method pf2lora] [--out benchmarks/results/engines.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pf2lora.engines.flower import env

env.apply()  # before flwr / ray are imported

import psutil
import torch

from pf2lora.config import load
from pf2lora.engines.local import LocalEngine
from pf2lora.plan import build_task

ROOT = Path(__file__).resolve().parents[1]


class MemorySampler:
    """Peak RSS of this process and of this process plus all its descendants, while running."""

    def __init__(self, period_s: float = 0.05):
        self.period_s = period_s
        self.me = psutil.Process()
        self.peak_self = 0
        self.peak_tree = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            own = self.me.memory_info().rss
        except psutil.Error:
            return
        total, count = own, 1
        try:
            kids = self.me.children(recursive=True)
        except psutil.Error:
            kids = []
        for p in kids:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:
                pass
        self.peak_self = max(self.peak_self, own)
        self.peak_tree = max(self.peak_tree, total)
        self.max_procs = max(self.max_procs, count)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure(name: str, run) -> tuple[dict, list]:
    stamps: list[float] = []

    def on_round(record: dict) -> None:
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    with MemorySampler() as mem:
        results = run(on_round)
    wall = time.perf_counter() - start
    edges = [start, *stamps]
    rounds = [b - a for a, b in itertools.pairwise(edges)]
    steady = rounds[1:] or rounds
    steady_mean = sum(steady) / len(steady) if steady else float("nan")
    out = {
        "engine": name,
        "wall_s": round(wall, 3),
        "round_s": [round(r, 3) for r in rounds],
        "steady_round_s": round(steady_mean, 4),
        "startup_s": round(wall - len(rounds) * steady_mean, 3) if rounds else None,
        "peak_rss_self_mb": round(mem.peak_self / 2**20, 1),
        "peak_rss_tree_mb": round(mem.peak_tree / 2**20, 1),
        "max_processes": mem.max_procs,
    }
    return out, results


def max_metric_diff(a: list, b: list) -> float:
    """Largest relative difference of any finite per-client metric between two engines."""
    worst = 0.0
    for ca, cb in zip(a, b, strict=True):
        for cid, metrics in ca.items():
            for k, v in metrics.items():
                w = cb[cid][k]
                if isinstance(v, float) and isinstance(w, float) and math.isfinite(v) and math.isfinite(w):
                    worst = max(worst, abs(v - w) / max(1.0, abs(v)))
    return worst


def runner(cfg, name: str):
    """A function (on_round) -> results running ``cfg`` on engine ``name``."""
    if name == "local":

        def run(on_round):
            task = build_task(cfg)
            return [LocalEngine(cfg, task, progress=False).run(m, on_round=on_round) for m in cfg.methods]
    elif name == "flower-sim":

        def run(on_round):
            from pf2lora.engines.flower.sim import run_flower_sim

            return run_flower_sim(cfg, on_round=on_round, num_cpus=os.cpu_count())
    elif name == "flower-deploy":

        def run(on_round):
            from pf2lora.engines.flower.deploy import run_flower_deploy

            return run_flower_deploy(cfg, on_round=on_round, timeout_s=900)
    else:
        raise SystemExit(f"unknown engine {name!r} (local, flower-sim, flower-deploy)")
    return run


def machine() -> dict:
    import flwr

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="pf2lora")
    ap.add_argument("--engines", default="local,flower-sim,flower-deploy", help="comma-separated, local first")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines.json"))
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one engine in this process
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    ranks = [i % 3 for i in range(args.clients)]
    overrides = [
        f"rounds={args.rounds}",
        f"task.num_clients={args.clients}",
        f"task.private_ranks={ranks}",
        f'methods=["{args.method}"]',
        "num_threads=1",
    ]
    cfg = load(ROOT / "configs" / "synthetic_rank.toml", overrides)
    torch.set_num_threads(1)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]

    if args.only:
        row, results = measure(args.only, runner(cfg, args.only))
        payload = {"row": row, "clients": [r.clients for r in results]}
        Path(args.row_file).write_text(json.dumps(payload))
        return 0

    rows: dict[str, dict] = {}
    clients: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pf2lora-bench-") as tmp:
        for name in engines:
            runner(cfg, name)  # fail early on an unknown engine
            row_file = Path(tmp) / f"{name}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--clients",
                str(args.clients),
                "--rounds",
                str(args.rounds),
                "--method",
                args.method,
                "--only",
                name,
                "--row-file",
                str(row_file),
            ]
            subprocess.run(cmd, check=True, env=env.child_env())
            payload = json.loads(row_file.read_text())
            rows[name], clients[name] = payload["row"], payload["clients"]
            print(f"{name}: {json.dumps(rows[name])}", flush=True)

    base = rows.get("local")
    if base:
        for name, row in rows.items():
            row["vs_local"] = {
                k: round(row[k] / base[k], 2) if base[k] else None
                for k in ("wall_s", "steady_round_s", "peak_rss_self_mb", "peak_rss_tree_mb")
            }
            if name != "local":
                row["max_rel_metric_diff_vs_local"] = max_metric_diff(clients["local"], clients[name])

    report = {
        "benchmark": "engines",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "work": {"config": "configs/synthetic_rank.toml", "overrides": overrides},
        "machine": machine(),
        "engines": rows,
        "notes": [
            "round_s[0] runs from the engine call's start to the first round record, so it carries start-up",
            "each engine ran in a fresh Python process started by this command (the 'self' process); the rows were measured there",
            "peak_rss_tree_mb sums RSS over that process and all its descendants (shared pages counted once per process)",
            (
                "flower-deploy starts a new ClientApp process (which imports torch) for every message a SuperNode gets, "
                "which is most of its per-round time on a small model"
            ),
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

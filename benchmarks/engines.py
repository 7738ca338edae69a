"""Cost of the Flower engines relative to the local engine on the same work, measured in one run.

The work: the synthetic rank-recovery config (``configs/synthetic_rank.toml``) cut down to
``--clients`` clients (default 2), ``--rounds`` rounds (default 4), one method (default pf2lora),
one torch thread, an evaluation after every round (``--set``, default ``eval.every=1``). Each
row runs it twice (once with 1 round) in a fresh Python process, in this order: ``local``
(in-process loop), ``flower-sim`` (Flower's simulation runtime on Ray, in that process),
``flower-deploy`` (a loopback federation: a SuperLink and one SuperNode per client on 127.0.0.1,
the app submitted with ``flwr run``; everything started is stopped afterwards) and
``flower-deploy[flower.node_cache=false]`` (the same without the nodes' model cache). ``--before
REV`` adds ``flower-deploy`` as of git revision REV, run from a worktree on the same work: a
before/after ratio measured in one run.

Reported per row:

- ``wall_s``: the engine call, start to end (Ray start-up, process start-up, teardown included);
  ``wall_s_1_round`` the same with 1 round;
- ``per_round_s`` = (wall_s - wall_s_1_round) / (rounds - 1): what one more round costs (start-up,
  final evaluation and teardown cancel); ``overhead_per_round_s`` = that minus local's;
- ``round_s``: wall seconds between consecutive round records as they arrive (informative only:
  where a round's evaluation rides on the next round's messages, its record arrives with them);
- ``peak_rss_self_mb``: the peak resident memory of the process that drives the engine (task
  building and imports included; sampled every 50 ms with psutil);
- ``peak_rss_tree_mb``: the peak of the sum over that process, every process below it (Ray's
  workers and daemons; the SuperLink, SuperNodes, SuperExec, ServerApp, ClientApp processes and
  ``flwr run``) and the deployed nodes' workers, sampled the same way. A process that lives less
  than one sampling period can be missed; shared pages are counted once per process (RSS), so the
  sum is an upper bound.

Ratios are against ``local``. The client metrics of every row are also compared with local's
(they must agree to float tolerance: same seed, same work).

    python benchmarks/engines.py [--clients 2] [--rounds 4] [--method pf2lora] [--before REV] [--out benchmarks/results/engines.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
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
        self.since = time.time() - 1.0
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
        kids += [w for w in self._workers() if w not in kids]
        for p in kids:
            try:
                total += p.memory_info().rss
                count += 1
            except psutil.Error:
                pass
        self.peak_self = max(self.peak_self, own)
        self.peak_tree = max(self.peak_tree, total)
        self.max_procs = max(self.max_procs, count)

    def _workers(self) -> list[psutil.Process]:
        """Deployed nodes' workers (pf2lora.engines.flower.nodeworker) started since this sampler:
        a ClientApp starts one and exits, so it is no longer below this process."""
        out = []
        for p in psutil.process_iter(["cmdline", "create_time"]):
            try:
                if p.info["create_time"] >= self.since and any("flower.nodeworker" in a for a in p.info["cmdline"] or []):
                    out.append(p)
            except (psutil.Error, TypeError):
                pass
        return out

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


def variant(item: str) -> tuple[str, list[str]]:
    """``ENGINE`` or ``ENGINE[key=value;key=value]`` -> (engine, its extra overrides)."""
    name, _, rest = item.partition("[")
    extra = [kv.strip() for kv in rest.rstrip("]").split(";") if kv.strip()]
    return name.strip(), extra


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


def before_worktree(rev: str, tmp: Path, overrides: list[str]) -> Path:
    """A checkout of ``rev`` in ``tmp`` whose synthetic_rank config holds ``overrides`` (that
    version's engines.py sets only rounds, clients, ranks, method and threads itself)."""
    import tomllib

    import tomli_w

    tree = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
    path = tree / "configs" / "synthetic_rank.toml"
    data = tomllib.loads(path.read_text())
    for item in overrides:
        keys, _, value = item.partition("=")
        node = data
        *parents, last = keys.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = tomllib.loads(f"v = {value.strip()}")["v"]
    path.write_text(tomli_w.dumps(data))
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--method", default="pf2lora")
    ap.add_argument(
        "--engines",
        default="local,flower-sim,flower-deploy,flower-deploy[flower.node_cache=false]",
        help="comma-separated, local first; ENGINE[key=value;...] runs ENGINE with extra config overrides",
    )
    ap.add_argument("--set", dest="sets", action="append", default=None, help="config override for every row (default: eval.every=1)")
    ap.add_argument("--before", metavar="REV", help="also run flower-deploy as of git revision REV (a worktree), on the same work")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines.json"))
    ap.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one engine in this process
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sets = args.sets if args.sets is not None else ["eval.every=1"]
    if args.rounds < 2 and not args.only:
        ap.error("--rounds must be at least 2 (the per-round cost is the difference to a 1-round run)")

    ranks = [i % 3 for i in range(args.clients)]
    overrides = [
        f"rounds={args.rounds}",
        f"task.num_clients={args.clients}",
        f"task.private_ranks={ranks}",
        f'methods=["{args.method}"]',
        "num_threads=1",
        *sets,
    ]
    torch.set_num_threads(1)
    engines = [e.strip() for e in re.split(r",(?![^\[]*\])", args.engines) if e.strip()]

    if args.only:
        name, extra = variant(args.only)
        cfg = load(ROOT / "configs" / "synthetic_rank.toml", overrides + extra)
        row, results = measure(args.only, runner(cfg, name))
        payload = {"row": row, "clients": [r.clients for r in results]}
        Path(args.row_file).write_text(json.dumps(payload))
        return 0

    rows: dict[str, dict] = {}
    clients: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="pf2lora-bench-") as tmp:
        jobs: list[tuple[str, list[str], dict[str, str]]] = []
        for item in engines:
            name, extra = variant(item)
            runner(load(ROOT / "configs" / "synthetic_rank.toml", overrides + extra), name)  # fail early on a bad engine or key
            child = [str(Path(__file__).resolve()), "--only", item, *[f"--set={x}" for x in sets]]
            jobs.append((item, child, env.child_env()))
        if args.before:
            tree = before_worktree(args.before, Path(tmp), sets)
            child = [str(tree / "benchmarks" / "engines.py"), "--only", "flower-deploy"]
            jobs.append((f"flower-deploy@{args.before}", child, env.child_env(PYTHONPATH=str(tree))))
        try:
            for item, child, environ in jobs:
                for rounds in (1, args.rounds):  # the per-round cost is the difference: start-up and teardown cancel
                    row_file = Path(tmp) / f"row-{len(rows)}-{rounds}.json"
                    common = ["--clients", str(args.clients), "--rounds", str(rounds), "--method", args.method, "--row-file", str(row_file)]
                    subprocess.run([sys.executable, *child, *common], check=True, env=environ)
                    payload = json.loads(row_file.read_text())
                short = json.loads((Path(tmp) / f"row-{len(rows)}-1.json").read_text())["row"]
                row = payload["row"]
                row["engine"] = item
                row["wall_s_1_round"] = short["wall_s"]
                row["per_round_s"] = round((row["wall_s"] - short["wall_s"]) / (args.rounds - 1), 3)
                rows[item], clients[item] = row, payload["clients"]
                print(f"{item}: {json.dumps(row)}", flush=True)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "before")], check=False)

    base = rows.get("local")
    if base:
        for name, row in rows.items():
            row["vs_local"] = {
                k: round(row[k] / base[k], 2) if base[k] else None
                for k in ("wall_s", "per_round_s", "peak_rss_self_mb", "peak_rss_tree_mb")
            }
            row["overhead_per_round_s"] = round(row["per_round_s"] - base["per_round_s"], 3)
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
            "per_round_s = (wall_s - wall_s_1_round) / (rounds - 1): each engine also ran the same work with 1 round, so start-up, "
            "the final evaluation and teardown cancel; overhead_per_round_s = per_round_s - local's (the same training and evaluation)",
            "round_s / steady_round_s time the round records as they arrive; where a round's evaluation rides on the next round's "
            "messages its record arrives with the next round's, so use per_round_s to compare",
            "each engine ran in a fresh Python process started by this command (the 'self' process); the rows were measured there",
            "peak_rss_tree_mb sums RSS over that process, all its descendants and the deployed nodes' workers (shared pages counted once per process)",
            "ENGINE@REV: that engine as of git revision REV (a worktree of it, same work), for a before/after ratio in one run",
            (
                "flower-deploy: Flower starts a new ClientApp process for every message a SuperNode gets; with flower.node_cache it "
                "hands the message to the node's long-lived worker instead of importing torch and building the task itself"
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

"""PF2LoRA with its old and new default hypergradient estimator on the same seeds: are the results
unchanged within seed noise?

The default changed from the central finite difference (``pf2lora.fd_one_sided = false``, four
forward/backward passes a step) to the one-sided one (three passes; error O(e0) instead of
O(e0^2)). Each setting runs PF2LoRA with both, seed by seed, on the in-process engine, and the JSON
(default ``benchmarks/results/pf2lora_default_check.json``) holds per setting and variant the mean
and std over seeds, per seed the difference new - old, and the seed-to-seed spread to compare it
with. Settings: the synthetic rank-recovery configs (``configs/synthetic_rank.toml``,
``configs/synthetic_rank_lowdata.toml``; bilinear, so the two differences agree up to rounding)
and the real-text ``configs/rt_compare.toml`` (MiniLM-L3 on Rotten Tomatoes, s-similarity 0.3;
nonlinear, where the estimators differ), each with ``--rounds`` / ``--text-rounds`` overridable
for a reduced-scale check.

    .venv/bin/python benchmarks/pf2lora_default_check.py --seeds 0 1 --jobs 2 --text-rounds 5 --old-commit a35ceaf

``--old-commit`` also runs the package of that commit (extracted with ``git archive``) with its own
default, so the whole change (not only the estimator) is compared on the same seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS, ROOT, machine, write_json

SYNTHETIC = ["configs/synthetic_rank.toml", "configs/synthetic_rank_lowdata.toml"]
TEXT = "configs/rt_compare.toml"
OLD_CODE = "old code, its default (central)"
VARIANTS = {OLD_CODE: [], "new code, old default (central)": ["pf2lora.fd_one_sided=false"], "new code, new default (one-sided)": []}
"""The old code (``--old-commit``, the package as it was before the change) runs with its own
default; the new code with the old default (only the estimator differs from the new default)
and with the new default."""
METRICS = {
    "synthetic": ("mean_test_mse", "worst_test_mse", "rank_matched"),
    "text": ("mean_accuracy", "mean_macro_f1", "mean_balanced_accuracy", "mean_global_accuracy", "worst_accuracy"),
}


def _in_subprocess(tree: str, job: tuple) -> dict:
    """``run_one(*job)`` in a fresh interpreter that imports the package from ``tree`` (one process
    per run: a process imports one package once)."""
    code = (
        "import json, sys; "
        f"sys.path[:0] = [{tree!r}, {str(ROOT / 'benchmarks')!r}]; "
        "import pf2lora_default_check as m; "
        f"print(json.dumps(m.run_one(*{list(job)!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{job}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one(config: str, seed: int, variant: str, rounds: int | None) -> dict:
    import torch

    import pf2lora
    from pf2lora import plan
    from pf2lora.engines.local import LocalEngine

    torch.set_num_threads(1)
    overrides = [f"seed={seed}", 'methods=["pf2lora"]', *VARIANTS[variant], *([f"rounds={rounds}"] if rounds else [])]
    cfg = plan.load(ROOT / config, overrides)
    torch.manual_seed(cfg.seed)
    result = LocalEngine(cfg, plan.build_task(cfg), progress=False).run("pf2lora")
    clients = list(result.clients.values())
    out: dict = {
        "config": config,
        "seed": seed,
        "variant": variant,
        "fd_one_sided": cfg.pf2lora.fd_one_sided,
        "package": str(Path(pf2lora.__file__).parent.parent),
        "rounds": cfg.rounds,
        "wall_time_s": result.wall_time_s,
    }
    mean = lambda key: sum(c[key] or 0.0 for c in clients) / len(clients)
    if cfg.task.kind == "synthetic":
        out |= {
            "mean_test_mse": mean("test_mse"),
            "worst_test_mse": max(c["test_mse"] for c in clients),
            "rank_matched": mean("rank_matched"),
        }
    else:
        out |= {
            "mean_accuracy": mean("accuracy"),
            "mean_macro_f1": mean("macro_f1"),
            "mean_balanced_accuracy": mean("balanced_accuracy"),
            "mean_global_accuracy": mean("global_accuracy"),
            "worst_accuracy": min(c["accuracy"] for c in clients),
        }
    out["final_train_loss"] = result.rounds[-1]["train_loss"]
    return out


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for config in sorted({r["config"] for r in runs}):
        rs = [r for r in runs if r["config"] == config]
        keys = METRICS["synthetic" if config in SYNTHETIC else "text"] + ("final_train_loss", "wall_time_s")
        per: dict = {}
        for variant in VARIANTS:
            vs = sorted((r for r in rs if r["variant"] == variant), key=lambda r: r["seed"])
            if not vs:
                continue
            per[variant] = {
                k: {
                    "mean": statistics.fmean(r[k] for r in vs),
                    "std_over_seeds": statistics.pstdev([r[k] for r in vs]) if len(vs) > 1 else 0.0,
                    "per_seed": [r[k] for r in vs],
                }
                for k in keys
            }
        names = [v for v in VARIANTS if v in per and per[v][keys[0]]["per_seed"]]
        old, new = per[names[0]], per[names[-1]]
        per[f"({names[-1]}) - ({names[0]}), per seed"] = {
            k: [b - a for a, b in zip(old[k]["per_seed"], new[k]["per_seed"], strict=True)] for k in keys
        }
        out[config] = per
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (each on one thread)")
    ap.add_argument("--rounds", type=int, help="override the synthetic configs' rounds (reduced scale)")
    ap.add_argument("--text-rounds", type=int, help="override rt_compare's rounds (reduced scale)")
    ap.add_argument("--no-text", action="store_true", help="only the synthetic settings")
    ap.add_argument("--old-commit", default="", help="also run the package of this commit (git archive) with its own default")
    ap.add_argument("--out", type=Path, default=RESULTS / "pf2lora_default_check.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    variants = [v for v in VARIANTS if v != OLD_CODE or args.old_commit]
    settings = [(c, args.rounds) for c in SYNTHETIC] + ([] if args.no_text else [(TEXT, args.text_rounds)])
    jobs = [(c, s, v, rounds) for c, rounds in settings for s in args.seeds for v in variants]
    start = time.time()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as old_tree:
        if args.old_commit:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.old_commit, "pf2lora"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_in_subprocess, old_tree if job[2] == OLD_CODE else str(ROOT), job) for job in jobs]
            for i, f in enumerate(futures, 1):
                r = f.result()
                expected = old_tree if r["variant"] == OLD_CODE else str(ROOT)
                assert r["package"] == expected, (r["package"], expected)
                r["package"] = f"git archive {args.old_commit}" if r["variant"] == OLD_CODE else "working tree"
                runs.append(r)
                shown = {k: round(r[k], 4) for k in METRICS["synthetic" if r["config"] in SYNTHETIC else "text"]}
                print(f"[{i}/{len(jobs)}] {r['config']} seed {r['seed']} {r['variant']}: {shown} ({r['wall_time_s']:.0f} s)", flush=True)
                write_json(args.out, {"partial": True, "runs": runs})
    data = {
        "benchmark": "PF2LoRA, old default (central finite difference) vs new default (one-sided), same seeds",
        "old_commit": args.old_commit or None,
        "command": "python " + " ".join(["benchmarks/pf2lora_default_check.py", *sys.argv[1:]]),
        "machine": machine(torch_threads_per_job=1, jobs=args.jobs),
        "total_wall_time_s": time.time() - start,
        "results": summarize(runs),
        "runs": runs,
    }
    write_json(args.out, data)
    for config, per in data["results"].items():
        print(config)
        for variant, vals in per.items():
            print(
                f"  {variant}: "
                + ", ".join(
                    f"{k} {v['mean']:.4f}±{v['std_over_seeds']:.4f}" if isinstance(v, dict) else f"{k} {v}" for k, v in vals.items()
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

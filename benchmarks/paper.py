"""Does PF2LoRA work? The paper's protocol on offline stand-ins, every method tuned alike.

PF2LoRA (arXiv 2503.03920) against its peers with the paper's protocol (8 clients, label skew by
s-similarity, r = 8, r~ = 2, 10 local steps a round, AdamW upper / SGD lower level), on the data
and models we can install (``configs/paper/*.toml``), trained until the curves flatten.

Two tiers. ``--tier cpu``: the 3-layer paraphrase-MiniLM-L3-v2 encoder, 30 rounds (300 steps per
client), 190 runs of 7 to 50 minutes each on one core of a 2-core machine (more than a day with 2
jobs). ``--tier gpu``: all-MiniLM-L6-v2 with the paper's
rounds (100 for the binary settings, 300 for the 25-class one), every setting with 3 seeds, for a
GPU (all sampled clients batched, ``parallel_clients = 0``) that is yours for hours: on the device
machine of one session (15 minutes of an H200, ``benchmarks/gpu_paper.sh``), 12 runs started as 12
processes on the one GPU and none finished within 3 minutes (README, "GPU figures").

Fair tuning, the same for every method: AdamW ``optim.lr`` over ``LR_GRID`` for every method,
and for a method with one extra step size (PF2LoRA's and PF2LoRA-FO's lower-level SGD lr,
Per-FedAvg's inner lr) every pair of ``LR_GRID`` and that step size's grid (as many values): the
full grid, as a coordinate search (the lr first, then the extra step size at the chosen lr; used
until 2026-12-05) missed PF2LoRA's best cell. Every tuning run is scored by the clients' mean personalised
balanced accuracy on a validation federation (another ``task.data_seed``); the best run's values
are used on the benchmark federation with 3 seeds. Tuned on ``rt_s03``; the other encoder
settings reuse its choice. The generation setting (another model, whose scale of step sizes the
encoder's grid does not transfer to) keeps its config's AdamW lr for every method and searches
each extra step size at 0.1x, 0.3x and 1x its config value (``EXTRA_FACTORS``, and once beyond
the edge the best lies on, ``EXTRA_EDGE``; 3-round runs on its validation federation, scored by
the test loss): PF2LoRA's diverged at the config's value.
The GPU tier takes the CPU tier's choices (``CPU_TUNED``).

Resumable: one JSON file per run under ``benchmarks/results/paper_TIER/`` (tuning runs under
``tuning/``), skipped when present, so the work spans sessions; after every finished run the
summary ``benchmarks/results/paper_TIER.json`` is rebuilt from all files present. A run killed
midway (a session's end) continues from its last checkpoint: each run checkpoints after a round
(every round on a CPU; on a GPU at most every ``CHECKPOINT_EVERY_S``) into ``<its file>.partial/``
(not committed), and the next start of the same run resumes there, with the same numbers as an
uninterrupted run (the engine's resume is exact) and the wall time of its segments added up. A
checkpoint outlives code changes that keep the numbers (the project's rule while this runs); one
of another job or config, or whose state no longer fits the code, is dropped and the run restarts.

    .venv/bin/python benchmarks/paper.py --tier cpu --jobs 2          # run what is missing
    .venv/bin/python benchmarks/paper.py --tier cpu --list            # what is done / to do
    .venv/bin/python benchmarks/paper.py --tier cpu --table           # the README tables
    .venv/bin/python benchmarks/paper.py --tier cpu --readme          # ... put in place in README.md
    .venv/bin/python benchmarks/paper.py --tier cpu --figures         # curves and ranks (PNG)
    .venv/bin/python benchmarks/paper.py --tier cpu --rerun rt_s03 homlora 0   # one cell again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, machine, trained_params, write_json

ALL_METHODS = ("pf2lora", "pf2lora-fo", "homlora", "hetlora", "perfedavg", "local", "fedsa-lora", "pfedlora", "fdlora")
NLG_METHODS = ("pf2lora", "homlora", "hetlora", "perfedavg", "local")
RT_METHODS = (*ALL_METHODS, "she-lora", "fed-hello")
PAPER_COMPARISON = ("pf2lora", "homlora", "hetlora", "perfedavg")
"""PF2LoRA and the baselines the paper compares it with (HOMLoRA, HETLoRA, Per-FedAvg-LoRA)."""
"""rt_s03 also runs the two methods of the field that are not personalisation methods."""
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
"""Four values for every method: the first pass, with three (up to 3e-3), put six of nine methods'
best AdamW lr on the grid's top edge (rt_s03 on the CPU tier, 2026-12-04), so the grid grew by one
step there, for every method alike."""
EXTRA_GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "pf2lora": ("optim.lower_lr", (0.1, 0.3, 1.0, 3.0)),
    "pf2lora-fo": ("optim.lower_lr", (0.1, 0.3, 1.0, 3.0)),
    "perfedavg": ("perfedavg.inner_lr", (0.005, 0.015, 0.05, 0.15)),
}
"""As many values as ``LR_GRID``; each grew by one step at its bottom, where PF2LoRA-FO's and
Per-FedAvg's first choices lay."""
VALIDATION = ("task.data_seed=4321",)
"""The validation federation: another draw and partition of the same data."""
FLAT_FRACTION = 0.2
"""Converged: the last 20% of rounds move the mean headline metric by less than ``FLAT_TOLERANCE``."""


@dataclass(frozen=True)
class Setting:
    """One row group of the results: a config, the seeds and methods it runs, how it is tuned."""

    config: str
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = ALL_METHODS
    overrides: tuple[str, ...] = ()
    tuning: str = "reuse:rt_s03"
    """``tune`` (this setting's grid search), ``extra`` (the config's AdamW lr for every method, a
    search of the one extra step size, :func:`extra_stage`), ``reuse:SETTING``,
    ``reuse:TIER/SETTING`` (another tier's choice) or ``none`` (the config's values)."""
    about: str = ""
    tuning_rounds: int = 0
    """``extra`` only: the rounds of a tuning run (0: the config's)."""

    @property
    def generation(self) -> bool:
        return "nlg" in self.config


HEADLINE = {False: ("balanced_accuracy", True), True: ("loss", False)}
"""(metric, higher is better) per kind: balanced accuracy under label skew (never accuracy alone),
the test loss for generation (BLEU / ROUGE-L of 16 greedy decodes per client are noisier)."""
FLAT_TOLERANCE = {False: 0.005, True: 0.005}
"""0.5 points of balanced accuracy; for generation 0.5% of the loss (relative)."""

GPU = ("task.model=all-MiniLM-L6-v2", "device=auto", "parallel_clients=0")
CPU_TUNED = "reuse:cpu/rt_s03"
"""The GPU tier takes the CPU tier's choices (MiniLM-L3, 30 rounds): its own grid search would be
~50 runs of 100 rounds, hours of a GPU; a step size tuned on the smaller model and shorter run is
the same handicap for every method."""


def _gpu(config: str, rounds: int, about: str, *extra: str, methods: tuple[str, ...] = ALL_METHODS) -> Setting:
    """An encoder setting of the GPU tier: MiniLM-L6, the paper's rounds, 3 seeds, the CPU tier's step sizes."""
    overrides = (*GPU, f"rounds={rounds}", f"eval.every={rounds // 10}", *extra)
    return Setting(f"configs/paper/{config}.toml", (0, 1, 2), methods, overrides, CPU_TUNED, f"{about}, MiniLM-L6, {rounds} rounds")


TIERS: dict[str, dict[str, Setting]] = {
    "cpu": {
        "rt_s03": Setting("configs/paper/rt_s03.toml", (0, 1, 2), RT_METHODS, tuning="tune", about="Rotten Tomatoes, s = 0.3"),
        "vader_domains": Setting("configs/paper/vader_domains.toml", (0, 1, 2), about="VADER, 4 domains x 2 clients"),
        "wordnet_topics": Setting("configs/paper/wordnet_topics.toml", (0, 1, 2), about="WordNet noun topics, 25 classes, s = 0.3"),
        "rt_s05": Setting("configs/paper/rt_s05.toml", (0,), about="Rotten Tomatoes, s = 0.5"),
        "rt_s03_private_head": Setting(
            "configs/paper/rt_s03.toml", (0,), overrides=("lora.head=private",), about="rt_s03 with the head private"
        ),
        "wordnet_nlg": Setting(
            "configs/paper/wordnet_nlg.toml",
            (0,),
            NLG_METHODS,
            tuning="extra",
            tuning_rounds=3,
            about="WordNet definitions, SmolLM2-135M, 4 clients",
        ),
    },
    "gpu": {
        "rt_s03": _gpu("rt_s03", 100, "Rotten Tomatoes, s = 0.3", methods=RT_METHODS),
        "vader_domains": _gpu("vader_domains", 100, "VADER, 4 domains x 2 clients"),
        "wordnet_topics": _gpu("wordnet_topics", 300, "WordNet noun topics, 25 classes, s = 0.3"),
        "rt_s05": _gpu("rt_s05", 100, "Rotten Tomatoes, s = 0.5"),
        "rt_s03_private_head": _gpu("rt_s03", 100, "rt_s03 with the head private", "lora.head=private"),
        "wordnet_nlg": Setting(
            "configs/paper/wordnet_nlg.toml",
            (0, 1, 2),
            NLG_METHODS,
            overrides=("device=auto", "parallel_clients=0", "rounds=30"),
            tuning="reuse:cpu/wordnet_nlg",
            about="WordNet definitions, SmolLM2-135M, 4 clients, 30 rounds",
        ),
    },
}


# -- jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One run: a method of a setting with a seed and its step sizes, written to ``path``."""

    setting: str
    method: str
    seed: int
    overrides: tuple[str, ...]
    path: Path
    tuning: bool = False
    needs: tuple[Path, ...] = field(default=(), compare=False)


def _fmt(v: float) -> str:
    return f"{v:g}"


def tuning_dir(out: Path, setting: str, method: str) -> Path:
    return out / "tuning" / setting / method


def lr_stage(tier: str, out: Path, setting: str, method: str) -> list[Job]:
    """Stage 1: every AdamW lr of the grid, the extra step size at the config's value."""
    return [tuning_job(tier, out, setting, method, lr) for lr in LR_GRID]


def tuning_job(tier: str, out: Path, setting: str, method: str, lr: float, extra: float | None = None) -> Job:
    """One cell of ``method``'s tuning on the validation federation: AdamW ``lr`` and, where given,
    the method's extra step size ``extra`` (else the config's value)."""
    s = TIERS[tier][setting]
    overrides = (*s.overrides, *VALIDATION, f"optim.lr={lr!r}")
    name = f"lr={_fmt(lr)}"
    if extra is not None:
        key = EXTRA_GRID[method][0]
        overrides, name = (*overrides, f"{key}={extra!r}"), f"{name},{key}={_fmt(extra)}"
    return Job(setting, method, 0, overrides, tuning_dir(out, setting, method) / f"{name}.json", tuning=True)


def score(path: Path, metric: str = "balanced_accuracy") -> float:
    return json.loads(path.read_text())["summary"][metric]


EXTRA_FACTORS = (0.1, 0.3, 1.0)
"""An ``extra`` search: the method's extra step size at these multiples of the config's value.
Why below it only: the generation config's values were set by hand from gradient sizes, and
PF2LoRA's diverged at it (its private adapters' norm grew past 100 and its training loss rose
from 4.4 to 8.1 over 15 rounds, wordnet_nlg seed 0, 2026-12-05); the same three multiples for
every method with an extra step size (Per-FedAvg's inner lr too)."""
EXTRA_EDGE = (0.03, 3.0)
"""Where the best of the three lies on the grid's edge, one more value beyond it (once), for
every method alike: the rule the encoder grid followed when six methods' best lr lay on its top
edge. On the NLG setting PF2LoRA's best lay at the bottom (0.05) and Per-FedAvg's at the top
(0.05), 2026-12-05."""


def extra_stage(tier: str, out: Path, setting: str, method: str) -> list[Job]:
    """An ``extra`` search's cells for ``method`` (none without an extra step size): the config's
    AdamW lr, the extra step size at each of ``EXTRA_FACTORS`` of its config value (then, where
    the best lies on an edge, ``EXTRA_EDGE``'s value beyond it), in ascending order, on the
    validation federation for the setting's ``tuning_rounds``."""
    if method not in EXTRA_GRID:
        return []
    s = TIERS[tier][setting]
    key = EXTRA_GRID[method][0]
    centre = config_value(s, key)
    rounds = (f"rounds={s.tuning_rounds}", f"eval.every={s.tuning_rounds}") if s.tuning_rounds else ()

    def cell(factor: float) -> Job:
        x = float(f"{factor * centre:.6g}")  # 0.005, not 0.005000000000000001
        overrides = (*s.overrides, *VALIDATION, *rounds, f"{key}={x!r}")
        return Job(setting, method, 0, overrides, tuning_dir(out, setting, method) / f"{key}={_fmt(x)}.json", tuning=True)

    cells = [cell(f) for f in EXTRA_FACTORS]
    if not all(j.path.exists() for j in cells):
        return cells
    metric, higher = HEADLINE[s.generation]
    scores = [score(j.path, metric) for j in cells]
    best = scores.index((max if higher else min)(scores))  # the first of equals
    if best == 0:
        cells.insert(0, cell(EXTRA_EDGE[0]))
    elif best == len(cells) - 1:
        cells.append(cell(EXTRA_EDGE[1]))
    return cells


def tuning_cells(tier: str, out: Path, setting: str, method: str) -> list[Job]:
    """Every tuning run ``method``'s choice in ``setting`` reads."""
    if TIERS[tier][setting].tuning == "extra":
        return extra_stage(tier, out, setting, method)
    return [*lr_stage(tier, out, setting, method), *(grid_stage(tier, out, setting, method) if method in EXTRA_GRID else [])]


LAST_EVALUATIONS = 3
"""For a check of the tuning's sensitivity: a run's mean of its last 3 evaluations. A seed's curve
swings by up to 0.05 from one evaluation to the next (every 3 rounds on the CPU tier), so its last
evaluation alone, the tuning's score, depends on where a swing ends."""


def mean_of_last(run: dict[str, Any], n: int = LAST_EVALUATIONS) -> float:
    """A run's mean personalised balanced accuracy over its last ``n`` evaluations."""
    return statistics.fmean(c["balanced_accuracy"] for c in run["curve"][-n:])


def chosen(tier: str, out: Path, setting: str, method: str) -> tuple[dict[str, float], dict[str, float]] | None:
    """(the chosen step sizes: the grid's best cell, every tuning run's score) once ``method``'s
    grid is complete, else None."""
    cells = tuning_cells(tier, out, setting, method)
    if not all(j.path.exists() for j in cells):
        return None
    s = TIERS[tier][setting]
    if s.tuning == "extra":
        return chosen_extra(s, cells, method)
    scores = {j.path.stem: score(j.path) for j in cells}
    # the first of equals: the lr stage's cells (the config's extra value) first, then lr by lr
    sizes = dict(o.split("=", 1) for o in max(cells, key=lambda j: scores[j.path.stem]).overrides)
    choice = {"optim.lr": float(sizes["optim.lr"])}
    if method in EXTRA_GRID:
        key = EXTRA_GRID[method][0]
        choice[key] = float(sizes[key]) if key in sizes else config_value(TIERS[tier][setting], key)
    return choice, scores


def chosen_extra(s: Setting, cells: list[Job], method: str) -> tuple[dict[str, float], dict[str, float]]:
    """An ``extra`` search's choice: the cell with the best headline (the first of equals, the
    smallest step size). The config's value is chosen as no override, so that a run made with
    the config as it is counts."""
    if not cells:
        return {}, {}
    metric, higher = HEADLINE[s.generation]
    scores = {j.path.stem: score(j.path, metric) for j in cells}
    best = (max if higher else min)(cells, key=lambda j: scores[j.path.stem])
    key = EXTRA_GRID[method][0]
    value = float(dict(o.split("=", 1) for o in best.overrides)[key])
    return ({} if value == config_value(s, key) else {key: value}), scores


def grid_stage(tier: str, out: Path, setting: str, method: str) -> list[Job]:
    """The rest of the full grid: every lr with the method's extra step size at each value but the
    config's (stage 1's runs)."""
    key, values = EXTRA_GRID[method]
    centre = config_value(TIERS[tier][setting], key)
    return [tuning_job(tier, out, setting, method, lr, x) for lr in LR_GRID for x in values if x != centre]


def config_value(s: Setting, key: str) -> float:
    cfg = load_config(s, ())
    section, name = key.split(".")
    return float(getattr(getattr(cfg, section), name))


def load_config(s: Setting, extra: Iterable[str]):
    from pf2lora import plan

    return plan.load(ROOT / s.config, [*s.overrides, *extra])


def step_sizes(tier: str, out: Path, name: str, method: str) -> tuple[str, ...] | None:
    """The step-size overrides a benchmark run of ``method`` in ``name`` uses (None: tuning not done)."""
    s = TIERS[tier][name]
    if s.tuning == "none":
        return ()
    source = name if s.tuning in ("tune", "extra") else s.tuning.split(":", 1)[1]
    if "/" in source:  # another tier's choice, read from that tier's results
        tier, source = source.split("/", 1)
        out = out.parent / f"paper_{tier}"  # the tiers' results are siblings (RESULTS/paper_TIER)
    got = chosen(tier, out, source, method)
    if got is None:
        return None
    return tuple(f"{k}={v!r}" for k, v in got[0].items())


def ran_with(run: dict[str, Any], sizes: tuple[str, ...]) -> bool:
    """Whether a stored run used the step sizes ``sizes`` (overrides ``key=value``)."""
    return set(sizes) <= set(run["overrides"])


def ready(tier: str, out: Path, settings: list[str], methods: list[str] | None) -> tuple[list[Job], int]:
    """(the runs that can start now, how many more wait for tuning), tuning first, then by seed."""
    jobs: list[Job] = []
    waiting = 0
    tuned = {n for n in settings if TIERS[tier][n].tuning in ("tune", "extra")}
    tuned |= {TIERS[tier][n].tuning.split(":", 1)[1] for n in settings if TIERS[tier][n].tuning.startswith("reuse:")}
    tuned = {n for n in tuned if "/" not in n}  # another tier's tuning is that tier's work
    for name in sorted(tuned):
        for m in TIERS[tier][name].methods:
            if methods and m not in methods:
                continue
            jobs += [j for j in tuning_cells(tier, out, name, m) if not j.path.exists()]  # the same cells chosen() reads
    for name in settings:
        s = TIERS[tier][name]
        for m in s.methods:
            if methods and m not in methods:
                continue
            sizes = step_sizes(tier, out, name, m)
            for seed in s.seeds:
                path = out / name / m / f"seed{seed}.json"
                # a stored run counts unless the tuning now chooses other step sizes (then a run replaces it)
                if path.exists() and sizes is None:
                    continue  # its method's tuning is not done: it stays, and so does a checkpoint of its rerun
                if path.exists() and ran_with(json.loads(path.read_text()), sizes):
                    shutil.rmtree(partial_of(path), ignore_errors=True)  # a kill between the result and its cleanup
                    continue
                if sizes is None:
                    waiting += 1
                    continue
                jobs.append(Job(name, m, seed, (*s.overrides, *sizes), path))
    # Seed-major, so that a partial run leaves whole comparisons (every method on seed 0 first);
    # within a seed PF2LoRA and the baselines the paper names first (a device session's few
    # minutes should settle the paper's own comparison), and the costly methods first, so that
    # they do not end the run alone.
    costly = {"pf2lora": 0, "perfedavg": 1, "fdlora": 1}
    jobs.sort(
        key=lambda j: (
            not j.tuning,
            TIERS[tier][j.setting].generation,
            j.seed,
            j.method not in PAPER_COMPARISON,
            costly.get(j.method, 2),
        )
    )
    return jobs, waiting


# -- one run -----------------------------------------------------------------------------------


def heterogeneity(info: dict[str, Any], pooled: list[float] | None) -> dict[str, Any]:
    """How a client differs from the federation: its group (domain, topic), its largest label share
    and the total-variation distance of its label distribution from the pooled one."""
    out: dict[str, Any] = {}
    if "group" in info:
        out["group"] = info["group"]
    counts = info.get("train_label_counts")
    if counts and pooled:
        n = sum(counts)
        share = [c / n for c in counts]
        out["majority_share"] = max(share)
        out["label_tv"] = 0.5 * sum(abs(a - b) for a, b in zip(share, pooled))
    return out


def run_job(setting: Setting, job: Job) -> dict[str, Any]:
    """Run ``job`` (one thread) and write its JSON: per-client metrics, the curve, costs."""
    import torch

    from pf2lora import plan
    from pf2lora.engines.local import LocalEngine, RunState
    from pf2lora.methods import registry

    torch.set_num_threads(1)
    cfg = load_config(setting, [*job.overrides[len(setting.overrides) :], f"seed={job.seed}", f'methods=["{job.method}"]'])
    torch.manual_seed(cfg.seed)
    task = plan.build_task(cfg)
    partial = partial_dir(job)
    resume, resumed_after = resumable(partial, job, cfg)
    before = resume.elapsed_s if resume is not None else 0.0  # read now: the engine advances the state it resumes
    saved_at = time.monotonic()

    def on_state(state: RunState) -> None:
        nonlocal saved_at
        if time.monotonic() - saved_at < CHECKPOINT_EVERY_S:
            return
        meta = {"engine": "local", "job": _job_key(job), "config": dataclasses.asdict(cfg), "resumed_after": resumed_after}
        save_partial(partial, {**meta, "current": dataclasses.asdict(state)})
        saved_at = time.monotonic()

    start = time.time()
    result = LocalEngine(cfg, task, progress=False).run(job.method, resume=resume, on_state=on_state)
    wall = before + time.time() - start  # the segments before this one, to their last checkpointed round
    counts = [c.info["train_label_counts"] for c in task.clients if "train_label_counts" in c.info]
    total = [sum(col) for col in zip(*counts)] if counts else []
    pooled = [t / sum(total) for t in total] if total else None
    info = {c.client_id: heterogeneity(c.info, pooled) for c in task.clients}
    clients = {
        cid: {k: v for k, v in c.items() if k != "spectrum"} | {"heterogeneity": info.get(cid, {})} for cid, c in result.clients.items()
    }
    metric, higher = HEADLINE[setting.generation]
    rounds = result.rounds
    curve = [{"round": r["round"], **r["eval_means"]} for r in rounds if "eval_means" in r]
    final = {k: _mean(clients, k) for k in sorted({k for c in clients.values() for k, v in c.items() if _scalar(v)})}
    curve.append({"round": cfg.rounds, **final})
    data = {
        "setting": job.setting,
        "method": job.method,
        "seed": job.seed,
        "tuning_run": job.tuning,
        "overrides": list(job.overrides),
        "config": dataclasses.asdict(cfg),
        "summary": summarize_clients(clients, metric, higher, setting.generation),
        "params_per_client": trained_params(registry()[job.method](cfg, task), task),
        "upload_bytes_per_client_per_round": statistics.fmean(r["upload_bytes_per_client"] for r in rounds),
        "download_bytes_per_client_per_round": statistics.fmean(r["download_bytes_per_client"] for r in rounds),
        "wall_time_s": wall,
        **({"resumed_after_rounds": resumed_after} if resumed_after else {}),
        "train_loss_per_round": [r["train_loss"] for r in rounds],
        "curve": curve,
        "clients": clients,
        "machine": machine(torch_threads=1, torch=torch.__version__),
    }
    write_json(job.path, data)
    shutil.rmtree(partial, ignore_errors=True)  # after the result: a kill in between leaves a stale folder, never a lost run
    return data


def remaining_time(out: Path, jobs: list[Job]) -> tuple[float, int]:
    """(the seconds ``jobs`` will take, estimated from the finished runs' wall times; how many have
    no estimate). A job takes the mean of its setting and method's finished runs, else of its
    method's in the tier (tuning runs included: the same size of run); a setting with no finished
    run is another model or size, so its jobs have none. An estimate only: wall times were taken
    with other jobs on the machine."""
    walls: dict[tuple[str, str], list[float]] = {}
    for path in out.glob("**/*.json"):
        if "figures" in path.parts:
            continue
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _scalar(run.get("wall_time_s")) and "setting" in run:
            walls.setdefault((run["setting"], run["method"]), []).append(run["wall_time_s"])
    settings = {sk for sk, _ in walls}
    total, unknown = 0.0, 0
    for j in jobs:
        same = walls.get((j.setting, j.method))
        method = [w for (_, m), ws in walls.items() if m == j.method for w in ws]
        if j.setting not in settings or not (same or method):
            unknown += 1
            continue
        total += statistics.fmean(same or method)
    return total, unknown


CHECKPOINT_EVERY_S = 30.0
"""A running job checkpoints after a round when this long has passed since its last checkpoint: on
a CPU (rounds of 20 to 100 s) after every round; on a GPU (rounds of a second or two, a
checkpoint of some 18 MB) not often enough to slow it."""


def partial_dir(job: Job) -> Path:
    """Where ``job`` checkpoints while it runs."""
    return partial_of(job.path)


def partial_of(result: Path) -> Path:
    """The checkpoint folder of the run whose result is ``result``: ``<it without .json>.partial/``."""
    return result.with_name(result.stem + ".partial")


def _job_key(job: Job) -> dict[str, Any]:
    return {"setting": job.setting, "method": job.method, "seed": job.seed, "overrides": list(job.overrides)}


def save_partial(partial: Path, payload: dict[str, Any]) -> None:
    """A running job's checkpoint after a round (atomic: a kill leaves the last good one)."""
    from pf2lora import checkpoint

    partial.mkdir(parents=True, exist_ok=True)
    checkpoint.save(partial, payload)


def resumable(partial: Path, job: Job, cfg: Any) -> tuple[Any, list[int]]:
    """(the state to resume ``job`` from, the rounds after which it was resumed, this time's
    included), or (None, []) to start afresh: when there is no checkpoint, or one of another job
    or config (a changed tuning choice or code that moved a default), which is then discarded
    with a line on stderr. A checkpoint that cannot be read is discarded the same way."""
    from pf2lora import checkpoint
    from pf2lora.engines.local import RunState
    from pf2lora.errors import UserError

    if not (partial / checkpoint.FILENAME).is_file():
        return None, []
    try:
        saved = checkpoint.load(partial)
    except UserError as e:
        saved, why = None, str(e)
    else:
        current = saved.get("current")
        if saved.get("job") != _job_key(job) or saved.get("config") != dataclasses.asdict(cfg) or not current:
            saved, why = None, "it is of another job or config"
    if saved is not None:
        try:
            state = RunState(**saved["current"])
        except TypeError as e:  # written by code whose RunState had other fields
            saved, why = None, f"its state does not fit this code's: {e}"
    if saved is None:
        print(f"paper.py: {partial}: not resuming ({why}); starting the run afresh", file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)
        return None, []
    return state, [*saved.get("resumed_after", []), state.round]


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean(clients: dict[str, dict[str, Any]], key: str) -> float | None:
    vals = [c[key] for c in clients.values() if _scalar(c.get(key))]
    return statistics.fmean(vals) if vals else None


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize_clients(clients: dict[str, dict[str, Any]], metric: str, higher: bool, generation: bool) -> dict[str, float | None]:
    """A run's figures: clients' means, the worst client and the 10th percentile of the headline."""
    per = [c[metric] for c in clients.values() if _scalar(c.get(metric))]
    keys = ("loss", "perplexity", "bleu", "rouge_l") if generation else ("balanced_accuracy", "macro_f1", "accuracy", "mcc")
    out: dict[str, float | None] = {k: _mean(clients, k) for k in keys}
    out |= {f"global_{k}": _mean(clients, f"global_{k}") for k in keys}
    out["worst_" + metric] = (max(per) if not higher else min(per)) if per else None
    out[("p90_" if not higher else "p10_") + metric] = _percentile(per, 10 if higher else 90) if per else None
    if not generation:
        out["majority_accuracy"] = _mean(clients, "majority_accuracy")
        for key in ("majority_share", "majority_predicted", "global_majority_predicted"):
            value = _mean(clients, key)
            if value is not None:  # runs from before the metric existed lack it
                out[key] = value
    out["private_norm"] = _mean(clients, "private_norm")
    ranks = [r for c in clients.values() for r in (c.get("layer_ranks") or {}).values() if r is not None]
    out["mean_layer_rank"] = statistics.fmean(ranks) if ranks else None
    return out


PARENT_POLL_S = 5.0


def exit_with_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process once ``parent`` is no longer its parent. A driver stopped by a signal to it
    alone (``kill PID``, not Ctrl-C, which reaches every process of the group) leaves its runs
    going as orphans, which would write their checkpoints beside the next driver's run of the same
    job; this way a run stops within ``poll_s`` and the next driver resumes it from its checkpoint
    (written atomically, so an exit mid-write loses nothing)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_in_child(setting: Setting, job: Job) -> tuple[Job, float, float]:
    exit_with_parent(os.getppid())
    data = run_job(setting, job)
    metric, _ = HEADLINE[setting.generation]
    return job, data["summary"][metric], data["wall_time_s"]


# -- the summary JSON --------------------------------------------------------------------------


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def converged(curve: list[dict[str, Any]], rounds: int, metric: str, generation: bool) -> tuple[bool | None, float | None]:
    """(flat, change): the headline's change over the last ``FLAT_FRACTION`` of rounds, read off
    a least-squares line through the evaluations in the last ``2 * FLAT_FRACTION`` of rounds.

    Why a fitted line and not the last evaluation minus the one at 80%: a client's test set holds
    tens of examples, so one evaluation moves by a few points from the next (seen on every
    tuning run), and the difference of two of them measures that noise more than the trend.
    Generation: the change relative to the line's mean. None when fewer than 3 evaluations lie
    in the window (no line)."""
    window = [p for p in curve if _scalar(p.get(metric)) and p["round"] > rounds * (1 - 2 * FLAT_FRACTION)]
    if len(window) < 3:
        return None, None
    xs, ys = [float(p["round"]) for p in window], [float(p[metric]) for p in window]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        return None, None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread
    change = slope * FLAT_FRACTION * rounds
    if generation:
        if my == 0:
            return None, None
        change /= abs(my)
    return abs(change) < FLAT_TOLERANCE[generation], change


def last_step(curve: list[dict[str, Any]], metric: str, generation: bool) -> dict[str, Any] | None:
    """The change between the curve's last two evaluations (relative for generation): shown where
    :func:`converged` has too few evaluations to fit its line, as information, not as a verdict
    (the NLG setting evaluates every 5 of its 15 rounds: two evaluations in the window)."""
    points = [p for p in curve if _scalar(p.get(metric))]
    if len(points) < 2:
        return None
    (a, b) = points[-2:]
    change = float(b[metric]) - float(a[metric])
    if generation:
        if float(a[metric]) == 0:
            return None
        change /= abs(float(a[metric]))
    return {"from_round": a["round"], "to_round": b["round"], "change": change}


CLASSES = {"wordnet-topics": 25}
"""Labels per classification dataset of the offline stand-ins (the rest are binary)."""


def failed_to_train(run: dict[str, Any], generation: bool) -> float | None:
    """The last round's mean training loss when it is above a uniform guess's, ``ln(classes)``: a
    run whose step sizes blew its model up (PF2LoRA's private head at ``optim.lower_lr = 1``: a
    training loss of 40 to 60), which the convergence rule would call flat. For generation, whose
    uniform guess (ln of the vocabulary) is no useful bar: when it is above the first round's
    (PF2LoRA at the NLG config's ``optim.lower_lr = 0.5``: 4.4 in round 1, 8.1 in round 15).
    None otherwise."""
    losses = [float(x) for x in run.get("train_loss_per_round", []) if _scalar(x)]  # finite
    if not losses:
        return None
    last = losses[-1]
    if generation:
        return last if last > losses[0] else None
    return last if last > math.log(CLASSES.get(run["config"]["task"]["dataset"], 2)) else None


def mean_curve(curves: list[list[dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """The seeds' mean curve: at each round every seed evaluated, the mean of their ``metric``."""
    by_round: dict[int, list[float]] = {}
    for c in curves:
        for p in c:
            if _scalar(p.get(metric)):
                by_round.setdefault(p["round"], []).append(float(p[metric]))
    return [{"round": r, metric: statistics.fmean(v)} for r, v in sorted(by_round.items()) if len(v) == len(curves)]


def collect(tier: str, out: Path) -> dict[str, Any]:
    """``paper_TIER.json`` from every run file present (the issue's shape; see the module docstring)."""
    data: dict[str, Any] = {
        "benchmark": "the paper's protocol on offline stand-ins, every method tuned alike (benchmarks/paper.py)",
        "tier": tier,
        "command": f"python benchmarks/paper.py --tier {tier} --jobs 2",
        "headline": {"classification": "clients' mean personalised balanced accuracy", "generation": "clients' mean test loss"},
        "convergence_rule": (
            f"flat when the last {FLAT_FRACTION:.0%} of rounds change the headline by less than 0.5 points "
            "(balanced accuracy) or 0.5% (generation loss), for every method; the change is read off a "
            f"least-squares line through the seeds' mean curve over the last {2 * FLAT_FRACTION:.0%} of rounds "
            "(single evaluations are too noisy to difference); per seed for information"
        ),
        "tuning_grid": {"optim.lr": list(LR_GRID), **{m: {k: list(v)} for m, (k, v) in EXTRA_GRID.items()}},
        "settings": {},
    }
    for name, s in TIERS[tier].items():
        runs = [json.loads(p.read_text()) for p in sorted((out / name).glob("*/seed*.json"))]
        tuned = sorted((out / "tuning" / name).glob("*/*.json")) if s.tuning in ("tune", "extra") else []
        if not runs and not tuned:
            continue
        metric, higher = HEADLINE[s.generation]
        entry: dict[str, Any] = {"about": s.about, "seeds_planned": list(s.seeds), "methods_planned": list(s.methods)}
        first = (runs[0] if runs else json.loads(tuned[0].read_text()))["config"]
        entry["config"] = {k: v for k, v in first.items() if k not in ("seed", "methods", "optim", "perfedavg")}
        entry["config"]["overrides"] = list(s.overrides)
        entry["tuning"] = tuning_record(tier, out, name, s)
        methods: dict[str, Any] = {}
        flat_all: list[bool | None] = []
        superseded: dict[str, list[int]] = {}
        for m in s.methods:
            mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
            sizes = step_sizes(tier, out, name, m)
            if sizes is not None:  # a run with step sizes the tuning no longer chooses is left out, to run again
                if old := [r["seed"] for r in mine if not ran_with(r, sizes)]:
                    superseded[m] = old
                mine = [r for r in mine if ran_with(r, sizes)]
            if not mine:
                continue
            seeds = {}
            conv = {}
            untrained: dict[str, float] = {}
            for r in mine:
                conv[str(r["seed"])] = converged(r["curve"], r["config"]["rounds"], metric, s.generation)[1]
                loss = failed_to_train(r, s.generation)
                if loss is not None:
                    untrained[str(r["seed"])] = loss
                seeds[str(r["seed"])] = {
                    # from the clients, not the stored summary: that may predate a figure
                    **summarize_clients(r["clients"], metric, higher, s.generation),
                    "params_lora": r["params_per_client"]["lora"],
                    "params_head": r["params_per_client"]["head"],
                    "upload_bytes_per_client_per_round": r["upload_bytes_per_client_per_round"],
                    "download_bytes_per_client_per_round": r["download_bytes_per_client_per_round"],
                    "wall_time_s": r["wall_time_s"],
                    "step_sizes": {k: r["config"][k.split(".")[0]][k.split(".")[1]] for k in _step_keys(m)},
                    "curve": r["curve"],
                    "clients": r["clients"],
                }
            keys = [k for k, v in seeds[str(mine[0]["seed"])].items() if _scalar(v)]
            mean, std = {}, {}
            for k in keys:
                vals = [v[k] for v in seeds.values() if _scalar(v.get(k))]
                if vals:
                    mean[k], std[k] = _ms(vals)
            seed_mean = mean_curve([r["curve"] for r in mine], metric)
            flat, change = converged(seed_mean, mine[0]["config"]["rounds"], metric, s.generation)
            flat_all.append(flat if not untrained else False)
            methods[m] = {
                "failed_to_train": untrained,
                "seeds": seeds,
                "mean": mean,
                "std": std,
                "last_20pct_change": {"seed_mean": change, **conv},
                "converged": flat,
                **({"last_two_evaluations": last_step(seed_mean, metric, s.generation)} if flat is None else {}),
                **({"tuning_pending": True} if sizes is None else {}),
            }
        entry["methods"] = methods
        if superseded:
            entry["superseded_runs"] = superseded
        entry["complete"] = not any(r.get("tuning_pending") for r in methods.values()) and all(
            str(sd) in methods.get(m, {}).get("seeds", {}) for m in s.methods for sd in s.seeds
        )
        entry["converged"] = bool(flat_all) and all(f is True for f in flat_all)
        entry["convergence_judged"] = any(f is not None for f in flat_all)
        if "pf2lora" in methods:
            seed0 = next(iter(methods["pf2lora"]["seeds"].values()))
            entry["pf2lora_ranks"] = {cid: c.get("layer_ranks", {}) for cid, c in seed0["clients"].items()}
            entry["client_heterogeneity"] = {cid: c.get("heterogeneity", {}) for cid, c in seed0["clients"].items()}
        # the comparison leaves out runs made before their method's tuning was done: no verdict from them
        settled = {m: r for m, r in methods.items() if not r.get("tuning_pending")}
        if "pf2lora" in settled:
            entry["pf2lora_vs"] = head_to_head(settled, metric, higher)
            if not s.generation:
                # the paper reports accuracy: its claim is compared in its own metric too
                entry["pf2lora_vs_in_accuracy"] = head_to_head(settled, "accuracy", True)
                entry["pf2lora_clients"] = pf2lora_clients(settled["pf2lora"])
        data["settings"][name] = entry
        if not runs:
            entry["config"]["task"].pop("data_seed", None)  # the tuning runs' is the validation federation's
    return data


CLIENT_EVIDENCE = (
    "balanced_accuracy",
    "global_balanced_accuracy",
    "majority_share",
    "majority_predicted",
    "global_majority_predicted",
    "private_norm",
)


def pf2lora_clients(pf2lora: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per client, the mean over PF2LoRA's seeds of what says what its private adapter learned: its
    model's and the global model's (the common adapter alone) balanced accuracy, how often each
    predicts the client's majority test label against that label's share, the private adapter's
    norm and the mean effective rank of its layers' updates; next to the client's heterogeneity.
    A private adapter that learns the client's label prior shows as a personal model predicting
    the majority label more often than the global one, and more often than the label occurs."""
    per: dict[str, dict[str, list[float]]] = {}
    heterogeneity: dict[str, dict[str, Any]] = {}
    for seed in pf2lora["seeds"].values():
        for cid, c in seed["clients"].items():
            row = per.setdefault(cid, {})
            for k in CLIENT_EVIDENCE:
                if _scalar(c.get(k)):
                    row.setdefault(k, []).append(float(c[k]))
            ranks = c.get("layer_ranks") or {}
            if ranks:
                row.setdefault("mean_layer_rank", []).append(sum(ranks.values()) / len(ranks))
            heterogeneity[cid] = c.get("heterogeneity", {})
    return {cid: {**{k: sum(v) / len(v) for k, v in row.items()}, "heterogeneity": heterogeneity[cid]} for cid, row in per.items()}


def head_to_head(methods: dict[str, Any], metric: str, higher: bool) -> dict[str, Any]:
    """PF2LoRA against each other method, paired by seed (a seed is the same federation, another
    initialisation and mini-batch stream): the mean and std of PF2LoRA's lead over the seeds both
    have, signed so that positive is better for PF2LoRA. ``verdict``: "wins" / "loses" when every
    seed's lead has the same sign and their mean exceeds their std; else "ties (within seed
    noise)"; with one seed "ahead" / "behind" / "level", as there is no noise estimate."""
    out: dict[str, Any] = {}
    ours = methods["pf2lora"]["seeds"]
    sign = 1.0 if higher else -1.0
    for m, r in methods.items():
        if m == "pf2lora":
            continue
        common = sorted(set(ours) & set(r["seeds"]))
        leads = [
            sign * (ours[sd][metric] - r["seeds"][sd][metric])
            for sd in common
            if _scalar(ours[sd].get(metric)) and _scalar(r["seeds"][sd].get(metric))
        ]
        if not leads:
            continue
        mean, std = _ms(leads)
        if len(leads) == 1:
            verdict = "ahead" if mean > 0 else "behind" if mean < 0 else "level"
        elif all(x > 0 for x in leads) and mean > std:
            verdict = "wins"
        elif all(x < 0 for x in leads) and -mean > std:
            verdict = "loses"
        else:
            verdict = "ties (within seed noise)"
        out[m] = {"metric": metric, "lead_mean": mean, "lead_std": std, "seeds": common, "verdict": verdict}
    return out


def _step_keys(method: str) -> list[str]:
    return ["optim.lr", *([EXTRA_GRID[method][0]] if method in EXTRA_GRID else [])]


def tuning_record(tier: str, out: Path, name: str, s: Setting) -> Any:
    if s.tuning == "none":
        return "none: the config's step sizes for every method (see its header)"
    if s.tuning.startswith("reuse:"):
        return f"reused from {s.tuning.split(':', 1)[1]}"
    if s.tuning == "extra":
        return extra_record(tier, out, name, s)
    rec: dict[str, Any] = {
        "validation_federation": list(VALIDATION) + ["seed=0"],
        "score": "clients' mean personalised balanced accuracy on the validation federation",
        "search": "every cell of the grid: optim.lr, and for a method with an extra step size every pair of the two; the best cell",
        "methods": {},
    }
    for m in s.methods:
        got = chosen(tier, out, name, m)
        runs = {p.stem: json.loads(p.read_text()) for p in sorted(tuning_dir(out, name, m).glob("*.json"))}
        rec["methods"][m] = {
            "chosen": got[0] if got else None,
            "scores": {c: r["summary"]["balanced_accuracy"] for c, r in runs.items()},
            f"scores_last_{LAST_EVALUATIONS}": {c: mean_of_last(r) for c, r in runs.items()},
        }
        # how large the personal part grew at each cell (the clients' mean norm of what a personal
        # model adds to the common adapter; 0 without a personal part): what the extra step size does
        norms = {c: v for c, r in runs.items() if (v := r["summary"].get("private_norm")) is not None}
        if any(norms.values()):
            rec["methods"][m]["private_norms"] = norms
        if m in EXTRA_GRID:
            key, values = EXTRA_GRID[m]
            rec["methods"][m]["extra_step_size"] = {"key": key, "values": list(values), "config_value": config_value(s, key)}
    return rec


def extra_record(tier: str, out: Path, name: str, s: Setting) -> dict[str, Any]:
    """An ``extra`` search's record: per method with an extra step size, every cell's score and
    private norm, the choice."""
    metric, higher = HEADLINE[s.generation]
    rounds = s.tuning_rounds or load_config(s, ()).rounds
    rec: dict[str, Any] = {
        "mode": "extra",
        "validation_federation": list(VALIDATION) + ["seed=0"],
        "score": f"clients' mean personalised {metric} on the validation federation after {rounds} rounds ({'higher' if higher else 'lower'} is better)",
        "search": (
            "the config's AdamW lr for every method; a method's extra step size at "
            f"{', '.join(f'{f:g}x' for f in EXTRA_FACTORS)} its config value, and once one more value "
            f"beyond the edge where the best of those lies ({' or '.join(f'{f:g}x' for f in EXTRA_EDGE)}); the best cell"
        ),
        "methods": {},
    }
    for m in s.methods:
        if m not in EXTRA_GRID:
            continue
        got = chosen(tier, out, name, m)
        runs = {p.stem: json.loads(p.read_text()) for p in sorted(tuning_dir(out, name, m).glob("*.json"))}
        key = EXTRA_GRID[m][0]
        rec["methods"][m] = {
            "extra_step_size": {"key": key, "config_value": config_value(s, key)},
            "chosen": None if got is None else {key: got[0].get(key, config_value(s, key))},
            "scores": {c: r["summary"][metric] for c, r in runs.items()},
            "private_norms": {c: r["summary"].get("private_norm") for c, r in runs.items()},
            "train_loss_last_round": {c: r["train_loss_per_round"][-1] for c, r in runs.items() if r.get("train_loss_per_round")},
        }
    return rec


def extra_tuning_table(name: str, rec: dict[str, Any]) -> str:
    """An ``extra`` search: a row per method and cell."""
    lines = [
        f"**{name}: tuning** ({rec['score']}; {', '.join(rec['validation_federation'])}; {rec['search']})\n",
        "| method | step size | score | private norm | last round's training loss | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in rec["methods"].items():
        pick = None if r["chosen"] is None else f"{r['extra_step_size']['key']}={_fmt(next(iter(r['chosen'].values())))}"
        for cell, sc in r["scores"].items():
            norm = r["private_norms"].get(cell)
            loss = r["train_loss_last_round"].get(cell)
            lines.append(
                f"| {m} | `{cell}` | {sc:.3f} | {'-' if norm is None else f'{norm:.3g}'} | "
                f"{'-' if loss is None else f'{loss:.3f}'} | {'yes' if cell == pick else ''} |"
            )
    return "\n".join(lines) + "\n"


# -- tables and figures ------------------------------------------------------------------------


def _pm(m: dict, s: dict, key: str, digits: int = 3) -> str:
    if key not in m:
        return "-"
    return f"{m[key]:.{digits}f} ± {s.get(key, 0.0):.{digits}f}"


def tuning_table(name: str, rec: dict[str, Any]) -> str:
    """The tuning runs of ``name``: each method's score per lr (at its extra step size's config
    value), its best cell and its choice; then, for each method with an extra step size, its grid."""
    lrs = [f"lr={_fmt(lr)}" for lr in LR_GRID]
    lines = [
        f"**{name}: tuning** ({rec['score']}; {', '.join(rec['validation_federation'])}; {rec['search']})\n",
        "| method | " + " | ".join(f"`optim.{x}`" for x in lrs) + " | the rest of its grid | chosen |",
        "|---" * (len(lrs) + 3) + "|",
    ]
    grids = []
    for m, r in rec["methods"].items():
        scores = r["scores"]
        if not scores:
            continue
        cells = [f"{scores[x]:.3f}" if x in scores else "-" for x in lrs]
        rest = "-"
        if "extra_step_size" in r:
            ex = r["extra_step_size"]
            n = len(lrs) * (len(ex["values"]) - 1)
            done = [k for k in scores if "," in k]
            rest = f"{len(done)} of {n} cells at other `{ex['key']}` values (below)"
            grids.append(grid_table(name, m, scores, ex, r.get("private_norms", {})))
        choice = ", ".join(f"`{k}={_fmt(v)}`" for k, v in r["chosen"].items()) if r["chosen"] else "(tuning not complete)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {rest} | {choice} |")
    return "\n".join(lines) + "\n" + "".join("\n" + g for g in grids)


def grid_table(name: str, method: str, scores: dict[str, float], ex: dict[str, Any], norms: dict[str, float] | None = None) -> str:
    """One method's tuning over both its step sizes: a row per value of its extra step size, each
    cell with how large its run's personal part grew (the tuning record's ``private_norms``) where
    it is known."""
    lrs = [f"lr={_fmt(lr)}" for lr in LR_GRID]
    key, norms = ex["key"], norms or {}
    note = "; in parentheses the clients' mean norm of what a personal model adds to the common adapter" if norms else ""

    def cell(tag: str) -> str:
        if tag not in scores:
            return "-"
        return f"{scores[tag]:.3f}" + (f" ({norms[tag]:.2f})" if tag in norms else "")

    lines = [
        f"*{name}: {method}'s tuning grid (rows: `{key}`, `{_fmt(ex['config_value'])}` the config's value; columns: `optim.lr`{note})*\n",
        f"| `{key}` | " + " | ".join(f"`{_fmt(lr)}`" for lr in LR_GRID) + " |",
        "|---" * (len(lrs) + 1) + "|",
    ]
    for x in ex["values"]:
        tags = [lr if x == ex["config_value"] else f"{lr},{key}={_fmt(x)}" for lr in lrs]
        lines.append(f"| {_fmt(x)} | " + " | ".join(cell(g) for g in tags) + " |")
    return "\n".join(lines) + "\n"


def sensitivity_table(name: str, rec: dict[str, Any]) -> str:
    """Each tuned method's choice (the best last evaluation) against the cell with the best mean of
    the last ``LAST_EVALUATIONS`` evaluations: how much the choice owes to where a curve's swing
    ended. Empty until a method's grid is complete; records without the second score are skipped."""
    key = f"scores_last_{LAST_EVALUATIONS}"
    rows = []
    for m, r in rec["methods"].items():
        last, scores = r.get(key), r["scores"]
        if not r["chosen"] or not last:
            continue
        pick = f"lr={_fmt(r['chosen']['optim.lr'])}"  # the chosen cell's name, as tuning_job() writes it
        ex = r.get("extra_step_size")
        if ex and r["chosen"][ex["key"]] != ex["config_value"]:
            pick += f",{ex['key']}={_fmt(r['chosen'][ex['key']])}"
        alt = max(last, key=lambda c: last[c])
        same = "the same" if alt == pick else f"`{alt}`: {scores[alt]:.3f} / {last[alt]:.3f}"
        rows.append(f"| {m} | `{pick}`: {scores[pick]:.3f} / {last[pick]:.3f} | {same} |")
    if not rows:
        return ""
    lines = [
        f"*{name}: the tuning's choice against the best mean of each run's last {LAST_EVALUATIONS} evaluations (cell: its last "
        f"evaluation / the mean of its last {LAST_EVALUATIONS}; a run's curve swings by up to 0.05 between evaluations)*\n",
        f"| method | chosen: best last evaluation | best mean of the last {LAST_EVALUATIONS} |",
        "|---|---|---|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def same_cells_table(name: str, rec: dict[str, Any], a: str, b: str) -> str:
    """``a`` against ``b`` in every tuning cell both ran (the same step sizes, federation and
    seed): for PF2LoRA and its no-bilevel ablation, what the bilevel step adds at equal step
    sizes (its hypergradient term and its unrolled two-batch step together), apart from where
    each method's search ended. Empty when they share no cell or ``a`` has no
    extra step size."""
    sa, sb = (rec["methods"].get(m, {}).get("scores", {}) for m in (a, b))
    cells = [c for c in sa if c in sb]
    if not cells or "extra_step_size" not in rec["methods"][a]:
        return ""
    ex = rec["methods"][a]["extra_step_size"]  # a cell that names no extra step size is at the config's
    value, centre = ex["config_value"], f"{ex['key']}={_fmt(ex['config_value'])}"
    cells.sort(key=lambda c: [float(kv.split("=", 1)[1]) for kv in c.split(",")] + ([value] if "," not in c else []))
    lines = [
        f"*{name}: {a} against {b} at the same step sizes (each tuning cell both ran, `{centre}` where a cell names no other: "
        f"{rec['score']}; positive: {a} better)*\n",
        f"| cell | {a} | {b} | difference |",
        "|---|---|---|---|",
        *(f"| `{c}` | {sa[c]:.3f} | {sb[c]:.3f} | {sa[c] - sb[c]:+.3f} |" for c in cells),
    ]
    ahead = sum(sa[c] > sb[c] for c in cells)
    ma, mb = statistics.fmean(sa[c] for c in cells), statistics.fmean(sb[c] for c in cells)
    lines.append(f"| mean of the {len(cells)} cells ({a} ahead in {ahead}) | {ma:.3f} | {mb:.3f} | {ma - mb:+.3f} |")
    return "\n".join(lines) + "\n"


def _trend(r: dict[str, Any], generation: bool) -> str:
    """The seeds' mean curve's fitted change over the last 20% of rounds, and whether that is flat
    (or why it is not judged); a run that did not train says so rather than "flat"."""
    change = r.get("last_20pct_change", {}).get("seed_mean")
    last = r.get("last_two_evaluations")

    def size(x: float) -> str:
        return f"{100 * x:+.1f}%" if generation else f"{100 * x:+.1f} pts"

    if change is not None:
        trend = f"{size(change)} ({'flat' if r.get('converged') else 'moving'})"
    elif last:
        trend = (
            f"not judged (under 3 evaluations in the last 40%); rounds {last['from_round']} to {last['to_round']}: {size(last['change'])}"
        )
    else:
        return "-"
    failed = r.get("failed_to_train") or {}
    if failed:
        losses = ", ".join(f"{loss:.1f}" for loss in failed.values())
        bar = "its first round's" if generation else "a uniform guess's"
        return f"{trend.split(' (')[0]}; DID NOT TRAIN (seed {', '.join(failed)}: final training loss {losses}, above {bar})"
    return trend


def _convergence(e: dict[str, Any]) -> str:
    if e["converged"]:
        return "converged"
    if not e.get("convergence_judged", True):
        return "convergence not judged: too few evaluations for the rule"
    return "NOT converged by the rule"


def _superseded(e: dict[str, Any]) -> str:
    old = e.get("superseded_runs", {})
    if not old:
        return ""
    return "; left out, to run again at the tuning's new choice: " + ", ".join(f"{m} seed {', '.join(map(str, s))}" for m, s in old.items())


def table(data: dict[str, Any]) -> str:
    """Markdown tables, one per setting, best headline first (and a tuned setting's tuning runs)."""
    out: list[str] = []
    for name, e in data["settings"].items():
        if isinstance(e.get("tuning"), dict) and e["tuning"].get("mode") == "extra":
            out.append(extra_tuning_table(name, e["tuning"]))
        elif isinstance(e.get("tuning"), dict):
            out.append(tuning_table(name, e["tuning"]))
            out.append(sensitivity_table(name, e["tuning"]))
            out.append(same_cells_table(name, e["tuning"], "pf2lora", "pf2lora-fo"))
        if not e["methods"]:
            continue
        gen = TIERS[data["tier"]][name].generation
        metric, higher = HEADLINE[gen]
        worst, pct = f"worst_{metric}", ("p90_" if not higher else "p10_") + metric
        seeds = sorted({sd for m in e["methods"].values() for sd in m["seeds"]})
        out.append(
            f"**{name}** ({e['about']}; seeds {', '.join(seeds)}; "
            f"{_convergence(e)}"
            f"{'' if not any(r.get('failed_to_train') for r in e['methods'].values()) else ' (a run did not train)'}; "
            f"{'complete' if e['complete'] else 'incomplete'}"
            f"{_superseded(e)})\n"
        )
        cols: tuple[str, ...]
        if gen:
            cols = ("loss", "perplexity", "bleu", "rouge_l", worst, "global_loss")
            head = "| method | loss | perplexity | BLEU | ROUGE-L | worst client loss | global model loss |"
        else:
            cols = ("balanced_accuracy", "macro_f1", "accuracy", worst, pct, "global_balanced_accuracy", "majority_predicted")
            head = (
                "| method | balanced acc. | macro-F1 | accuracy | worst client bal. acc. | 10th pct. bal. acc. | global model bal. acc. "
                "| majority label predicted |"
            )
        out.append(head + " LoRA / head params per client | upload KB/client/round | wall time (s) | last 20% of rounds |")
        out.append("|---" * (len(cols) + 5) + "|")
        order = sorted(e["methods"].items(), key=lambda kv: kv[1]["mean"].get(metric, 0.0) * (-1 if higher else 1))
        for m, r in order:
            mean, std = r["mean"], r["std"]
            cells = " | ".join(_pm(mean, std, c, 2 if c in ("perplexity", "bleu", "rouge_l") else 3) for c in cols)
            out.append(
                f"| {m}{' (run before its tuning was complete; in no comparison)' if r.get('tuning_pending') else ''} "
                f"| {cells} | {int(mean['params_lora']):,} / {int(mean['params_head']):,} "
                f"| {mean['upload_bytes_per_client_per_round'] / 1000:.0f} | {mean['wall_time_s']:.0f} | {_trend(r, gen)} |"
            )
        if not gen:
            maj = [r["mean"].get("majority_accuracy") for r in e["methods"].values()]
            share = next((r["mean"]["majority_share"] for r in e["methods"].values() if "majority_share" in r["mean"]), None)
            share_cell = "" if share is None else f"{share:.3f} (its share of the test set)"
            if maj and maj[0] is not None:
                out.append(
                    f"| *majority label (reference)* | {'0.500 (binary)' if e['config']['task']['dataset'] != 'wordnet-topics' else '1/classes'} "
                    f"| | {maj[0]:.3f} | | | | {share_cell} | | | | |"
                )
        out.append("")
        if e.get("pf2lora_vs"):
            acc = e.get("pf2lora_vs_in_accuracy", {})
            out.append(
                f"*{name}: PF2LoRA's lead over each method in {metric.replace('_', ' ')}, paired by seed "
                f"(positive: PF2LoRA better; mean ± std over the seeds both ran)"
                f"{'; and in plain accuracy, the metric the paper reports' if acc else ''}*\n"
            )
            digits = 4 if gen else 3
            out.append("| against | lead | seeds | verdict |" + (" lead in accuracy | verdict in accuracy |" if acc else ""))
            out.append("|---" * (6 if acc else 4) + "|")
            for m, v in sorted(e["pf2lora_vs"].items(), key=lambda kv: -kv[1]["lead_mean"]):
                row = f"| {m} | {v['lead_mean']:+.{digits}f} ± {v['lead_std']:.{digits}f} | {', '.join(v['seeds'])} | {v['verdict']} |"
                if acc:
                    a = acc.get(m)
                    row += f" {a['lead_mean']:+.3f} ± {a['lead_std']:.3f} | {a['verdict']} |" if a else " | |"
                out.append(row)
            out.append("")
        if e.get("pf2lora_clients"):
            out.append(client_table(name, e["pf2lora_clients"], len(e["methods"]["pf2lora"]["seeds"])))
        if "pf2lora" not in e["methods"] and "pf2lora" in e.get("superseded_runs", {}):
            out.append(awaiting_rerun(name, metric))
    out.append(verdict_table(data))
    return "\n".join(out)


VERDICT_ORDER = ("homlora", "hetlora", "perfedavg", "local", "fedsa-lora", "pfedlora", "fdlora", "pf2lora-fo", "she-lora", "fed-hello")
"""The paper's three baselines first, as it names them, then the others."""


def verdict_table(data: dict[str, Any]) -> str:
    """PF2LoRA against each method in every setting at once (the settings' lead tables, one cell
    each): the answer to "does it beat its peers", with each lead's seeds and the rule's word."""
    names = [n for n, e in data["settings"].items() if e.get("pf2lora_vs")]
    if not names:
        return ""

    def cell(v: dict[str, Any] | None, digits: int) -> str:
        if v is None:
            return "-"
        n = len(v["seeds"])
        spread = f" ± {v['lead_std']:.{digits}f}" if n > 1 else ""
        return f"{v['lead_mean']:+.{digits}f}{spread} {v['verdict'].split(' (')[0]} ({n} seed{'s' if n > 1 else ''})"

    def rows(key: str) -> list[str]:
        present = [n for n in names if data["settings"][n].get(key)]
        others = {m for n in present for m in data["settings"][n][key]}
        order = [m for m in VERDICT_ORDER if m in others] + sorted(others - set(VERDICT_ORDER))
        lines = ["| against | " + " | ".join(f"`{n}`" for n in present) + " |", "|---" * (len(present) + 1) + "|"]
        for m in order:
            cells = [cell(data["settings"][n][key].get(m), 4 if TIERS[data["tier"]][n].generation else 3) for n in present]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines

    out = [
        "**PF2LoRA against each method, every setting** (its lead in each setting's headline metric, paired by seed: "
        "mean ± std over the seeds both ran, positive: PF2LoRA better; wins / loses: every seed the same sign and "
        "the mean beyond the std, else ties; ahead / behind: one seed, no noise estimate)\n",
        *rows("pf2lora_vs"),
        "",
    ]
    if any(data["settings"][n].get("pf2lora_vs_in_accuracy") for n in names):
        out += ["*PF2LoRA against each method in plain accuracy, the metric the paper reports (the same pairing and rule)*\n"]
        out += [*rows("pf2lora_vs_in_accuracy"), ""]
    return "\n".join(out)


def awaiting_rerun(name: str, metric: str) -> str:
    """PF2LoRA's lead and per-client tables while its only runs of ``name`` are left out (at step
    sizes the tuning no longer chooses): one row that says so, under the same captions, so that
    ``--readme`` replaces the tables of the left-out runs instead of leaving them in place."""
    why = "none yet: its runs of this setting were at the step sizes of the earlier search and run again at its tuning's choice"
    return (
        f"*{name}: PF2LoRA's lead over each method in {metric.replace('_', ' ')}, paired by seed ({why})*\n\n"
        f"| against | lead | seeds | verdict |\n|---|---|---|---|\n| - | - | - | - |\n\n"
        f"*{name}: PF2LoRA per client ({why})*\n\n"
        f"| client | bal. acc. | private adapter norm | mean effective rank |\n|---|---|---|---|\n| - | - | - | - |\n"
    )


def _blocks(lines: list[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    """The captioned tables of a markdown text: key -> (caption line, end of the table), for the
    captions that occur once.

    A caption is a line in bold (a setting's table: keyed by the caption up to its first ";",
    which names the setting and the tier's model, not the seeds or the state) or in italics (a
    setting's lead or client table: keyed by the bold caption above it and its own words up to
    "(", as both tiers have them), followed by blank lines and the table's rows."""
    out: dict[tuple[str, ...], tuple[int, int]] = {}
    twice: set[tuple[str, ...]] = set()
    main: tuple[str, ...] = ()
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if not (lines[i].startswith("*") and j < len(lines) and lines[j].startswith("|")):
            i += 1
            continue
        end = j
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if lines[i].startswith("**"):
            main = key = (lines[i].split(";", 1)[0],)
        else:
            key = (*main, lines[i].split("(", 1)[0])
        if key in out:
            twice.add(key)
        out[key] = (i, end)
        i = end
    return {k: v for k, v in out.items() if k not in twice}  # a caption seen twice names no one table


def write_readme(tables: str) -> None:
    """Put ``tables`` in place in the project's README.md (:func:`refresh_readme`, written
    atomically) and say which captions were replaced and which have no place there."""
    from pf2lora.io import atomic_write

    readme = ROOT / "README.md"
    text, done, missing = refresh_readme(readme.read_text(), tables)
    atomic_write(readme, text)
    for caption in done:
        print(f"updated: {caption}")
    for caption in missing:
        print(f"not in README.md (place it by hand): {caption}")


def refresh_readme(readme: str, tables: str) -> tuple[str, list[str], list[str]]:
    """``readme`` with each of ``tables``' captioned tables put in place of the one with the same
    caption (the prose around them is left as it is), and the captions (first 60 characters)
    replaced and those with no place in ``readme`` (new ones, to be placed by hand; or a caption
    that occurs twice there, which is not guessed at)."""
    lines, new = readme.split("\n"), tables.split("\n")
    have = _blocks(lines)
    done: list[str] = []
    missing: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []
    for key, (i, end) in _blocks(new).items():
        if key not in have:
            missing.append(new[i][:60])
            continue
        a, b = have[key]
        edits.append((a, b, new[i:end]))
        done.append(new[i][:60])
    for a, b, block in sorted(edits, reverse=True):  # from the bottom up, so the indices above hold
        lines[a:b] = block
    return "\n".join(lines), done, missing


def client_table(name: str, clients: dict[str, dict[str, Any]], n_seeds: int) -> str:
    """PF2LoRA per client (:func:`pf2lora_clients`), the most heterogeneous first."""

    def skew(c: dict[str, Any]) -> tuple[str, float]:
        h = c["heterogeneity"]
        if "label_tv" in h:
            return f"{h['label_tv']:.2f} / {h.get('majority_share', float('nan')):.2f}", -h["label_tv"]
        return str(h.get("group", "-")), 0.0

    def cell(c: dict[str, Any], k: str, digits: int = 3) -> str:
        return f"{c[k]:.{digits}f}" if k in c else "-"

    out = [
        f"*{name}: PF2LoRA per client (mean of {n_seeds} seed(s)): what its private adapter learned. Heterogeneity: "
        "the label distribution's total-variation distance from the pooled one / its largest label share (training "
        "set), or the client's domain*\n",
        "| client | heterogeneity | bal. acc. | global model bal. acc. | majority label's test share | majority predicted "
        "| global model: majority predicted | private adapter norm | mean effective rank |",
        "|---" * 9 + "|",
    ]
    for cid, c in sorted(clients.items(), key=lambda kv: (skew(kv[1])[1], kv[0])):
        out.append(
            f"| {cid} | {skew(c)[0]} | {cell(c, 'balanced_accuracy')} | {cell(c, 'global_balanced_accuracy')} "
            f"| {cell(c, 'majority_share')} | {cell(c, 'majority_predicted')} | {cell(c, 'global_majority_predicted')} "
            f"| {cell(c, 'private_norm', 2)} | {cell(c, 'mean_layer_rank', 2)} |"
        )
    out.append("")
    return "\n".join(out)


def figures(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Learning curves per setting and PF2LoRA's effective rank per client against its label skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, e in data["settings"].items():
        if not e["methods"]:  # only tuning runs so far: no curves to draw
            continue
        metric, _ = HEADLINE[TIERS[data["tier"]][name].generation]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, r in e["methods"].items():
            curves = [s["curve"] for s in r["seeds"].values()]
            rounds = sorted({p["round"] for c in curves for p in c})
            ys = [statistics.fmean(p[metric] for c in curves for p in c if p["round"] == x and p.get(metric) is not None) for x in rounds]
            ax.plot(rounds, ys, marker=".", label=m, linewidth=2.2 if m == "pf2lora" else 1.2)
        ax.set_xlabel("round")
        ax.set_ylabel(f"clients' mean {metric.replace('_', ' ')}")
        ax.set_title(f"{name}: personalised {metric.replace('_', ' ')} (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        path = out_dir / f"curves_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    ranked = {n: e for n, e in data["settings"].items() if e.get("pf2lora_ranks")}
    if ranked:
        fig, axes = plt.subplots(1, len(ranked), figsize=(4.2 * len(ranked), 4), squeeze=False)
        for ax, (name, e) in zip(axes[0], ranked.items()):
            het = e["client_heterogeneity"]
            for cid, layers in e["pf2lora_ranks"].items():
                vals = [v for v in layers.values() if v is not None]
                x = het.get(cid, {}).get("majority_share")
                if not vals or x is None:
                    continue
                y = statistics.fmean(vals)
                ax.scatter([x], [y], color="C0")
                label = cid + (f" ({het[cid]['group']})" if "group" in het[cid] else "")
                ax.annotate(label, (x, y), fontsize=6)
            lora = e["config"]["lora"]
            ax.set_ylim(0, lora["rank"] + lora["private_rank"] + 0.5)  # the whole range: a difference of one layer's rank looks its size
            ax.set_xlabel("client's largest label share (training)")
            ax.set_ylabel("mean effective rank of its update (common + private)")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        fig.suptitle("PF2LoRA: effective rank per client\n(singular values > 0.1 x largest; the axis runs to r + r~)", fontsize=9)
        fig.tight_layout()
        path = out_dir / "pf2lora_ranks.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    parser.add_argument("--settings", nargs="+", help="default: every setting of the tier")
    parser.add_argument("--methods", nargs="+", help="default: every method of each setting")
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes, each on one thread")
    parser.add_argument("--hours", type=float, default=0.0, help="start no new run after this many hours (0 = no limit)")
    parser.add_argument("--list", action="store_true", help="print what is done and what is left, and exit")
    parser.add_argument("--table", action="store_true", help="rebuild the summary JSON from the run files, print its markdown tables, exit")
    parser.add_argument("--figures", action="store_true", help="write the PNG figures from the summary JSON and exit")
    parser.add_argument(
        "--readme",
        action="store_true",
        help="as --table, then put each table into README.md in place of the one with its caption, and exit",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override added to every run of the tier after its own (e.g. task.model=DIR on a machine with the model elsewhere)",
    )
    parser.add_argument("--rerun", nargs=3, metavar=("SETTING", "METHOD", "SEED"), help="run one cell again, compare, keep nothing")
    args = parser.parse_args()
    out = RESULTS / f"paper_{args.tier}"
    summary = RESULTS / f"paper_{args.tier}.json"
    sys.path.insert(0, str(ROOT))
    if args.set:
        TIERS[args.tier] = {n: dataclasses.replace(s, overrides=(*s.overrides, *args.set)) for n, s in TIERS[args.tier].items()}
    if args.table or args.readme:  # the summary rebuilt from the run files first: it holds every finished run
        write_json(summary, collect(args.tier, out))
        tables = table(json.loads(summary.read_text()))
        if args.table:
            print(tables)
            return 0
        write_readme(tables)
        return 0
    if args.figures:
        for p in figures(json.loads(summary.read_text()), out / "figures"):
            print(p.relative_to(ROOT))
        return 0
    settings = args.settings or list(TIERS[args.tier])
    unknown = [s for s in settings if s not in TIERS[args.tier]]
    if unknown:
        print(f"paper.py: unknown setting {unknown[0]!r} (tier {args.tier}: {', '.join(TIERS[args.tier])})", file=sys.stderr)
        return 2
    if args.rerun:
        return rerun(args.tier, out, *args.rerun)
    jobs, waiting = ready(args.tier, out, settings, args.methods)
    if args.list:
        for j in jobs:
            partial = partial_dir(j)
            note = " (has a checkpoint: resumed if it is of this run's step sizes)" if partial.is_dir() else ""
            print(f"ready: {j.path.relative_to(out)}{note}")
        print(f"{len(jobs)} ready, {waiting} waiting for tuning")
        pending = [
            p
            for n in settings
            for m in TIERS[args.tier][n].methods
            if (not args.methods or m in args.methods) and step_sizes(args.tier, out, n, m) is None
            for p in (out / n / m).glob("seed*.json")
        ]
        if pending:
            print(f"{len(pending)} stored run(s) of methods whose tuning is not done: run again if their choice changes")
        known, unknown = remaining_time(out, jobs)
        if jobs:
            print(
                f"about {known / 3600:.1f} h of runs as long as the finished ones ({known / 3600 / args.jobs:.1f} h with {args.jobs} jobs)"
                + (f", and {unknown} run(s) of settings with none finished yet" if unknown else "")
            )
        return 0
    return drive(args.tier, out, summary, settings, args.methods, args.jobs, args.hours)


def drive(tier: str, out: Path, summary: Path, settings: list[str], methods: list[str] | None, n_jobs: int, hours: float) -> int:
    """Keep ``n_jobs`` runs going, starting what became ready (a tuning's choice) as runs finish.

    A run that fails (an error in its process) is reported in one line and not started again by
    this call, and the others go on: an unattended night is not ended by one bad run. Exit 1 when
    any failed (a next call tries them again), or when a process died (killed, out of memory), which
    ends this call: its pool is unusable."""
    deadline = time.time() + hours * 3600 if hours else math.inf
    running: dict[Future, Job] = {}
    failed: set[Path] = set()
    done = 0
    broken = False
    with ProcessPoolExecutor(max_workers=n_jobs, max_tasks_per_child=1) as pool:
        while not broken:
            if time.time() < deadline:
                jobs, _ = ready(tier, out, settings, methods)
                skip = {j.path for j in running.values()} | failed
                for j in [j for j in jobs if j.path not in skip][: n_jobs - len(running)]:
                    running[pool.submit(_run_in_child, TIERS[tier][j.setting], j)] = j
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                job = running.pop(f)
                try:
                    _, value, wall = f.result()
                except BrokenProcessPool as e:
                    print(
                        f"FAILED {job.path.relative_to(out)}: its process or another run's died ({e}); stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                    failed.add(job.path)
                    broken = True
                    continue
                except Exception as e:  # noqa: BLE001 - one run's error, reported; the rest go on
                    print(f"FAILED {job.path.relative_to(out)}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    failed.add(job.path)
                    continue
                done += 1
                print(f"[{done}] {job.path.relative_to(out)}: {value:.4f} ({wall:.0f} s)", flush=True)
            write_json(summary, collect(tier, out))
    left, waiting = ready(tier, out, settings, methods)
    print(f"{done} runs finished, {len(failed)} failed; {len(left)} ready and {waiting} waiting remain")
    return 1 if failed else 0


def rerun(tier: str, out: Path, name: str, method: str, seed: str) -> int:
    """Run one stored cell again into a temporary file and print both headlines."""
    import tempfile

    stored = out / name / method / f"seed{seed}.json"
    if not stored.exists():
        print(f"paper.py: no stored run {stored.relative_to(ROOT)}", file=sys.stderr)
        return 2
    old = json.loads(stored.read_text())
    s = TIERS[tier][name]
    with tempfile.TemporaryDirectory() as tmp:
        job = Job(name, method, int(seed), tuple(old["overrides"]), Path(tmp) / "run.json")
        new = run_job(s, job)
    metric, _ = HEADLINE[s.generation]
    print(f"{name} {method} seed {seed}: stored {old['summary'][metric]:.6f}, now {new['summary'][metric]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

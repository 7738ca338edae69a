"""benchmarks/paper.py's bookkeeping on a tiny tier: the tuning's order and choice, resuming,
the summary's shape, the convergence rule (the real tiers are too slow for a test)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper
import test_text_tasks as tt
from pf2lora.engines import rounds

tiny_llama, gen_jsonl = tt.tiny_llama, tt.gen_jsonl  # the text tasks' fixtures

TINY = """
name = "tiny"
methods = ["homlora", "pf2lora-fo"]
rounds = 3
local_steps = 2
batch_size = 16
num_threads = 1
[task]
kind = "tiny-text"
num_clients = 3
train_samples = 48
test_samples = 32
seq_len = 12
[lora]
rank = 4
[optim]
lr = 1e-2
lower_lr = 0.05
[eval]
every = 1
"""


@pytest.fixture
def tier(tmp_path, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    monkeypatch.setattr(paper, "LR_GRID", (1e-3, 3e-2))
    monkeypatch.setattr(paper, "EXTRA_GRID", {"pf2lora-fo": ("optim.lower_lr", (0.05, 0.5))})
    tiers = {
        "t": {
            "a": paper.Setting(str(config), (0, 1), ("homlora", "pf2lora-fo"), tuning="tune", about="tiny"),
            "b": paper.Setting(str(config), (0,), ("homlora",), overrides=("lora.head=private",), tuning="reuse:a"),
        }
    }
    monkeypatch.setattr(paper, "TIERS", tiers)
    return tmp_path / "results"


def run_all(out: Path) -> list[paper.Job]:
    ran = []
    while True:
        jobs, _ = paper.ready("t", out, ["a", "b"], None)
        if not jobs:
            return ran
        for job in jobs:
            paper.run_job(paper.TIERS["t"][job.setting], job)
            ran.append(job)


def test_tuning_first_then_the_choice_everywhere_and_nothing_twice(tier):
    out = tier
    jobs, waiting = paper.ready("t", out, ["a", "b"], None)
    # every cell of the grid at once: homlora's 2 lr, pf2lora-fo's 2 lr x 2 lower-level lr; nothing else can start yet
    assert [j.tuning for j in jobs] == [True] * 6
    assert waiting == 4 + 1  # a's 4 runs, b's 1 run
    assert all("task.data_seed=4321" in j.overrides for j in jobs)  # the validation federation
    ran = run_all(out)
    assert len(ran) == 6 + 5
    extra = [j for j in ran if j.tuning and "optim.lower_lr=0.5" in j.overrides]
    assert len(extra) == 2  # at each lr; the centre (0.05) is the lr stage's run
    for method in ("homlora", "pf2lora-fo"):
        choice, scores = paper.chosen("t", out, "a", method)
        assert len(scores) == (2 if method == "homlora" else 4)
        tag = f"lr={paper._fmt(choice['optim.lr'])}"
        if method == "pf2lora-fo" and choice["optim.lower_lr"] != 0.05:
            tag += f",optim.lower_lr={paper._fmt(choice['optim.lower_lr'])}"
        assert scores[tag] == max(scores.values())  # the best cell of the whole grid
        for name, seeds in (("a", (0, 1)), ("b", (0,))):
            if method not in paper.TIERS["t"][name].methods:
                continue
            for seed in seeds:
                run = json.loads((out / name / method / f"seed{seed}.json").read_text())
                assert run["config"]["optim"]["lr"] == choice["optim.lr"]
                assert run["config"]["task"]["data_seed"] == 1234  # the benchmark federation
                if method == "pf2lora-fo":
                    assert run["config"]["optim"]["lower_lr"] == choice["optim.lower_lr"]
    assert paper.ready("t", out, ["a", "b"], None) == ([], 0)
    (out / "a" / "homlora" / "seed1.json").unlink()
    jobs, _ = paper.ready("t", out, ["a", "b"], None)
    assert [(j.setting, j.method, j.seed) for j in jobs] == [("a", "homlora", 1)]
    # what is left, estimated from the same setting and method's finished runs (seed 0 and the tuning's)
    done = [out / "a" / "homlora" / "seed0.json", *paper.tuning_dir(out, "a", "homlora").glob("*.json")]
    walls = [json.loads(p.read_text())["wall_time_s"] for p in done]
    assert len(walls) == 3 and paper.remaining_time(out, jobs) == (pytest.approx(sum(walls) / 3), 0)
    assert paper.remaining_time(out, [dataclasses.replace(jobs[0], setting="new")]) == (0.0, 1)  # another model: no estimate


class _SlowClock:
    """``time`` as the engine sees it, with a ``perf_counter`` that advances 100 s a reading: a
    wall time taken from the engine's resumed state after the run would show it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 100.0
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


class _Killed(Exception):
    """A session's end, in the middle of a run."""


def test_a_killed_run_resumes_from_its_last_round_with_the_same_numbers(tier, tmp_path, monkeypatch, capsys):
    setting = paper.TIERS["t"]["a"]
    job = paper.Job("a", "pf2lora-fo", 0, ("optim.lr=0.03",), tier / "a" / "pf2lora-fo" / "seed0.json")
    monkeypatch.setattr(paper, "CHECKPOINT_EVERY_S", 0.0)  # after every round
    save = paper.save_partial

    def killed_after_round_2(partial, payload):
        save(partial, payload)
        if payload["current"]["round"] == 2:
            raise _Killed

    monkeypatch.setattr(paper, "save_partial", killed_after_round_2)
    with pytest.raises(_Killed):
        paper.run_job(setting, job)
    assert not job.path.exists() and (paper.partial_dir(job) / "checkpoint.pt").is_file()
    monkeypatch.setattr(paper, "save_partial", save)
    before = torch.load(paper.partial_dir(job) / "checkpoint.pt", weights_only=True)["current"]["elapsed_s"]
    monkeypatch.setattr(rounds, "time", _SlowClock())  # the engine's own clock now runs 100 s a reading
    start = time.time()
    resumed = paper.run_job(setting, job)
    took = time.time() - start
    monkeypatch.setattr(rounds, "time", time)
    assert resumed["resumed_after_rounds"] == [2] and not paper.partial_dir(job).exists()
    # the wall time is the segments' sum: the first one's to its checkpoint, plus this one's
    assert before <= resumed["wall_time_s"] <= before + took
    whole = paper.run_job(setting, dataclasses.replace(job, path=tmp_path / "whole" / "seed0.json"))
    assert "resumed_after_rounds" not in whole
    for key in ("clients", "curve", "train_loss_per_round", "summary"):  # the private adapters survived too
        assert resumed[key] == whole[key], key

    # a checkpoint of another job at that path (here: another step size) is not resumed
    monkeypatch.setattr(paper, "save_partial", killed_after_round_2)
    with pytest.raises(_Killed):
        paper.run_job(setting, job)
    monkeypatch.setattr(paper, "save_partial", save)
    other = paper.run_job(setting, dataclasses.replace(job, overrides=("optim.lr=0.001",)))
    assert "not resuming (it is of another job or config)" in capsys.readouterr().err
    assert "resumed_after_rounds" not in other and not paper.partial_dir(job).exists()


def test_summary_shape_table_and_figures(tier, tmp_path):
    out = tier
    run_all(out)
    data = paper.collect("t", out)
    a, b = data["settings"]["a"], data["settings"]["b"]
    assert a["complete"] and b["complete"] and isinstance(a["converged"], bool)
    assert set(a["tuning"]["methods"]) == {"homlora", "pf2lora-fo"}
    assert a["tuning"]["methods"]["pf2lora-fo"]["chosen"].keys() == {"optim.lr", "optim.lower_lr"}
    assert b["tuning"] == "reused from a"
    hom = a["methods"]["homlora"]
    assert set(hom["seeds"]) == {"0", "1"}
    seed0 = hom["seeds"]["0"]
    assert len(seed0["clients"]) == 3 and 0 <= seed0["balanced_accuracy"] <= 1
    assert seed0["worst_balanced_accuracy"] <= seed0["p10_balanced_accuracy"] <= seed0["balanced_accuracy"] + 1e-12
    vals = [hom["seeds"][s]["balanced_accuracy"] for s in ("0", "1")]
    assert hom["mean"]["balanced_accuracy"] == pytest.approx(sum(vals) / 2)
    assert [p["round"] for p in seed0["curve"]] == [1, 2, 3]
    assert a["config"]["task"]["kind"] == "tiny-text" and "optim" not in a["config"]
    text = paper.table(data)
    assert "**a**" in text and "| homlora |" in text and "| pf2lora-fo |" in text
    results = text.split("**a**", 1)[1].split("\n\n", 2)[1].splitlines()  # a's results table
    assert results[0].startswith("| method |") and len({line.count("|") for line in results}) == 1, results
    written = paper.figures(data, tmp_path / "fig")
    assert [p.name for p in written] == ["curves_a.png", "curves_b.png"] and all(p.stat().st_size > 0 for p in written)


def test_a_tier_can_take_another_tiers_choice(tier, monkeypatch):
    """``reuse:TIER/SETTING`` (the GPU tier takes the CPU tier's): no tuning of its own, it waits
    for the other tier's search and then runs with its choice."""
    out_t = tier.parent / "paper_t"
    config = paper.TIERS["t"]["a"].config
    paper.TIERS["g"] = {"x": paper.Setting(config, (0,), ("homlora",), overrides=("rounds=2",), tuning="reuse:t/a")}
    out_g = tier.parent / "paper_g"
    assert paper.ready("g", out_g, ["x"], None) == ([], 1)  # waits for tier t's search
    for job in paper.ready("t", out_t, ["a"], ["homlora"])[0]:
        paper.run_job(paper.TIERS["t"][job.setting], job)
    (job,), waiting = paper.ready("g", out_g, ["x"], None)
    choice, _ = paper.chosen("t", out_t, "a", "homlora")
    assert waiting == 0 and not job.tuning and f"optim.lr={choice['optim.lr']!r}" in job.overrides


def test_pf2lora_leads_in_the_headline_and_in_the_papers_accuracy(tmp_path, monkeypatch):
    """The lead table pairs seeds in balanced accuracy and again in plain accuracy (what the paper
    reports), so its claim can be read in its own metric."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    monkeypatch.setattr(paper, "LR_GRID", (3e-2,))
    monkeypatch.setattr(paper, "EXTRA_GRID", {"pf2lora": ("optim.lower_lr", (0.05,))})
    tiers = {"t": {"a": paper.Setting(str(config), (0, 1), ("homlora", "pf2lora"), tuning="tune", about="tiny")}}
    monkeypatch.setattr(paper, "TIERS", tiers)
    out = tmp_path / "results"
    while jobs := paper.ready("t", out, ["a"], None)[0]:
        for job in jobs:
            paper.run_job(tiers["t"]["a"], job)
    a = paper.collect("t", out)["settings"]["a"]
    seeds = a["methods"]["pf2lora"]["seeds"], a["methods"]["homlora"]["seeds"]
    leads = [seeds[0][sd]["accuracy"] - seeds[1][sd]["accuracy"] for sd in ("0", "1")]
    acc = a["pf2lora_vs_in_accuracy"]["homlora"]
    assert acc["metric"] == "accuracy" and acc["lead_mean"] == pytest.approx(sum(leads) / 2)
    assert a["pf2lora_vs"]["homlora"]["metric"] == "balanced_accuracy"
    text = paper.table({"tier": "t", "settings": {"a": a}})
    lead_table = text.split("PF2LoRA's lead over each method", 1)[1].split("\n\n", 2)[1].splitlines()
    assert lead_table[0] == "| against | lead | seeds | verdict | lead in accuracy | verdict in accuracy |"
    assert lead_table[2].startswith("| homlora |") and f"{acc['lead_mean']:+.3f} ± {acc['lead_std']:.3f}" in lead_table[2]
    assert len({line.count("|") for line in lead_table}) == 1


def test_tuning_runs_alone_make_a_summary_and_a_tuning_table(tier, tmp_path):
    """Before any benchmark run, the tuned setting is in the summary with its tuning record, and
    the tables show each method's score per step size, its grid, and its choice once the grid is done."""
    out = tier
    cells = paper.ready("t", out, ["a", "b"], None)[0]
    for job in cells:  # every lr at the config's lower-level lr; pf2lora-fo's other column waits
        if "optim.lower_lr=0.5" not in job.overrides:
            paper.run_job(paper.TIERS["t"][job.setting], job)
    data = paper.collect("t", out)
    assert list(data["settings"]) == ["a"]
    a = data["settings"]["a"]
    assert a["methods"] == {} and not a["complete"]
    assert a["tuning"]["methods"]["homlora"]["chosen"] is not None  # no extra step size: chosen
    assert a["tuning"]["methods"]["pf2lora-fo"]["chosen"] is None  # half its grid is still to run
    text = paper.table(data)
    assert "**a: tuning**" in text and "(tuning not complete)" in text and "0 of 2 cells at other `optim.lower_lr` values" in text
    homlora_row = next(line for line in text.splitlines() if line.startswith("| homlora |"))
    scores = a["tuning"]["methods"]["homlora"]["scores"]
    assert all(f"{v:.3f}" in homlora_row for v in scores.values())
    assert "*a: pf2lora-fo's tuning grid" in text
    assert next(line for line in text.splitlines() if line.startswith("| 0.5 |")) == "| 0.5 | - | - |"
    assert paper.figures(data, tmp_path / "fig") == []
    for job in cells:
        if not job.path.exists():
            paper.run_job(paper.TIERS["t"][job.setting], job)
    data = paper.collect("t", out)
    rec = data["settings"]["a"]["tuning"]["methods"]["pf2lora-fo"]
    text = paper.table(data)
    grid = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith(("| 0.05 |", "| 0.5 |"))}
    for lr in ("0.001", "0.03"):
        for x in ("0.05", "0.5"):
            tag = f"lr={lr}" + ("" if x == "0.05" else f",optim.lower_lr={x}")
            assert f"{rec['scores'][tag]:.3f}" in grid[x]
    chosen = rec["chosen"]
    tag = f"lr={paper._fmt(chosen['optim.lr'])}" + ("" if chosen["optim.lower_lr"] == 0.05 else ",optim.lower_lr=0.5")
    assert rec["scores"][tag] == max(rec["scores"].values())  # the best cell of the whole grid (the first of equals)


def test_the_tuning_grid_shows_how_large_each_cells_personal_part_grew(tier):
    """Beside each cell's score, the norm of what its personal models add to the common adapter
    (the text tasks report it; tiny-text does not, so the run files are written here)."""
    out = tier
    for job in paper.ready("t", out, ["a", "b"], None)[0]:
        norm = 0.0 if job.method == "homlora" else float(len(job.path.stem))  # homlora: nothing personal
        job.path.parent.mkdir(parents=True, exist_ok=True)
        curve = [{"round": 1, "balanced_accuracy": 0.5}]
        job.path.write_text(json.dumps({"summary": {"balanced_accuracy": 0.5, "private_norm": norm}, "curve": curve}))
    rec = paper.tuning_record("t", out, "a", paper.TIERS["t"]["a"])
    fo = rec["methods"]["pf2lora-fo"]
    assert fo["private_norms"] == {stem: float(len(stem)) for stem in fo["scores"]} and len(fo["scores"]) == 4
    assert "private_norms" not in rec["methods"]["homlora"]
    text = paper.tuning_table("a", rec)
    assert "; in parentheses the clients' mean norm of what a personal model adds to the common adapter" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 0.05 |", "| 0.5 |"))]
    assert rows == [
        "| 0.05 | 0.500 (8.00) | 0.500 (7.00) |",  # lr=0.001, lr=0.03: the config's lower-level lr
        "| 0.5 | 0.500 (27.00) | 0.500 (26.00) |",
    ]


def test_sensitivity_table_names_the_cell_the_mean_of_the_last_evaluations_would_choose():
    ex = {"key": "optim.lower_lr", "values": [0.1, 1.0], "config_value": 1.0}
    rec = {
        "methods": {
            "a": {
                "chosen": {"optim.lr": 0.01},
                "scores": {"lr=0.01": 0.7, "lr=0.1": 0.6},
                "scores_last_3": {"lr=0.01": 0.5, "lr=0.1": 0.6},
            },
            "b": {
                "chosen": {"optim.lr": 0.1, "optim.lower_lr": 0.1},
                "scores": {"lr=0.1,optim.lower_lr=0.1": 0.8, "lr=0.1": 0.7},
                "scores_last_3": {"lr=0.1,optim.lower_lr=0.1": 0.75, "lr=0.1": 0.7},
                "extra_step_size": ex,
            },
            "c": {"chosen": None, "scores": {"lr=0.1": 0.9}, "scores_last_3": {"lr=0.1": 0.9}},  # its grid is not complete
            "d": {"chosen": {"optim.lr": 0.1}, "scores": {"lr=0.1": 0.9}},  # a record from before the second score
        }
    }
    rows = [line for line in paper.sensitivity_table("x", rec).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| a | `lr=0.01`: 0.700 / 0.500 | `lr=0.1`: 0.600 / 0.600 |",
        "| b | `lr=0.1,optim.lower_lr=0.1`: 0.800 / 0.750 | the same |",
    ]
    assert paper.sensitivity_table("x", {"methods": {"c": rec["methods"]["c"]}}) == ""


def test_pf2lora_tables_of_left_out_runs_are_replaced_not_left_standing():
    """When PF2LoRA's only runs of a setting are left out, ``--readme`` puts a one-row table under
    each of its two captions, so the README no longer shows the left-out runs' leads."""
    bold = "**s** (about; seeds 0; incomplete)\n\n| method | x |\n|---|---|\n| homlora | 0.7 |\n"
    stale = (
        "*s: PF2LoRA's lead over each method in balanced accuracy, paired by seed (positive: PF2LoRA better)*\n\n"
        "| against | lead |\n|---|---|\n| homlora | -0.071 |\n\nprose\n\n"
        "*s: PF2LoRA per client (mean of 1 seed(s)): what its private adapter learned*\n\n| client | x |\n|---|---|\n| c0 | 0.6 |\n"
    )
    new, done, missing = paper.refresh_readme(bold + "\n" + stale, bold + "\n" + paper.awaiting_rerun("s", "balanced_accuracy"))
    assert len(done) == 3 and not missing
    assert "-0.071" not in new and "| c0 |" not in new and "prose" in new and new.count("none yet: its runs of this setting") == 2


def test_a_run_at_step_sizes_no_longer_chosen_is_left_out_and_run_again(tier):
    """Once the tuning chooses other step sizes (say, a wider search), a stored benchmark run at the
    old ones no longer counts: the summary leaves it out and says so, and the driver runs it again;
    while a method's tuning is not complete its runs stay, marked."""
    out = tier
    run_all(out)
    choice, _ = paper.chosen("t", out, "a", "pf2lora-fo")
    stored = out / "a" / "pf2lora-fo" / "seed1.json"
    run = json.loads(stored.read_text())
    other = 0.5 if choice["optim.lower_lr"] == 0.05 else 0.05
    run["overrides"] = [o for o in run["overrides"] if not o.startswith("optim.lower_lr=")] + [f"optim.lower_lr={other!r}"]
    stored.write_text(json.dumps(run))
    jobs, waiting = paper.ready("t", out, ["a", "b"], None)
    assert [(j.setting, j.method, j.seed) for j in jobs] == [("a", "pf2lora-fo", 1)] and waiting == 0
    assert f"optim.lower_lr={choice['optim.lower_lr']!r}" in jobs[0].overrides
    data = paper.collect("t", out)
    a = data["settings"]["a"]
    assert a["superseded_runs"] == {"pf2lora-fo": [1]} and list(a["methods"]["pf2lora-fo"]["seeds"]) == ["0"]
    assert not a["complete"] and "left out, to run again at the tuning's new choice: pf2lora-fo seed 1" in paper.table(data)
    # a grid cell gone (a grid that grew): the method's tuning is pending, its runs stay and say so,
    # and so does a checkpoint of the rerun
    cell = next(paper.tuning_dir(out, "a", "pf2lora-fo").glob("*lower_lr*.json"))
    kept = cell.read_bytes()
    cell.unlink()
    paper.partial_of(stored).mkdir()
    jobs, waiting = paper.ready("t", out, ["a", "b"], None)
    assert [j.tuning for j in jobs] == [True] and waiting == 0  # the stored runs wait, they are not run again yet
    assert paper.partial_of(stored).is_dir()
    a = paper.collect("t", out)["settings"]["a"]
    assert a["methods"]["pf2lora-fo"]["tuning_pending"] and "superseded_runs" not in a and not a["complete"]
    assert "| pf2lora-fo (run before its tuning was complete; in no comparison) |" in paper.table(paper.collect("t", out))
    # the grid complete again: the rerun, and then nothing is left
    cell.write_bytes(kept)
    shutil.rmtree(paper.partial_of(stored))
    (job,), _ = paper.ready("t", out, ["a", "b"], None)
    paper.run_job(paper.TIERS["t"]["a"], job)
    assert paper.ready("t", out, ["a", "b"], None) == ([], 0)
    a = paper.collect("t", out)["settings"]["a"]
    assert "superseded_runs" not in a and a["complete"] and list(a["methods"]["pf2lora-fo"]["seeds"]) == ["0", "1"]


def test_the_choice_is_the_best_cell_of_the_whole_grid_the_first_of_equals(tier, monkeypatch):
    """A best cell a coordinate search would not visit (neither the best lr at the config's extra
    value, nor the config's extra value) is chosen; of equal cells the first in grid order."""
    out = tier
    monkeypatch.setattr(paper, "LR_GRID", (1e-3, 3e-2, 1e-1))
    monkeypatch.setattr(paper, "EXTRA_GRID", {"pf2lora-fo": ("optim.lower_lr", (0.05, 0.5, 5.0))})
    made = {}
    for job in [*paper.lr_stage("t", out, "a", "pf2lora-fo"), *paper.grid_stage("t", out, "a", "pf2lora-fo")]:
        job.path.parent.mkdir(parents=True, exist_ok=True)
        job.path.write_text("{}")
        made[job.path.stem] = 0.5
    assert len(made) == 9
    made["lr=0.001"] = 0.7  # the coordinate search's lr; at it, the best extra value stays the config's
    made["lr=0.1,optim.lower_lr=5"] = 0.8  # off that path
    monkeypatch.setattr(paper, "score", lambda path: made[path.stem])
    assert paper.chosen("t", out, "a", "pf2lora-fo")[0] == {"optim.lr": 0.1, "optim.lower_lr": 5.0}
    made["lr=0.03,optim.lower_lr=0.5"] = 0.8  # a tie: the earlier cell in grid order wins
    assert paper.chosen("t", out, "a", "pf2lora-fo")[0] == {"optim.lr": 0.03, "optim.lower_lr": 0.5}
    made["lr=0.1"] = 0.8  # the lr stage's cells come first
    assert paper.chosen("t", out, "a", "pf2lora-fo")[0] == {"optim.lr": 0.1, "optim.lower_lr": 0.05}


@pytest.mark.parametrize(
    ("curve", "flat"),
    [
        ([(7, 0.700), (8, 0.702), (9, 0.700), (10, 0.702)], True),  # noise around a flat line: +0.08 points
        ([(7, 0.700), (8, 0.705), (9, 0.710), (10, 0.715)], False),  # +1 point over the last 2 rounds
        ([(7, 0.700), (8, 0.730), (9, 0.720), (10, 0.700)], True),  # noisy evaluations, no trend: -0.2 points
        ([(7, 0.72), (8, 0.71), (9, 0.70), (10, 0.69)], False),  # falling counts too
        ([(1, 0.5), (7, 0.700), (8, 0.702), (10, 0.701)], True),  # the early rounds play no part
    ],
)
def test_convergence_rule(curve, flat):
    """A line through the last 40% of rounds' evaluations, its change over the last 20% (2 rounds of 10)."""
    points = [{"round": r, "balanced_accuracy": v} for r, v in curve]
    assert paper.converged(points, 10, "balanced_accuracy", False)[0] is flat


def test_convergence_needs_three_evaluations_in_the_window():
    assert paper.converged([{"round": 9, "loss": 1.0}, {"round": 10, "loss": 1.0}], 10, "loss", True) == (None, None)
    flat, change = paper.converged([{"round": r, "loss": 2.0 - 0.01 * r} for r in (7, 8, 9, 10)], 10, "loss", True)
    assert flat is False and change == pytest.approx(-0.02 / 1.915)  # relative to the line's mean loss


def test_too_few_evaluations_are_shown_not_judged():
    """The NLG setting evaluates at rounds 5, 10, 15: no line to fit, so its last step is shown
    as information and the setting is called not judged rather than not converged."""
    curve = [{"round": r, "loss": v} for r, v in ((5, 3.34), (10, 3.20), (15, 3.12))]
    assert paper.converged(curve, 15, "loss", True) == (None, None)
    last = paper.last_step(curve, "loss", True)
    assert last == {"from_round": 10, "to_round": 15, "change": pytest.approx(-0.08 / 3.20)}
    method = {"last_20pct_change": {"seed_mean": None}, "converged": None, "last_two_evaluations": last}
    assert paper._trend(method, True) == "not judged (under 3 evaluations in the last 40%); rounds 10 to 15: -2.5%"
    assert paper._convergence({"converged": False, "convergence_judged": False}).startswith("convergence not judged")
    assert paper._convergence({"converged": False, "convergence_judged": True}) == "NOT converged by the rule"
    assert paper.last_step(curve[:1], "loss", True) is None


@pytest.mark.parametrize(
    ("dataset", "losses", "failed"),
    [
        ("rotten-tomatoes", [0.68, 0.45, 0.31], None),  # trained
        ("rotten-tomatoes", [41.5, 60.9, 61.7], 61.7),  # blown up (PF2LoRA's private head at lower_lr 1): flat, yet no model
        ("rotten-tomatoes", [0.5, float("nan")], None),  # a non-finite loss is the engine's to reject, not this rule's
        ("wordnet-topics", [3.1, 2.9], None),  # below ln 25 = 3.22: 25 classes
        ("wordnet-topics", [3.1, 3.3], 3.3),
    ],
)
def test_a_run_whose_training_loss_ends_above_a_uniform_guess_did_not_train(dataset, losses, failed):
    run = {"train_loss_per_round": losses, "config": {"task": {"dataset": dataset}}}
    assert paper.failed_to_train(run, False) == failed


@pytest.mark.parametrize(
    ("losses", "failed"),
    [
        ([4.72, 3.75, 3.16], None),  # HOMLoRA on the NLG setting
        ([4.41, 6.52, 8.04, 8.15], 8.15),  # PF2LoRA there at optim.lower_lr = 0.5: its private adapters blew up
        ([4.4, float("nan")], None),
    ],
)
def test_a_generation_run_whose_training_loss_ends_above_its_first_rounds_did_not_train(losses, failed):
    run = {"train_loss_per_round": losses, "config": {"task": {"dataset": "wordnet-definitions"}}}
    assert paper.failed_to_train(run, True) == failed
    if failed:
        method = {"last_20pct_change": {"seed_mean": None}, "last_two_evaluations": {"from_round": 10, "to_round": 15, "change": 0.01}}
        method["failed_to_train"] = {"0": failed}
        assert paper._trend(method, True) == "not judged; DID NOT TRAIN (seed 0: final training loss 8.2, above its first round's)"


def test_mean_curve_keeps_the_rounds_every_seed_evaluated():
    a = [{"round": 1, "x": 0.2}, {"round": 2, "x": 0.4}]
    b = [{"round": 2, "x": 0.6}]
    assert paper.mean_curve([a, b], "x") == [{"round": 2, "x": pytest.approx(0.5)}]


def test_head_to_head_pairs_seeds_and_calls_ties_within_noise():
    """The verdict rule: paired by seed, a lead must hold on every seed and exceed its std."""

    def runs(*values: float) -> dict:
        return {"seeds": {str(i): {"balanced_accuracy": v} for i, v in enumerate(values)}}

    methods = {
        "pf2lora": runs(0.70, 0.72, 0.74),
        "clear": runs(0.60, 0.63, 0.65),  # leads 0.10, 0.09, 0.09
        "noisy": runs(0.65, 0.75, 0.73),  # leads +0.05, -0.03, +0.01
        "better": runs(0.80, 0.81, 0.85),
        "one_seed": {"seeds": {"1": {"balanced_accuracy": 0.75}}},
    }
    got = paper.head_to_head(methods, "balanced_accuracy", higher=True)
    assert got["clear"]["verdict"] == "wins" and got["clear"]["lead_mean"] == pytest.approx(0.28 / 3)
    assert got["noisy"]["verdict"].startswith("ties")
    assert got["better"]["verdict"] == "loses"
    assert got["one_seed"] == {
        "metric": "balanced_accuracy",
        "lead_mean": pytest.approx(-0.03),
        "lead_std": 0.0,
        "seeds": ["1"],
        "verdict": "behind",
    }
    # lower is better (generation loss): a smaller loss is a lead
    loss = paper.head_to_head(
        {"pf2lora": {"seeds": {"0": {"loss": 2.0}}}, "homlora": {"seeds": {"0": {"loss": 2.5}}}}, "loss", higher=False
    )
    assert loss["homlora"]["lead_mean"] == pytest.approx(0.5) and loss["homlora"]["verdict"] == "ahead"


def test_verdict_table_puts_every_setting_s_lead_side_by_side():
    """One row per method, the paper's baselines first; a setting that never ran a method shows
    "-"; one seed gets no spread and says so; the plain-accuracy table only where it was computed."""

    def lead(mean: float, std: float, seeds: list[str], verdict: str) -> dict:
        return {"lead_mean": mean, "lead_std": std, "seeds": seeds, "verdict": verdict}

    data = {
        "tier": "cpu",
        "settings": {
            "rt_s03": {
                "pf2lora_vs": {
                    "local": lead(-0.007, 0.022, ["0", "1"], "ties (within seed noise)"),
                    "homlora": lead(-0.108, 0.016, ["0", "1", "2"], "loses"),
                    "she-lora": lead(-0.078, 0.007, ["0", "1"], "loses"),
                },
                "pf2lora_vs_in_accuracy": {"homlora": lead(0.071, 0.008, ["0", "1", "2"], "wins")},
            },
            "wordnet_nlg": {"pf2lora_vs": {"homlora": lead(0.0123, 0.0, ["0"], "ahead")}},
            "rt_s05": {"methods": {}},  # no PF2LoRA run yet: no column
        },
    }
    got = paper.verdict_table(data).split("\n")
    assert got[2] == "| against | `rt_s03` | `wordnet_nlg` |"
    rows = [line for line in got if line.startswith("| ") and not line.startswith("| against")]
    assert [r.split(" |")[0] for r in rows[:3]] == ["| homlora", "| local", "| she-lora"]
    assert rows[0] == "| homlora | -0.108 ± 0.016 loses (3 seeds) | +0.0123 ahead (1 seed) |"
    assert rows[1] == "| local | -0.007 ± 0.022 ties (2 seeds) | - |"
    accuracy = got.index(next(line for line in got if line.startswith("*PF2LoRA against each method in plain accuracy")))
    assert got[accuracy + 2] == "| against | `rt_s03` |"
    assert got[accuracy + 4] == "| homlora | +0.071 ± 0.008 wins (3 seeds) |"
    assert paper.verdict_table({"tier": "cpu", "settings": {"rt_s05": {"methods": {}}}}) == ""


def test_pf2lora_client_evidence_is_the_seed_mean_most_heterogeneous_first():
    def client(bal, maj_pred, norm, ranks, tv):
        return {
            "balanced_accuracy": bal,
            "global_balanced_accuracy": 0.7,
            "majority_share": 0.8,
            "majority_predicted": maj_pred,
            "global_majority_predicted": 0.6,
            "private_norm": norm,
            "layer_ranks": ranks,
            "heterogeneity": {"label_tv": tv, "majority_share": 0.5 + tv},
        }

    seeds = {
        "0": {"clients": {"c0": client(0.6, 0.9, 4.0, {"q": 2, "v": 4}, 0.1), "c1": client(0.8, 0.7, 2.0, {"q": 1, "v": 1}, 0.3)}},
        "1": {"clients": {"c0": client(0.7, 0.8, 6.0, {"q": 4, "v": 4}, 0.1), "c1": client(0.9, 0.5, 2.0, {"q": 1, "v": 3}, 0.3)}},
    }
    ev = paper.pf2lora_clients({"seeds": seeds})
    assert ev["c0"]["balanced_accuracy"] == pytest.approx(0.65) and ev["c0"]["private_norm"] == pytest.approx(5.0)
    assert ev["c0"]["mean_layer_rank"] == pytest.approx(3.5) and ev["c1"]["majority_predicted"] == pytest.approx(0.6)
    lines = [line for line in paper.client_table("s", ev, 2).splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in lines}) == 1, lines
    assert lines[2].startswith("| c1 | 0.30 / 0.80 |") and lines[3].startswith("| c0 |")  # the more skewed first


def test_readme_refresh_replaces_tables_by_caption_and_keeps_the_prose():
    readme = "\n".join([
        "# Results", "",
        "**rt_s03** (RT, MiniLM-L6, 100 rounds; seeds 0; incomplete)", "", "| m | x |", "|---|---|", "| a | 1 |", "",
        "*rt_s03: PF2LoRA's lead (positive: better)*", "", "| against | lead |", "|---|---|", "| a | +1 |", "",
        "Prose about the GPU tier.", "",
        "**rt_s03** (RT; seeds 0; incomplete)", "", "| m | x |", "|---|---|", "| a | 2 |", "",
        "*rt_s03: PF2LoRA's lead (positive: better)*", "", "| against | lead |", "|---|---|", "| a | +2 |", "",
        "Prose about the CPU tier, kept.", "",
    ])  # fmt: skip
    tables = "\n".join([
        "**rt_s03** (RT; seeds 0, 1; complete)", "", "| m | x | y |", "|---|---|---|", "| a | 3 | 4 |", "| b | 5 | 6 |", "",
        "*rt_s03: PF2LoRA's lead (positive: better; and in accuracy)*", "", "| against | lead | acc |", "|---|---|---|", "| a | +3 | +4 |", "",
        "**vader** (VADER; seeds 0; incomplete)", "", "| m |", "|---|", "| a |", "",
    ])  # fmt: skip
    text, done, missing = paper.refresh_readme(readme, tables)
    assert len(done) == 2 and missing == ["**vader** (VADER; seeds 0; incomplete)"]
    assert "| a | 1 |" in text and "| a | +1 |" in text  # the other tier's tables (another caption) stay
    assert "| a | 2 |" not in text and "| a | +2 |" not in text
    cpu = text.split("Prose about the GPU tier.", 1)[1]
    assert cpu.index("**rt_s03** (RT; seeds 0, 1; complete)") < cpu.index("| b | 5 | 6 |") < cpu.index("| a | +3 | +4 |")
    assert cpu.rstrip().endswith("Prose about the CPU tier, kept.")
    assert paper.refresh_readme(text, tables)[0] == text  # idempotent


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """The driver (one process per run, as unattended nights run it): a run whose config is bad
    fails in its process, is reported in one line and not retried by this call; the next run
    still runs, the summary is written, and the exit status says that one failed."""
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("rounds = 3", "rounds = 1"))
    setting = paper.Setting(str(config), (0,), ("no-such-method", "homlora"), tuning="none", about="tiny")
    monkeypatch.setattr(paper, "TIERS", {"t": {"a": setting}})
    out, summary = tmp_path / "results", tmp_path / "summary.json"
    assert paper.drive("t", out, summary, ["a"], None, 1, 0.0) == 1
    captured = capsys.readouterr()
    assert "FAILED a/no-such-method/seed0.json:" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert (out / "a" / "homlora" / "seed0.json").exists() and not (out / "a" / "no-such-method").exists()
    assert "1 runs finished, 1 failed; 1 ready" in captured.out
    assert json.loads(summary.read_text())["settings"]["a"]["methods"].keys() == {"homlora"}


def _tiny_nlg(tmp_path: Path, tiny_llama, gen_jsonl) -> Path:
    config = tmp_path / "tiny_nlg.toml"  # "nlg" in the name: a generation setting
    config.write_text(
        f"""name = "tiny_nlg"
methods = ["homlora", "pf2lora"]
rounds = 2
local_steps = 1
batch_size = 4
num_threads = 1
[task]
kind = "generation"
model = "{tiny_llama}"
dataset = "jsonl"
data_path = "{gen_jsonl}"
text_column = "src"
target_column = "tgt"
group_column = "who"
num_clients = 2
max_length = 16
eval_generate = 2
max_new_tokens = 3
[lora]
rank = 2
alpha = 2.0
private_rank = 1
private_alpha = 1.0
[optim]
lower_lr = 0.3
[eval]
every = 1
"""
    )
    return config


def test_a_generation_setting_makes_its_summary_table_and_figures(tiny_llama, gen_jsonl, tmp_path, monkeypatch):
    """The NLG setting (last in the benchmark's order): lower loss is better, no accuracy columns."""
    config = _tiny_nlg(tmp_path, tiny_llama, gen_jsonl)
    setting = paper.Setting(str(config), (0,), ("homlora", "pf2lora"), tuning="none", about="tiny NLG")
    monkeypatch.setattr(paper, "TIERS", {"t": {"nlg": setting}})
    out = tmp_path / "results"
    for job in paper.ready("t", out, ["nlg"], None)[0]:
        paper.run_job(setting, job)
    data = paper.collect("t", out)
    e = data["settings"]["nlg"]
    assert e["complete"] and e["tuning"] is not None and "pf2lora_vs_in_accuracy" not in e
    lead = e["pf2lora_vs"]["homlora"]
    runs = {m: e["methods"][m]["seeds"]["0"] for m in ("homlora", "pf2lora")}
    assert lead["metric"] == "loss" and lead["lead_mean"] == pytest.approx(runs["homlora"]["loss"] - runs["pf2lora"]["loss"])
    text = paper.table(data)
    assert "| method | loss | perplexity | BLEU | ROUGE-L |" in text and "lead in accuracy" not in text
    assert [p.name for p in paper.figures(data, tmp_path / "fig")] == ["curves_nlg.png", "pf2lora_ranks.png"]


def test_an_extra_search_tunes_only_the_extra_step_size_by_the_lowest_loss(tiny_llama, gen_jsonl, tmp_path, monkeypatch):
    """The NLG setting's tuning: the config's AdamW lr for all, each extra step size at 0.1x, 0.3x
    and 1x its config value on the validation federation for ``tuning_rounds``; a method without
    one runs at once and is never superseded; the lowest validation loss is chosen."""
    config = _tiny_nlg(tmp_path, tiny_llama, gen_jsonl)
    monkeypatch.setattr(paper, "EXTRA_GRID", {"pf2lora": ("optim.lower_lr", (9.0,))})  # an extra search ignores the grid's values
    setting = paper.Setting(str(config), (0,), ("homlora", "pf2lora"), tuning="extra", tuning_rounds=1, about="tiny NLG")
    monkeypatch.setattr(paper, "TIERS", {"t": {"nlg": setting}})
    out = tmp_path / "results"
    paper.run_job(setting, paper.Job("nlg", "pf2lora", 0, (), out / "nlg" / "pf2lora" / "seed0.json"))  # at the config's values
    assert "pf2lora_vs" not in paper.collect("t", out)["settings"]["nlg"]  # no verdict from a run made before its tuning
    jobs, waiting = paper.ready("t", out, ["nlg"], None)
    assert [(j.method, j.tuning) for j in jobs] == [("pf2lora", True)] * 3 + [("homlora", False)] and waiting == 0
    assert [j.path.stem for j in jobs[:3]] == ["optim.lower_lr=0.03", "optim.lower_lr=0.09", "optim.lower_lr=0.3"]
    assert all({"task.data_seed=4321", "rounds=1", "eval.every=1"} <= set(j.overrides) for j in jobs[:3])
    for job in jobs:
        paper.run_job(setting, job)
    base = [json.loads(j.path.read_text())["summary"]["loss"] for j in jobs[:3]]
    edge = {0: "optim.lower_lr=0.009", 2: "optim.lower_lr=0.9"}.get(base.index(min(base)))
    if edge:  # the best of the three on the grid's edge: one more value beyond it, first
        jobs, _ = paper.ready("t", out, ["nlg"], None)
        assert [j.path.stem for j in jobs] == [edge]
        paper.run_job(setting, jobs[0])
    choice, scores = paper.chosen("t", out, "nlg", "pf2lora")
    best = min(scores, key=scores.__getitem__)
    assert choice == ({} if best == "optim.lower_lr=0.3" else {"optim.lower_lr": float(best.split("=")[1])})
    assert paper.chosen("t", out, "nlg", "homlora") == ({}, {})
    jobs, waiting = paper.ready("t", out, ["nlg"], None)
    if best != "optim.lower_lr=0.3":  # another step size than the stored run's: it runs again
        assert [(j.method, j.seed) for j in jobs] == [("pf2lora", 0)] and waiting == 0
        paper.run_job(setting, jobs[0])
    run = json.loads((out / "nlg" / "pf2lora" / "seed0.json").read_text())
    assert run["config"]["optim"]["lower_lr"] == float(best.split("=")[1]) and run["config"]["task"]["data_seed"] != 4321
    assert paper.ready("t", out, ["nlg"], None) == ([], 0)
    data = paper.collect("t", out)
    rec = data["settings"]["nlg"]["tuning"]
    assert rec["mode"] == "extra" and list(rec["methods"]) == ["pf2lora"] and rec["methods"]["pf2lora"]["scores"] == scores
    text = paper.table(data)
    assert f"| pf2lora | `{best}` | {scores[best]:.3f} |" in text and text.count("| yes |") == 1
    assert "lower is better" in text and "pf2lora_vs" in data["settings"]["nlg"]


@pytest.mark.parametrize(
    ("losses", "extra"),
    [
        ((3.68, 5.05, 8.19), "optim.lower_lr=0.015"),  # PF2LoRA on the NLG setting: best at the bottom edge
        ((3.69, 3.69, 3.67), "optim.lower_lr=1.5"),  # best at the top edge (Per-FedAvg there)
        ((3.70, 3.60, 3.65), None),  # inside: the three are the search
        ((3.60, 3.60, 3.65), "optim.lower_lr=0.015"),  # a tie: the first of equals, on the edge
    ],
)
def test_an_extra_search_goes_once_beyond_the_edge_its_best_lies_on(tmp_path, monkeypatch, losses, extra):
    config = tmp_path / "x_nlg.toml"
    config.write_text('name = "x_nlg"\nmethods = ["pf2lora"]\n[task]\nkind = "tiny-text"\n[optim]\nlower_lr = 0.5\n')
    setting = paper.Setting(str(config), (0,), ("pf2lora",), tuning="extra", tuning_rounds=3)
    monkeypatch.setattr(paper, "TIERS", {"t": {"x": setting}})
    out = tmp_path / "results"
    cells = paper.extra_stage("t", out, "x", "pf2lora")
    assert [j.path.stem for j in cells] == ["optim.lower_lr=0.05", "optim.lower_lr=0.15", "optim.lower_lr=0.5"]
    for job, loss in zip(cells, losses, strict=True):
        job.path.parent.mkdir(parents=True, exist_ok=True)
        job.path.write_text(json.dumps({"summary": {"loss": loss}}))
    after = [j.path.stem for j in paper.extra_stage("t", out, "x", "pf2lora")]
    assert after == sorted({*(j.path.stem for j in cells), *([extra] if extra else [])}, key=lambda n: float(n.split("=")[1]))
    assert (paper.chosen("t", out, "x", "pf2lora") is None) == bool(extra)  # no choice before the extra cell


def test_checkpoints_wait_their_interval_and_a_bad_or_stale_one_is_dropped(tier, monkeypatch, capsys):
    setting = paper.TIERS["t"]["a"]
    job = paper.Job("a", "homlora", 0, ("optim.lr=0.03",), tier / "a" / "homlora" / "seed0.json")
    calls = []
    save = paper.save_partial
    monkeypatch.setattr(paper, "save_partial", lambda partial, payload: calls.append(payload["current"]["round"]))
    paper.run_job(setting, job)
    assert calls == []  # rounds of milliseconds: none within the interval (30 s), so no cost on a GPU either
    monkeypatch.setattr(paper, "save_partial", save)

    # a checkpoint whose state does not fit this code's RunState: dropped with a line, run afresh
    monkeypatch.setattr(paper, "CHECKPOINT_EVERY_S", 0.0)
    job.path.unlink()
    partial = paper.partial_dir(job)
    payload = {"engine": "local", "job": paper._job_key(job), "current": {"method": "homlora", "round": 1, "no_such_field": 0}}
    paper.save_partial(partial, payload)
    cfg = paper.load_config(setting, [*job.overrides, "seed=0", 'methods=["homlora"]'])
    payload["config"] = dataclasses.asdict(cfg)
    paper.save_partial(partial, payload)
    assert paper.resumable(partial, job, cfg) == (None, [])
    assert "its state does not fit this code's" in capsys.readouterr().err and not partial.exists()

    # a finished run's checkpoint (a kill between its result and the cleanup) is removed, not resumed,
    # once the run is known to be at the chosen step sizes
    paper.run_job(setting, job)
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"stale")
    paper.ready("t", tier, ["a"], ["homlora"])
    assert partial.exists()  # homlora's tuning is not done: the run may be run again, its checkpoint stays
    monkeypatch.setattr(paper, "step_sizes", lambda *_: ("optim.lr=0.03",))
    paper.ready("t", tier, ["a"], ["homlora"])
    assert not partial.exists()


def test_readme_refresh_leaves_a_caption_that_occurs_twice_alone():
    table = ["", "| m |", "|---|", "| a |", ""]
    readme = "\n".join(["**rt_s03** (RT; seeds 0)", *table, "**rt_s03** (RT; seeds 0)", *table])
    text, done, missing = paper.refresh_readme(readme, "\n".join(["**rt_s03** (RT; seeds 0, 1)", "", "| m |", "|---|", "| b |", ""]))
    assert text == readme and done == [] and missing == ["**rt_s03** (RT; seeds 0, 1)"]


def test_pf2lora_against_its_first_order_ablation_cell_by_cell():
    rec = {
        "score": "s",
        "methods": {
            "pf2lora": {
                "scores": {"lr=0.01": 0.6, "lr=0.001": 0.7, "lr=0.003,optim.lower_lr=0.3": 0.5, "lr=0.003": 0.65},
                "extra_step_size": {"key": "optim.lower_lr", "values": [0.3, 1.0, 3.0], "config_value": 1.0},
            },
            "pf2lora-fo": {"scores": {"lr=0.01": 0.7, "lr=0.001": 0.6, "lr=0.003,optim.lower_lr=3": 0.9, "lr=0.003": 0.65}},
        },
    }
    text = paper.same_cells_table("x", rec, "pf2lora", "pf2lora-fo")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [  # the cells both ran, by step size; a cell only one method ran is left out
        "| `lr=0.001` | 0.700 | 0.600 | +0.100 |",
        "| `lr=0.003` | 0.650 | 0.650 | +0.000 |",
        "| `lr=0.01` | 0.600 | 0.700 | -0.100 |",
    ]
    assert "`optim.lower_lr=1` where a cell names no other" in text
    assert text.splitlines()[-1] == "| mean of the 3 cells (pf2lora ahead in 1) | 0.650 | 0.650 | +0.000 |"
    rec["methods"]["pf2lora-fo"]["scores"] = {"lr=0.1": 0.5}
    assert paper.same_cells_table("x", rec, "pf2lora", "pf2lora-fo") == ""
    del rec["methods"]["pf2lora-fo"]
    assert paper.same_cells_table("x", rec, "pf2lora", "pf2lora-fo") == ""


def _state(pid: int) -> str | None:
    """A process's state letter (``Z``: exited, not yet reaped), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_run_ends_when_its_driver_is_killed_alone():
    """The driver killed by a signal to it alone: its run does not go on as an orphan."""
    import subprocess

    child = (
        f"import os, sys, time; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import paper; "
        "paper.exit_with_parent(os.getppid(), poll_s=0.05); print('ready', flush=True); time.sleep(60)"
    )
    driver = (
        "import os, subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True); "
        "p.stdout.readline(); print(p.pid, flush=True); os._exit(0)"  # gone without a word to its child
    )
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60, check=True).stdout
    pid = int(out.split()[0])
    deadline = time.time() + 20
    while _state(pid) not in (None, "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(pid) in (None, "Z")

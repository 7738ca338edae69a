"""benchmarks/pf2lora_ablation.py: its runs are the tuning cells with only the estimator changed,
and its table subtracts the right runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper
import pf2lora_ablation as ablation
import test_paper_benchmark


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(test_paper_benchmark.TINY)  # paper.py's tiny tier, smaller still, with the lower-level lr at a grid value
    overrides = ("rounds=2", "task.num_clients=2", "optim.lower_lr=1.0")
    monkeypatch.setattr(paper, "TIERS", {"cpu": {"rt_s03": paper.Setting(str(config), (0,), ("pf2lora",), overrides, tuning="tune")}})
    monkeypatch.setattr(ablation, "CELLS", ((3e-3, 0.1), (1e-2, 1.0)))
    return tmp_path / "results"


def _stored(path: Path, value: float, earlier: tuple[float, float] = (0.0, 0.0)) -> None:
    """A run file whose last evaluation is ``value``, after ``earlier`` ones (and one before them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = [{"round": r, "balanced_accuracy": v} for r, v in enumerate((0.9, *earlier, value))]
    path.write_text(json.dumps({"summary": {"balanced_accuracy": value}, "curve": curve}))


def test_each_run_is_its_tuning_cell_with_only_the_variants_overrides_added(tiny):
    jobs = ablation.jobs(tiny)
    assert len(jobs) == len(ablation.VARIANTS) * len(ablation.CELLS)
    variants = [(v, extra, cell) for v, extra in ablation.VARIANTS.items() for cell in ablation.CELLS]
    for job, (variant, extra, (lr, lower)) in zip(jobs, variants, strict=True):
        cell = paper.tuning_job("cpu", tiny / "paper_cpu", "rt_s03", "pf2lora", lr, None if lower == 1.0 else lower)
        assert job.overrides == (*cell.overrides, *extra)
        assert job.path == tiny / ablation.ABLATION / variant / cell.path.name  # beside paper_cpu/, not in it
        assert "paper_cpu" not in job.path.relative_to(tiny).parts
        cfg = paper.load_config(paper.TIERS["cpu"]["rt_s03"], job.overrides)
        assert (cfg.pf2lora.estimator, cfg.optim.lr, cfg.optim.lower_lr, cfg.task.data_seed) == ("first-order", lr, lower, 4321)
        assert cfg.pf2lora.one_batch == variant.endswith("one-batch")


def test_table_splits_the_gap_into_the_term_the_second_batch_and_the_gradient_at_the_stepped_adapter(tiny):
    tuning = tiny / "paper_cpu" / "tuning" / "rt_s03"
    two, one = (tiny / ablation.ABLATION / v for v in ablation.VARIANTS)
    first, second = (j.path.name for j in ablation.jobs(tiny)[:2])
    _stored(tuning / "pf2lora" / first, 0.70, (0.5, 0.6))  # mean of the last 3: 0.6
    _stored(two / first, 0.65, (0.5, 0.5))  # 0.55
    _stored(one / first, 0.62, (0.5, 0.5))  # 0.54
    _stored(tuning / "pf2lora-fo" / first, 0.60, (0.6, 0.6))  # 0.6
    _stored(tuning / "pf2lora" / second, 0.50)  # no variant run yet: no differences for this cell
    rows = ablation.table(tiny).splitlines()
    assert rows[4] == (
        f"| `{Path(first).stem}` | 0.700 (0.600) | 0.650 (0.550) | 0.620 (0.540) | 0.600 (0.600) "
        "| +0.050 (+0.050) | +0.030 (+0.010) | +0.020 (-0.060) | +0.050 (-0.050) |"
    )
    assert rows[5] == f"| `{Path(second).stem}` | 0.500 (0.167) | - | - | - | - | - | - | - |"
    assert rows[6].endswith("| +0.050 (+0.050) | +0.030 (+0.010) | +0.020 (-0.060) | +0.050 (-0.050) |")


def test_evidence_table_shows_each_runs_global_model_and_private_size(tiny):
    tuning = tiny / "paper_cpu" / "tuning" / "rt_s03"
    two = tiny / ablation.ABLATION / next(iter(ablation.VARIANTS))
    first, second = (j.path.name for j in ablation.jobs(tiny)[:2])
    summaries = {tuning / "pf2lora" / first: (0.71, 8.96), two / first: (0.652, 17.6), tuning / "pf2lora-fo" / second: (0.7, 0.321)}
    for path, (global_model, norm) in summaries.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"balanced_accuracy": 0.5, "global_balanced_accuracy": global_model, "private_norm": norm}
        path.write_text(json.dumps({"summary": summary, "curve": [{"round": 1, "balanced_accuracy": 0.5}]}))
    rows = ablation.evidence_table(tiny).splitlines()
    assert rows[4] == f"| `{Path(first).stem}` | 0.710 / 8.96 | 0.652 / 17.60 | - | - |"
    assert rows[5] == f"| `{Path(second).stem}` | - | - | - | 0.700 / 0.32 |"
    # its caption differs from the first table's, so --readme puts each in its own place
    both = ablation.tables(tiny)
    assert len(paper.refresh_readme(f"intro\n\n{both}\nprose", both)[1]) == 2


def test_missing_cells_run_once_and_stored_ones_are_skipped(tiny, capsys):
    ablation.run(tiny)
    files = sorted((tiny / ablation.ABLATION).glob("*/*.json"))
    assert files == sorted(j.path for j in ablation.jobs(tiny))
    for path in files:
        run = json.loads(path.read_text())
        assert run["config"]["pf2lora"]["estimator"] == "first-order" and run["method"] == "pf2lora"
        assert run["config"]["pf2lora"]["one_batch"] == path.parent.name.endswith("one-batch")
    assert not list((tiny / ablation.ABLATION).glob("*/*.partial"))
    stamp = [p.stat().st_mtime_ns for p in files]
    capsys.readouterr()
    ablation.run(tiny)
    assert [p.stat().st_mtime_ns for p in files] == stamp and capsys.readouterr().out == ""

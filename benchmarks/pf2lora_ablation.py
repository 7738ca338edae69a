"""What in PF2LoRA's bilevel step makes the difference to its no-bilevel ablation?

``pf2lora-fo`` (the ablation in ``paper.py``'s matrix) differs from ``pf2lora`` in two ways at once:
PF2LoRA takes an unrolled step (the private adapter's SGD step on one mini-batch, then the common
adapter's gradient at that stepped private adapter on a second mini-batch) and adds the
hypergradient term ``-eta H_xy v``; PF2LoRA-FO takes one joint step on one mini-batch. PF2LoRA's
own ``pf2lora.estimator = "first-order"`` keeps the unrolled two-batch step and drops only the
term (the spec's "first-order" estimator), and ``pf2lora.one_batch = true`` takes that step on
one mini-batch, so four runs at the same step sizes split the gap in three:

    term         = pf2lora - pf2lora[first-order]
    second batch = pf2lora[first-order] - pf2lora[first-order, one batch]
    gradient at the stepped adapter = pf2lora[first-order, one batch] - pf2lora-fo

(the last two together: the unrolled two-batch step). The variants' runs use ``paper.py``'s
tuning cells (the validation federation of ``rt_s03``, seed 0, 30 rounds); the two other columns
are ``paper.py``'s stored tuning runs of those cells.
Resumable like ``paper.py`` (one JSON per cell, skipped when present; a cut-off run resumes from
its checkpoint). One seed and 8 clients of 200 test examples: differences of about 0.01 are noise.

    .venv/bin/python benchmarks/pf2lora_ablation.py            # run the missing cells (one process)
    .venv/bin/python benchmarks/pf2lora_ablation.py --table    # the tables, from the files
    .venv/bin/python benchmarks/pf2lora_ablation.py --readme   # ... and in place in README.md (each by its caption)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import paper
from common import RESULTS, ROOT

TIER, SETTING = "cpu", "rt_s03"
ABLATION = Path("paper_cpu_ablation") / SETTING
"""Under the results folder beside ``paper_cpu/``, not in it (``paper.py`` reads every run file
under its own folder); a folder per variant."""
VARIANTS: dict[str, tuple[str, ...]] = {
    "pf2lora-first-order-estimator": ("pf2lora.estimator=first-order",),
    "pf2lora-first-order-estimator-one-batch": ("pf2lora.estimator=first-order", "pf2lora.one_batch=true"),
}
"""PF2LoRA's runs besides its tuning runs: a folder name and the overrides that make the variant."""
CELLS = ((3e-3, 0.1), (3e-3, 1.0), (1e-2, 0.1), (1e-2, 1.0))
"""(AdamW lr, lower-level lr): the 2 x 2 block of the grid around both methods' best cells so far,
with the two largest gaps between them (2026-12-05)."""


def jobs(results: Path = RESULTS) -> list[paper.Job]:
    """One run per variant and cell (variant by variant), named and configured as that cell's
    tuning run plus the variant's overrides."""
    centre = paper.config_value(paper.TIERS[TIER][SETTING], "optim.lower_lr")
    found = []
    for variant, extra in VARIANTS.items():
        for lr, lower in CELLS:
            cell = paper.tuning_job(TIER, results / f"paper_{TIER}", SETTING, "pf2lora", lr, None if lower == centre else lower)
            found.append(dataclasses.replace(cell, overrides=(*cell.overrides, *extra), path=results / ABLATION / variant / cell.path.name))
    return found


LAST = paper.LAST_EVALUATIONS


def scores(path: Path) -> tuple[float, float] | None:
    """(the run's score as ``paper.py`` tunes by: its last evaluation; the mean of its last
    ``LAST`` evaluations, less at the mercy of where a swing of its curve ends), or None when the
    run is still to come."""
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run["summary"]["balanced_accuracy"], paper.mean_of_last(run)


RUNS = "pf2lora | pf2lora, first-order estimator | the same, one batch | pf2lora-fo"
"""The tables' run columns, in :func:`cell_runs`' order."""


def cell_runs(results: Path, name: str) -> tuple[Path, Path, Path, Path]:
    """A cell's four run files: pf2lora and pf2lora-fo (``paper.py``'s tuning runs) and the two
    variants between them, in the tables' column order."""
    tuning = paper.tuning_dir(results / f"paper_{TIER}", SETTING, "pf2lora").parent
    two, one = VARIANTS
    return tuning / "pf2lora" / name, results / ABLATION / two / name, results / ABLATION / one / name, tuning / "pf2lora-fo" / name


def table(results: Path = RESULTS) -> str:
    """Markdown: per cell the four runs' scores and the differences, each as the last
    evaluation (the mean of the last ``LAST``); missing runs are ``-``."""

    def fmt(v: tuple[float, float] | None, sign: str = "") -> str:
        return f"{v[0]:{sign}.3f} ({v[1]:{sign}.3f})" if v is not None else "-"

    def minus(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[float, float] | None:
        return (a[0] - b[0], a[1] - b[1]) if a is not None and b is not None else None

    rows: list[str] = []
    diffs: list[list[tuple[float, float]]] = [[], [], [], []]
    for job in jobs(results)[: len(CELLS)]:
        full, fo_two, fo_one, joint = (scores(p) for p in cell_runs(results, job.path.name))
        parts = (minus(full, fo_two), minus(fo_two, fo_one), minus(fo_one, joint), minus(fo_two, joint))
        for d, v in zip(diffs, parts, strict=True):
            d += [v] if v is not None else []
        cells = [fmt(v) for v in (full, fo_two, fo_one, joint)] + [fmt(v, "+") for v in parts]
        rows.append(f"| `{job.path.stem}` | " + " | ".join(cells) + " |")
    means = [fmt((statistics.fmean(v[0] for v in d), statistics.fmean(v[1] for v in d)), "+") if d else "-" for d in diffs]
    return (
        "\n".join(
            [
                f"**{SETTING}: what PF2LoRA's bilevel step adds, split in three (clients' mean personalised balanced accuracy on the "
                f"validation federation, seed 0, at the last evaluation and, in parentheses, the mean of the last {LAST} "
                "(rounds 24 to 30); the term: pf2lora minus pf2lora with `pf2lora.estimator=first-order`; the second batch: "
                "that minus the same on one mini-batch (`pf2lora.one_batch=true`); the gradient at the stepped adapter: that "
                "minus pf2lora-fo; the last two together: the unrolled two-batch step; `optim.lower_lr=1` where a cell names no other)**\n",
                f"| cell | {RUNS} | the hypergradient term | the second batch | the gradient at the stepped adapter "
                "| the unrolled two-batch step |",
                "|---|---|---|---|---|---|---|---|---|",
                *rows,
                f"| mean over the cells with both runs | | | | | {' | '.join(means)} |",
            ]
        )
        + "\n"
    )


def evidence_table(results: Path = RESULTS) -> str:
    """Markdown: per cell and run, what the common adapter learned alone (the global model's
    balanced accuracy) and how large the private adapter grew (the clients' mean norm of what a
    personal model adds): where a step leaves the shared model weaker and the private part larger,
    the private adapter took over what the federation could have learned (``-``: to come)."""
    rows: list[str] = []
    for job in jobs(results)[: len(CELLS)]:
        cells = []
        for path in cell_runs(results, job.path.name):
            s = json.loads(path.read_text())["summary"] if path.exists() else None
            cells.append(f"{s['global_balanced_accuracy']:.3f} / {s['private_norm']:.2f}" if s else "-")
        rows.append(f"| `{job.path.stem}` | " + " | ".join(cells) + " |")
    return (
        "\n".join(
            [
                f"*{SETTING}: the same runs' global model (the common adapter alone: its clients' mean balanced accuracy at the "
                "last evaluation) / the private adapter's size (the clients' mean norm of what a personal model adds to the "
                "common adapter)*\n",
                f"| cell | {RUNS} |",
                "|---|---|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )


def tables(results: Path = RESULTS) -> str:
    """Both tables, as ``--table`` prints them and ``--readme`` places them (each by its caption)."""
    return table(results) + "\n" + evidence_table(results)


def run(results: Path = RESULTS) -> None:
    """Run the cells whose file is missing, one after another, on one thread each."""
    setting = paper.TIERS[TIER][SETTING]
    for job in jobs(results):
        if job.path.exists():
            continue
        data = paper.run_job(setting, job)
        print(f"{job.path.relative_to(results)}: {data['summary']['balanced_accuracy']:.4f} ({data['wall_time_s']:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--table", action="store_true", help="print the table from the run files and exit")
    parser.add_argument("--readme", action="store_true", help="put the table in place in README.md (by its caption) and exit")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.table or args.readme:
        text = tables()
        if args.table:
            print(text)
            return 0
        paper.write_readme(text)
        return 0
    run()
    print(tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())

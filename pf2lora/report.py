"""Run directory outputs: config.toml, metrics.jsonl, summary.json, report.md and PNG figures.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written summary behind and an earlier result stays readable until the new one replaces it.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pf2lora.engines.rounds import MethodResult
from pf2lora.errors import UserError
from pf2lora.io import atomic_write
from pf2lora.tasks.base import Task

RUN_FILES = ("summary.json", "metrics.jsonl", "report.md", "checkpoint.pt", "states", "adapters")
"""What makes a directory a run: anything training wrote (a lone ``config.toml`` is a run that
stopped on bad input before training, which a corrected retry may replace)."""


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse (one line, nothing touched) a ``path`` that is a file or already holds a run."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: output path exists and is not a directory")
    if path.is_dir() and any((path / f).exists() for f in RUN_FILES) and not overwrite:
        raise UserError(f"{path}: already holds a run; choose another --out or pass --overwrite")


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Create ``path``; refuse (one line, nothing touched) if it already holds a run."""
    check_run_dir(path, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True):
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot write the run directory ({e.strerror})") from None


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def client_stats(clients: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric over clients: mean, sample-weighted mean, std, min, 10th percentile, max.

    The minimum and the 10th percentile are there so the worst clients are never hidden by a mean.
    """
    metrics = sorted({k for c in clients.values() for k, v in c.items() if isinstance(v, (int, float)) and k != "num_train"})
    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        pairs = [(float(c[m]), float(c.get("num_train", 1))) for c in clients.values() if _finite([c.get(m)])]
        if not pairs:
            continue
        vals = sorted(v for v, _ in pairs)
        mean = sum(vals) / len(vals)
        total_w = sum(w for _, w in pairs)
        pos = 0.1 * (len(vals) - 1)
        lo = int(math.floor(pos))
        p10 = vals[lo] + (vals[min(lo + 1, len(vals) - 1)] - vals[lo]) * (pos - lo)
        out[m] = {
            "mean": mean,
            "weighted_mean": sum(v * w for v, w in pairs) / total_w,
            "std": (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5,
            "min": vals[0],
            "p10": p10,
            "max": vals[-1],
        }
    return out


def summarize(task: Task, results: list[MethodResult], extra: dict[str, Any]) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for r in results:
        clients = {cid: {k: v for k, v in m.items() if not isinstance(v, list)} for cid, m in r.clients.items()}
        spectra = {cid: m["spectrum"] for cid, m in r.clients.items() if isinstance(m.get("spectrum"), list)}
        stats = client_stats(clients)
        n_rounds = max(1, len(r.rounds))
        entry: dict[str, Any] = {
            "clients": clients,
            "mean": {m: s["mean"] for m, s in stats.items()},
            "stats": stats,
            # Means over rounds: heterogeneous-rank methods send different sizes per client.
            "upload_bytes_per_client_per_round": sum(x.get("upload_bytes_per_client", 0.0) for x in r.rounds) / n_rounds,
            "download_bytes_per_client_per_round": sum(x.get("download_bytes_per_client", 0.0) for x in r.rounds) / n_rounds,
            "wall_time_s": r.wall_time_s,
        }
        entry["participation"] = [x.get("participants") for x in r.rounds]
        entry["faults"] = r.faults
        entry["rejected_clients"] = sorted({f["client"] for f in r.faults if f["fault"] == "rejected"})
        if r.privacy is not None:
            entry["privacy"] = r.privacy
        if spectra:
            entry["spectra"] = spectra
        methods[r.method] = entry
    return {"task": task.name, **extra, "methods": methods}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def results_table(
    summary: dict[str, Any],
    columns: tuple[str, ...] = (),
    primary: str | None = None,
    higher_is_better: bool = False,
    reference: tuple[str, str] | None = None,
) -> str:
    """Markdown table: one row per method, the mean over clients of each metric, and the worst
    client's ``primary`` metric beside it. ``reference = (key, label)`` adds a last row with the
    clients' ``key`` (e.g. majority-class accuracy) in the ``primary`` column: the floor to beat."""
    methods = summary["methods"]
    if not columns:
        seen: list[str] = []
        for m in methods.values():
            seen += [k for k in m["mean"] if k not in seen]
        columns = tuple(seen)
    worst_key = "min" if higher_is_better else "max"
    head = ["method", *[f"mean {c}" for c in columns]]
    if primary:
        head.append(f"worst client {primary}")
    head.append("upload B/client/round")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        row = [name, *[_fmt(m["mean"].get(c)) for c in columns]]
        if primary:
            row.append(_fmt(m["stats"].get(primary, {}).get(worst_key)))
        row.append(_fmt(int(m["upload_bytes_per_client_per_round"])))
        lines.append("| " + " | ".join(row) + " |")
    if reference and primary in columns and methods:
        key, label = reference
        stats = next(iter(methods.values()))["stats"].get(key)
        if stats:
            row = [f"*{label}*", *[_fmt(stats["mean"]) if c == primary else "" for c in columns]]
            row += [_fmt(stats[worst_key]), ""]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def task_table(task: Task, summary: dict[str, Any]) -> str:
    return results_table(summary, task.table_columns, task.primary_metric, task.higher_is_better, task.reference)


def per_client_table(summary: dict[str, Any], metric: str, extra_columns: tuple[str, ...] = ()) -> str:
    methods = summary["methods"]
    client_ids = list(next(iter(methods.values()))["clients"])
    head = ["client", *extra_columns, *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cid in client_ids:
        first = next(iter(methods.values()))["clients"][cid]
        row = [cid, *[_fmt(first.get(c)) for c in extra_columns], *[_fmt(m["clients"][cid].get(metric)) for m in methods.values()]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(out: Path, task: Task, summary: dict[str, Any], figures: list[str], command: str) -> str:
    metric = task.primary_metric
    parts = [
        f"# {summary.get('name', 'run')}: {summary['task']}",
        "",
        f"Command: `{command}`  ",
        f"Seed: {summary.get('seed')}; rounds: {summary.get('rounds')}; machine: {summary.get('machine')}"
        + (
            f"; device: {summary['device']} ({summary.get('device_name')}), {summary.get('precision', 'fp32')}"
            if "device" in summary
            else ""
        ),
        "",
        "## Results (mean over clients)",
        "",
        task_table(task, summary),
        "",
        f"## Per client: {metric}",
        "",
        per_client_table(summary, metric, (task.reference[0],) if task.reference else ()),
        "",
    ]
    if any("effective_rank" in c for m in summary["methods"].values() for c in m["clients"].values()):
        parts += [
            "## Per client: effective rank (true rank in the second column)",
            "",
            per_client_table(summary, "effective_rank", ("true_rank",)),
            "",
        ]
    worst = [
        f"- {n}: worst client {metric} = {_fmt(m['stats'][metric]['max' if not task.higher_is_better else 'min'])}"
        for n, m in summary["methods"].items()
        if metric in m["stats"]
    ]
    parts += ["## Worst client", "", *worst, ""]
    notes = task.report_notes()
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if figures:
        parts += ["## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    text = "\n".join(parts)
    atomic_write(out / "report.md", text)
    return text


def finite_or_none(data: Any) -> Any:
    """Replace NaN and infinities (a diverged client) by None, so every output is valid JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(finite_or_none(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def plot_figures(out: Path, task: Task, summary: dict[str, Any], results: list[MethodResult]) -> list[str]:
    """Training-loss curves per method and, where present, each client's learned spectrum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([x["round"] for x in r.rounds], [x["train_loss"] for x in r.rounds], label=r.method)
    ax.set_xlabel("round")
    ax.set_ylabel("mean client training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out / "train_loss.png"))
    plt.close(fig)

    files += _metric_figures(out, task, summary, results, plt)

    with_spectra = {n: m["spectra"] for n, m in summary["methods"].items() if "spectra" in m}
    if with_spectra:
        client_ids = list(next(iter(with_spectra.values())))
        cols = min(4, len(client_ids))
        rows = math.ceil(len(client_ids) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        k = max(len(s) for spectra in with_spectra.values() for s in spectra.values())
        shown = min(k, 12)
        for i, cid in enumerate(client_ids):
            ax = axes[i // cols][i % cols]
            for name, spectra in with_spectra.items():
                s = spectra[cid][:shown]
                top = s[0] if s and s[0] > 0 else 1.0
                ax.plot(range(1, len(s) + 1), [v / top for v in s], marker="o", ms=3, label=name)
            true_rank = next(iter(summary["methods"].values()))["clients"][cid].get("true_rank")
            if true_rank is not None:
                ax.axvline(true_rank + 0.5, color="k", ls="--", lw=0.8)
            threshold = summary.get("rank_threshold")
            if threshold:
                ax.axhline(threshold, color="grey", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.5)
            ax.set_xticks(range(1, shown + 1))
            ax.set_title(f"{cid} (true rank {true_rank})", fontsize=9)
            ax.set_xlabel("index", fontsize=8)
        for j in range(len(client_ids), rows * cols):
            axes[j // cols][j % cols].axis("off")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("singular values of each client's learned update / largest (dashed: true rank)", fontsize=10)
        fig.tight_layout()
        files.append(_save(fig, out / "spectra.png"))
        plt.close(fig)
    return files


def _metric_figures(out: Path, task: Task, summary: dict[str, Any], results: list[MethodResult], plt: Any) -> list[str]:
    """The primary metric per round (mean over clients of each personalised model; rounds come from
    ``eval.every`` plus the final evaluation) and per client, so a weak client is seen, not averaged away."""
    metric = task.primary_metric
    methods = {n: m for n, m in summary["methods"].items() if metric in m.get("stats", {})}
    if not methods:
        return []
    files: list[str] = []
    label = metric.replace("_", " ")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.method not in methods:
            continue
        points = [(x["round"], x["eval"]) for x in r.rounds if isinstance(x.get("eval"), (int, float))]
        final_round = len(r.rounds)
        points = [p for p in points if p[0] != final_round]  # the final evaluation is the one reported
        points.append((final_round, methods[r.method]["stats"][metric]["mean"]))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=r.method)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel(f"mean personalised {label} over clients")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, out / f"{metric}_per_round.png"))
    plt.close(fig)

    client_ids = list(next(iter(methods.values()))["clients"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(client_ids) + 2), 4))
    for i, (name, m) in enumerate(methods.items()):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(client_ids))]
        ax.bar(xs, [m["clients"][c].get(metric, float("nan")) for c in client_ids], width, label=name)
    reference = next(iter(methods.values()))["clients"]
    if all("majority_accuracy" in reference[c] for c in client_ids) and metric == "accuracy":
        ax.scatter(
            range(len(client_ids)),
            [reference[c]["majority_accuracy"] for c in client_ids],
            marker="_",
            s=400,
            color="k",
            zorder=3,
            label="majority class",
        )
    ax.set_xticks(range(len(client_ids)))
    ax.set_xticklabels(client_ids, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"personalised {label}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files.append(_save(fig, out / f"{metric}_per_client.png"))
    plt.close(fig)
    return files


def _save(fig: Any, path: Path) -> str:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path.name

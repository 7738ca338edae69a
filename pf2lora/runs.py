"""Using what a run trained: export its adapters again (another layout, merged full models) and
predict with a client's personalised model.

A run directory holds ``config.toml``, the final state of every finished method
(``states/METHOD.pt``: the server's tensors and each client's parameters, no optimizer moments)
and, while a method is in progress, ``checkpoint.pt``. :func:`export` rebuilds the task from the
config and writes adapters from those states (the same tensors a run writes itself, see
:func:`pf2lora.engines.rounds.save_adapters`); :func:`predict` reads a client's adapter
(``RUN/adapters/METHOD/CLIENT``), as a user of the adapter would.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pf2lora import adapters, checkpoint, plan
from pf2lora import state as st
from pf2lora.config import RunConfig
from pf2lora.data.user_files import label_index
from pf2lora.engines.rounds import personal_model, save_adapters
from pf2lora.errors import UserError
from pf2lora.export import import_peft, unwrap
from pf2lora.io import atomic_save, atomic_write
from pf2lora.methods import registry
from pf2lora.tasks.base import Task, on_host

STATES = "states"
WHERE = "__where__"
"""A row's place in its input file, for one-line errors (not an output column)."""
LABEL = "__label__"
"""A split row's class index, or target text (the run's own reading of the data)."""


# -- final states ----------------------------------------------------------------------------


def save_final_state(run_dir: Path, method: str, round_: int, server: st.Tensors, clients: dict[str, Any]) -> None:
    """``states/METHOD.pt``: what a finished method's models are made of: every client's state
    without its optimizer moments (parameters, and the method's ``meta/`` entries: a client's
    rank, fusion weights, keys)."""
    (run_dir / STATES).mkdir(exist_ok=True)
    payload = {
        "method": method,
        "round": round_,
        "server": checkpoint.on_cpu(dict(server)),
        "clients": {cid: checkpoint.on_cpu({k: v for k, v in s.items() if not k.startswith("opt/")}) for cid, s in clients.items()},
    }
    atomic_save(payload, run_dir / STATES / f"{method}.pt", fsync=False)


def _states(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every method of the run with a state to export: finished ones, and the one in progress."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / STATES).glob("*.pt")):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
            raise UserError(f"{path}: not a readable pf2lora state file ({type(e).__name__})") from None
        out[payload["method"]] = payload
    if (run_dir / checkpoint.FILENAME).is_file():
        current = checkpoint.load(run_dir).get("current")
        if current is not None and current["method"] not in out:
            out[current["method"]] = current
    return out


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[Path, RunConfig]:
    """The run directory and its config, on ``device`` (a run made on a GPU is used on a CPU)."""
    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise UserError(f"{run}: not a pf2lora run directory (no config.toml)")
    return run, plan.load(run / "config.toml", [f"device={device}"])


def _client_ids(task: Task, client: str | None, where: str) -> list[str]:
    ids = [c.client_id for c in task.clients]
    if client is None:
        return ids
    if client not in ids:
        raise UserError(f"{where}: no client {client!r} (clients: {', '.join(ids)})")
    return [client]


# -- export ----------------------------------------------------------------------------------


def export(
    run_dir: str | Path, out: str | Path, method: str | None = None, client: str | None = None, merge: bool = False, device: str = "auto"
) -> list[Path]:
    """Write ``OUT/METHOD/CLIENT`` adapters (``--merge``: full models with the adapter merged
    into the base weights, ``save_pretrained``) from the run's final or last checkpointed state."""
    run, cfg = load_run(run_dir, device)
    states = _states(run)
    if not states:
        raise UserError(f"{run}: holds no trained state to export (no states/ and no checkpoint)")
    if method is not None and method not in states:
        raise UserError(f"{run}: method {method!r} is not in the run (has: {', '.join(states)})")
    task = plan.build_task(cfg)
    wanted = _client_ids(task, client, str(run))
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    written: list[Path] = []
    for name in [method] if method else list(states):
        s = states[name]
        m = registry()[name](cfg, task)
        clients = {cid: v for cid, v in s["clients"].items() if cid in wanted or cid == "pooled"}
        if not merge:
            only = [c for c in task.clients if c.client_id in wanted]
            metrics = summary.get("methods", {}).get(name, {}).get("clients") if int(s["round"]) == cfg.rounds else None
            written += save_adapters(Path(out), cfg, _only(task, only), m, s["server"], clients, int(s["round"]), metrics)
            continue
        for c in task.clients:
            if c.client_id not in wanted:
                continue
            state = clients.get(c.client_id) or clients.get("pooled") or {}
            received = st.clone(m.broadcast(s["server"], c.client_id))
            personal = personal_model(cfg, task, m, c, received, state, int(s["round"]))
            written.append(merged(task, personal, adapters.adapter_dir(Path(out), name, c.client_id)))
    return written


def _only(task: Task, clients: list) -> Task:
    """``task`` seen with only ``clients`` (a shallow copy; the model is shared)."""
    view = copy.copy(task)
    view.clients = clients
    return view


@torch.no_grad()
def merged(task: Task, params: st.Tensors, out: Path) -> Path:
    """The base model with ``params``' LoRA update added to its weights and its head replaced,
    saved with ``save_pretrained`` (plus the tokenizer, if the task has one)."""
    from pf2lora import lora
    from pf2lora.io import atomic_dir

    lora_model = copy.deepcopy(task.model).cpu()  # the merge is done on the CPU, wherever the run trained
    paths = st.model_params({k: v.detach().cpu().float() if v.is_floating_point() else v for k, v in params.items()})
    deltas = lora.delta_weights(lora_model, task.targets, paths)
    fan_in_fan_out = {path: getattr(lora_model.get_submodule(path), "fan_in_fan_out", False) for path in deltas}
    model: Any = unwrap(lora_model)
    for path, delta in deltas.items():
        weight = model.get_parameter(f"{path}.weight")
        weight.add_((delta.T if fan_in_fan_out[path] else delta).to(weight.dtype))
    names = list(getattr(task, "label_names", []) or [])
    if names:  # so a pipeline shows the class names, not LABEL_i
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    own = dict(model.named_parameters())
    for path, value in paths.items():
        if lora.split_path(path) is None and path in own:
            own[path].copy_(value)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok: Any = getattr(task, "tok", None)
        if tok is not None:
            tok.save_pretrained(tmp)
    return out


# -- predict ---------------------------------------------------------------------------------


def _read_input(path: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """Rows of a CSV, JSONL or TXT file (one text per line), each with the config's text column."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    text_col = cfg.task.text_column
    if suffix == ".txt":
        return [{text_col: line, WHERE: f"{path}: line {n}"} for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not a JSON object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: not a JSON object per line")
            rows.append(row)
    else:
        raise UserError(f"{path}: expected a .csv, .jsonl or .txt file")
    if not rows:
        raise UserError(f"{path}: no rows")
    unit = "row" if suffix == ".csv" else "line"
    wanted = [(text_col, "task.text_column")] + (
        [(cfg.task.text_pair_column, "task.text_pair_column")] if cfg.task.text_pair_column else []
    )
    for n, row in enumerate(rows, 2 if suffix == ".csv" else 1):
        row[WHERE] = f"{path}: {unit} {n}"
        for col, key in wanted:
            if not isinstance(row.get(col), str):
                has = ", ".join(str(k) for k in row if k != WHERE)
                raise UserError(
                    f"{row[WHERE]}: column {col!r} ({key} of the run's config) holds {row.get(col)!r}; expected text (has {has})"
                )
    return rows


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, i + size)


def predict(
    run_dir: str | Path,
    method: str,
    client: str,
    input_path: str | Path | None = None,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Rows ``text``, ``prediction`` (and per-class probabilities, or the generated text) and,
    where the input has one, ``label``: ``client``'s personalised model of ``method``."""
    run, cfg = load_run(run_dir, device)
    if cfg.task.kind not in ("text-classification", "generation"):
        raise UserError(f"{run}: predict needs a text task (task.kind text-classification or generation), not {cfg.task.kind!r}")
    adapter = adapters.adapter_dir(run / adapters.DIRNAME, method, client)
    ran = sorted(p.name for p in (run / adapters.DIRNAME).iterdir()) if (run / adapters.DIRNAME).is_dir() else []
    if method not in ran:
        raise UserError(f"{run}: no adapters of method {method!r} (has: {', '.join(ran) or 'none'}; `pf2lora export` writes them)")
    task = plan.build_task(cfg)
    _client_ids(task, client, str(run))
    if not adapter.is_dir():
        raise UserError(f"{adapter}: no adapter for client {client!r}")
    params = st.model_params(import_peft(task.model, task.targets, adapter))
    params = {k: v.to(task.device) for k, v in params.items()}
    generation = cfg.task.kind == "generation"
    if split is not None:
        rows, batch = _split_rows(task, cfg, client, split)
    else:
        rows = _read_input(Path(str(input_path)), cfg)
        batch = None
    if generation:
        return _generate(task, cfg, params, rows, batch, batch_size)
    return _classify(task, cfg, params, rows, batch, batch_size)


def _split_rows(task: Task, cfg: RunConfig, client: str, split: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The client's own split as the run encoded it (so predictions match its evaluation)."""
    from pf2lora.data import catalogue

    if split not in ("test", "train"):
        raise UserError(f"--split {split!r}: expected test or train")
    data = next(c for c in task.clients if c.client_id == client)
    ds = catalogue.load(cfg.task)
    idx = data.info[f"{split}_indices"]
    rows: list[dict[str, Any]] = [{cfg.task.text_column: ds.text[i]} for i in idx]
    for row, i in zip(rows, idx):
        if ds.text_pair is not None:
            row[cfg.task.text_pair_column or "text_pair"] = ds.text_pair[i]
        if ds.labels is not None:
            row[LABEL] = ds.labels[i]
        if ds.targets is not None:
            row[LABEL] = ds.targets[i]
    return rows, getattr(data, split)


@torch.no_grad()
def _classify(task: Any, cfg: RunConfig, params, rows, batch, batch_size: int) -> list[dict[str, Any]]:
    from pf2lora.tasks.text_classification import tokenize

    names = list(task.label_names)
    if batch is None:
        texts = [str(r[cfg.task.text_column]) for r in rows]
        pair_col = cfg.task.text_pair_column
        pairs = [str(r.get(pair_col, "")) for r in rows] if pair_col else None
        batch, _ = tokenize(task.tok, texts, pairs, task.max_length)
    probs = []
    for sl in _chunks(len(rows), batch_size):
        chunk = {k: v[sl] if on_host(k) else v[sl].to(task.device) for k, v in batch.items() if k != "labels"}
        probs.append(torch.softmax(task.logits(params, chunk).float(), dim=-1).cpu())
    p = torch.cat(probs)
    out = []
    for row, pr in zip(rows, p.tolist()):
        item: dict[str, Any] = {"text": row[cfg.task.text_column], "prediction": names[max(range(len(pr)), key=pr.__getitem__)]}
        item |= {f"p_{name}": round(v, 6) for name, v in zip(names, pr)}
        col = cfg.task.label_column
        if LABEL in row:
            item["label"] = names[row[LABEL]]
        elif row.get(col) not in (None, ""):  # read as training reads it: an index, or a class name
            item["label"] = names[label_index(row[col], names, row[WHERE], col)]
        out.append(item)
    return out


@torch.no_grad()
def _generate(task: Any, cfg: RunConfig, params, rows, batch, batch_size: int) -> list[dict[str, Any]]:
    from pf2lora.tasks.generation import encode

    if batch is None:
        L = task.max_length
        ids = torch.full((len(rows), L), task.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt, _ = task.dataset.prompt_and_target(str(row[cfg.task.text_column]), "")
            _, _, full, _ = encode(task.tok, prompt, "", L, task.eos)
            q = full[-max(1, L - task.max_new_tokens) :]
            ids[i, L - len(q) :] = torch.tensor(q)
            mask[i, L - len(q) :] = 1
    else:
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    texts: list[str] = []
    for sl in _chunks(len(rows), batch_size):
        texts += task.generate(params, ids[sl].to(task.device), mask[sl].to(task.device))
    out = []
    for row, gen in zip(rows, texts):
        item: dict[str, Any] = {"text": row[cfg.task.text_column], "prediction": gen}
        label = row.get(LABEL, row.get(cfg.task.target_column))
        if label is not None:
            item["label"] = label
        out.append(item)
    return out


def write_rows(rows: list[dict[str, Any]], out: str | Path | None) -> str | None:
    """CSV (or JSONL for a ``.jsonl`` path) to ``out`` atomically; the CSV text if ``out`` is None."""
    if out is not None and Path(out).suffix.lower() in (".jsonl", ".json"):
        atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return None
    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    if out is None:
        return buf.getvalue()
    atomic_write(out, buf.getvalue())
    return None

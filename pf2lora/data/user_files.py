"""Users' own files: GLUE task folders, E2E NLG, WebNLG, and any CSV / TSV / JSON lines table.

Nothing here is fetched: every loader takes the path the user gives (``task.data_path``) and
returns a :class:`~pf2lora.data.dataset.TextDataset`. Every failure (missing file, corrupt line,
missing column, wrong label type, empty file) is a one-line :class:`~pf2lora.errors.UserError`
that names the file, and the line or column where it applies.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pf2lora.data.dataset import TextDataset
from pf2lora.data.files import csv_rows, existing_file, read_text, split_lines
from pf2lora.errors import UserError

# ---------------------------------------------------------------------------------------------
# Delimited files and JSON lines


def _jsonl_records(path: Path) -> list[tuple[int, Any]]:
    out = []
    for n, line in enumerate(split_lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n}: bad JSON ({e.msg} at column {e.colno})") from None
    return out


def _json_records(path: Path) -> list[tuple[int, Any]]:
    """A ``.json`` file holding a list of records (or ``{"data"/"entries": [...]}``), else JSON lines."""
    content = read_text(path)
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: bad JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return [(i + 1, r) for i, r in enumerate(data)]
    if stripped.startswith("{"):
        try:
            data = json.loads(content)
        except json.JSONDecodeError:
            return _jsonl_records(path)  # one object per line
        for key in ("data", "entries", "examples", "rows"):
            if isinstance(data, dict) and isinstance(data.get(key), list):
                return [(i + 1, r) for i, r in enumerate(data[key])]
        return [(1, data)]
    return _jsonl_records(path)


def label_index(value: Any, label_names: Sequence[str] | None, where: str, column: str) -> int:
    """The class index a label cell means (an index, or a name of ``label_names``), or one line
    naming ``where`` and ``column``: training and ``pf2lora predict`` read labels alike."""
    if label_names is not None and isinstance(value, str) and value in label_names:
        return list(label_names).index(value)
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        ok = False
    elif isinstance(value, int):
        ok = True
    elif isinstance(value, float):
        ok = value.is_integer()
        value = int(value) if ok else value
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value, ok = int(value), True
    else:
        ok = False
    if not ok:
        hint = (
            f"one of {', '.join(label_names)}"
            if label_names is not None
            else "an integer class index (or pass label_names to map class names)"
        )
        raise UserError(f"{where}: label column {column!r} holds {value!r}; expected {hint}")
    if value < 0:
        raise UserError(f"{where}: label column {column!r} holds {value}; class indices start at 0")
    if label_names is not None and value >= len(label_names):
        raise UserError(
            f"{where}: label column {column!r} holds {value}; expected 0..{len(label_names) - 1} ({len(label_names)} label_names)"
        )
    return int(value)


def load_table(
    path: str | Path,
    *,
    text: str = "text",
    text_pair: str | None = None,
    label: str | None = None,
    target: str | None = None,
    client: str | None = None,
    label_names: Sequence[str] | None = None,
    format: str | None = None,
    name: str | None = None,
) -> TextDataset:
    """Bring your own data: a CSV / TSV (header row) or JSON lines file with named columns.

    ``text`` (and optionally ``text_pair``) name the input columns, exactly one of ``label``
    (classification) or ``target`` (generation) the output, and ``client`` an optional column of
    natural client ids. Labels are integer class indices, or class names: those of
    ``label_names`` (whose order fixes the indices), else the sorted set of names in the file. ``format`` is ``csv``, ``tsv`` or ``jsonl`` (default: from the
    suffix; ``.json`` may also hold a list of records). Every problem is one line naming the file,
    the line and the column.
    """
    if (label is None) == (target is None):
        raise UserError("give exactly one of a label column (classification) or a target column (generation)")
    p = existing_file(path, "data file")
    fmt = (format or p.suffix.lstrip(".")).lower()
    if fmt == "txt":
        fmt = "tsv"
    if fmt not in ("csv", "tsv", "jsonl", "json", "ndjson"):
        raise UserError(f"{p}: unknown format {fmt!r}; use .csv, .tsv, .jsonl or pass format=csv|tsv|jsonl")
    wanted = [c for c in (text, text_pair, label, target, client) if c is not None]
    records: list[tuple[int, dict[str, Any]]]
    if fmt in ("csv", "tsv"):
        rows = csv_rows(p, "\t" if fmt == "tsv" else ",")
        rows = [r for r in rows if any(cell.strip() for cell in r)]
        if not rows:
            raise UserError(f"{p}: the file is empty")
        header = [h.strip() for h in rows[0]]
        for col in wanted:
            if col not in header:
                raise UserError(f"{p}: no column {col!r}; columns are {', '.join(header)}")
        records = []
        for n, row in enumerate(rows[1:], 2):
            if len(row) != len(header):
                raise UserError(f"{p}: row {n}: {len(row)} fields, the header has {len(header)}")
            records.append((n, dict(zip(header, row))))
    else:
        records = []
        for n, rec in _json_records(p):
            if not isinstance(rec, dict):
                raise UserError(f"{p}: line {n}: expected a JSON object, got {type(rec).__name__}")
            records.append((n, rec))
        if not records:
            raise UserError(f"{p}: the file is empty")
        for col in wanted:
            if col not in records[0][1]:
                raise UserError(f"{p}: line {records[0][0]}: no column {col!r}; columns are {', '.join(map(str, records[0][1]))}")
    if not records:
        raise UserError(f"{p}: no examples (only a header)")
    inferred = label is not None and label_names is None and _names_in(records, label)
    if inferred:  # class names without label_names: the sorted set found in the file
        label_names = sorted({str(rec[label]) for _, rec in records if label in rec})
    texts: list[str] = []
    pairs: list[str] | None = [] if text_pair else None
    labels: list[int] | None = [] if label else None
    targets: list[str] | None = [] if target else None
    groups: list[str] | None = [] if client else None
    unit = "row" if fmt in ("csv", "tsv") else "line"
    for n, rec in records:
        where = f"{p}: {unit} {n}"
        for col in wanted:
            if col not in rec:
                raise UserError(f"{where}: no column {col!r}; columns are {', '.join(map(str, rec))}")

        def string(col: str, rec: dict = rec, where: str = where) -> str:  # bound now: called in this iteration only
            v = rec[col]
            if not isinstance(v, str):
                raise UserError(f"{where}: column {col!r} holds {v!r}; expected a string")
            return v

        texts.append(string(text))
        if pairs is not None and text_pair is not None:
            pairs.append(string(text_pair))
        if targets is not None and target is not None:
            targets.append(string(target))
        if labels is not None and label is not None:
            labels.append(label_index(rec[label], label_names, where, label))
        if groups is not None and client is not None:
            g = rec[client]
            if g is None or isinstance(g, (list, dict)):
                raise UserError(f"{where}: client column {client!r} holds {g!r}; expected a string or number")
            groups.append(str(g))
    names = list(label_names) if label_names is not None else None
    if labels is not None and names is None:
        names = [str(i) for i in range(max(labels) + 1)]
    return TextDataset(
        name or p.stem,
        texts,
        text_pair=pairs,
        labels=labels,
        targets=targets,
        groups=groups,
        label_names=names,
        group_name=client,
        info={"source": str(p), **({"label_names_inferred": True} if inferred else {})},
    )


def _names_in(records: list[tuple[int, dict[str, Any]]], column: str) -> bool:
    """Whether ``column`` holds class names (strings that are not integers) rather than indices; a
    column mixing both is neither (the per-row check then names the odd row)."""
    return all(isinstance(rec.get(column), str) and not re.fullmatch(r"[+-]?\d+", rec[column].strip()) for _, rec in records)


# ---------------------------------------------------------------------------------------------
# GLUE (the official TSV distribution)


@dataclass(frozen=True)
class GlueSpec:
    text: str | int
    text_pair: str | int | None
    label: str | int
    label_names: tuple[str, ...]
    header: bool = True
    group: str | None = None


GLUE: dict[str, GlueSpec] = {
    "sst2": GlueSpec("sentence", None, "label", ("negative", "positive")),
    # CoLA train/dev have no header: source, label, original label, sentence
    "cola": GlueSpec(3, None, 1, ("unacceptable", "acceptable"), header=False),
    "mnli": GlueSpec("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"), group="genre"),
    "qnli": GlueSpec("question", "sentence", "label", ("entailment", "not_entailment")),
    "qqp": GlueSpec("question1", "question2", "is_duplicate", ("not_duplicate", "duplicate")),
    "rte": GlueSpec("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "mrpc": GlueSpec("#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent")),
}
"""Columns of each task's train/dev TSV in the official GLUE distribution; label order as in HF datasets."""

_GLUE_ALIASES = {"sst-2": "sst2", "sst_2": "sst2"}
_GLUE_SPLITS = {
    "train": "train.tsv",
    "dev": "dev.tsv",
    "validation": "dev.tsv",
    "dev_matched": "dev_matched.tsv",
    "validation_matched": "dev_matched.tsv",
    "dev_mismatched": "dev_mismatched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def load_glue(task: str, data_dir: str | Path, split: str = "train") -> TextDataset:
    """One split of a GLUE task from its folder in the official distribution (e.g. ``glue_data/SST-2``).

    ``split`` is ``train`` or ``dev``/``validation`` (MNLI: ``dev_matched``/``dev_mismatched``; plain
    ``dev`` means matched). The public test files carry no labels and are refused. Files are read
    without quote processing (as GLUE's own code does); rows with missing fields, or a label
    outside the task's classes (MNLI's ``-``), are skipped and counted in ``info["skipped"]``.
    MNLI's ``groups`` are the genres. Labels are named as in HF datasets, e.g. SST-2 0=negative.
    """
    key = _GLUE_ALIASES.get(task.lower(), task.lower())
    if key not in GLUE:
        raise UserError(f"unknown GLUE task {task!r}; choose from {', '.join(sorted(GLUE))}")
    if split.startswith("test"):
        raise UserError(f"GLUE {task} {split}: the public test files have no labels; use train or dev")
    if split not in _GLUE_SPLITS:
        raise UserError(f"unknown GLUE split {split!r}; choose from train, dev, dev_matched, dev_mismatched")
    filename = _GLUE_SPLITS[split]
    if key == "mnli" and filename == "dev.tsv":
        filename = "dev_matched.tsv"
    spec = GLUE[key]
    p = existing_file(Path(data_dir).expanduser() / filename, f"GLUE {task} {split} file")
    rows = csv_rows(p, "\t", quoting=csv.QUOTE_NONE)
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{p}: the file is empty")

    def column(col: str | int, header: list[str]) -> int:
        if isinstance(col, int):
            return col
        if col not in header:
            raise UserError(f"{p}: no column {col!r} for GLUE {task}; columns are {', '.join(header)}")
        return header.index(col)

    header = rows[0] if spec.header else []
    body = rows[1:] if spec.header else rows
    ti = column(spec.text, header)
    pi = None if spec.text_pair is None else column(spec.text_pair, header)
    li = column(spec.label, header)
    gi = None if spec.group is None else column(spec.group, header)
    need = max(i for i in (ti, pi, li, gi) if i is not None)
    names = list(spec.label_names)
    text: list[str] = []
    pairs: list[str] | None = [] if pi is not None else None
    labels: list[int] = []
    groups: list[str] | None = [] if gi is not None else None
    skipped = 0
    for row in body:
        if len(row) <= need:
            skipped += 1
            continue
        raw = row[li].strip()
        if raw in names:
            y = names.index(raw)
        elif raw.isdigit() and int(raw) < len(names):
            y = int(raw)
        else:
            skipped += 1
            continue
        text.append(row[ti])
        labels.append(y)
        if pairs is not None and pi is not None:
            pairs.append(row[pi])
        if groups is not None and gi is not None:
            groups.append(row[gi])
    if not text:
        raise UserError(f"{p}: no labelled rows for GLUE {task}")
    return TextDataset(
        f"glue_{key}_{split}",
        text,
        text_pair=pairs,
        labels=labels,
        groups=groups,
        label_names=names,
        group_name=spec.group,
        info={"source": str(p), "skipped": skipped},
    )


# ---------------------------------------------------------------------------------------------
# E2E NLG and WebNLG (data-to-text generation)

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


def parse_mr(mr: str) -> dict[str, str]:
    """An E2E meaning representation ``name[The Vaults], eatType[pub]`` -> ``{"name": "The Vaults", ...}``."""
    return {k: v for k, v in _MR_ITEM.findall(mr)}


def load_e2e(path: str | Path, group_attr: str | None = None) -> TextDataset:
    """E2E NLG (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``): ``mr`` -> ``ref``.

    One example per row (the same ``mr`` appears once per reference). ``group_attr`` (e.g.
    ``eatType``, ``food``, ``area``) makes that slot's value the group; rows without it get
    ``"none"``.
    """
    ds = load_table(path, text="mr", target="ref", format="csv", name="e2e")
    if group_attr is not None:
        ds.groups = [parse_mr(mr).get(group_attr, "none") for mr in ds.text]
        ds.group_name = group_attr
    return ds


def _webnlg_triples(rec: dict[str, Any]) -> list[str] | None:
    sets = rec.get("modified_triple_sets") or rec.get("original_triple_sets")
    if isinstance(sets, dict):
        inner = sets.get("mtriple_set") or sets.get("otriple_set")
        if isinstance(inner, list) and inner and isinstance(inner[0], list):
            return [str(t) for t in inner[0]]
    for key in ("triples", "input"):
        if isinstance(rec.get(key), list):
            return [" | ".join(t) if isinstance(t, list) else str(t) for t in rec[key]]
    return None


def _webnlg_texts(rec: dict[str, Any]) -> list[str] | None:
    lex = rec.get("lex")
    if isinstance(lex, dict) and isinstance(lex.get("text"), list):
        langs = lex.get("lang") or [""] * len(lex["text"])
        return [t for t, lang in zip(lex["text"], langs) if lang in ("", "en", None)]
    if isinstance(lex, list):
        return [e["text"] if isinstance(e, dict) else str(e) for e in lex]
    for key in ("lexicalisations", "references", "target"):
        v = rec.get(key)
        if isinstance(v, list):
            return [str(x) for x in v]
        if isinstance(v, str):
            return [v]
    return None


def linearize_triples(triples: Sequence[str]) -> str:
    """``["Alan_Bean | birthPlace | Wheeler,_Texas", ...]`` -> ``"Alan Bean | birthPlace | Wheeler, Texas && ..."``."""
    return " && ".join(" | ".join(part.strip().replace("_", " ") for part in t.split("|")) for t in triples)


def load_webnlg(path: str | Path) -> TextDataset:
    """WebNLG in the HF-datasets layout (JSON lines, or a JSON list): triples -> lexicalisations.

    A record holds ``modified_triple_sets.mtriple_set[0]`` (strings ``"subject | property |
    object"``) and ``lex.text`` (its English verbalisations, filtered by ``lex.lang`` when
    present) plus ``category``; the simpler ``{"triples": [[s, p, o], ...], "lexicalisations":
    [...], "category": ...}`` is accepted too. One example per lexicalisation; the source is the
    linearised triple set (:func:`linearize_triples`); ``groups`` is the category.
    """
    p = existing_file(path, "WebNLG file")
    text, targets, groups = [], [], []
    for n, rec in _json_records(p):
        where = f"{p}: line {n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        triples = _webnlg_triples(rec)
        if not triples:
            raise UserError(f"{where}: no triples (expected modified_triple_sets.mtriple_set or triples); keys are {', '.join(rec)}")
        lexs = _webnlg_texts(rec)
        if lexs is None:
            raise UserError(f"{where}: no lexicalisations (expected lex.text or lexicalisations); keys are {', '.join(rec)}")
        source = linearize_triples(triples)
        for t in lexs:
            text.append(source)
            targets.append(t)
            groups.append(str(rec.get("category", "none")))
    if not text:
        raise UserError(f"{p}: no examples")
    return TextDataset("webnlg", text, targets=targets, groups=groups, group_name="category", info={"source": str(p)})

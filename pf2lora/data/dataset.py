"""The common shape of a text data set: :class:`TextDataset`, parallel columns.

A :class:`TextDataset` holds parallel columns: ``text`` (always), ``text_pair`` (sentence-pair
tasks), either ``labels`` (classification, ints in ``range(len(label_names))``) or ``targets``
(generation, strings), and ``groups`` (a natural client key such as a domain, topic or speaking
role; see :func:`pf2lora.data.partition.natural`). Every loader returns one (fetched corpora:
:mod:`pf2lora.data.corpora`; users' files: :mod:`pf2lora.data.user_files`); partitioners in
:mod:`pf2lora.data.partition` index into it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


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

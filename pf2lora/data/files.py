"""Reading data files with one-line errors, shared by the fetched corpora and users' files.

Every failure (missing file, a directory, undecodable bytes, malformed CSV) is a one-line
:class:`~pf2lora.errors.UserError` that names the file.
"""

from __future__ import annotations

import bz2
import csv
import io
import sys
from pathlib import Path
from typing import Literal

from pf2lora.errors import UserError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # GLUE / user rows can be long


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        raise UserError(f"{what} is a directory, expected a file: {p}")
    return p


def read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        opener = bz2.open if path.suffix == ".bz2" else open
        with opener(path, "rt", encoding=encoding, newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not {encoding} text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def split_lines(content: str) -> list[str]:
    """Lines split on ``\n`` only (``str.splitlines`` would also split on form feeds, U+2028 ... in texts)."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def csv_rows(path: Path, delimiter: str, quoting: Literal[0, 1, 2, 3] = csv.QUOTE_MINIMAL) -> list[list[str]]:
    content = read_text(path)
    try:
        return list(csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting))
    except csv.Error as e:
        raise UserError(f"{path}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} file ({e})") from None

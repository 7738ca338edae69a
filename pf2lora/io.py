"""Atomic files and directories, and the cache directory: the one place pf2lora writes them.

Every writer here builds its output under a temporary name in the *same* directory (so the final
``os.replace`` is a rename on one file system, atomic on POSIX) and removes the temporary on any
error, Ctrl-C included: a reader sees the old file or the new one, never half of one, and a failed
write leaves the old file intact. Files and directories are created with the permissions the
umask allows (``0o666 & ~umask``, ``0o777 & ~umask``), not the private ``0o600`` of
``tempfile.mkstemp``: on a shared machine another user can read a run, a cache or an export.

A leaf module: it imports nothing from pf2lora (torch only inside :func:`atomic_save`).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

CACHE_ENV = "PF2LORA_CACHE"


def cache_dir() -> Path:
    """The cache of models and data: ``$PF2LORA_CACHE``, else ``~/.cache/pf2lora`` (not created here).

    A blank value counts as unset; ``~`` is expanded in either.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env or "~/.cache/pf2lora").expanduser()


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file next to ``path``, mode ``0o666 & ~umask``; (fd, name)."""
    while True:
        tmp = _sibling(path, "tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``.

    ``data`` is text (written as UTF-8), bytes, or a function given the open binary file to write
    into (``lambda f: fig.savefig(f, format="png")``). The parent directory must exist.
    ``fsync=False`` skips the flush to disk: the rename is still atomic against a killed process,
    only not against a power cut.
    """
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: object, path: str | Path, *, fsync: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), fsync=fsync)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in place of ``path``.

    ``with atomic_dir(out) as tmp: write_into(tmp)``: on a normal exit ``tmp`` becomes ``out``
    (an existing ``out`` is moved aside and deleted only after the new one is in place); on an
    exception ``tmp`` is deleted and ``out`` is left as it was. The parent directory is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            tmp.mkdir(0o777)  # the umask applies, unlike tempfile.mkdtemp's 0o700
            break
        except FileExistsError:  # pragma: no cover
            continue
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            trash = _sibling(path, "old")
            os.replace(path, trash)
            os.replace(tmp, path)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

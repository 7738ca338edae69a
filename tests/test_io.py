"""pf2lora.io: atomic files and directories, readable by others as the umask allows; the cache dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from pf2lora import io


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_text_bytes_and_callable(tmp_path):
    assert io.atomic_write(tmp_path / "a.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert (io.atomic_write(tmp_path / "b.bin", b"\x00\x01")).read_bytes() == b"\x00\x01"
    io.atomic_write(tmp_path / "c.bin", lambda f: f.write(b"xyz"), fsync=False)
    assert (tmp_path / "c.bin").read_bytes() == b"xyz"
    io.atomic_write(tmp_path / "a.txt", "replaced")
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.bin"]  # no temp left


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_and_dirs_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        f = io.atomic_write(tmp_path / "f.txt", "x")
        s = io.atomic_save({"w": torch.ones(2)}, tmp_path / "s.pt")
        with io.atomic_dir(tmp_path / "d") as d:
            (d / "inner.txt").write_text("y")
    finally:
        os.umask(old)
    assert _mode(f) == _mode(s) == 0o666 & ~umask  # not mkstemp's 0o600
    assert _mode(tmp_path / "d") == 0o777 & ~umask  # not mkdtemp's 0o700


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, umask_022):
    path = io.atomic_write(tmp_path / "summary.json", "old")

    def boom(f):
        f.write(b"half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        io.atomic_write(path, boom)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_save_round_trips_and_cleans_up(tmp_path, monkeypatch):
    path = io.atomic_save({"w": torch.arange(3)}, tmp_path / "s.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))

    def full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError):
        io.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_atomic_dir_swaps_in_and_keeps_the_old_one_on_error(tmp_path):
    out = tmp_path / "sub" / "export"
    with io.atomic_dir(out) as d:  # the parent is created
        assert d.parent == out.parent and not out.exists()
        (d / "v").write_text("1")
    assert (out / "v").read_text() == "1"
    with pytest.raises(RuntimeError), io.atomic_dir(out) as d:
        (d / "v").write_text("2")
        raise RuntimeError("build failed")
    assert (out / "v").read_text() == "1"
    with io.atomic_dir(out) as d:  # replaces an existing directory; the old one is deleted
        (d / "w").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["w"]
    assert [p.name for p in out.parent.iterdir()] == ["export"]


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path))
    assert io.cache_dir() == tmp_path
    monkeypatch.setenv(io.CACHE_ENV, "  ")
    assert io.cache_dir() == Path.home() / ".cache" / "pf2lora"
    monkeypatch.setenv(io.CACHE_ENV, "~/elsewhere")
    assert io.cache_dir() == Path.home() / "elsewhere"
    monkeypatch.delenv(io.CACHE_ENV)
    assert io.cache_dir() == Path.home() / ".cache" / "pf2lora"
    from pf2lora import models
    from pf2lora.data import assets

    assert models.cache_dir is assets.cache_dir is io.cache_dir  # one function, not two readings

"""The write path (``aahr_fast.utils.io``) keeps its two promises (issue 15, item 7):

* the destination is never written in place: while the body runs, and after a body that fails part-way,
  the final path holds the previous complete content;
* the data is durable before it becomes visible: the temporary file is fsynced (after all its bytes
  are written) before the rename, and the folder is fsynced after it.

The fsync checks record every ``os.fsync`` call with what its fd refers to (``os.fstat``: inode, file
or folder, size at that moment), and the order of fsyncs and ``os.replace``.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aahr_fast.utils import io as aio

OLD = "old complete content\n" * 50
NEW = "new content " * 4000            # larger than one buffer, so part of it reaches the file early


def _leftovers(folder: Path, keep: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != keep)


# ------------------------------------------------------------------ never in place


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failing_body_leaves_the_old_file_intact_during_and_after(tmp_path, mode):
    path = tmp_path / "result.json"
    path.write_text(OLD)
    seen_during = []
    with pytest.raises(RuntimeError, match="body failed"):
        with aio.atomic_write(path, mode) as fh:
            data = NEW if mode == "w" else NEW.encode()
            fh.write(data[: len(data) // 2])
            fh.flush()                                     # half of the new data is on disk somewhere
            seen_during.append(path.read_text())
            raise RuntimeError("body failed")
    assert seen_during == [OLD]
    assert path.read_text() == OLD
    assert _leftovers(tmp_path, path) == []              # the temporary file is removed


def test_the_final_path_keeps_the_old_content_until_the_body_returns(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(OLD.encode())
    old_inode = path.stat().st_ino
    with aio.atomic_write(path, "wb") as fh:
        fh.write(NEW.encode())
        fh.flush()
        assert path.read_bytes() == OLD.encode()          # not truncated, not partly overwritten
        assert path.stat().st_ino == old_inode            # still the old file
        assert os.fstat(fh.fileno()).st_ino != old_inode  # the body writes another file
    assert path.read_bytes() == NEW.encode()
    assert _leftovers(tmp_path, path) == []


def test_atomic_write_path_with_a_failing_writer_leaves_the_old_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text(OLD)

    def writer(tmp: str) -> None:
        assert Path(tmp) != path and Path(tmp).parent == path.parent
        with open(tmp, "w") as fh:
            fh.write(NEW[:1000])
        assert path.read_text() == OLD
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        aio.atomic_write_path(path, writer)
    assert path.read_text() == OLD
    assert _leftovers(tmp_path, path) == []
    aio.atomic_write_path(path, lambda tmp: Path(tmp).write_text(NEW))
    assert path.read_text() == NEW


def test_the_json_npy_and_torch_savers_keep_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    aio.atomic_save_json({"a": 1}, path)
    before = path.read_text()
    with pytest.raises(TypeError):
        aio.atomic_save_json({"a": object()}, path)     # json.dump fails after writing '{"a": '
    assert path.read_text() == before
    assert _leftovers(tmp_path, path) == []


# ------------------------------------------------------------------ fsync


class _Recorder:
    """Wraps os.fsync and os.replace; ``events`` is the ordered list of what happened."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            self.events.append(("fsync", kind, st.st_ino, st.st_size))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self.events.append(("replace", os.stat(src).st_ino, str(dst)))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def _check_durable(events, path: Path, size: int) -> None:
    """File fsync of the final inode with all its bytes, then the rename to ``path``, then a folder fsync."""
    final_ino = path.stat().st_ino
    dir_ino = path.parent.stat().st_ino
    kinds = [e[0] for e in events]
    assert "replace" in kinds, f"no os.replace: {events}"
    r = kinds.index("replace")
    assert events[r][1:] == (final_ino, str(path))
    file_syncs = [e for e in events[:r] if e[:3] == ("fsync", "file", final_ino)]
    assert file_syncs, f"the new file was not fsynced before the rename: {events}"
    assert file_syncs[-1][3] == size, f"fsync before all the data was written: {events}"
    assert ("fsync", "dir", dir_ino) in [e[:3] for e in events[r + 1:]], \
        f"the folder {path.parent} was not fsynced after the rename: {events}"


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "out.txt"
    path.parent.mkdir()
    path.write_text(OLD)
    rec = _Recorder(monkeypatch)
    with aio.atomic_write(path, "w") as fh:
        fh.write(NEW)
    assert path.read_text() == NEW
    _check_durable(rec.events, path, len(NEW))


def test_atomic_write_path_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    rec = _Recorder(monkeypatch)
    aio.atomic_write_path(path, lambda tmp: Path(tmp).write_bytes(NEW.encode()))
    _check_durable(rec.events, path, len(NEW))


def test_the_savers_go_through_the_fsynced_path(tmp_path, monkeypatch):
    import numpy as np

    rec = _Recorder(monkeypatch)
    aio.atomic_save_npy(np.arange(10), tmp_path / "a.npy")
    _check_durable(rec.events, tmp_path / "a.npy", (tmp_path / "a.npy").stat().st_size)
    rec.events.clear()
    aio.atomic_save_torch({"x": 1}, tmp_path / "s.pt")
    _check_durable(rec.events, tmp_path / "s.pt", (tmp_path / "s.pt").stat().st_size)


def test_fsync_dir_fsyncs_that_folder(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    aio.fsync_dir(tmp_path)
    assert [e[:3] for e in rec.events] == [("fsync", "dir", tmp_path.stat().st_ino)]


def test_a_failed_write_does_not_rename(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    path.write_text(OLD)
    rec = _Recorder(monkeypatch)
    with pytest.raises(ValueError):
        with aio.atomic_write(path, "w") as fh:
            fh.write(NEW)
            raise ValueError("stop")
    assert [e for e in rec.events if e[0] == "replace"] == []
    assert path.read_text() == OLD

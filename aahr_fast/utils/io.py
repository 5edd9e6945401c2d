"""Atomic file writes: a crash or SIGKILL at any moment leaves the previous file intact.

Every writer goes through :func:`atomic_write`, which writes into a temporary file in the same
folder, flushes and fsyncs it, then ``os.replace``s it over the destination (atomic on POSIX) and
fsyncs the folder. A reader therefore sees either the old complete file or the new complete file,
never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit it atomically replaces ``path``.

    The file gets the mode a plain ``open()`` would give it: 0o666 minus the process umask (not
    ``mkstemp``'s 0600).

    Args:
        path: destination file. Its folder is created if missing.
        mode: ``"wb"`` or ``"w"``.
    Raises:
        Whatever the body raises; the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; results should be readable like any file
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_path(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce a file, then atomically move it to ``path``.

    For libraries that insist on writing to a path themselves (``safetensors.torch.save_file``,
    ``matplotlib.savefig``). The temporary name keeps the destination's suffix. The file gets the mode a
    plain ``open()`` would give it (0o666 minus the umask) *after* ``writer`` ran, because some writers
    (safetensors) replace the path with a file of their own, created 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())  # the writer may have replaced tmp with its own 0600 file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=indent)
        fh.write("\n")


def atomic_save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a numpy array as ``.npy`` atomically."""
    with atomic_write(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def _umask_mode() -> int:
    """File mode a plain ``open()`` would create (0o666 minus the process umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    """fsync a directory so that renames / new entries in it survive a crash (best effort: OSError ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

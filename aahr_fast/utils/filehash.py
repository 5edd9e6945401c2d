"""Content digests of (large) files, cached by file identity so that a re-run costs one ``stat``.

Used to identify backbones by the bytes of their weight files rather than by where a virtualenv put them
(two clones, ``make test VENV=...`` and a rebuilt ``.venv`` hold the same weights at other paths).

The cache maps an absolute path to ``[size, mtime_ns, inode, sha256]``; an entry is used only while all
three of size, mtime and inode still match, so an edited or replaced file is hashed again. It lives in
memory for the process and in ``<cache>/file_sha256.json`` (``$AAHR_CACHE``, else ``~/.cache/aahr_fast``)
across processes; the disk copy is best effort (unwritable or corrupt: ignored, the digest is computed).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

__all__ = ["file_digest", "digest_cache_path"]

_MEMO: dict[str, list] = {}
_LOCK = threading.Lock()
_CHUNK = 1 << 22


def digest_cache_path() -> Path:
    """``<$AAHR_CACHE or ~/.cache/aahr_fast>/file_sha256.json``: the on-disk digest cache."""
    root = os.environ.get("AAHR_CACHE") or Path.home() / ".cache" / "aahr_fast"
    return Path(root).expanduser() / "file_sha256.json"


def _load_disk() -> dict:
    try:
        data = json.loads(digest_cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_disk(key: str, entry: list) -> None:
    from aahr_fast.utils.io import atomic_save_json

    try:
        data = _load_disk()
        data[key] = entry
        atomic_save_json(data, digest_cache_path(), indent=None)
    except OSError:
        pass


def file_digest(path: str | os.PathLike) -> str:
    """Hex sha256 of the bytes of ``path``, from the cache while the file's size, mtime and inode match.

    Args:
        path: a regular file.
    Returns:
        64 lowercase hex characters.
    Raises:
        OSError: the file does not exist or cannot be read (FileNotFoundError for a missing file).
    """
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    ident = [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]
    with _LOCK:
        hit = _MEMO.get(p)
    if hit is None:
        disk = _load_disk().get(p)
        if isinstance(disk, list) and len(disk) == 4:
            hit = disk
    if hit is not None and list(hit[:3]) == ident and isinstance(hit[3], str):
        with _LOCK:
            _MEMO[p] = hit
        return hit[3]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    entry = [*ident, h.hexdigest()]
    with _LOCK:
        _MEMO[p] = entry
    _store_disk(p, entry)
    return entry[3]

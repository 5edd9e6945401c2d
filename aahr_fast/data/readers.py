"""Readers that turn dataset files into :class:`~aahr_fast.data.dataset.ImageTextSplit`.

Every reader raises :class:`~aahr_fast.utils.errors.DataError` naming the file and the line / index
that is wrong, never a bare ``KeyError`` or ``IndexError``.

Captions per image: readers keep *all* captions of an image (COCO has 5-7). Training iterates over
every caption (so images with more captions are seen more often, as in GPO/VSE-infinity); evaluation
groups captions by ``caption_image`` and never assumes exactly 5 per image.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from aahr_fast.data.dataset import ImageTextSplit, is_blank_caption
from aahr_fast.utils.errors import DataError

__all__ = ["read_flickr8k", "FLICKR8K_SPLITS"]

#: split name -> official Flickr8k split list file.
FLICKR8K_SPLITS = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what}: expected file {path} does not exist")


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without the line end (a trailing empty line is dropped)."""
    _require_file(path, "reader")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_flickr8k(root: str | os.PathLike, split: str) -> ImageTextSplit:
    """Read one official split of Flickr8k in the "Kaggle" layout.

    Layout of ``root``: ``captions.txt`` (CSV with header ``image,caption``, fields may be quoted and
    contain commas; read with the ``csv`` module), ``images/<name>.jpg``, and the split lists
    ``Flickr_8k.{train,dev,test}Images.txt`` (one image file name per line).

    Images are returned in split-list order, captions grouped per image in CSV order (5 per image in
    the official data, giving 6,000/1,000/1,000 images and 30,000/5,000/5,000 captions).
    ``image_ids`` are the file names, ``image_paths`` are ``root/images/<name>``; ``caption_ids`` is None.

    Raises:
        DataError: unknown split; missing ``captions.txt``, split list or ``images/`` folder; a bad CSV
            header or row (line number given); a split image without captions or without an image file
            (split-list line given); a duplicated split entry; empty captions.
    """
    root = Path(root)
    if split not in FLICKR8K_SPLITS:
        raise DataError(f"{root}: unknown Flickr8k split {split!r}; expected one of {sorted(FLICKR8K_SPLITS)}")
    cap_file = root / "captions.txt"
    list_file = root / FLICKR8K_SPLITS[split]
    img_dir = root / "images"
    _require_file(cap_file, "read_flickr8k")
    _require_file(list_file, "read_flickr8k")
    if not img_dir.is_dir():
        raise DataError(f"read_flickr8k: expected image folder {img_dir} does not exist")

    names: list[str] = []
    line_of: list[int] = []
    index: dict[str, int] = {}
    for ln, line in enumerate(_read_lines(list_file), start=1):
        name = line.strip()
        if not name:
            continue
        if name in index:
            raise DataError(f"{list_file}:{ln}: image {name!r} listed twice (first at entry {index[name]})")
        index[name] = len(names)
        names.append(name)
        line_of.append(ln)
    if not names:
        raise DataError(f"{list_file}: split list is empty")

    groups: list[list[str]] = [[] for _ in names]
    try:
        with open(cap_file, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
                raise DataError(f"{cap_file}:1: expected header 'image,caption', got {header!r}")
            for row in reader:
                ln = reader.line_num
                if not row:
                    continue
                if len(row) != 2:
                    raise DataError(
                        f"{cap_file}:{ln}: expected 2 CSV fields (image,caption), got {len(row)}: {row!r}"
                    )
                i = index.get(row[0].strip())
                if i is not None:
                    if is_blank_caption(row[1]):
                        raise DataError(
                            f"{cap_file}:{ln}: caption of {row[0]!r} is empty or only "
                            f"whitespace/punctuation: {row[1]!r}"
                        )
                    groups[i].append(row[1].strip())
    except UnicodeDecodeError as exc:
        raise DataError(f"{cap_file}: not valid UTF-8 ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{cap_file}: malformed CSV ({exc})") from None

    present = set(os.listdir(img_dir))
    for i, name in enumerate(names):
        if not groups[i]:
            raise DataError(f"{list_file}:{line_of[i]}: image {name!r} has no caption in {cap_file}")
        if name not in present:
            raise DataError(f"{list_file}:{line_of[i]}: image file {img_dir / name} does not exist")
    return ImageTextSplit.from_groups(
        name=split,
        source=str(cap_file),
        image_ids=names,
        groups=groups,
        image_paths=[img_dir / n for n in names],
    )

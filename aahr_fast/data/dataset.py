"""``ImageTextSplit``: the one dataset abstraction every reader returns (see docs/DESIGN.md, "Data contract").

A split holds ``N`` unique images and ``M`` captions. Captions point at their image through
``caption_image`` (an index into the image list); captions of one image need not be contiguous and an
image may have any number (>= 1) of captions. Training iterates over all captions (GPO style);
evaluation groups captions by ``caption_image``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from aahr_fast.utils.errors import DataError

__all__ = ["ImageTextSplit", "is_blank_caption", "concat_splits"]


def is_blank_caption(text: str) -> bool:
    """True when ``text`` has no letter or digit (empty, whitespace-only or punctuation/symbol-only)."""
    return not any(ch.isalnum() for ch in text)


@dataclass
class ImageTextSplit:
    """One split of one image-text dataset (the contract of docs/DESIGN.md).

    Attributes:
        name: split name (``train``, ``dev``, ``test``, ``testall``, ...).
        source: file or folder the split was read from; used in every error message.
        image_ids: ``N`` unique image identifiers (file name for raw images, id for precomp).
        image_paths: ``N`` raw image files, or ``None`` for feature-only sources (precomp).
        captions: ``M`` caption strings.
        caption_image: ``np.ndarray[int64]`` of shape ``(M,)``; ``caption_image[c]`` is the index in
            ``image_ids`` of the image that caption ``c`` describes. Any list-like of ints is converted.
        caption_ids: ``M`` per-caption ids where the source has them (COCO annotation ids), else ``None``.

    Raises:
        DataError: (at construction) naming ``source`` and the offending index when lengths disagree,
            ``caption_image`` is not 1-D integer or has an entry outside ``[0, N)``, an image has no
            caption, an image id is repeated, or a caption is empty / whitespace- or punctuation-only.
    """

    name: str
    source: str
    image_ids: list[str]
    image_paths: list[Path] | None
    captions: list[str]
    caption_image: np.ndarray
    caption_ids: list[str] | None = None
    _caps_of: list[np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.source = str(self.source)
        self.image_ids = [str(i) for i in self.image_ids]
        self.captions = list(self.captions)
        where = f"{self.source} (split {self.name!r})"
        ci = np.asarray(self.caption_image)
        if ci.ndim != 1:
            raise DataError(f"{where}: caption_image must be 1-D (M,), got shape {ci.shape}")
        if ci.size and not np.issubdtype(ci.dtype, np.integer):
            raise DataError(f"{where}: caption_image must hold integers, got dtype {ci.dtype}")
        self.caption_image = ci.astype(np.int64, copy=False)
        n, m = len(self.image_ids), len(self.captions)
        if n == 0:
            raise DataError(f"{where}: split has no images")
        if self.caption_image.shape[0] != m:
            raise DataError(
                f"{where}: {m} captions but caption_image has {self.caption_image.shape[0]} entries"
            )
        if self.image_paths is not None:
            self.image_paths = [Path(p) for p in self.image_paths]
            if len(self.image_paths) != n:
                raise DataError(f"{where}: {n} image ids but {len(self.image_paths)} image paths")
        if self.caption_ids is not None:
            self.caption_ids = [str(c) for c in self.caption_ids]
            if len(self.caption_ids) != m:
                raise DataError(f"{where}: {m} captions but {len(self.caption_ids)} caption ids")
        bad = np.flatnonzero((self.caption_image < 0) | (self.caption_image >= n))
        if bad.size:
            c = int(bad[0])
            raise DataError(
                f"{where}: caption {c} points at image index {int(self.caption_image[c])}, "
                f"expected 0 <= index < {n} ({bad.size} such captions)"
            )
        counts = np.bincount(self.caption_image, minlength=n)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            i = int(empty[0])
            raise DataError(
                f"{where}: image {i} ({self.image_ids[i]!r}) has no caption; every image needs >= 1 "
                f"({empty.size} such images)"
            )
        if len(set(self.image_ids)) != n:
            seen: dict[str, int] = {}
            for i, iid in enumerate(self.image_ids):
                if iid in seen:
                    raise DataError(f"{where}: image id {iid!r} repeated at indices {seen[iid]} and {i}")
                seen[iid] = i
        for c, text in enumerate(self.captions):
            if not isinstance(text, str):
                raise DataError(f"{where}: caption {c} is {type(text).__name__}, expected str")
            if is_blank_caption(text):
                raise DataError(
                    f"{where}: caption {c} (image {self.image_ids[int(self.caption_image[c])]!r}) is "
                    f"empty or has only whitespace/punctuation: {text!r}"
                )

    @property
    def num_images(self) -> int:
        """Number of unique images ``N``."""
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        """Number of captions ``M``."""
        return len(self.captions)

    def captions_of(self, i: int) -> np.ndarray:
        """Caption indices (int64, ascending) of image ``i``.

        Raises:
            IndexError: ``i`` outside ``[-N, N)``.
        """
        n = self.num_images
        if not -n <= i < n:
            raise IndexError(f"{self.source} (split {self.name!r}): image index {i} out of range [0, {n})")
        if self._caps_of is None:
            order = np.argsort(self.caption_image, kind="stable")
            bounds = np.cumsum(np.bincount(self.caption_image, minlength=n))
            self._caps_of = np.split(order, bounds[:-1])
        return self._caps_of[i % n]

    def subset(self, n_images: int) -> "ImageTextSplit":
        """The first ``n_images`` images and all of their captions (caption order kept), for small tests.

        Raises:
            DataError: ``n_images`` < 1.
        """
        if n_images < 1:
            raise DataError(f"{self.source}: subset needs n_images >= 1, got {n_images}")
        n = min(int(n_images), self.num_images)
        keep = np.flatnonzero(self.caption_image < n)
        return ImageTextSplit(
            name=self.name,
            source=self.source,
            image_ids=self.image_ids[:n],
            image_paths=None if self.image_paths is None else self.image_paths[:n],
            captions=[self.captions[c] for c in keep],
            caption_image=self.caption_image[keep],
            caption_ids=None if self.caption_ids is None else [self.caption_ids[c] for c in keep],
        )

    @classmethod
    def from_groups(
        cls,
        name: str,
        source: str,
        image_ids: Sequence[str],
        groups: Sequence[Sequence[str]],
        image_paths: Sequence[Path] | None = None,
        caption_id_groups: Sequence[Sequence[str]] | None = None,
    ) -> "ImageTextSplit":
        """Build a split from per-image caption lists (captions end up contiguous, in image order)."""
        captions = [c for g in groups for c in g]
        caption_image = np.repeat(np.arange(len(groups), dtype=np.int64), [len(g) for g in groups])
        cids = None if caption_id_groups is None else [c for g in caption_id_groups for c in g]
        return cls(name, source, list(image_ids), None if image_paths is None else list(image_paths),
                   captions, caption_image, cids)


def concat_splits(name: str, parts: Sequence[ImageTextSplit]) -> ImageTextSplit:
    """One split made of several (e.g. ``captions_train2014.json`` + ``captions_val2014.json`` as ``train``).

    Images keep their order, part after part; each part's captions follow, pointing at their image in
    the combined list. ``source`` is the parts' sources joined by ``" + "``; ``image_paths`` and
    ``caption_ids`` are kept when every part has them (else None).

    Args:
        name: the combined split's name. parts: one or more splits.
    Returns:
        the combined :class:`ImageTextSplit` (``parts[0]`` itself, renamed, when there is one part).
    Raises:
        DataError: no parts, or an image id found in two parts (names both sources, the id and how many
            ids are shared): the same image twice in one split would be a false negative of itself.
    """
    if not parts:
        raise DataError(f"split {name!r}: no sources to combine")
    seen: dict[str, str] = {}
    for part in parts:
        shared = [i for i in part.image_ids if i in seen]
        if shared:
            other = seen[shared[0]]
            raise DataError(f"split {name!r}: {part.source} and {other} both hold image id {shared[0]!r} "
                            f"({len(shared)} shared image ids); a split must list each image once: "
                            f"give the same source once, or sources with disjoint images")
        seen.update((i, part.source) for i in part.image_ids)
    offsets = np.cumsum([0] + [p.num_images for p in parts[:-1]])
    paths = None if any(p.image_paths is None for p in parts) else [x for p in parts for x in p.image_paths]
    cap_ids = None if any(p.caption_ids is None for p in parts) else [x for p in parts for x in p.caption_ids]
    return ImageTextSplit(
        name=name, source=" + ".join(p.source for p in parts),
        image_ids=[i for p in parts for i in p.image_ids], image_paths=paths,
        captions=[c for p in parts for c in p.captions],
        caption_image=np.concatenate([p.caption_image + off for p, off in zip(parts, offsets)]),
        caption_ids=cap_ids)

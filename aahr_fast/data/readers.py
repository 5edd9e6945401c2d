"""Readers that turn dataset files into :class:`~aahr_fast.data.dataset.ImageTextSplit`.

Every reader raises :class:`~aahr_fast.utils.errors.DataError` naming the file and the line / index
that is wrong, never a bare ``KeyError`` or ``IndexError``.

Captions per image: readers keep *all* captions of an image (COCO has 5-7). Training iterates over
every caption (so images with more captions are seen more often, as in GPO/VSE-infinity); evaluation
groups captions by ``caption_image`` and never assumes exactly 5 per image.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aahr_fast.data.dataset import ImageTextSplit, is_blank_caption
from aahr_fast.utils.errors import DataError

__all__ = [
    "open_sources",
    "read_flickr8k",
    "read_precomp",
    "PrecompIndex",
    "precomp_index",
    "read_coco_json",
    "read_karpathy",
    "open_dataset",
    "FLICKR8K_SPLITS",
    "KARPATHY_SPLITS",
    "DEV_TRUNCATE_CAPTIONS",
]

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
                    groups[i].append(" ".join(row[1].split()))
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


# ----------------------------------------------------------------------------- SCAN precomp
#: SCAN/GPO/HREM/CHAN cut the ``dev`` split to its first 5,000 captions (= 1,000 images), keyed on the
#: split name. See /work/shared/docs/data-and-eval.md section 1.2.
DEV_TRUNCATE_CAPTIONS = 5000


@dataclass
class PrecompIndex:
    """How the rows of a precomp folder's files map to images and captions of one split.

    Attributes:
        split: the ``ImageTextSplit`` (``image_paths`` None; ``image_ids`` from ``{split}_ids.txt``).
        image_row: int64 ``(N,)``; row of ``{split}_ims.npy`` holding image ``i``.
        caption_row: int64 ``(M,)``; line of ``{split}_caps.txt`` (= row of the per-caption ``.npy``
            files) holding caption ``c`` (``arange(M)`` unless truncated).
        n_rows: rows of ``{split}_ims.npy``.
        n_lines: lines of ``{split}_caps.txt`` before truncation.
        layout: ``"per_caption"`` (one ims row per caption, SCAN dev/test F30K, ``im_div = 1``),
            ``"per_image_ids"`` (one row per unique id, ids file has one line per caption),
            ``"per_image_div"`` (one row per image, ids file has one line per row, ``im_div = M / rows``).
        im_div: captions per ims row for ``per_image_div``; 1 otherwise.
        truncated: True when the dev truncation was applied.
    """

    split: ImageTextSplit
    image_row: np.ndarray
    caption_row: np.ndarray
    n_rows: int
    n_lines: int
    layout: str
    im_div: int
    truncated: bool


def _npy_rows(path: Path) -> tuple[int, ...]:
    """Shape of a ``.npy`` file without reading its data (memory-mapped header only)."""
    _require_file(path, "reader")
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None


def precomp_index(
    folder: str | os.PathLike, split: str, dev_truncate: bool = True, n_rows: int | None = None
) -> PrecompIndex:
    """Map the rows of ``{folder}/{split}_{ims.npy,caps.txt,ids.txt}`` to unique images and captions.

    Row conventions (data-and-eval.md 1.1), with ``M`` caption lines, ``R`` ims rows and ``K`` id lines:

    1. ``R == M``: one ims row per caption (SCAN's ``im_div = 1``; e.g. F30K dev, 5,070 rows). Images
       are the distinct ids in first-appearance order; image ``i`` uses the first row of its id.
       ``K`` must be ``M``.
    2. ``R != M`` and ``K == M``: one row per image, rows in first-appearance order of the per-caption
       ids (SCAN dev/test, and our prepared folders where an image may have any number of captions).
       The number of distinct ids must equal ``R``.
    3. ``R != M`` and ``K == R``: one row per image and one id per row (SCAN train). This is SCAN's
       ``im_div`` rule: ``im_div = M // R`` (5 in SCAN) and caption ``c`` belongs to row ``c // im_div``;
       ``M`` must be a multiple of ``R``.

    Dev truncation (a convention of every SCAN-family loader, switchable here): when ``split == "dev"``
    and ``dev_truncate`` is true, only the first 5,000 caption lines are kept, with the images they
    refer to (the first 1,000 images when captions come in contiguous blocks of 5). Other splits are
    never truncated.

    Args:
        folder: the precomp folder. split: split name (file prefix). n_rows: ims row count when the
            caller already opened ``{split}_ims.npy`` (otherwise read from the file header).
    Raises:
        DataError: a missing file, an empty or blank caption line (file:line), a count mismatch between
            the three files, or ids inconsistent with the row layout.
    """
    folder = Path(folder)
    caps_file, ids_file, ims_file = (folder / f"{split}_{x}" for x in ("caps.txt", "ids.txt", "ims.npy"))
    for f in (caps_file, ids_file, ims_file):
        if not f.is_file():
            raise DataError(
                f"precomp folder {folder}: expected file {f.name} for split {split!r} does not exist"
            )
    if n_rows is None:
        shape = _npy_rows(ims_file)
        if len(shape) != 3:
            raise DataError(f"{ims_file}: expected a 3-D (rows, regions, dim) array, got shape {shape}")
        n_rows = shape[0]
    captions = [c.strip() for c in _read_lines(caps_file)]
    ids = [x.strip() for x in _read_lines(ids_file)]
    m, k, r = len(captions), len(ids), int(n_rows)
    for c, text in enumerate(captions):
        if is_blank_caption(text):
            raise DataError(f"{caps_file}:{c + 1}: caption is empty or only whitespace/punctuation: {text!r}")
    for j, x in enumerate(ids):
        if not x:
            raise DataError(f"{ids_file}:{j + 1}: empty image id")
    if m == 0 or r == 0:
        raise DataError(f"precomp folder {folder}: split {split!r} is empty ({r} ims rows, {m} captions)")

    if r == m:
        if k != m:
            raise DataError(
                f"{ids_file}: {k} lines, expected {m} (one per caption, as {ims_file.name} has one row per "
                f"caption and {caps_file.name} has {m} lines)"
            )
        layout, im_div = "per_caption", 1
        first: dict[str, int] = {}
        cap_img = np.empty(m, dtype=np.int64)
        for c, x in enumerate(ids):
            cap_img[c] = first.setdefault(x, len(first))
        image_ids = list(first)
        # first caption row of each image (cap_img is non-decreasing in first-appearance order)
        image_row = np.unique(cap_img, return_index=True)[1].astype(np.int64)
    elif k == m:
        layout, im_div = "per_image_ids", 1
        first = {}
        cap_img = np.empty(m, dtype=np.int64)
        for c, x in enumerate(ids):
            cap_img[c] = first.setdefault(x, len(first))
        image_ids = list(first)
        if len(image_ids) != r:
            raise DataError(
                f"{ids_file}: {len(image_ids)} distinct image ids over {m} caption lines, but "
                f"{ims_file.name} has {r} rows (expected one row per distinct id, or one per caption)"
            )
        image_row = np.arange(r, dtype=np.int64)
    elif k == r:
        if m % r:
            raise DataError(
                f"precomp folder {folder}: {caps_file.name} has {m} lines, not a multiple of the {r} rows "
                f"of {ims_file.name} (im_div rule needs captions = im_div x rows)"
            )
        layout, im_div = "per_image_div", m // r
        cap_img = np.arange(m, dtype=np.int64) // im_div
        image_ids = ids
        image_row = np.arange(r, dtype=np.int64)
    else:
        raise DataError(
            f"precomp folder {folder}: count mismatch for split {split!r}: {caps_file.name} {m} lines, "
            f"{ids_file.name} {k} lines, {ims_file.name} {r} rows (expected ids lines = captions or = rows)"
        )

    caption_row = np.arange(m, dtype=np.int64)
    truncated = False
    if dev_truncate and split == "dev" and m > DEV_TRUNCATE_CAPTIONS:
        truncated = True
        caption_row = caption_row[:DEV_TRUNCATE_CAPTIONS]
        kept_img, cap_img = np.unique(cap_img[:DEV_TRUNCATE_CAPTIONS], return_inverse=True)
        image_ids = [image_ids[i] for i in kept_img]
        image_row = image_row[kept_img]
        captions = captions[:DEV_TRUNCATE_CAPTIONS]
    split_obj = ImageTextSplit(
        name=split,
        source=str(folder),
        image_ids=image_ids,
        image_paths=None,
        captions=captions,
        caption_image=cap_img.astype(np.int64),
    )
    return PrecompIndex(split_obj, image_row, caption_row, r, m, layout, im_div, truncated)


def read_precomp(folder: str | os.PathLike, split: str, dev_truncate: bool = True) -> ImageTextSplit:
    """Read the text side of a SCAN precomp split (``{split}_ims.npy`` is only opened memory-mapped).

    See :func:`precomp_index` for the three row conventions (the ``im_div`` rule) and the switchable
    dev truncation to the first 5,000 captions / 1,000 images. ``image_ids`` are the ids from
    ``{split}_ids.txt`` (COCO image id, F30K Karpathy index), ``image_paths`` is None.

    Raises:
        DataError: see :func:`precomp_index`.
    """
    return precomp_index(folder, split, dev_truncate).split


# ----------------------------------------------------------------------------- COCO / Karpathy json
def _load_json(path: Path) -> Any:
    _require_file(path, "reader")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _check_image_files(paths: list[Path], source: Path) -> None:
    """Every path must exist (one directory listing per distinct folder)."""
    listing: dict[Path, set[str]] = {}
    for i, p in enumerate(paths):
        if p.parent not in listing:
            listing[p.parent] = set(os.listdir(p.parent)) if p.parent.is_dir() else set()
        if p.name not in listing[p.parent]:
            raise DataError(f"{source}: image {i} file {p} does not exist (pass the right image_dir, or "
                            f"check_images=False to read captions only)")


def read_coco_json(
    annotation_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    name: str | None = None,
    check_images: bool = True,
) -> ImageTextSplit:
    """Read an official COCO captions file (``captions_{train,val}2014.json``) as one split.

    Uses ``images`` (``id``, ``file_name``) and ``annotations`` (``id``, ``image_id``, ``caption``).
    Images keep the file's order; *all* captions are kept (COCO has 5-7 per image), grouped per image
    (contiguous blocks) in file order within an image;
    images without any caption are dropped (they cannot be evaluated). ``image_ids`` are the COCO image
    ids (as strings; the same ids SCAN precomp and ECCV Caption use), ``caption_ids`` the annotation
    ids, ``image_paths`` ``image_dir / file_name``. Training trains on all captions; evaluation groups
    by ``caption_image`` (never assumes 5 per image).

    Args:
        name: split name (default: the file stem without ``captions_``, e.g. ``val2014``).
        check_images: verify that every image file exists.
    Raises:
        DataError: missing/invalid file, missing keys, an annotation whose ``image_id`` is not among
            ``images`` or whose caption is blank (index given), a missing image file.
    """
    path, image_dir = Path(annotation_json), Path(image_dir)
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{path}: expected a COCO captions json with 'images' and 'annotations'")
    index: dict[int, int] = {}
    files: list[str] = []
    ids: list[str] = []
    for i, im in enumerate(data["images"]):
        try:
            iid, fname = im["id"], im["file_name"]
        except (KeyError, TypeError):
            raise DataError(f"{path}: images[{i}] lacks 'id' or 'file_name'") from None
        if iid in index:
            raise DataError(f"{path}: images[{i}] repeats image id {iid} (first at images[{index[iid]}])")
        index[iid] = len(files)
        files.append(str(fname))
        ids.append(str(iid))
    groups: list[list[str]] = [[] for _ in files]
    cid_groups: list[list[str]] = [[] for _ in files]
    for a, ann in enumerate(data["annotations"]):
        try:
            iid, cap, aid = ann["image_id"], ann["caption"], ann["id"]
        except (KeyError, TypeError):
            raise DataError(f"{path}: annotations[{a}] lacks 'image_id', 'caption' or 'id'") from None
        if iid not in index:
            raise DataError(f"{path}: annotations[{a}] (id {aid}) refers to unknown image_id {iid}")
        if not isinstance(cap, str) or is_blank_caption(cap):
            raise DataError(f"{path}: annotations[{a}] (id {aid}) caption is empty or only "
                            f"whitespace/punctuation: {cap!r}")
        groups[index[iid]].append(" ".join(cap.split()))
        cid_groups[index[iid]].append(str(aid))
    keep = [i for i, g in enumerate(groups) if g]
    if not keep:
        raise DataError(f"{path}: no image has a caption")
    paths = [image_dir / files[i] for i in keep]
    if check_images:
        _check_image_files(paths, path)
    split_name = name or path.stem.removeprefix("captions_")
    return ImageTextSplit.from_groups(
        split_name, str(path), [ids[i] for i in keep], [groups[i] for i in keep], paths,
        [cid_groups[i] for i in keep],
    )


#: our split name -> Karpathy ``split`` values. ``restval`` (COCO val2014 images outside val/test) is
#: folded into train, as in SCAN/GPO/VSE++ (113,287 COCO training images); ``testall`` is COCO's 5K test.
KARPATHY_SPLITS = {
    "train": ("train", "restval"),
    "dev": ("val",),
    "test": ("test",),
    "testall": ("test",),
}


def read_karpathy(
    dataset_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str,
    *,
    check_images: bool = True,
) -> ImageTextSplit:
    """Read one split of a Karpathy ``dataset_{coco,flickr8k,flickr30k}.json``.

    Uses ``images[*]``: ``split``, ``filepath`` (COCO only: ``train2014``/``val2014``), ``filename``,
    ``sentences[*].raw``, ``sentids`` and ``cocoid`` when present. Split names: ``train`` (Karpathy
    ``train`` + ``restval``, restval folded into train as SCAN/GPO do), ``dev`` (``val``), ``test`` and
    ``testall`` (both ``test``). All sentences of an image are kept (training uses every caption;
    evaluation groups by ``caption_image``).

    ``image_ids``: the COCO id for COCO (``cocoid``), else the file name; ``caption_ids``: ``sentids``;
    ``image_paths``: ``image_dir / filepath / filename``.

    Raises:
        DataError: unknown split; invalid json or missing keys (image index given); an image without
            sentences; a blank sentence (image and sentence index given); a missing image file.
    """
    path, image_dir = Path(dataset_json), Path(image_dir)
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{path}: unknown split {split!r}; expected one of {sorted(KARPATHY_SPLITS)}")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a Karpathy dataset json with an 'images' list")
    wanted = KARPATHY_SPLITS[split]
    ids: list[str] = []
    paths: list[Path] = []
    groups: list[list[str]] = []
    cid_groups: list[list[str]] = []
    for i, im in enumerate(data["images"]):
        try:
            if im["split"] not in wanted:
                continue
            fname, sents = im["filename"], im["sentences"]
        except (KeyError, TypeError):
            raise DataError(f"{path}: images[{i}] lacks 'split', 'filename' or 'sentences'") from None
        if not sents:
            raise DataError(f"{path}: images[{i}] ({fname}) has no sentences")
        caps = []
        for s, sent in enumerate(sents):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(raw, str) or is_blank_caption(raw):
                raise DataError(f"{path}: images[{i}].sentences[{s}] ({fname}) raw caption is empty or only "
                                f"whitespace/punctuation: {raw!r}")
            caps.append(" ".join(raw.split()))
        sentids = im.get("sentids") or [sent.get("sentid", "") for sent in sents]
        if len(sentids) != len(caps):
            raise DataError(f"{path}: images[{i}] ({fname}) has {len(caps)} sentences but {len(sentids)} sentids")
        ids.append(str(im["cocoid"]) if "cocoid" in im else str(fname))
        paths.append(image_dir / im.get("filepath", "") / fname)
        groups.append(caps)
        cid_groups.append([str(x) for x in sentids])
    if not ids:
        raise DataError(f"{path}: no image with split in {list(wanted)} (for split {split!r})")
    if check_images:
        _check_image_files(paths, path)
    return ImageTextSplit.from_groups(split, str(path), ids, groups, paths, cid_groups)


# ----------------------------------------------------------------------------- dispatch
def open_dataset(spec: str | os.PathLike, split: str, *, image_dir: str | os.PathLike | None = None,
                 dev_truncate: bool = True, **synthetic_kwargs: Any) -> ImageTextSplit:
    """Open ``split`` of the dataset named by ``spec``, picking the reader from what ``spec`` is.

    * ``"synthetic"`` or ``"synthetic:<root>"``: the procedurally rendered default dataset
      (:func:`aahr_fast.data.synthetic.make_synthetic`; ``synthetic_kwargs`` go to ``make_synthetic``;
      root default ``$AAHR_SYNTHETIC_DIR``, else ``<$AAHR_CACHE or ~/.cache/aahr_fast>/synthetic/<tag>``
      with one tag per set of ``synthetic_kwargs``);
    * a folder with ``captions.txt``: Flickr8k (:func:`read_flickr8k`);
    * a folder with ``{split}_caps.txt``: SCAN precomp / prepared features (:func:`read_precomp`);
    * a ``.json`` with ``annotations``: COCO captions (:func:`read_coco_json`; ``image_dir`` default:
      ``<json>/../../<stem without captions_>`` as in the COCO layout ``annotations/captions_val2014.json``
      + ``val2014/``, falling back to the json's folder);
    * a ``.json`` whose ``images`` carry ``sentences``: Karpathy (:func:`read_karpathy`; ``image_dir``
      default: the json's folder).

    Raises:
        DataError: a path that does not exist or matches none of the above.
    """
    s = str(spec)
    if s == "synthetic" or s.startswith("synthetic:"):
        from aahr_fast.data.synthetic import make_synthetic

        root = s.partition(":")[2] or os.environ.get("AAHR_SYNTHETIC_DIR")
        if not root:  # one folder per configuration, so that different configs never overwrite each other
            cache = Path(os.environ.get("AAHR_CACHE") or Path.home() / ".cache" / "aahr_fast")
            key = json.dumps(synthetic_kwargs, sort_keys=True, default=str)
            tag = "default" if not synthetic_kwargs else "cfg-" + hashlib.sha256(key.encode()).hexdigest()[:12]
            root = str(cache / "synthetic" / tag)
        splits = make_synthetic(root, **synthetic_kwargs)
        if split not in splits:
            raise DataError(f"synthetic dataset at {root}: unknown split {split!r}; has {sorted(splits)}")
        return splits[split]
    path = Path(s)
    if path.is_dir():
        if (path / "captions.txt").is_file():
            return read_flickr8k(path, split)
        if (path / f"{split}_caps.txt").is_file():
            return read_precomp(path, split, dev_truncate)
        raise DataError(f"{path}: folder has neither captions.txt (Flickr8k) nor {split}_caps.txt (precomp)")
    if path.suffix == ".json" and path.is_file():
        data = _load_json(path)
        if isinstance(data, dict) and "annotations" in data:
            if image_dir is None:
                stem = path.stem.removeprefix("captions_")
                cands = [path.parent.parent / stem, path.parent / stem, path.parent]
                image_dir = next((c for c in cands if c.is_dir()), cands[0])
            return read_coco_json(path, image_dir, name=split)
        imgs = data.get("images") if isinstance(data, dict) else None
        if isinstance(imgs, list) and imgs and isinstance(imgs[0], dict) and "sentences" in imgs[0]:
            return read_karpathy(path, image_dir if image_dir is not None else path.parent, split)
        raise DataError(f"{path}: json is neither COCO captions ('annotations') nor Karpathy "
                        f"('images[*].sentences')")
    raise DataError(f"dataset spec {s!r}: not 'synthetic[:root]', an existing folder, or a .json file")


def open_sources(sources: str | os.PathLike | Sequence[str | os.PathLike], split: str,
                 **kwargs: Any) -> ImageTextSplit:
    """Open ``split`` from one source or combine it from several (``prepare --split-source``).

    Each source is opened with :func:`open_dataset` (``open_dataset(source, split, **kwargs)``: a COCO
    captions json or a Flickr8k folder, ...) and the parts are joined by
    :func:`aahr_fast.data.dataset.concat_splits` in the order given.

    Args:
        sources: a spec, or a list of specs. split: the split name each source is opened with and the
            combined split's name. kwargs: passed to :func:`open_dataset`.
    Raises:
        DataError: an empty list, an unreadable source (from the readers), or an image id in two sources.
    """
    from aahr_fast.data.dataset import concat_splits

    if isinstance(sources, (str, os.PathLike)):
        return open_dataset(sources, split, **kwargs)
    sources = list(sources)
    if not sources:
        raise DataError(f"split {split!r}: empty list of sources")
    parts = [open_dataset(s, split, **kwargs) for s in sources]
    return parts[0] if len(parts) == 1 else concat_splits(split, parts)

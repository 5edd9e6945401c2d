"""``python -m aahr_fast.index``: encode a gallery (images or captions) with a trained model into a FAISS index.

Usage::

    python -m aahr_fast.index --checkpoint runs/x --data /prepared/flickr8k --split test \\
        --modality image --out indexes/f8k-test-images                       # exact IndexFlatIP
    python -m aahr_fast.index --checkpoint runs/x --data /prepared/coco --split testall \\
        --modality text --out indexes/coco-caps --index hnsw --ef-search 128  # approximate (HNSW, IP)
    python -m aahr_fast.index ... --index ivf --nlist 256 --nprobe 16           # approximate (IVF-Flat, IP)

The gallery vectors are the model's final fused embeddings (``encode_images`` / ``encode_texts``) of
every image / caption of the split, unnormalised: the index scores raw inner products, the quantity the
R@K evaluation ranks by (``aahr_fast.evaluation``), so the exact ``flat`` index returns the evaluation's
ranking. ``--modality image`` builds an image gallery (searched with text queries); ``--modality text`` a
caption gallery (searched with image queries).

Approximate indexes (``hnsw``: ``IndexHNSWFlat``; ``ivf``: ``IndexIVFFlat`` over an ``IndexFlatIP``
coarse quantizer; both with the inner-product metric) report their ANN recall against the exact index
on the gallery's own queries (the split's captions for an image gallery, its images for a caption
gallery): ``recall@K = mean_q |approx top-K & exact top-K| / K`` for K = 1, 5, 10. It is printed and
stored in the manifest.

Index folder (``--out``), every file written atomically (:mod:`aahr_fast.utils.io`), manifest last::

    index.faiss   the FAISS index (row j = gallery item j)
    items.json    image ids (+ image files: the prepared folder's {split}_images.txt, else its dataset), captions,
                  caption -> image index; the gallery items are the images or the captions
    index.json    manifest: format, modality, split, data folder + its meta hash/backbones, checkpoint
                  (given spec, weights path, ckpt_id, sha256 of the weights file), dim, ntotal, index
                  kind and parameters, sizes + sha256 of the two files, ANN recall, timings

A folder without a matching ``index.json`` is incomplete (``index.json`` is removed before a rebuild).
Loading (:meth:`GalleryIndex.load`) checks the file hashes, the index's ``d``/``ntotal`` and, when a model
is given, that it is the checkpoint the index was built with (same ``ckpt_id``) and has the same
embedding dim; any mismatch raises a :class:`~aahr_fast.utils.errors.CheckpointError` /
:class:`~aahr_fast.utils.errors.DataError` naming both sides.

Exit status: 0 ok, 2 for configuration / data / checkpoint errors (one-line message).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aahr_fast.utils.errors import AAHRError, CheckpointError, ConfigError, DataError

__all__ = [
    "FORMAT",
    "KINDS",
    "INDEX_FILE",
    "ITEMS_FILE",
    "MANIFEST_FILE",
    "make_faiss_index",
    "faiss_search",
    "build_index",
    "GalleryIndex",
    "build_parser",
    "main",
]

FORMAT = "aahr_fast.index/1"
KINDS = ("flat", "hnsw", "ivf")
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.json"
MANIFEST_FILE = "index.json"
RECALL_KS = (1, 5, 10)
#: Keys of the prepared folder's meta.json copied into the manifest (backbone identity, dims, dtype).
_META_KEYS = ("format", "dataset", "dtype", "image_backbone", "text_backbone", "clip", "dims", "content_hash")


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ConfigError("the retrieval index needs faiss (pip install faiss-cpu)") from err
    return faiss


def _as_f32(x, name: str) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty (count, D) array, got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: row {int(np.flatnonzero(bad)[0])} contains NaN/inf")
    return a


# ----------------------------------------------------------------------------------------------------
# faiss index construction and search


def _pos_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def make_faiss_index(emb, kind: str = "flat", *, nlist: int | None = None, nprobe: int | None = None,
                     hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64) -> tuple[Any, dict]:
    """Build a FAISS inner-product index over ``emb`` (row ``j`` gets id ``j``).

    Args:
        emb: ``(N, D)`` float embeddings (torch or numpy; converted to float32).
        kind: ``"flat"`` exact ``IndexFlatIP``; ``"hnsw"`` ``IndexHNSWFlat(D, hnsw_m, METRIC_INNER_PRODUCT)``
            (Malkov & Yashunin 2018) with ``efConstruction`` / ``efSearch``; ``"ivf"`` ``IndexIVFFlat``
            with ``nlist`` k-means cells over an ``IndexFlatIP`` quantizer (Jegou et al. 2011), trained on
            ``emb`` itself, searching ``nprobe`` cells.
        nlist: IVF cells, ``1 <= nlist <= N`` (default ``round(sqrt(N))``). nprobe: IVF cells probed
            (default ``min(nlist, max(8, nlist // 8))``). hnsw_m / ef_construction / ef_search: HNSW graph
            degree and beam widths.
    Returns:
        ``(index, params)`` with ``params`` the effective parameters (stored in the manifest).
    Raises:
        ConfigError: unknown kind, non-positive parameters, ``nlist > N``.
        DataError: empty / non-finite embeddings (row named).
    """
    faiss = _faiss()
    x = _as_f32(emb, "gallery embeddings")
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        params: dict = {}
    elif kind == "hnsw":
        hnsw_m = _pos_int("hnsw_m", hnsw_m, 2)
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = _pos_int("ef_construction", ef_construction)
        index.hnsw.efSearch = _pos_int("ef_search", ef_search)
        params = {"hnsw_m": hnsw_m, "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
    elif kind == "ivf":
        nlist = max(1, int(round(math.sqrt(n)))) if nlist is None else _pos_int("nlist", nlist)
        if nlist > n:
            raise ConfigError(f"nlist={nlist} is larger than the gallery ({n} items): IVF needs at least one "
                              f"training vector per cell")
        nprobe = min(nlist, max(8, nlist // 8)) if nprobe is None else _pos_int("nprobe", nprobe)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(nprobe, nlist)
        params = {"nlist": nlist, "nprobe": int(index.nprobe)}
    else:
        raise ConfigError(f"index kind must be one of {KINDS}, got {kind!r}")
    index.add(x)
    return index, params


def _set_search_params(index, kind: str, params: dict) -> None:
    faiss = _faiss()
    if kind == "hnsw" and "ef_search" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def faiss_search(index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search, each row re-sorted by (descending score, ascending id).

    The re-sort makes ties deterministic and matches :func:`aahr_fast.retrieval.brute_force_topk`.
    Missing results (an IVF search probing cells with fewer than ``k`` vectors) are ``id -1`` with score
    ``-inf``, placed last.

    Args:
        index: a FAISS index. queries: ``(Q, D)`` floats. k: results per query (capped at ``ntotal``).
    Returns:
        ``(scores (Q, k') float32, ids (Q, k') int64)``.
    Raises:
        DataError: query dim differs from the index's ``d``, or non-finite queries. ConfigError: bad ``k``.
    """
    q = _as_f32(queries, "queries")
    if q.shape[1] != index.d:
        raise DataError(f"queries have dimension {q.shape[1]} but the index holds {index.d}-d vectors")
    k = _pos_int("k", k)
    k = min(k, int(index.ntotal))
    scores, ids = index.search(q, k)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores.astype(np.float64)), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids.astype(np.int64), order, 1)


# ----------------------------------------------------------------------------------------------------
# the index folder


def _write_bytes(path: Path, data: bytes) -> dict:
    from aahr_fast.utils.io import atomic_write

    with atomic_write(path, "wb") as fh:
        fh.write(data)
    import hashlib

    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _image_paths(meta: dict | None, split: str, image_ids: Sequence[str],
                 folder: Path | None = None) -> list[str | None] | None:
    """Image files of the split's images (row order), or None when none is known.

    Sources, first found wins: ``folder/{split}_images.txt`` (written by ``prepare``: one absolute path per
    image row); else the dataset ``meta.json`` records, re-read with ``open_dataset`` (a Flickr8k folder, a
    COCO / Karpathy json); else, for in-memory splits (the synthetic dataset), ``<source>/images/<image id>``
    of the split's recorded source folder. Files that no longer exist are still listed (search says so).
    """
    n = len(image_ids)
    if folder is not None and (folder / f"{split}_images.txt").is_file():
        try:
            lines = (folder / f"{split}_images.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        if len(lines) == n:
            return [ln or None for ln in lines]
    spec = (meta or {}).get("dataset")
    if not spec:
        return None
    if spec.startswith("<"):  # in-memory splits: their source folders (the synthetic cache holds images/<id>)
        src = ((meta or {}).get("sources") or {}).get(split)
        if not src or not (Path(src) / "images").is_dir():
            return None
        paths = [Path(src) / "images" / i for i in image_ids]
        return [str(p.resolve()) for p in paths] if any(p.is_file() for p in paths) else None
    if spec == "synthetic":
        return None
    try:
        from aahr_fast.data.readers import open_dataset

        raw = open_dataset(spec, split)
    except (AAHRError, OSError, ValueError):
        return None
    if raw.image_paths is None:
        return None
    where = {iid: str(Path(p).resolve()) for iid, p in zip(raw.image_ids, raw.image_paths)}
    paths = [where.get(i) for i in image_ids]
    return paths if any(p is not None for p in paths) else None


def build_index(checkpoint: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike | None = None,
                split: str = "test", modality: str = "image", kind: str = "flat", which: str = "best",
                nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32, ef_construction: int = 80,
                ef_search: int = 64, recall_queries: int | None = None, batch_size: int | None = None,
                device: str = "cpu", loaded: Any = None, log=print) -> dict:
    """Encode the ``modality`` gallery of ``split`` of ``data`` with a checkpoint and write an index folder.

    Args:
        checkpoint: what :func:`aahr_fast.retrieval.load_model` accepts (ignored for loading when
            ``loaded`` is given, but recorded). out: index folder (created; an old manifest is removed first).
        data: what ``train`` / ``evaluate`` accept as ``--data`` (:func:`aahr_fast.train.resolve_data`):
            ``"synthetic"`` (the run's synthetic sizes and seed; rendered and prepared into the cache when
            missing), a prepared feature folder, or a raw dataset (prepared into the cache). Default: the
            run's ``data.path``.
        split: split name. modality: ``"image"`` or ``"text"`` gallery. kind: ``flat`` / ``hnsw`` / ``ivf``.
        nlist, nprobe, hnsw_m, ef_construction, ef_search: see :func:`make_faiss_index`.
        recall_queries: approximate kinds: use the first this many of the gallery's own queries for the
            ANN recall (None = all). batch_size: items per forward (default the run's eval batch size).
        device: torch device for encoding. loaded: an already loaded model (:class:`LoadedModel`).
    Returns:
        the manifest dict (also written to ``out/index.json``).
    Raises:
        CheckpointError: unusable checkpoint; feature dims of ``data`` differing from the checkpoint's; or
            ``data`` made by other backbones than the run's training folder (when both ``meta.json`` are
            readable: image / text backbone names, OpenCLIP model and dims are compared; equal dims from
            different backbones would otherwise give a silently meaningless index).
        DataError: unreadable folder / split. ConfigError: bad options.
    """
    from aahr_fast.engine import feature_dims
    from aahr_fast.retrieval import (
        _check_modality,
        check_trained_backbones,
        encode_gallery,
        file_sha256,
        load_model,
        read_prepared_meta,
    )
    from aahr_fast.utils.io import atomic_save_json

    _check_modality(modality)
    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {KINDS}, got {kind!r}")
    if recall_queries is not None:
        recall_queries = _pos_int("recall_queries", recall_queries)
    if batch_size is not None:  # 0 must not silently mean "the run's default"
        batch_size = _pos_int("batch_size", batch_size)
    faiss = _faiss()
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(checkpoint, which=which, device=device)
    cfg = loaded.config
    # --data takes what train / evaluate take: one resolver (aahr_fast.train.resolve_data) for all three
    from aahr_fast.train import resolve_data

    data_cfg = copy.deepcopy(cfg)
    if data is not None:
        data_cfg.data.path = str(data)
    folder = resolve_data(data_cfg, log).expanduser().resolve()
    from aahr_fast.data.features import FeatureSplit

    fs = FeatureSplit(folder, split)
    dims = feature_dims(fs)
    bad = [f"{k}: checkpoint {loaded.dims.get(k)} != data {v}" for k, v in dims.items() if loaded.dims.get(k) != v]
    if bad:
        raise CheckpointError(f"{loaded.weights} was trained on features with different dims than {folder} "
                              f"(split {split}): " + "; ".join(bad))
    check_trained_backbones(loaded.weights, cfg, folder, what="gallery")
    meta = read_prepared_meta(folder) if (folder / "meta.json").is_file() else None
    bs = batch_size or int(cfg.data.eval_batch_size)
    emb = encode_gallery(loaded, fs, modality, batch_size=bs).numpy()
    t_enc = time.perf_counter() - t0
    log(f"[index] encoded {emb.shape[0]} {'images' if modality == 'image' else 'captions'} of split {split!r} "
        f"of {folder} ({emb.shape[1]}-d) in {t_enc:.1f}s")

    t1 = time.perf_counter()
    index, params = make_faiss_index(emb, kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                                     ef_construction=ef_construction, ef_search=ef_search)
    t_build = time.perf_counter() - t1

    ann = None
    if kind != "flat":
        other = "text" if modality == "image" else "image"
        q = encode_gallery(loaded, fs, other, batch_size=bs, limit=recall_queries).numpy()
        exact = faiss.IndexFlatIP(emb.shape[1])
        exact.add(emb)
        kmax = min(max(RECALL_KS), emb.shape[0])
        _, e_ids = faiss_search(exact, q, kmax)
        t2 = time.perf_counter()
        _, a_ids = faiss_search(index, q, kmax)
        t_search = time.perf_counter() - t2
        from aahr_fast.retrieval import overlap_recall

        ann = {"queries": int(q.shape[0]), "query_modality": other, **overlap_recall(a_ids, e_ids, RECALL_KS),
               "search_seconds": round(t_search, 4)}
        log(f"[index] {kind} ANN recall vs exact on {q.shape[0]} {other} queries: "
            + ", ".join(f"{k} = {v:.4f}" for k, v in ann.items() if k.startswith("recall@")))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    build_id = uuid.uuid4().hex
    image_ids = list(fs.image_ids)
    items = {"build_id": build_id, "modality": modality, "image_ids": image_ids,
             "image_paths": _image_paths(meta, split, image_ids, folder), "captions": list(fs.captions),
             "caption_image": [int(i) for i in np.asarray(fs.caption_image)]}
    files = {INDEX_FILE: _write_bytes(out / INDEX_FILE, faiss.serialize_index(index).tobytes()),
             ITEMS_FILE: _write_bytes(out / ITEMS_FILE, json.dumps(items).encode("utf-8"))}
    m0 = meta or {}
    manifest = {
        "format": FORMAT,
        "build_id": build_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modality": modality,
        "split": split,
        "data": {"folder": str(folder), "content_hash": m0.get("content_hash") or m0.get("config_hash"),
                 "dataset": m0.get("dataset"), "dtype": m0.get("dtype"), "has_meta": meta is not None,
                 "num_images": fs.num_images, "num_captions": fs.num_captions,
                 # what raw-query encoding needs (aahr_fast.retrieval.QueryEncoder), kept with the index
                 "meta": None if meta is None else {k: meta.get(k) for k in _META_KEYS}},
        "checkpoint": {"spec": str(checkpoint), "weights": str(loaded.weights), "ckpt_id": loaded.ckpt_id,
                       "weights_sha256": file_sha256(loaded.weights), "epoch": loaded.meta.get("epoch"),
                       "step": loaded.meta.get("step")},
        "dim": int(emb.shape[1]),
        "ntotal": int(index.ntotal),
        "index": {"kind": kind, "metric": "inner_product", "faiss_class": type(index).__name__,
                  "faiss_version": getattr(faiss, "__version__", None), "params": params},
        "ann_recall": ann,
        "files": files,
        "seconds": {"encode": round(t_enc, 3), "build": round(t_build, 3),
                    "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_save_json(manifest, out / MANIFEST_FILE)
    return manifest


class GalleryIndex:
    """A loaded index folder: the FAISS index, its items and its manifest.

    Attributes:
        folder: the index folder. manifest: ``index.json``. items: ``items.json``. index: the FAISS index.
        modality: ``"image"`` or ``"text"``. dim: ``D``. ntotal: gallery size.
    """

    def __init__(self, folder: Path, manifest: dict, items: dict, index: Any) -> None:
        self.folder, self.manifest, self.items, self.index = folder, manifest, items, index
        self.modality: str = manifest["modality"]
        self.dim: int = int(manifest["dim"])
        self.ntotal: int = int(manifest["ntotal"])
        self.kind: str = manifest["index"]["kind"]
        self._captions_of: dict[int, list[str]] | None = None

    @classmethod
    def load(cls, folder: str | os.PathLike, loaded: Any = None, *, verify_hashes: bool = True) -> "GalleryIndex":
        """Open an index folder written by :func:`build_index`.

        Args:
            folder: the index folder. loaded: optional :class:`aahr_fast.retrieval.LoadedModel`; it must
                be the checkpoint the index was built with (same ``ckpt_id``, same embedding dim).
            verify_hashes: check the sha256 of ``index.faiss`` / ``items.json`` against the manifest.
        Raises:
            DataError: not an index folder / incomplete (no manifest), unknown format, files missing,
                truncated or replaced (size / sha256 / build id differ), index ``d`` / ``ntotal`` differing
                from the manifest.
            CheckpointError: ``loaded`` is another checkpoint or has another embedding dim.
        """
        folder = Path(folder)
        mpath = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise DataError(f"index folder {folder} does not exist")
        if not mpath.is_file():
            raise DataError(f"{folder}: no {MANIFEST_FILE} (not an index folder, or an interrupted build; "
                            f"re-run python -m aahr_fast.index)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{mpath}: unreadable manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise DataError(f"{mpath}: not an aahr_fast index manifest (format {got!r}, expected {FORMAT!r})")
        from aahr_fast.retrieval import file_sha256

        for name in (INDEX_FILE, ITEMS_FILE):
            path = folder / name
            want = (manifest.get("files") or {}).get(name) or {}
            if not path.is_file():
                raise DataError(f"{path}: missing (the index folder is incomplete)")
            try:
                same = path.stat().st_size == want.get("bytes") and (
                    not verify_hashes or file_sha256(path) == want.get("sha256"))
            except (OSError, CheckpointError):
                same = False
            if not same:
                raise DataError(f"{path}: does not match {MANIFEST_FILE} (size/sha256 differ: truncated or "
                                f"replaced by another build); rebuild the index")
        faiss = _faiss()
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as err:
            raise DataError(f"{folder / INDEX_FILE}: not a readable FAISS index ({err})") from None
        try:
            items = json.loads((folder / ITEMS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{folder / ITEMS_FILE}: unreadable ({err})") from None
        if items.get("build_id") != manifest.get("build_id"):
            raise DataError(f"{folder / ITEMS_FILE} belongs to another build than {mpath}")
        if int(index.d) != int(manifest["dim"]) or int(index.ntotal) != int(manifest["ntotal"]):
            raise DataError(f"{folder / INDEX_FILE}: holds {index.ntotal} vectors of dim {index.d}, manifest says "
                            f"{manifest['ntotal']} of dim {manifest['dim']}")
        n_items = len(items["image_ids"] if manifest["modality"] == "image" else items["captions"])
        if n_items != int(index.ntotal):
            raise DataError(f"{folder / ITEMS_FILE}: {n_items} {manifest['modality']} items but the index holds "
                            f"{index.ntotal} vectors")
        _set_search_params(index, manifest["index"]["kind"], manifest["index"].get("params") or {})
        self = cls(folder, manifest, items, index)
        if loaded is not None:
            self.check_model(loaded)
        return self

    def check_model(self, loaded: Any) -> None:
        """Raise CheckpointError unless ``loaded`` is the checkpoint this index was built with.

        Compared: embedding dim (``model.embed_dim`` vs the index's ``d``) and the checkpoint id written
        into the weights file by the trainer (``ckpt_id``); the messages name both checkpoints.
        """
        ck = self.manifest["checkpoint"]
        if int(loaded.embed_dim) != self.dim:
            raise CheckpointError(f"checkpoint {loaded.weights} embeds into {loaded.embed_dim} dims but index "
                                  f"{self.folder} holds {self.dim}-d vectors (built with {ck['weights']})")
        if loaded.ckpt_id != ck["ckpt_id"]:
            raise CheckpointError(f"index {self.folder} was built with checkpoint {ck['weights']} (id "
                                  f"{ck['ckpt_id']}), not {loaded.weights} (id {loaded.ckpt_id}); rebuild the "
                                  f"index or pass the checkpoint it was built with")

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Override the IVF ``nprobe`` / HNSW ``efSearch`` for later searches (ConfigError for the wrong kind)."""
        if nprobe is not None:
            if self.kind != "ivf":
                raise ConfigError(f"nprobe applies to an ivf index; {self.folder} is {self.kind}")
            _set_search_params(self.index, "ivf", {"nprobe": _pos_int("nprobe", nprobe)})
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ConfigError(f"ef_search applies to an hnsw index; {self.folder} is {self.kind}")
            _set_search_params(self.index, "hnsw", {"ef_search": _pos_int("ef_search", ef_search)})

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery items of each query embedding: see :func:`faiss_search`."""
        return faiss_search(self.index, queries, k)

    def item(self, j: int) -> dict:
        """Description of gallery item ``j``: ``image_id``, ``image_path`` (or None) and, for a caption
        gallery, ``caption`` and ``caption_index``."""
        it = self.items
        paths = it.get("image_paths")
        img = j if self.modality == "image" else int(it["caption_image"][j])
        out = {"index": int(j), "image_id": it["image_ids"][img], "image_path": paths[img] if paths else None}
        if self.modality == "text":
            out["caption"] = it["captions"][j]
        else:
            if self._captions_of is None:
                self._captions_of = {}
                for c, i in zip(it["captions"], it["caption_image"]):
                    self._captions_of.setdefault(int(i), []).append(c)
            out["captions"] = list(self._captions_of.get(img, []))
        return out


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m aahr_fast.index",
                                description="Encode a gallery with a trained aahr_fast checkpoint into a FAISS index.")
    p.add_argument("--checkpoint", required=True, help="run folder, pointer .json, .safetensors or .pt")
    p.add_argument("--data", help="'synthetic', a prepared feature folder, or a raw dataset to prepare; the values "
                                  "train and evaluate accept (default: the data the run was trained on)")
    p.add_argument("--split", default="test", help="split name (default test)")
    p.add_argument("--modality", required=True, choices=("image", "text"),
                   help="gallery items: images (for text queries) or captions (for image queries)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--index", dest="kind", default="flat", choices=KINDS,
                   help="flat: exact IndexFlatIP (default); hnsw / ivf: approximate, inner product")
    p.add_argument("--nlist", type=int, default=None, help="ivf: k-means cells (default round(sqrt(N)))")
    p.add_argument("--nprobe", type=int, default=None,
                   help="ivf: cells probed per query (default min(nlist, max(8, nlist // 8)))")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph degree M")
    p.add_argument("--ef-construction", type=int, default=80, help="hnsw: efConstruction")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: efSearch")
    p.add_argument("--recall-queries", type=int, default=None,
                   help="approximate kinds: number of the gallery's own queries for the ANN recall (default all)")
    p.add_argument("--which", choices=("best", "last"), default="best", help="pointer used for a run folder")
    p.add_argument("--batch-size", type=int, default=None, help="items per forward (default the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss CPU threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 configuration/data/checkpoint error)."""
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(_pos_int("--threads", args.threads))
            _faiss().omp_set_num_threads(args.threads)
        m = build_index(args.checkpoint, args.out, data=args.data, split=args.split, modality=args.modality,
                        kind=args.kind, which=args.which, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_construction=args.ef_construction, ef_search=args.ef_search,
                        recall_queries=args.recall_queries, batch_size=args.batch_size, device=args.device, log=log)
        line = (f"index {args.out}: {m['ntotal']} {m['modality']} items, dim {m['dim']}, {m['index']['kind']} "
                f"{m['index']['params'] or ''}".rstrip())
        print(line, flush=True)
        if m["ann_recall"]:
            r = m["ann_recall"]
            print(f"ANN recall vs exact ({r['queries']} {r['query_modality']} queries): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("recall@")), flush=True)
        return 0
    except AAHRError as err:
        log(f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Retrieval building blocks shared by ``python -m aahr_fast.index`` and ``python -m aahr_fast.search``.

* :func:`load_model` rebuilds a trained model from a checkpoint (run folder, pointer ``.json``,
  ``.safetensors`` or ``.pt``) with the trainer's loader (:mod:`aahr_fast.checkpoint`).
* :func:`encode_gallery` encodes every image or every caption of a prepared split with the model's
  final fused embeddings ``f_v`` / ``f_t`` (``encode_images`` / ``encode_texts``), exactly the vectors
  the evaluation scores with raw dot products (``aahr_fast.engine.encode_split``).
* :func:`brute_force_topk` is the reference ranking: dot products from
  :func:`aahr_fast.evaluation.similarity_matrix`, sorted by descending score, ties by lower item index.
* :class:`QueryEncoder` turns a raw caption or image file into the model's embedding through the same
  frozen backbones and the same steps as ``aahr_fast.prepare`` (WordPiece ``[CLS] ... [SEP]``, MiniLM
  ``last_hidden_state`` + L2-normalised masked mean; EfficientNet-Lite0 7x7 grid + mean; rounding to the
  folder's storage dtype), then the model's text / image encoder.
* :func:`check_backbones` refuses raw queries for a model trained on features of other backbones.

Retrieval uses raw dot products of the fused embeddings (no extra normalisation), as the R@K evaluation
does (data-and-eval.md section 4), so the exact FAISS index (``IndexFlatIP``) reproduces its ranking.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aahr_fast.utils.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "MODALITIES",
    "LoadedModel",
    "load_model",
    "file_sha256",
    "read_prepared_meta",
    "training_data_meta",
    "check_backbones",
    "check_trained_backbones",
    "encode_gallery",
    "brute_force_topk",
    "overlap_recall",
    "QueryEncoder",
    "thumbnail_data_uri",
]

#: Gallery modalities: ``"image"`` (images are retrieved by captions) and ``"text"`` (captions by images).
MODALITIES = ("image", "text")


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return modality


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks). Raises CheckpointError when unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# model


@dataclass
class LoadedModel:
    """A trained model rebuilt from its checkpoint, in eval mode.

    Attributes:
        model: ``build_model(cfg.model, dims)`` with the checkpoint's weights (``encode_images`` /
            ``encode_texts`` -> ``(B, D)`` float32).
        config: the resolved :class:`aahr_fast.config.TrainConfig` stored in the weights file.
        meta: weights metadata (``config``, ``dims``, ``epoch``, ``step``, ``ckpt_id``), see
            :func:`aahr_fast.checkpoint.read_weights_meta`.
        weights: absolute path of the ``.safetensors`` file. spec: what the caller passed.
        device: where the model lives.
    """

    model: torch.nn.Module
    config: Any
    meta: dict
    weights: Path
    spec: str
    device: torch.device

    @property
    def embed_dim(self) -> int:
        """Joint embedding width ``D`` (``model.embed_dim``)."""
        return int(self.config.model.embed_dim)

    @property
    def ckpt_id(self) -> str:
        """Unique id written into the weights file by ``save_checkpoint``."""
        return str(self.meta["ckpt_id"])

    @property
    def dims(self) -> dict:
        """Feature dims the model was trained on: ``{region_dim, img_global_dim, token_dim, txt_global_dim}``."""
        return dict(self.meta["dims"])


def load_model(checkpoint: str | os.PathLike, *, which: str = "best",
               device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model of a checkpoint from the config and dims stored in its weights file.

    Args:
        checkpoint: run folder (``best.json``, else ``last.json``; see ``which``), pointer ``.json``,
            ``.safetensors`` weights or ``.pt`` state file (:func:`aahr_fast.checkpoint.resolve_checkpoint`).
        which: ``"best"`` or ``"last"`` pointer of a run folder.
        device: torch device (``"auto"`` = CUDA when available).
    Returns:
        :class:`LoadedModel` in eval mode.
    Raises:
        CheckpointError: nothing usable at ``checkpoint``, or weights that do not fit the stored config.
        ConfigError: a stored config this version cannot build.
    """
    from aahr_fast.checkpoint import load_weights, read_weights_meta, resolve_checkpoint
    from aahr_fast.config import config_from_dict
    from aahr_fast.engine import select_device
    from aahr_fast.models import build_model

    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    ref = resolve_checkpoint(checkpoint, prefer=which)
    meta = read_weights_meta(ref.weights, given=ref.given)
    cfg = config_from_dict(meta["config"])
    dev = select_device(device)
    model = build_model(cfg.model, dict(meta["dims"])).to(dev)
    load_weights(model, ref)
    model.eval()
    return LoadedModel(model, cfg, meta, Path(ref.weights).resolve(), str(checkpoint), dev)


# ----------------------------------------------------------------------------------------------------
# prepared folders and backbone identity


def read_prepared_meta(folder: str | os.PathLike) -> dict:
    """``meta.json`` of a prepared feature folder as a dict.

    Raises:
        DataError: no ``meta.json`` (a plain SCAN folder or an incomplete ``prepare`` run) or invalid JSON.
    """
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise DataError(f"{folder}: no meta.json (not a prepared feature folder, or an incomplete prepare run)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable meta.json ({err})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def training_data_meta(config: Any) -> tuple[dict | None, str]:
    """``meta.json`` of the feature folder a run was trained on, when ``data.path`` names one.

    Returns:
        ``(meta or None, description)``: None when ``data.path`` is ``"synthetic"`` or a raw dataset
        (prepared into the cache by the trainer) or no longer exists; the description says which.
    """
    path = str(getattr(config.data, "path", "") or "")
    if path and path != "synthetic" and (Path(path).expanduser() / "meta.json").is_file():
        return read_prepared_meta(Path(path).expanduser()), str(Path(path).expanduser())
    return None, f"data.path={path!r} (not a prepared folder on this machine)"


def _backbone_identity(meta: dict) -> dict:
    ib = meta.get("image_backbone") or {}
    tb = meta.get("text_backbone") or {}
    clip = meta.get("clip")
    return {"image": ib.get("name"), "text": tb.get("name"),
            "clip": None if not clip else clip.get("model"), "dims": meta.get("dims")}


def check_backbones(gallery_meta: dict, train_meta: dict | None = None, *, what: str = "gallery") -> dict:
    """Check that raw queries can be encoded for a model: its features came from our real backbones.

    The identity compared is (image backbone name, text backbone name, OpenCLIP model or None, dims).
    Args:
        gallery_meta: ``meta.json`` of the gallery's prepared folder (the one the index was built from).
        train_meta: ``meta.json`` of the folder the run was trained on, when known (see
            :func:`training_data_meta`); it must have the same identity.
        what: name of ``gallery_meta`` in messages.
    Returns:
        the gallery identity dict.
    Raises:
        ConfigError: features from ``toy``/unknown backbones (no raw-query path), or a training folder
            whose backbones differ from the gallery's (named).
    """
    ident = _backbone_identity(gallery_meta)
    if ident["image"] != "efficientnet-lite0" or not ident["text"] or ident["text"] == "toy":
        raise ConfigError(
            f"the {what} features come from backbones image={ident['image']!r}, text={ident['text']!r}: raw "
            f"text/image queries can only be encoded for features written by aahr_fast.prepare "
            f"(EfficientNet-Lite0 + a local BERT)")
    if train_meta is not None:
        other = _backbone_identity(train_meta)
        diffs = [f"{k}: trained on {other[k]!r}, {what} {ident[k]!r}" for k in ident if other[k] != ident[k]]
        if diffs:
            raise ConfigError("the model was trained on features of other backbones than the " + what
                              + ": " + "; ".join(diffs))
    return ident


def check_trained_backbones(weights: Any, config: Any, folder: str | os.PathLike, *, what: str = "data") -> None:
    """Refuse features of ``folder`` made by other backbones than the ones a checkpoint was trained on.

    Equal feature dims from different backbones (e.g. another BERT of the same width) would otherwise be
    scored or indexed silently with meaningless results. The identity compared is that of
    :func:`check_backbones` (image / text backbone names, OpenCLIP model, dims), read from ``folder/meta.json``
    and the ``meta.json`` of the run's training folder (:func:`training_data_meta` of ``config``). Nothing is
    checked when either is unavailable (a SCAN folder without ``meta.json``, synthetic or raw training data,
    or a training folder no longer on this machine).

    Args:
        weights: the checkpoint's weights file (named in the message).
        config: the run's :class:`~aahr_fast.config.Config` as trained (its ``data.path`` is the training folder).
        folder: the prepared feature folder about to be used.
        what: name of ``folder`` in the message (``"data"`` for evaluation, ``"gallery"`` for an index).
    Raises:
        CheckpointError: the backbones differ; names the weights file, the training folder, ``folder`` and
            every differing field (``text: trained on 'toy', data 'other-bert-32'``).
        DataError: an unreadable ``meta.json``.
    """
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        return
    train_meta, train_where = training_data_meta(config)
    if train_meta is None:
        return
    ident, trained = _backbone_identity(read_prepared_meta(folder)), _backbone_identity(train_meta)
    diffs = [f"{k}: trained on {trained[k]!r}, {what} {ident[k]!r}" for k in ident if ident[k] != trained[k]]
    if diffs:
        raise CheckpointError(f"{weights} was trained on features of other backbones ({train_where}) "
                              f"than {folder}: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------------
# gallery encoding and the reference ranking


def _text_field(model_cfg: Any) -> str:
    # the same rule as the trainer's evaluation (aahr_fast.engine.encode_split)
    return "input_ids" if getattr(model_cfg, "text_mode", "frozen") == "finetune" else "tokens"


def _uses_global(model_cfg: Any) -> bool:
    return bool(getattr(model_cfg, "use_global", True)) and getattr(model_cfg, "arch", "aahr") == "aahr"


@torch.no_grad()
def encode_gallery(loaded: LoadedModel, fs: Any, modality: str, *, batch_size: int = 256,
                   limit: int | None = None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Final fused embeddings of every image (``modality="image"``) or caption (``"text"``) of a split.

    Same inputs and model calls as the evaluation (``aahr_fast.engine.encode_split``): the unique images
    of the split (``ImageDataset``) or its captions (``TextDataset``), in split order.

    Args:
        loaded: :func:`load_model` result. fs: :class:`aahr_fast.data.features.FeatureSplit`.
        modality: ``"image"`` or ``"text"``. batch_size: items per forward.
        limit: encode only the first ``limit`` items (None = all).
        autocast: optional autocast dtype (None = float32).
    Returns:
        ``(N, D)`` float32 CPU tensor (N images or M captions), row ``j`` = item ``j`` of the split.
    Raises:
        ConfigError: bad modality / batch size. DataError: fields the model needs are missing from the folder.
    """
    from torch.utils.data import DataLoader, Subset

    from aahr_fast.data.features import ImageDataset, TextDataset, collate_images, collate_texts

    _check_modality(modality)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    model, mcfg, dev = loaded.model, loaded.config.model, loaded.device
    glob = _uses_global(mcfg)
    if modality == "image":
        ds, collate, fn = ImageDataset(fs, with_global=glob), collate_images, model.encode_images
    else:
        ds, collate, fn = TextDataset(fs, text=_text_field(mcfg), with_global=glob), collate_texts, model.encode_texts
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive int or None, got {limit!r}")
        ds = Subset(ds, range(min(limit, len(ds))))
    was_training = model.training
    model.eval()
    chunks = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator())
    try:
        for batch in loader:
            batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                chunks.append(fn(batch).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise DataError(f"split {fs.name!r} of {fs.folder} has no {'images' if modality == 'image' else 'captions'}")
    return torch.cat(chunks)


def brute_force_topk(queries, gallery, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-``k``: ``S = queries @ gallery.T`` (:func:`aahr_fast.evaluation.similarity_matrix`),
    each row sorted by descending score, ties by lower gallery index (stable sort).

    Args:
        queries: ``(Q, D)`` float embeddings. gallery: ``(N, D)``. k: results per query, ``1 <= k``;
            capped at ``N``.
    Returns:
        ``(scores (Q, k') float32, ids (Q, k') int64)`` with ``k' = min(k, N)``.
    Raises:
        DataError: shapes / non-finite embeddings (from ``similarity_matrix``). ConfigError: bad ``k``.
    """
    from aahr_fast.evaluation import similarity_matrix

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive int, got {k!r}")
    s = similarity_matrix(queries, gallery)
    k = min(int(k), s.shape[1])
    order = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order).numpy().astype(np.float32), order.numpy().astype(np.int64)


def overlap_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """ANN recall of an approximate index against the exact one: ``mean_q |A_q[:k] & E_q[:k]| / k``.

    Args:
        approx_ids: ``(Q, >=K)`` int ids of the approximate search (``-1`` = no result).
        exact_ids: ``(Q, >=K)`` int ids of the exact search. ks: cut-offs (each capped at the columns).
    Returns:
        ``{"recall@K": fraction in [0, 1]}`` for every K (``K`` after capping).
    Raises:
        DataError: different query counts.
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise DataError(f"overlap_recall: expected (Q, K) id arrays with equal Q, got {a.shape} and {e.shape}")
    out = {}
    width = min(a.shape[1], e.shape[1])
    for k in sorted({min(int(k), width) for k in ks if k >= 1}):
        hits = sum(len(set(ar[:k].tolist()) & set(er[:k].tolist()) - {-1}) for ar, er in zip(a, e))
        out[f"recall@{k}"] = hits / (k * max(1, a.shape[0]))
    return out


# ----------------------------------------------------------------------------------------------------
# raw queries


class QueryEncoder:
    """Encode raw captions / image files into a model's joint space, the way ``prepare`` + the model do.

    Backbones are the ones recorded in the gallery folder's ``meta.json`` (``image_backbone.weights``,
    ``text_backbone.path``; the packaged EfficientNet-Lite0 / MiniLM when a recorded path does not exist
    on this machine and the name matches), plus OpenCLIP when the folder's global vectors came from it.
    Features are rounded to the folder's storage dtype (``meta["dtype"]``, float16 by default) before the
    model sees them, like the stored gallery features.

    Args:
        loaded: the model (:func:`load_model`). prepared_meta: the gallery folder's ``meta.json``.
        train_meta: ``meta.json`` of the run's training folder when known (checked by :func:`check_backbones`).
        image_backbone / text_backbone: already built :class:`aahr_fast.backbones.ImageBackbone` /
            ``TextBackbone`` to reuse (tests); default: built lazily on first use.
    Raises:
        ConfigError: features not from our backbones, different training backbones, missing backbone files.
    """

    def __init__(self, loaded: LoadedModel, prepared_meta: dict, train_meta: dict | None = None, *,
                 image_backbone: Any = None, text_backbone: Any = None) -> None:
        check_backbones(prepared_meta, train_meta)
        self.loaded = loaded
        self.meta = prepared_meta
        dtype = prepared_meta.get("dtype", "float32")
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"prepared meta.json: dtype {dtype!r}, expected float16 or float32")
        self.storage_dtype = np.float16 if dtype == "float16" else np.float32
        self._ib, self._tb, self._clip = image_backbone, text_backbone, None
        clip = prepared_meta.get("clip")
        self._clip_spec = clip if clip else None

    # -- backbones (lazy) ----------------------------------------------------------------------------
    def _recorded(self, path: str | None, default: str) -> str:
        return path if path and Path(path).exists() else default

    def image_backbone(self):
        """The frozen :class:`~aahr_fast.backbones.ImageBackbone` (built on first use)."""
        if self._ib is None:
            from aahr_fast.backbones import ImageBackbone, default_image_weights

            weights = self._recorded((self.meta.get("image_backbone") or {}).get("weights"), default_image_weights())
            self._ib = ImageBackbone(weights).to(self.loaded.device).eval()
        return self._ib

    def text_backbone(self):
        """The frozen :class:`~aahr_fast.backbones.TextBackbone` (built on first use)."""
        if self._tb is None:
            from aahr_fast.backbones import TextBackbone, default_text_model

            tb_meta = self.meta.get("text_backbone") or {}
            path = tb_meta.get("path")
            if not (path and Path(path).is_dir()):
                default = default_text_model()
                dname = Path(default).name if Path(default).name != "model" else Path(default).parent.name
                if tb_meta.get("name") != dname:
                    raise ConfigError(f"text backbone {tb_meta.get('name')!r} recorded at {path!r} does not exist "
                                      f"on this machine (the packaged one is {dname!r})")
                path = default
            self._tb = TextBackbone(path).to(self.loaded.device).eval()
        return self._tb

    def _clip_model(self):
        if self._clip_spec is None:
            return None
        if self._clip is None:
            from aahr_fast.backbones import OpenCLIPGlobal

            ck = self._clip_spec.get("checkpoint")
            ck = ck[0] if isinstance(ck, list) else ck
            self._clip = OpenCLIPGlobal(ck, self._clip_spec.get("model", "ViT-B-32")).to(self.loaded.device)
        return self._clip

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().numpy().astype(self.storage_dtype).astype(np.float32)
        return torch.from_numpy(arr)

    # -- batches -------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_batch(self, captions: Sequence[str]) -> dict:
        """Batch dict (docs/DESIGN.md) for raw captions: ``tokens`` (B, L, Dt) float32 (or ``input_ids``
        for a fine-tuned text model), ``token_lens`` (B,), ``txt_global`` (B, Dgt) float32.
        Raises DataError for an empty list or a caption that is not a string or has no letter or digit
        (empty, whitespace- or punctuation-only: the readers' rule, ``is_blank_caption``; index named)."""
        from aahr_fast.data.dataset import is_blank_caption

        caps = list(captions)
        if not caps:
            raise DataError("no query caption given")
        for i, c in enumerate(caps):
            if not isinstance(c, str) or is_blank_caption(c):
                raise DataError(f"query caption {i} is not a string or is empty / only whitespace or "
                                f"punctuation: {c!r} (expected text with at least one letter or digit)")
        caps = [" ".join(c.split()) if ("\n" in c or "\r" in c) else c for c in caps]  # prepare's caption cleaning
        tb = self.text_backbone()
        ids, lens = tb.tokenize(caps)
        dev = next(tb.parameters()).device
        tokens, glob = tb(ids.to(dev), lens.to(dev))
        clip = self._clip_model()
        if clip is not None:
            glob = clip.encode_texts(caps)
        batch = {"token_lens": lens.long(), "txt_global": self._round(glob)}
        if _text_field(self.loaded.config.model) == "input_ids":
            batch["input_ids"] = ids.long()
        else:
            batch["tokens"] = self._round(tokens)
        return batch

    @torch.no_grad()
    def image_batch(self, images: Sequence[str | os.PathLike]) -> dict:
        """Batch dict for image files: ``regions`` (B, 49, 1280), ``region_lens`` (B,), ``img_global``
        (B, Dg) float32. Raises DataError naming an unreadable / missing file."""
        from aahr_fast.backbones import load_rgb_image

        paths = list(images)
        if not paths:
            raise DataError("no query image given")
        ib = self.image_backbone()
        arrays = [load_rgb_image(p, ib.image_size) for p in paths]
        dev = next(ib.parameters()).device
        regions, glob = ib(ib.normalize(np.stack(arrays)).to(dev))
        clip = self._clip_model()
        if clip is not None:
            glob = clip.encode_images(arrays)
        regions = self._round(regions)
        return {"regions": regions, "region_lens": torch.full((len(paths),), regions.shape[1], dtype=torch.int64),
                "img_global": self._round(glob)}

    # -- embeddings ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """``(B, D)`` float32 fused text embeddings ``f_t`` of raw captions (model in eval mode)."""
        return self._encode(self.text_batch(captions), self.loaded.model.encode_texts)

    @torch.no_grad()
    def encode_images(self, images: Sequence[str | os.PathLike]) -> torch.Tensor:
        """``(B, D)`` float32 fused image embeddings ``f_v`` of image files (model in eval mode)."""
        return self._encode(self.image_batch(images), self.loaded.model.encode_images)

    def _encode(self, batch: dict, fn) -> torch.Tensor:
        model = self.loaded.model
        was_training = model.training
        model.eval()
        try:
            dev = self.loaded.device
            return fn({k: v.to(dev) for k, v in batch.items()}).float().cpu()
        finally:
            model.train(was_training)


# ----------------------------------------------------------------------------------------------------
# HTML helpers


def thumbnail_data_uri(path: str | os.PathLike, size: int = 160, quality: int = 85) -> str:
    """A ``data:image/jpeg;base64,...`` URI of a thumbnail (longest side ``size`` px) made with PIL.

    Raises:
        DataError: the file is missing or not a readable image (named).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image file {path}: {err}") from None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

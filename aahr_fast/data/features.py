"""Prepared feature folders: ``FeatureSplit`` (memory-mapped reader), torch ``Dataset``s and collate.

A prepared folder (docs/DESIGN.md, "Prepared feature folder") is a superset of the SCAN precomp layout.
Per split ``S``:

=============================  ===================================  =========================================
file                           shape / dtype                        meaning
=============================  ===================================  =========================================
``S_ims.npy``                  (R, Nr, Dr) float16 or float32       region features, one row per image (or
                                                                    per caption in SCAN dev/test files)
``S_caps.txt`` / ``S_ids.txt`` M lines                              caption / image id of each caption
``S_ims_global.npy``           (R, Dg) float                        frozen global image vector
``S_txt_tokens.npy``           (M, Lmax, Dt) float16                frozen token features, zero-padded
``S_txt_lens.npy``             (M,) int32                           tokens per caption incl. [CLS]/[SEP]
``S_txt_global.npy``           (M, Dgt) float                       frozen sentence vector
``S_txt_input_ids.npy``        (M, Lmax) int32                      token ids, 0 = pad
``meta.json``                  (shared by all splits, written last)
=============================  ===================================  =========================================

``meta.json`` schema read here (other keys are kept in ``FeatureSplit.meta`` untouched):
``splits: {S: {"images": N, "captions": M}}`` (required; must match the files), ``dims: {"region",
"img_global", "token", "txt_global"}`` (optional; checked against the arrays when present),
``n_regions`` and ``max_tokens`` (optional; checked), ``vocab_size`` (optional).

A folder with only the SCAN files (``S_ims.npy``, ``S_caps.txt``, ``S_ids.txt``) and no ``meta.json``
is read as plain SCAN precomp: regions and captions only; asking for a global vector or token
features raises a ``DataError``. A folder with any of our extra files but no ``meta.json`` is an
incomplete ``prepare`` run and is refused.

Training iterates over captions (GPO style): :class:`CaptionDataset` yields one item per caption with
its image; evaluation uses :class:`ImageDataset` (unique images) and :class:`TextDataset` (captions).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.data.readers import PrecompIndex, precomp_index
from aahr_fast.utils.errors import DataError

__all__ = [
    "FeatureSplit",
    "CaptionDataset",
    "ImageDataset",
    "TextDataset",
    "collate_captions",
    "collate_images",
    "collate_texts",
    "collate_batch",
    "EXTRA_FILES",
    "WordMasking",
    "word_masking_for_tokenizer",
]

#: field name -> file suffix of our additions to the SCAN layout.
EXTRA_FILES = {
    "img_global": "ims_global.npy",
    "tokens": "txt_tokens.npy",
    "token_lens": "txt_lens.npy",
    "txt_global": "txt_global.npy",
    "input_ids": "txt_input_ids.npy",
}


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None


class FeatureSplit:
    """One split of a prepared feature folder (or a plain SCAN precomp folder), memory-mapped.

    Arrays are opened with ``np.load(mmap_mode="r")``: nothing is read until an item is asked for.
    Finite values are checked lazily, per item: an item with NaN/Inf raises a ``DataError`` naming the
    file and row.

    Attributes:
        folder, name: the folder and split name. meta: the parsed ``meta.json`` (``None`` for SCAN-only).
        split: the text side as an :class:`ImageTextSplit` (``image_paths`` None).
        image_ids: list of ``N`` image ids. captions: list of ``M`` captions.
        caption_image: int64 ``(M,)`` image index of each caption (use for evaluation grouping).
        index: the :class:`~aahr_fast.data.readers.PrecompIndex` (row layout, im_div, truncation).
        n_regions, region_dim, max_tokens, ...: array dims (``None`` where the file is absent).

    Args:
        folder: the prepared (or SCAN precomp) folder. split: split name.
        dev_truncate: apply the SCAN dev truncation (first 5,000 captions) to split ``dev``.
    Raises:
        DataError: missing files; an incomplete folder (extra files without ``meta.json``); ``meta.json``
            unreadable or without this split; counts/shapes/dtypes of the files disagreeing with each
            other or with ``meta.json`` (message names the file and expected vs found).
    """

    def __init__(self, folder: str | os.PathLike, split: str, dev_truncate: bool = True) -> None:
        self.folder = Path(folder)
        self.name = split
        if not self.folder.is_dir():
            raise DataError(f"feature folder {self.folder} does not exist")
        extra_paths = {k: self.folder / f"{split}_{suffix}" for k, suffix in EXTRA_FILES.items()}
        meta_path = self.folder / "meta.json"
        present = {k for k, p in extra_paths.items() if p.is_file()}
        self.meta: dict[str, Any] | None = None
        if meta_path.is_file():
            try:
                self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{meta_path}: not valid JSON ({exc})") from None
            if not isinstance(self.meta, dict):
                raise DataError(f"{meta_path}: expected a JSON object")
        elif present:
            raise DataError(
                f"feature folder {self.folder} has {sorted(extra_paths[k].name for k in present)} but no "
                f"meta.json: an incomplete prepare run (meta.json is written last); re-run prepare"
            )

        ims_path = self.folder / f"{split}_ims.npy"
        if not ims_path.is_file():
            raise DataError(f"feature folder {self.folder}: expected file {ims_path.name} for split {split!r} does not exist")
        self._paths = {"regions": ims_path, **extra_paths}
        self._ims = _open_npy(ims_path)
        if self._ims.ndim != 3 or not np.issubdtype(self._ims.dtype, np.floating):
            raise DataError(f"{ims_path}: expected a float (rows, regions, dim) array, got "
                            f"{self._ims.dtype} {self._ims.shape}")
        self.index: PrecompIndex = precomp_index(self.folder, split, dev_truncate, n_rows=self._ims.shape[0])
        self.split: ImageTextSplit = self.index.split
        self.image_ids = self.split.image_ids
        self.captions = self.split.captions
        self.caption_image = self.split.caption_image
        self._image_row = self.index.image_row
        self._caption_row = self.index.caption_row
        rows, lines = self.index.n_rows, self.index.n_lines
        self.n_regions, self.region_dim = int(self._ims.shape[1]), int(self._ims.shape[2])

        self._arrays: dict[str, np.ndarray] = {}
        for k in sorted(present):
            self._arrays[k] = _open_npy(extra_paths[k])
        self._check_shapes(rows, lines)
        if self.meta is not None:
            self._check_meta(meta_path, rows, lines)
        lens = self._arrays.get("token_lens")
        self._token_lens = None if lens is None else np.asarray(lens, dtype=np.int64)[self._caption_row]
        if self._token_lens is not None:
            bad = np.flatnonzero((self._token_lens < 1) | (self._token_lens > self.max_tokens))
            if bad.size:
                c = int(self._caption_row[bad[0]])
                raise DataError(f"{extra_paths['token_lens']}: row {c} has length {int(lens[c])}, "
                                f"expected 1..{self.max_tokens}")

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the memory-mapped arrays (a pickled ``np.memmap`` would copy the whole file);
        :meth:`__setstate__` maps the files again. Matters for spawn/forkserver DataLoader workers."""
        state = self.__dict__.copy()
        state["_ims"] = None
        state["_arrays"] = {k: None for k in self._arrays}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ims = _open_npy(self._paths["regions"])
        self._arrays = {k: _open_npy(self._paths[k]) for k in self._arrays}

    # ------------------------------------------------------------------ validation
    def _check_shapes(self, rows: int, lines: int) -> None:
        a, p = self._arrays, self._paths

        def need(k: str, ndim: int, first: int, what: str, kind: str) -> None:
            x = a[k]
            if x.ndim != ndim or x.shape[0] != first:
                raise DataError(f"{p[k]}: expected {ndim}-D array with {first} rows ({what}), got shape {x.shape}")
            ok = np.issubdtype(x.dtype, np.floating) if kind == "f" else np.issubdtype(x.dtype, np.integer)
            if not ok:
                raise DataError(f"{p[k]}: expected {'float' if kind == 'f' else 'integer'} dtype, got {x.dtype}")

        if "img_global" in a:
            need("img_global", 2, rows, f"one per row of {p['regions'].name}", "f")
        if "txt_global" in a:
            need("txt_global", 2, lines, "one per caption", "f")
        if "tokens" in a or "input_ids" in a:
            if "token_lens" not in a:
                raise DataError(f"feature folder {self.folder}: {p['token_lens'].name} is missing but "
                                f"token features / input ids are present")
        if "token_lens" in a:
            need("token_lens", 1, lines, "one per caption", "i")
        if "tokens" in a:
            need("tokens", 3, lines, "one per caption", "f")
        if "input_ids" in a:
            need("input_ids", 2, lines, "one per caption", "i")
        if "tokens" in a and "input_ids" in a and a["tokens"].shape[1] != a["input_ids"].shape[1]:
            raise DataError(f"{p['input_ids']}: {a['input_ids'].shape[1]} token positions but "
                            f"{p['tokens'].name} has {a['tokens'].shape[1]}")
        self.img_global_dim = int(a["img_global"].shape[1]) if "img_global" in a else None
        self.txt_global_dim = int(a["txt_global"].shape[1]) if "txt_global" in a else None
        self.token_dim = int(a["tokens"].shape[2]) if "tokens" in a else None
        src = a.get("tokens", a.get("input_ids"))
        self.max_tokens = int(src.shape[1]) if src is not None else None

    def _check_meta(self, meta_path: Path, rows: int, lines: int) -> None:
        meta = self.meta
        splits = meta.get("splits")
        if not isinstance(splits, dict) or self.name not in splits:
            have = sorted(splits) if isinstance(splits, dict) else None
            raise DataError(f"{meta_path}: no entry for split {self.name!r} under 'splits' (has {have})")
        counts = splits[self.name]
        if not isinstance(counts, dict):
            raise DataError(f"{meta_path}: splits.{self.name} must be an object with 'images' and 'captions'")
        if self.index.layout != "per_caption":
            n_img: int | None = rows
        else:  # one row per caption: images are the distinct ids
            n_img = None if self.index.truncated else self.num_images
        for key, found in (("images", n_img), ("captions", lines)):
            if found is None or key not in counts:
                continue
            if int(counts[key]) != found:
                raise DataError(f"{meta_path}: splits.{self.name}.{key} = {counts[key]} but the files have "
                                f"{found} (stale meta.json or partial rewrite; re-run prepare)")
        dims = meta.get("dims", {}) or {}
        found_dims = {"region": self.region_dim, "img_global": self.img_global_dim, "token": self.token_dim,
                      "txt_global": self.txt_global_dim}
        for key, found in found_dims.items():
            if key in dims and found is not None and int(dims[key]) != found:
                raise DataError(f"{meta_path}: dims.{key} = {dims[key]} but the {self.name} files have {found}")
        for key, found in (("n_regions", self.n_regions), ("max_tokens", self.max_tokens)):
            if key in meta and found is not None and int(meta[key]) != found:
                raise DataError(f"{meta_path}: {key} = {meta[key]} but the {self.name} files have {found}")

    # ------------------------------------------------------------------ access
    @property
    def num_images(self) -> int:
        """Unique images ``N`` (after dev truncation)."""
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        """Captions ``M`` (after dev truncation)."""
        return len(self.captions)

    def has(self, field: str) -> bool:
        """Whether ``field`` (``regions``, ``img_global``, ``tokens``, ``token_lens``, ``txt_global``,
        ``input_ids``) is stored for this split."""
        return field == "regions" or field in self._arrays

    def require(self, *fields: str) -> None:
        """Raise ``DataError`` naming the missing file when any of ``fields`` is absent."""
        for f in fields:
            if f not in ("regions", *EXTRA_FILES):
                raise DataError(f"unknown feature field {f!r}; expected one of {['regions', *EXTRA_FILES]}")
            if not self.has(f):
                kind = "a SCAN precomp folder without our extra files" if self.meta is None else "a prepared folder"
                raise DataError(
                    f"feature folder {self.folder} ({kind}) has no {self._paths[f].name}: field {f!r} of "
                    f"split {self.name!r} is not available (re-run prepare to add it, or configure the "
                    f"model not to use it)"
                )

    def _finite(self, x: np.ndarray, field: str, row: int) -> np.ndarray:
        if not np.isfinite(x).all():
            raise DataError(f"{self._paths[field]}: row {row} contains NaN/Inf (image/caption features must be finite)")
        return x

    def regions(self, i: int) -> np.ndarray:
        """Region features of image ``i``: float32 ``(n_regions, region_dim)``.

        Raises:
            DataError: the row holds NaN/Inf (names ``{split}_ims.npy`` and the row).
        """
        row = int(self._image_row[i])
        return self._finite(np.asarray(self._ims[row], dtype=np.float32), "regions", row)

    def img_global(self, i: int) -> np.ndarray:
        """Global image vector of image ``i``: float32 ``(Dg,)``. Raises DataError when absent/non-finite."""
        self.require("img_global")
        row = int(self._image_row[i])
        return self._finite(np.asarray(self._arrays["img_global"][row], dtype=np.float32), "img_global", row)

    def token_len(self, c: int) -> int:
        """Token count of caption ``c`` incl. [CLS]/[SEP]. Raises DataError when absent."""
        self.require("token_lens")
        return int(self._token_lens[c])

    def tokens(self, c: int) -> np.ndarray:
        """Frozen token features of caption ``c``: float32 ``(L_c, Dt)`` (padding removed)."""
        self.require("tokens")
        row = int(self._caption_row[c])
        n = int(self._token_lens[c])
        return self._finite(np.asarray(self._arrays["tokens"][row, :n], dtype=np.float32), "tokens", row)

    def input_ids(self, c: int) -> np.ndarray:
        """Token ids of caption ``c``: int64 ``(L_c,)`` (padding removed)."""
        self.require("input_ids")
        row = int(self._caption_row[c])
        return np.asarray(self._arrays["input_ids"][row, : int(self._token_lens[c])], dtype=np.int64)

    def txt_global(self, c: int) -> np.ndarray:
        """Frozen sentence vector of caption ``c``: float32 ``(Dgt,)``."""
        self.require("txt_global")
        row = int(self._caption_row[c])
        return self._finite(np.asarray(self._arrays["txt_global"][row], dtype=np.float32), "txt_global", row)

    def __repr__(self) -> str:
        fields = ["regions", *sorted(self._arrays)]
        return (f"FeatureSplit({str(self.folder)!r}, {self.name!r}: {self.num_images} images, "
                f"{self.num_captions} captions, layout={self.index.layout}, fields={fields})")


# ---------------------------------------------------------------------- datasets
_TEXT_CHOICES = ("tokens", "input_ids", None)


def _check_text(fs: FeatureSplit, text: str | None, with_global: bool, image: bool, caption: bool) -> None:
    if text not in _TEXT_CHOICES:
        raise DataError(f"text must be one of {_TEXT_CHOICES}, got {text!r}")
    if caption and text is not None:
        fs.require(text, "token_lens")
    if with_global:
        if image:
            fs.require("img_global")
        if caption:
            fs.require("txt_global")


class _Augment:
    """Per-item random state derived from (seed, epoch, index): identical across DataLoader workers."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call once per epoch for fresh, reproducible augmentation)."""
        self.epoch = int(epoch)

    def rng(self, idx: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, int(idx)))


def drop_rows(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending) of rows kept when each of ``n`` rows is dropped independently with prob. ``p``;
    at least one row is always kept (a random one if all were dropped). GPO size augmentation."""
    keep = np.flatnonzero(rng.random(n) >= p)
    if keep.size == 0:
        keep = np.array([int(rng.integers(n))])
    return keep


def _drop_tokens(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Kept positions of a ``[CLS] t1..tk [SEP]`` sequence: the ends always kept, each inner token dropped
    with prob. ``p``, at least one inner token kept (when there is one)."""
    if n <= 2 or p <= 0:
        return np.arange(n)
    inner = 1 + drop_rows(n - 2, p, rng)
    return np.concatenate(([0], inner, [n - 1]))


#: Word-masking outcome codes (:meth:`WordMasking.draw`).
KEEP, MASK, RANDOM, DELETE = 0, 1, 2, 3


class WordMasking:
    """Training-time word masking of captions (the authors' ``process_caption_bert``, GPO lineage).

    Each word between ``[CLS]`` and ``[SEP]`` is selected with probability ``prob`` (authors: 0.2); a
    selected word is replaced by ``[MASK]`` with probability ``split[0]`` (0.5), by random tokens with
    ``split[1]`` (0.1) and deleted with ``split[2]`` (0.4). The draw is the authors' one: one uniform ``u``
    per word, selected when ``u < prob``, then ``u / prob`` picks the outcome. ``[CLS]`` / ``[SEP]`` (first
    and last position) are never touched; like the authors', every word of a caption may be deleted
    (leaving ``[CLS] [SEP]``, length 2). Random numbers come from the caller's per-item generator
    (derived from (seed, epoch, caption index)), so masking is reproducible and resume stays exact.

    Units:
    * ids (``text_mode: finetune``, :meth:`apply_ids`): **whole words**, as the authors do: a word is a
      first WordPiece and the ``##`` continuation pieces after it (``continuation``, from the tokenizer's
      vocabulary; the same words as the authors' basic tokenizer then WordPiece). [MASK] replaces every
      piece of the word by ``mask_id``; random replaces each piece by an id uniform over
      ``[0, vocab_size)`` (the authors draw over ``len(tokenizer.vocab)``); delete removes the pieces.
    * frozen token features (``text_mode: frozen``, :meth:`apply_features`): **WordPiece tokens**, one
      unit per row (the feature folder has no word boundaries in general). The cheapest faithful
      equivalent of each outcome on precomputed contextual features:
      - delete: the row is removed and the length shrinks (exactly what deletion does to the sequence);
      - [MASK]: the row becomes the zero vector. The text projection maps it to a constant that is
        learned (its bias, plus the MLP's response to 0), i.e. a learned mask embedding in the joint
        space, which is what BERT's learned [MASK] input embedding amounts to once the context is fixed;
      - random: the row is the frozen feature of a random inner token of a random caption of the split
        (a real token in a real context, drawn by corpus frequency where the authors draw uniformly
        over the vocabulary).
      Unlike fine-tuned BERT, the neighbours' frozen features were computed with the original word in
      context, so some information about a masked/deleted word leaks through them (a documented limit).

    Args:
        prob: selection probability per word, in [0, 1); 0 disables masking.
        split: (mask, random, delete) fractions, non-negative, summing to 1.
        mask_id: the tokenizer's [MASK] id (ids path). vocab_size: ids for random replacement (ids path).
        continuation: (vocab_size,) bool, True for ``##`` pieces; None = every token is a word.
    Raises:
        ValueError: ``prob`` outside [0, 1), a split that is not three non-negative numbers summing to 1.
    """

    def __init__(self, prob: float, split: Sequence[float] = (0.5, 0.1, 0.4), *, mask_id: int | None = None,
                 vocab_size: int | None = None, continuation: np.ndarray | None = None) -> None:
        if not 0.0 <= float(prob) < 1.0:
            raise ValueError(f"WordMasking: prob must be in [0, 1), got {prob}")
        split = [float(x) for x in split]
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"WordMasking: split must be 3 non-negative fractions (mask, random, delete) summing "
                             f"to 1, got {split}")
        self.prob, self.split = float(prob), split
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.continuation = None if continuation is None else np.asarray(continuation, dtype=bool)

    def __repr__(self) -> str:
        return f"WordMasking(prob={self.prob}, split={self.split}, mask_id={self.mask_id}, vocab_size={self.vocab_size})"

    def draw(self, n_words: int, rng: np.random.Generator) -> np.ndarray:
        """(n_words,) int8 outcome codes: 0 keep, 1 [MASK], 2 random, 3 delete (one uniform per word)."""
        u = rng.random(n_words)
        r = u / self.prob if self.prob > 0 else np.ones(n_words)
        m, rnd = self.split[0], self.split[0] + self.split[1]
        out = np.where(r < m, MASK, np.where(r < rnd, RANDOM, DELETE)).astype(np.int8)
        out[u >= self.prob] = KEEP
        return out

    def _word_index(self, ids: np.ndarray) -> np.ndarray:
        """Word number of each inner position (ids[1:-1]); continuation pieces join the word before."""
        inner = ids[1:-1]
        if self.continuation is None:
            return np.arange(inner.size)
        cont = self.continuation[np.clip(inner, 0, self.continuation.size - 1)]
        cont[0] = False                                  # a caption starting with a "##" piece: own word
        return np.cumsum(~cont) - 1

    def apply_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Mask a caption's ids ``[CLS] w.. [SEP]`` (L,) int -> (L',) int64 with L' <= L (whole words).

        Raises:
            ValueError: ``mask_id`` / ``vocab_size`` not set (they come from the tokenizer).
        """
        if self.mask_id is None or not self.vocab_size:
            raise ValueError("WordMasking.apply_ids needs mask_id and vocab_size (word_masking_for_tokenizer)")
        ids = np.asarray(ids, dtype=np.int64)
        if self.prob <= 0 or ids.size <= 2:
            return ids
        word = self._word_index(ids)
        codes = self.draw(int(word[-1]) + 1, rng)[word]   # per inner position
        inner = ids[1:-1].copy()
        inner[codes == MASK] = self.mask_id
        n_rand = int((codes == RANDOM).sum())
        if n_rand:
            inner[codes == RANDOM] = rng.integers(0, self.vocab_size, n_rand)
        inner = inner[codes != DELETE]
        return np.concatenate((ids[:1], inner, ids[-1:]))

    def apply_features(self, tokens: np.ndarray, rng: np.random.Generator, random_row) -> np.ndarray:
        """Mask a caption's frozen token features (L, Dt) float -> (L', Dt) float32, L' <= L (per token).

        Args:
            tokens: rows ``[CLS] t.. [SEP]``. rng: the item's generator.
            random_row: ``random_row(rng) -> (Dt,)`` float, the feature of a random token (see the class).
        """
        if self.prob <= 0 or len(tokens) <= 2:
            return tokens
        codes = self.draw(len(tokens) - 2, rng)
        if not codes.any():
            return tokens
        inner = np.array(tokens[1:-1], dtype=np.float32, copy=True)
        inner[codes == MASK] = 0.0
        for j in np.flatnonzero(codes == RANDOM):
            inner[j] = random_row(rng)
        inner = inner[codes != DELETE]
        return np.concatenate((tokens[:1], inner, tokens[-1:]), axis=0).astype(np.float32, copy=False)


def word_masking_for_tokenizer(prob: float, split: Sequence[float], model_path: str | os.PathLike | None = None
                               ) -> WordMasking:
    """A :class:`WordMasking` for token ids of the BERT tokenizer in ``model_path`` (local folder; None = the
    packaged MiniLM, whose vocabulary is bert-base-uncased's): its [MASK] id, ``len(vocab)`` and the ``##``
    continuation table (whole-word masking). Loads the tokenizer only (``local_files_only``).

    Raises:
        ConfigError: the folder has no loadable tokenizer or no [MASK] token.
    """
    from aahr_fast.utils.errors import ConfigError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if model_path is None:
        from aahr_fast.backbones import default_text_model

        model_path = default_text_model()
    try:
        tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"word masking: cannot load the tokenizer of {model_path}: {exc}") from exc
    if tok.mask_token_id is None:
        raise ConfigError(f"word masking: the tokenizer of {model_path} has no [MASK] token")
    vocab = tok.get_vocab()
    size = len(vocab)
    cont = np.zeros(max(size, max(vocab.values()) + 1), dtype=bool)
    for piece, idx in vocab.items():
        cont[idx] = piece.startswith("##")
    return WordMasking(prob, split, mask_id=int(tok.mask_token_id), vocab_size=size, continuation=cont)


class CaptionDataset(Dataset):
    """Training (or paired-eval) dataset: one item per caption, with its image (GPO style).

    Item: dict with ``regions`` float32 (n, Dr), ``img_global`` float32 (Dg,) [if with_global],
    ``tokens`` float32 (L, Dt) or ``input_ids`` int64 (L,) [per ``text``], ``txt_global`` (Dgt,)
    [if with_global], ``img_index`` and ``cap_index`` ints. Collate with :func:`collate_captions`.

    Augmentation (``train=True`` only; derived from ``(seed, epoch, index)`` so it is reproducible and
    identical with any number of DataLoader workers; call :meth:`set_epoch` each epoch):
    * size augmentation (data-and-eval.md 1.5): each region dropped independently with prob.
      ``region_drop`` (0.2), keeping >= 1;
    * ``token_drop`` (default 0, off): each token between [CLS] and [SEP] is deleted with this prob.,
      keeping >= 1 (plain deletion, kept for compatibility);
    * ``word_mask`` (default None, off): the authors' word masking, :class:`WordMasking` (whole words on
      ``input_ids``, tokens on frozen features), drawn after the region drop from the same generator.

    Args:
        features: the :class:`FeatureSplit`. train: enable augmentation.
        text: ``"tokens"`` (frozen token features), ``"input_ids"`` (fine-tuned backbone) or None.
        with_global: include ``img_global`` / ``txt_global``.
    Raises:
        DataError: a requested field is not stored in the folder (e.g. a SCAN precomp folder).
        ValueError: drop probabilities outside [0, 1).
    """

    def __init__(self, features: FeatureSplit, train: bool, region_drop: float = 0.2, token_drop: float = 0.0,
                 *, text: str | None = "tokens", with_global: bool = True, seed: int = 0,
                 word_mask: WordMasking | None = None) -> None:
        for nm, p in (("region_drop", region_drop), ("token_drop", token_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"CaptionDataset: {nm} must be in [0, 1), got {p}")
        _check_text(features, text, with_global, image=True, caption=True)
        self.features, self.train = features, bool(train)
        self.region_drop, self.token_drop = float(region_drop), float(token_drop)
        self.text, self.with_global = text, with_global
        self._aug = _Augment(seed)
        self.caption_image = features.caption_image
        self.image_ids = features.image_ids
        self.word_mask = word_mask if (word_mask is not None and word_mask.prob > 0) else None
        if self.word_mask is not None and text == "input_ids" and self.word_mask.mask_id is None:
            raise ValueError("CaptionDataset: word masking of input_ids needs the tokenizer's mask_id / vocab_size "
                             "(build it with word_masking_for_tokenizer)")

    def _random_token_row(self, rng: np.random.Generator) -> np.ndarray:
        """Frozen feature (Dt,) of a random inner token of a random caption (word masking, 'random')."""
        fs = self.features
        c = int(rng.integers(self.features.num_captions))
        n = fs.token_len(c)
        j = int(rng.integers(1, n - 1)) if n > 2 else int(rng.integers(n))
        return fs.tokens(c)[j]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self._aug.set_epoch(epoch)

    def __len__(self) -> int:
        return self.features.num_captions

    def __getitem__(self, c: int) -> dict[str, Any]:
        fs = self.features
        if not 0 <= c < len(self):
            raise IndexError(f"caption index {c} out of range [0, {len(self)})")
        i = int(fs.caption_image[c])
        regions = fs.regions(i)
        item: dict[str, Any] = {"img_index": i, "cap_index": int(c)}
        rng = self._aug.rng(c) if self.train else None
        if rng is not None and self.region_drop > 0:
            regions = regions[drop_rows(len(regions), self.region_drop, rng)]
        item["regions"] = regions
        if self.text is not None:
            seq = fs.tokens(c) if self.text == "tokens" else fs.input_ids(c)
            if rng is not None and self.token_drop > 0:
                seq = seq[_drop_tokens(len(seq), self.token_drop, rng)]
            if rng is not None and self.word_mask is not None:
                if self.text == "input_ids":
                    seq = self.word_mask.apply_ids(seq, rng)
                else:
                    seq = self.word_mask.apply_features(seq, rng, self._random_token_row)
            item[self.text] = seq
        if self.with_global:
            item["img_global"] = fs.img_global(i)
            item["txt_global"] = fs.txt_global(c)
        return item


class ImageDataset(Dataset):
    """Evaluation dataset over the ``N`` unique images (no augmentation).

    Item: ``regions`` float32 (Nr, Dr), ``img_global`` (Dg,) [if with_global], ``img_index``.
    Collate with :func:`collate_images`. Raises DataError when ``img_global`` is asked for but absent.
    """

    def __init__(self, features: FeatureSplit, *, with_global: bool = True) -> None:
        _check_text(features, None, with_global, image=True, caption=False)
        self.features, self.with_global = features, with_global
        self.image_ids = features.image_ids

    def __len__(self) -> int:
        return self.features.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range [0, {len(self)})")
        item: dict[str, Any] = {"img_index": int(i), "regions": self.features.regions(i)}
        if self.with_global:
            item["img_global"] = self.features.img_global(i)
        return item


class TextDataset(Dataset):
    """Evaluation dataset over the ``M`` captions (no augmentation).

    Item: ``tokens`` (L, Dt) or ``input_ids`` (L,) [per ``text``], ``txt_global`` (Dgt,) [if with_global],
    ``cap_index``, ``img_index``. Collate with :func:`collate_texts`.
    """

    def __init__(self, features: FeatureSplit, *, text: str | None = "tokens", with_global: bool = True) -> None:
        _check_text(features, text, with_global, image=False, caption=True)
        if text is None and not with_global:
            raise DataError("TextDataset needs text='tokens'/'input_ids' or with_global=True (nothing to return)")
        self.features, self.text, self.with_global = features, text, with_global
        self.caption_image = features.caption_image

    def __len__(self) -> int:
        return self.features.num_captions

    def __getitem__(self, c: int) -> dict[str, Any]:
        if not 0 <= c < len(self):
            raise IndexError(f"caption index {c} out of range [0, {len(self)})")
        fs = self.features
        item: dict[str, Any] = {"cap_index": int(c), "img_index": int(fs.caption_image[c])}
        if self.text is not None:
            item[self.text] = fs.tokens(c) if self.text == "tokens" else fs.input_ids(c)
        if self.with_global:
            item["txt_global"] = fs.txt_global(c)
        return item


# ---------------------------------------------------------------------- collate
def _pad(seqs: Sequence[np.ndarray], dtype: np.dtype, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    empty = np.flatnonzero(lens < 1)
    if empty.size:  # validated here, where data enters: the training step runs without value checks
        raise DataError(f"collate: item {int(empty[0])} has no {key or 'fragments'} (length 0); every item needs "
                        f"at least one region / token")
    out = np.zeros((len(seqs), int(lens.max()), *seqs[0].shape[1:]), dtype=dtype)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return torch.from_numpy(out), torch.from_numpy(lens)


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into the batch dict of docs/DESIGN.md, padding to the batch maximum.

    Output keys (those present in the items): ``regions`` (B, Nmax, Dr) float32 + ``region_lens`` (B,)
    int64; ``tokens`` (B, Lmax, Dt) float32 or ``input_ids`` (B, Lmax) int64 (pad 0) + ``token_lens``
    (B,) int64; ``img_global`` (B, Dg) float32; ``txt_global`` (B, Dgt) float32; ``img_index``,
    ``cap_index`` (B,) int64. Padding is zeros; lengths give the valid prefix.

    Args:
        items: ``B >= 1`` item dicts of one dataset (numpy arrays as documented on the datasets, plus
            int ``img_index`` / ``cap_index``).
    Returns:
        dict of CPU tensors (float32 features, int64 lengths / ids / indices) as listed above.
    Raises:
        DataError: empty batch, items with different keys, or an item with no regions / tokens (length 0;
            names the item). Lengths are thus valid here, so the trainer's step runs inside
            ``aahr_fast.ops.value_checks(False)``.
        ValueError: items whose feature widths differ (``Dr`` / ``Dt`` / ``Dg`` / ``Dgt``; numpy's
            broadcast / stack error, not checked further).
    """
    if not items:
        raise DataError("collate: empty batch")
    keys = set(items[0])
    for b, it in enumerate(items):
        if set(it) != keys:
            raise DataError(f"collate: item {b} has keys {sorted(it)}, item 0 has {sorted(keys)}")
    out: dict[str, torch.Tensor] = {}
    if "regions" in keys:
        out["regions"], out["region_lens"] = _pad([it["regions"] for it in items], key="regions", dtype=np.float32)
    if "tokens" in keys:
        out["tokens"], out["token_lens"] = _pad([it["tokens"] for it in items], key="tokens", dtype=np.float32)
    if "input_ids" in keys:
        out["input_ids"], out["token_lens"] = _pad([it["input_ids"] for it in items], key="input_ids", dtype=np.int64)
    for k in ("img_global", "txt_global"):
        if k in keys:
            out[k] = torch.from_numpy(np.stack([it[k] for it in items]).astype(np.float32, copy=False))
    for k in ("img_index", "cap_index"):
        if k in keys:
            out[k] = torch.tensor([it[k] for it in items], dtype=torch.int64)
    return out


def collate_captions(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`CaptionDataset` items (see :func:`collate_batch` for the keys and shapes).

    Returns:
        ``regions`` (B, Nmax, Dr) float32, ``region_lens`` (B,) int64; ``tokens`` (B, Lmax, Dt) float32
        or ``input_ids`` (B, Lmax) int64 with ``token_lens`` (B,) int64 (per the dataset's ``text``);
        ``img_global`` (B, Dg) / ``txt_global`` (B, Dgt) float32 (if ``with_global``); ``img_index``,
        ``cap_index`` (B,) int64. Zero padding.
    Raises:
        DataError / ValueError: as :func:`collate_batch`.
    """
    return collate_batch(items)


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`ImageDataset` items: ``regions``, ``region_lens``, ``img_global``, ``img_index``.

    Returns:
        ``regions`` (B, Nmax, Dr) float32 (zero padded), ``region_lens`` (B,) int64, ``img_global``
        (B, Dg) float32 (if the dataset has ``with_global``), ``img_index`` (B,) int64.
    Raises:
        DataError / ValueError: as :func:`collate_batch`.
    """
    return collate_batch(items)


def collate_texts(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`TextDataset` items: ``tokens``/``input_ids``, ``token_lens``, ``txt_global``,
    ``cap_index``, ``img_index``.

    Returns:
        ``tokens`` (B, Lmax, Dt) float32 or ``input_ids`` (B, Lmax) int64 (pad 0) with ``token_lens``
        (B,) int64 (when the dataset has ``text``); ``txt_global`` (B, Dgt) float32 (if
        ``with_global``); ``cap_index``, ``img_index`` (B,) int64.
    Raises:
        DataError / ValueError: as :func:`collate_batch`.
    """
    return collate_batch(items)

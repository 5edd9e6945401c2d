"""Procedural *toy features*: a prepared feature folder (docs/DESIGN.md) without images or backbones.

Used by fast tests and smoke runs of the trainer: the files have exactly the layout ``prepare`` writes,
but the vectors are generated from a hidden scene description so that a dual encoder can learn them.

Generative model (all random tables are fixed by ``seed`` and shared by every split):

* a scene has 1-3 objects; an object is (shape, colour, size, position) drawn from
  ``SHAPES`` x ``COLOURS`` x ``SIZES`` x ``POSITIONS``;
* region ``r`` of an object = sum of the fixed region embeddings of the object's four attributes
  (each ``N(0, 1/4)`` per entry, so the sum has unit variance) + Gaussian noise (std ``noise``).
  An object covers 1-3 of the ``n_regions`` rows; the first is complete, further "part" rows
  drop each attribute with p = 0.5. The remaining rows (at least one of them in most scenes) are clutter:
  one of ``N_BACKGROUNDS`` fixed background embeddings + noise. Rows are shuffled. (Every row is a
  valid region: the precomp format has no region mask, so "padding" is clutter, never zeros.)
* global image vector = sum over objects of fixed per-attribute global embeddings
  (``global_img_dim``) + noise;
* each caption is a template sentence naming some of the objects ("a large red circle at left and a
  blue star", "there is a green square", ...), at most ``max_tokens - 2`` words so that
  ``[CLS] words [SEP]`` fits ``max_tokens``. Token features = fixed per-word embedding
  (``token_dim``) + noise; ``[CLS]``/``[SEP]`` have their own embeddings; the sentence vector = sum
  of per-word global embeddings of the content words (``global_txt_dim``) + noise;
  ``input_ids`` index a fixed vocabulary (0 = ``[PAD]``, 1 = ``[CLS]``, 2 = ``[SEP]``).

Images are scored against captions by shared attributes only, so matching is learnable (a linear
map between mean-pooled regions and mean-pooled tokens is far above chance) but not trivial: captions
name subsets of the objects and attributes, and scenes share attributes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from aahr_fast.utils.errors import ConfigError
from aahr_fast.utils.io import atomic_save_json, atomic_save_npy, atomic_write

__all__ = ["write_toy_features", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "toy_vocabulary"]

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
N_BACKGROUNDS = 4
_FUNCTION_WORDS = ("a", "and", "at", "there", "is", "with", "an", "image", "of")
_SPECIALS = ("[PAD]", "[CLS]", "[SEP]")


def toy_vocabulary() -> list[str]:
    """The fixed toy vocabulary; position ``k`` is input id ``k`` (0 = ``[PAD]``, 1 = ``[CLS]``, 2 = ``[SEP]``)."""
    return [*_SPECIALS, *_FUNCTION_WORDS, *SHAPES, *COLOURS, *SIZES, *POSITIONS]


def _caption_words(objects: list[tuple[int, int, int, int]], rng: np.random.Generator, max_words: int) -> list[str]:
    """One template caption (list of words) naming a random subset of ``objects``, <= ``max_words`` words."""
    order = rng.permutation(len(objects))
    style = int(rng.integers(3))
    words: list[str] = []
    if style == 1:
        words = ["there", "is"]
    elif style == 2:
        words = ["an", "image", "of"]
    for k, j in enumerate(order):
        shape, colour, size, pos = objects[j]
        phrase = ["and"] if k else []
        phrase.append("a")
        if rng.random() < 0.5:
            phrase.append(SIZES[size])
        phrase += [COLOURS[colour], SHAPES[shape]]
        art = phrase.index("a")
        if phrase[art + 1][0] in "aeiou":
            phrase[art] = "an"
        if rng.random() < 0.4:
            phrase += ["at", POSITIONS[pos]]
        if len(words) + len(phrase) > max_words:
            if k == 0:  # the first object must fit: fall back to the bare "a colour shape"
                words = ["an" if COLOURS[colour][0] in "aeiou" else "a", COLOURS[colour], SHAPES[shape]]
            break
        words += phrase
    return words


def write_toy_features(
    folder: str | os.PathLike,
    split_sizes: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    captions_per_image: int = 5,
    n_regions: int = 12,
    region_dim: int = 64,
    token_dim: int = 32,
    global_img_dim: int = 48,
    global_txt_dim: int = 24,
    max_tokens: int = 12,
    noise: float = 0.5,
) -> dict:
    """Write a prepared feature folder of procedurally generated, learnable features.

    Files per split ``S`` (docs/DESIGN.md): ``S_ims.npy`` (N, n_regions, region_dim) float16,
    ``S_caps.txt``/``S_ids.txt`` (M = N * captions_per_image lines, captions of an image contiguous),
    ``S_ims_global.npy`` (N, global_img_dim) float32, ``S_txt_tokens.npy`` (M, max_tokens, token_dim)
    float16 zero-padded, ``S_txt_lens.npy`` (M,) int32 (with [CLS]/[SEP]), ``S_txt_global.npy``
    (M, global_txt_dim) float32, ``S_txt_input_ids.npy`` (M, max_tokens) int32 (0 = pad); then
    ``meta.json`` last. Every write is atomic (``aahr_fast.utils.io``). Deterministic in all arguments.

    Args:
        folder: output folder (created). split_sizes: images per split, default
            ``{"train": 400, "dev": 100, "test": 100}``. seed: seeds every random draw.
        noise: std of the Gaussian noise added to every vector (embedding entries have std 1/2).
    Returns:
        The meta dict written to ``meta.json``.
    Raises:
        ConfigError: non-positive sizes/dims, ``max_tokens < 5`` (needs [CLS] a colour shape [SEP]),
            ``n_regions < 3``, negative noise.
    """
    sizes = dict(split_sizes) if split_sizes is not None else {"train": 400, "dev": 100, "test": 100}
    for k, v in {"captions_per_image": captions_per_image, "region_dim": region_dim, "token_dim": token_dim,
                 "global_img_dim": global_img_dim, "global_txt_dim": global_txt_dim}.items():
        if int(v) < 1:
            raise ConfigError(f"write_toy_features: {k} must be >= 1, got {v}")
    for name, n in sizes.items():
        if int(n) < 1:
            raise ConfigError(f"write_toy_features: split {name!r} needs >= 1 image, got {n}")
    if max_tokens < 5:
        raise ConfigError(f"write_toy_features: max_tokens must be >= 5 ([CLS] a colour shape [SEP]), got {max_tokens}")
    if n_regions < 3:
        raise ConfigError(f"write_toy_features: n_regions must be >= 3, got {n_regions}")
    if noise < 0:
        raise ConfigError(f"write_toy_features: noise must be >= 0, got {noise}")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = toy_vocabulary()
    word_id = {w: i for i, w in enumerate(vocab)}
    n_attr = (len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS))
    offsets = np.cumsum((0,) + n_attr)  # attribute a of kind k -> row offsets[k] + a in the tables

    tables = np.random.default_rng([seed, 0])
    attr_region = tables.normal(0.0, 0.5, (offsets[-1], region_dim))
    background = tables.normal(0.0, 1.0, (N_BACKGROUNDS, region_dim))
    attr_global = tables.normal(0.0, 0.5, (offsets[-1], global_img_dim))
    word_tok = tables.normal(0.0, 1.0, (len(vocab), token_dim))
    word_glob = tables.normal(0.0, 0.5, (len(vocab), global_txt_dim))
    content = np.array([w not in _SPECIALS and w not in _FUNCTION_WORDS for w in vocab])

    config = dict(seed=seed, split_sizes=sizes, captions_per_image=captions_per_image, n_regions=n_regions,
                  region_dim=region_dim, token_dim=token_dim, global_img_dim=global_img_dim,
                  global_txt_dim=global_txt_dim, max_tokens=max_tokens, noise=noise, version=1)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    counts = {}
    for si, (split, n_img) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, 1, si])
        n_img = int(n_img)
        m = n_img * captions_per_image
        ims = np.empty((n_img, n_regions, region_dim), np.float32)
        ims_global = np.empty((n_img, global_img_dim), np.float32)
        tokens = np.zeros((m, max_tokens, token_dim), np.float32)
        input_ids = np.zeros((m, max_tokens), np.int32)
        lens = np.empty(m, np.int32)
        txt_global = np.empty((m, global_txt_dim), np.float32)
        captions: list[str] = []
        for i in range(n_img):
            n_obj = int(rng.integers(1, 4))
            objects = [tuple(int(rng.integers(n)) for n in n_attr) for _ in range(n_obj)]
            rows = []
            for obj in objects:
                attr_rows = offsets[:-1] + np.array(obj)
                rows.append(attr_region[attr_rows].sum(0))
                for _ in range(int(rng.integers(0, 3))):  # part regions: attributes dropped at p = 0.5
                    keep = rng.random(4) < 0.5
                    keep[rng.integers(4)] = True
                    rows.append(attr_region[attr_rows[keep]].sum(0))
            rows = rows[:n_regions]
            while len(rows) < n_regions:
                rows.append(background[rng.integers(N_BACKGROUNDS)].copy())
            reg = np.stack(rows)[rng.permutation(n_regions)]
            ims[i] = reg + rng.normal(0.0, noise, reg.shape)
            g = sum(attr_global[offsets[:-1] + np.array(o)].sum(0) for o in objects)
            ims_global[i] = g + rng.normal(0.0, noise, global_img_dim)
            for j in range(captions_per_image):
                c = i * captions_per_image + j
                words = _caption_words(objects, rng, max_tokens - 2)
                captions.append(" ".join(words))
                ids = np.array([1, *(word_id[w] for w in words), 2])
                L = len(ids)
                lens[c] = L
                input_ids[c, :L] = ids
                tokens[c, :L] = word_tok[ids] + rng.normal(0.0, noise, (L, token_dim))
                cw = ids[content[ids]]
                txt_global[c] = word_glob[cw].sum(0) + rng.normal(0.0, noise, global_txt_dim)
        image_ids = [f"toy_{split}_{i:06d}" for i in range(n_img)]
        atomic_save_npy(ims.astype(np.float16), folder / f"{split}_ims.npy")
        atomic_save_npy(ims_global, folder / f"{split}_ims_global.npy")
        atomic_save_npy(tokens.astype(np.float16), folder / f"{split}_txt_tokens.npy")
        atomic_save_npy(lens, folder / f"{split}_txt_lens.npy")
        atomic_save_npy(txt_global, folder / f"{split}_txt_global.npy")
        atomic_save_npy(input_ids, folder / f"{split}_txt_input_ids.npy")
        with atomic_write(folder / f"{split}_caps.txt", "w") as fh:
            fh.write("".join(c + "\n" for c in captions))
        with atomic_write(folder / f"{split}_ids.txt", "w") as fh:
            fh.write("".join(iid + "\n" for iid in image_ids for _ in range(captions_per_image)))
        counts[split] = {"images": n_img, "captions": m}

    meta = {
        "format": "aahr_fast.prepared/1",  # the layout aahr_fast.prepare writes
        "toy": True,
        "image_backbone": {"name": "toy", "num_regions": n_regions, "region_dim": region_dim,
                           "global_dim": global_img_dim},
        "text_backbone": {"name": "toy", "token_dim": token_dim, "global_dim": global_txt_dim, "pad_id": 0,
                          "lengths": "include [CLS] and [SEP]"},
        "dims": {"region": region_dim, "img_global": global_img_dim, "token": token_dim,
                 "txt_global": global_txt_dim},
        "n_regions": n_regions,
        "max_tokens": max_tokens,
        "dtype": "float16",  # regions and token features; global vectors are float32
        "vocab_size": len(vocab),
        "splits": counts,
        "config": config,
        "config_hash": config_hash,
    }
    atomic_save_json(meta, folder / "meta.json")
    return meta

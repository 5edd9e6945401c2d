"""The embedded default dataset: procedurally rendered shape scenes with template captions.

Nothing is downloaded: ``make_synthetic(root, ...)`` renders 224x224 RGB JPEG scenes with PIL from a seed
and returns one :class:`~aahr_fast.data.dataset.ImageTextSplit` per split (``train``, ``dev``, ``test``).

Scenes
    1-3 objects on a plain background (``white``, ``grey`` or ``black``) with faint pixel noise and a
    soft brightness gradient. An object has a shape (``SHAPES``: circle, square, triangle, star,
    cross, diamond; the shapes of one scene are distinct so "the circle" is unambiguous), a colour
    (``COLOURS``: red, green, blue, yellow, purple, orange, each jittered by up to +-15 per channel), a size
    (small = radius 22 px, large = radius 40 px; i.e. 1.4 and 2.5 cells of a 7x7 feature grid) and a
    small random rotation. A single object sits at a ``POSITIONS`` anchor (left, right, top, bottom,
    centre). Two or three objects occupy distinct cells of a 2x2 grid; objects 0 and 1 ("A" and "B")
    share a row or a column, which gives the spatial relation ``A <relation> B`` with relation in
    ``RELATIONS`` (left of, right of, above, below). Objects never overlap.

Captions
    Five paraphrases per image, one from each of five templates, e.g. "a red circle to the left of a
    small blue square", "there is a ...", "a small blue square to the right of a red circle" (the
    inverse relation), "a red circle and a blue square, the circle is left of the square", "a picture
    of ... on a white background". Every caption names colour and shape of A and B and their relation
    (or the position of a single object); the size word appears with p = 0.5; a third object is
    mentioned by colour and shape.

Near-miss scenes (soft negatives)
    With probability ``near_miss`` a scene is followed (next index) by a *sibling* that differs in
    exactly one thing: the colour, shape or size of object A or B, the relation (A and B swap cells,
    so "left of" becomes "right of"), or, for a single object, its position. Everything else (the other
    objects, cells, background, rotation, colour jitter, noise) is identical. Captions of both
    siblings always name the changed attribute (size words are forced when size is what differs), so
    each caption matches exactly one of the two. ``load_scenes(root, split)`` returns the scene
    records with ``sibling_of`` and ``change`` fields.

Files under ``root``: ``images/{split}_{index:05d}.jpg``, ``{split}_scenes.json`` (scene records and
captions) and ``synthetic.json`` (the config and its hash, written last). A re-run with the same
config finds ``synthetic.json`` with the same hash and all images present and writes nothing.
Every file is written atomically (``aahr_fast.utils.io``).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.utils.errors import ConfigError, DataError
from aahr_fast.utils.io import atomic_save_json, atomic_write

__all__ = ["make_synthetic", "load_scenes", "render_scene", "object_centre", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "RELATIONS"]

IMAGE_SIZE = 224
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 185),
    "orange": (245, 130, 20),
}
SIZES = {"small": 22, "large": 40}  # radius in pixels
BACKGROUNDS = {"white": (242, 242, 242), "grey": (165, 165, 165), "black": (28, 28, 28)}  # grey levels only
POSITIONS = {"left": (58, 112), "right": (166, 112), "top": (112, 58), "bottom": (112, 166), "centre": (112, 112)}
CELLS = {(0, 0): (60, 60), (0, 1): (164, 60), (1, 0): (60, 164), (1, 1): (164, 164)}
RELATIONS = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_REL_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
_POS_WORDS = {
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
_VERSION = 1
_RAMP = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)
_NOISE: list[np.ndarray] = []


def _noise_bank() -> np.ndarray:
    """A fixed (2S, 2S) float32 N(0, 4^2) texture; backgrounds use random S x S crops of it."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(12345).standard_normal((2 * IMAGE_SIZE, 2 * IMAGE_SIZE),
                                                                   dtype=np.float32) * np.float32(4.0))
    return _NOISE[0]


# ---------------------------------------------------------------------- scenes
def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    if a[0] == b[0]:
        return "left of" if a[1] < b[1] else "right of"
    return "above" if a[0] < b[0] else "below"


def _new_scene(rng: np.random.Generator) -> dict[str, Any]:
    n_obj = int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.30]))
    shapes = rng.choice(len(SHAPES), size=n_obj, replace=False)
    objects = []
    for k in range(n_obj):
        objects.append({
            "shape": SHAPES[int(shapes[k])],
            "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
            "size": list(SIZES)[int(rng.integers(len(SIZES)))],
            "jitter": [int(v) for v in rng.integers(-8, 9, size=2)],
            "rotation": float(rng.uniform(-15, 15)),
            "shade": [int(v) for v in rng.integers(-15, 16, size=3)],
        })
    scene: dict[str, Any] = {"objects": objects, "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
                             "noise_seed": int(rng.integers(2**31)), "sibling_of": None, "change": None}
    if n_obj == 1:
        scene["position"] = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        scene["relation"] = None
    else:
        a = list(CELLS)[int(rng.integers(4))]
        # B shares a row or a column with A
        b = (a[0], 1 - a[1]) if rng.random() < 0.5 else (1 - a[0], a[1])
        objects[0]["cell"], objects[1]["cell"] = list(a), list(b)
        if n_obj == 3:
            free = [c for c in CELLS if c not in (a, b)]
            objects[2]["cell"] = list(free[int(rng.integers(len(free)))])
        scene["position"] = None
        scene["relation"] = _relation(a, b)
    return scene


def _sibling(scene: dict[str, Any], rng: np.random.Generator, index: int) -> dict[str, Any]:
    """A copy of ``scene`` that differs in exactly one attribute of object A/B, the relation or the position."""
    sib = json.loads(json.dumps(scene))
    objs = sib["objects"]
    n_obj = len(objs)
    kinds = ["colour", "shape", "size"] + (["position"] if n_obj == 1 else ["relation"])
    kind = kinds[int(rng.integers(len(kinds)))]
    k = int(rng.integers(min(n_obj, 2)))
    if kind == "colour":
        objs[k]["colour"] = str(rng.choice([c for c in COLOURS if c != objs[k]["colour"]]))
    elif kind == "shape":
        used = {o["shape"] for o in objs}
        objs[k]["shape"] = str(rng.choice([s for s in SHAPES if s not in used]))
    elif kind == "size":
        objs[k]["size"] = "small" if objs[k]["size"] == "large" else "large"
    elif kind == "position":
        sib["position"] = str(rng.choice([p for p in POSITIONS if p != scene["position"]]))
        k = 0
    else:
        objs[0]["cell"], objs[1]["cell"] = objs[1]["cell"], objs[0]["cell"]
        sib["relation"] = _INVERSE[scene["relation"]]
        k = -1
    sib["sibling_of"] = index
    sib["change"] = kind if k < 0 or kind == "position" else f"{kind}:{k}"
    return sib


def _noun(obj: dict[str, Any], with_size: bool, article: bool = True) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    text = " ".join(words)
    if not article:
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def _captions(scene: dict[str, Any], rng: np.random.Generator, n: int) -> list[str]:
    objs = scene["objects"]
    forced = scene.get("_force_size", set())

    def noun(k: int, article: bool = True) -> str:
        return _noun(objs[k], k in forced or bool(rng.random() < 0.5), article)

    bg = scene["background"]
    caps = []
    templates = rng.permutation(5)
    for t in (templates[i % 5] for i in range(n)):
        if len(objs) == 1:
            pos = str(rng.choice(_POS_WORDS[scene["position"]]))
            cap = [
                lambda: f"{noun(0)} {pos}",
                lambda: f"there is {noun(0)} {pos}",
                lambda: f"a single {noun(0, False)} {pos} on a {bg} background",
                lambda: f"{pos}, {noun(0)}",
                lambda: f"a picture of one {noun(0, False)} {pos}",
            ][int(t)]()
        else:
            rel = scene["relation"]
            r = str(rng.choice(_REL_WORDS[rel]))
            ri = str(rng.choice(_REL_WORDS[_INVERSE[rel]]))
            a, b = objs[0], objs[1]
            cap = [
                lambda: f"{noun(0)} {r} {noun(1)}",
                lambda: f"there is {noun(0)} {r} {noun(1)}",
                lambda: f"{noun(1)} {ri} {noun(0)}",
                lambda: f"{noun(0)} and {noun(1)}, the {a['shape']} is {r} the {b['shape']}",
                lambda: f"a picture of {noun(0)} {r} {noun(1)} on a {bg} background",
            ][int(t)]()
            if len(objs) == 3:
                cap += str(rng.choice([" and {}", " next to {}", ", with {} nearby"])).format(noun(2))
        caps.append(cap)
    return caps


# ---------------------------------------------------------------------- rendering
def _polygon(shape: str, x: float, y: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.radians(45 + 90 * i), r * 0.95) for i in range(4)]
    elif shape == "triangle":
        pts = [(math.radians(-90 + 120 * i), r) for i in range(3)]
    elif shape == "star":
        pts = [(math.radians(-90 + 36 * i), r if i % 2 == 0 else r * 0.45) for i in range(10)]
    elif shape == "diamond":
        return [(x + dx * math.cos(math.radians(rot)) - dy * math.sin(math.radians(rot)),
                 y + dx * math.sin(math.radians(rot)) + dy * math.cos(math.radians(rot)))
                for dx, dy in ((0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0))]
    elif shape == "cross":
        w = r * 0.34
        outline = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        return [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in outline]
    else:
        raise ValueError(shape)
    return [(x + d * math.cos(a + math.radians(rot)), y + d * math.sin(a + math.radians(rot))) for a, d in pts]


def object_centre(scene: dict[str, Any], k: int) -> tuple[int, int]:
    """Pixel centre ``(x, y)`` of object ``k`` of a scene record."""
    obj = scene["objects"][k]
    base = POSITIONS[scene["position"]] if scene["position"] is not None else CELLS[tuple(obj["cell"])]
    return base[0] + obj["jitter"][0], base[1] + obj["jitter"][1]


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """Render a scene record to a 224x224 RGB ``PIL.Image`` (deterministic given the record)."""
    rng = np.random.default_rng(scene["noise_seed"])
    angle = rng.uniform(0, 2 * np.pi)
    ox, oy = (int(v) for v in rng.integers(IMAGE_SIZE, size=2))
    # faint pixel noise (std 4 grey levels: a crop of a fixed noise texture) on a soft +-10 gradient
    lum = _noise_bank()[oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE] + (
        np.float32(10.0 * np.cos(angle)) * _RAMP[None, :] + np.float32(10.0 * np.sin(angle)) * _RAMP[:, None])
    lum += np.float32(BACKGROUNDS[scene["background"]][0] + 0.5)
    np.clip(lum, 0, 255, out=lum)
    img = Image.fromarray(lum.astype(np.uint8), "L").convert("RGB")
    draw = ImageDraw.Draw(img)
    for k, obj in enumerate(scene["objects"]):
        x, y = object_centre(scene, k)
        r = SIZES[obj["size"]]
        fill = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLOURS[obj["colour"]], obj["shade"]))
        if obj["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], x, y, r, obj["rotation"]), fill=fill)
    return img


# ---------------------------------------------------------------------- public API
def _config(n_train: int, n_dev: int, n_test: int, seed: int, near_miss: float, captions_per_image: int,
            jpeg_quality: int) -> dict[str, Any]:
    return {"version": _VERSION, "image_size": IMAGE_SIZE, "seed": int(seed),
            "splits": {"train": int(n_train), "dev": int(n_dev), "test": int(n_test)},
            "near_miss": float(near_miss), "captions_per_image": int(captions_per_image),
            "jpeg_quality": int(jpeg_quality)}


def _generate(config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for si, (split, n) in enumerate(config["splits"].items()):
        rng = np.random.default_rng([config["seed"], si])
        scenes: list[dict[str, Any]] = []
        while len(scenes) < n:
            s = _new_scene(rng)
            scenes.append(s)
            if len(scenes) < n and rng.random() < config["near_miss"]:
                sib = _sibling(s, rng, len(scenes) - 1)
                if sib["change"].startswith("size:"):
                    s["_force_size"] = sib["_force_size"] = {int(sib["change"][5:])}
                scenes.append(sib)
        for i, s in enumerate(scenes):
            s["file"] = f"{split}_{i:05d}.jpg"
            s["captions"] = _captions(s, rng, config["captions_per_image"])
            s.pop("_force_size", None)
        out[split] = scenes
    return out


def _as_split(split: str, root: Path, scenes: list[dict[str, Any]]) -> ImageTextSplit:
    return ImageTextSplit.from_groups(
        name=split, source=str(root), image_ids=[s["file"] for s in scenes],
        groups=[s["captions"] for s in scenes], image_paths=[root / "images" / s["file"] for s in scenes],
    )


def make_synthetic(
    root: str | os.PathLike,
    n_train: int = 1000,
    n_dev: int = 200,
    n_test: int = 200,
    seed: int = 0,
    *,
    near_miss: float = 0.25,
    captions_per_image: int = 5,
    jpeg_quality: int = 92,
) -> dict[str, ImageTextSplit]:
    """Render (or find already rendered) the synthetic shapes dataset under ``root``.

    Args:
        root: output folder (created). n_train, n_dev, n_test: images per split. seed: seeds everything.
        near_miss: probability that a scene is followed by a near-miss sibling (see module docstring).
        captions_per_image: paraphrases per image (templates are cycled). jpeg_quality: JPEG quality.
    Returns:
        ``{"train": ImageTextSplit, "dev": ..., "test": ...}``; ``image_ids`` are the file names,
        ``image_paths`` the JPEGs, captions contiguous per image.
    Raises:
        ConfigError: a split size < 1, ``near_miss`` outside [0, 1], ``captions_per_image`` < 1.
    """
    for nm, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test), ("captions_per_image", captions_per_image)):
        if int(v) < 1:
            raise ConfigError(f"make_synthetic: {nm} must be >= 1, got {v}")
    if not 0.0 <= near_miss <= 1.0:
        raise ConfigError(f"make_synthetic: near_miss must be in [0, 1], got {near_miss}")
    root = Path(root)
    config = _config(n_train, n_dev, n_test, seed, near_miss, captions_per_image, jpeg_quality)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    scenes = _generate(config)
    manifest = root / "synthetic.json"
    done = False
    if manifest.is_file():
        try:
            done = json.loads(manifest.read_text()).get("hash") == digest
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            done = False
        if done:
            present = set(os.listdir(root / "images")) if (root / "images").is_dir() else set()
            done = all(s["file"] in present for ss in scenes.values() for s in ss)
    if not done:
        if manifest.is_file():
            manifest.unlink()  # the folder is being rewritten: incomplete until the new manifest lands
        (root / "images").mkdir(parents=True, exist_ok=True)

        def write(s: dict[str, Any]) -> None:
            buf = io.BytesIO()
            render_scene(s).save(buf, format="JPEG", quality=config["jpeg_quality"])
            with atomic_write(root / "images" / s["file"], "wb") as fh:
                fh.write(buf.getvalue())

        # threads overlap the per-file fsync of the atomic writes (the bulk of the time otherwise)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in pool.map(write, [s for ss in scenes.values() for s in ss]):
                pass
        for split, ss in scenes.items():
            atomic_save_json(ss, root / f"{split}_scenes.json", indent=None)
        atomic_save_json({"config": config, "hash": digest}, manifest)
    return {split: _as_split(split, root, ss) for split, ss in scenes.items()}


def load_scenes(root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Scene records of ``split`` written by :func:`make_synthetic` (objects, relation/position,
    background, captions, ``file``, ``sibling_of`` (index or None) and ``change``).

    Raises:
        DataError: ``{split}_scenes.json`` missing or unreadable.
    """
    path = Path(root) / f"{split}_scenes.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist (run make_synthetic first, split names: train/dev/test)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None

"""Tests of the embedded synthetic shapes dataset (determinism, idempotent re-runs, near-miss siblings,
visible objects in the pixels)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from aahr_fast.data.readers import open_dataset
from aahr_fast.data.synthetic import COLOURS, SIZES, load_scenes, make_synthetic, object_centre
from aahr_fast.utils.errors import ConfigError, DataError

SMALL = dict(n_train=40, n_dev=8, n_test=8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, make_synthetic(root, seed=1, near_miss=0.5, **SMALL)


def test_splits(synth):
    root, splits = synth
    assert set(splits) == {"train", "dev", "test"}
    tr = splits["train"]
    assert tr.num_images == 40 and tr.num_captions == 200
    assert np.all(np.bincount(tr.caption_image) == 5)
    assert all(p.is_file() for p in tr.image_paths)
    assert tr.image_ids[3] == "train_00003.jpg"
    with Image.open(tr.image_paths[0]) as im:
        assert im.size == (224, 224) and im.mode == "RGB"
    assert len(set(splits["dev"].image_ids) & set(tr.image_ids)) == 0
    # five different paraphrases per image
    assert all(len({tr.captions[c] for c in tr.captions_of(i)}) >= 4 for i in range(tr.num_images))


def test_deterministic_by_seed(tmp_path, synth):
    root, splits = synth
    again = make_synthetic(tmp_path / "b", seed=1, near_miss=0.5, **SMALL)
    assert again["train"].captions == splits["train"].captions
    for i in (0, 7, 39):
        assert (tmp_path / "b" / "images" / f"train_{i:05d}.jpg").read_bytes() == \
            (root / "images" / f"train_{i:05d}.jpg").read_bytes()
    other = make_synthetic(tmp_path / "c", seed=2, near_miss=0.5, **SMALL)
    assert other["train"].captions != splits["train"].captions


def test_rerun_is_noop_and_config_change_rerenders(tmp_path):
    root = tmp_path / "s"
    make_synthetic(root, 6, 2, 2, seed=0)
    files = sorted(root.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    make_synthetic(root, 6, 2, 2, seed=0)
    assert sorted(root.rglob("*")) == files
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files)
    old = json.loads((root / "synthetic.json").read_text())["hash"]
    make_synthetic(root, 6, 2, 2, seed=3)  # different config: rendered again, new manifest
    assert json.loads((root / "synthetic.json").read_text())["hash"] != old
    (root / "images" / "train_00002.jpg").unlink()  # a missing image forces a re-render too
    make_synthetic(root, 6, 2, 2, seed=3)
    assert (root / "images" / "train_00002.jpg").is_file()


def _diff(a: dict, b: dict) -> list[str]:
    out = []
    for k, (oa, ob) in enumerate(zip(a["objects"], b["objects"])):
        for f in ("shape", "colour", "size"):
            if oa[f] != ob[f]:
                out.append(f"{f}:{k}")
    if a["relation"] != b["relation"]:
        out.append("relation")
    if a["position"] != b["position"]:
        out.append("position")
    return out


def test_near_miss_siblings(synth):
    root, splits = synth
    scenes = load_scenes(root, "train")
    pairs = [(s["sibling_of"], i) for i, s in enumerate(scenes) if s["sibling_of"] is not None]
    assert len(pairs) >= 5  # near_miss=0.5 over 40 images
    kinds = set()
    for a, b in pairs:
        sa, sb = scenes[a], scenes[b]
        assert b == a + 1 and sa["sibling_of"] is None
        d = _diff(sa, sb)
        assert d == [sb["change"]], (a, d, sb["change"])  # exactly one difference, as recorded
        kinds.add(d[0].split(":")[0])
        assert sa["background"] == sb["background"] and len(sa["objects"]) == len(sb["objects"])
        if d[0] == "relation":
            assert sa["objects"][0]["cell"] == sb["objects"][1]["cell"]
        # every caption of both siblings names the changed attribute value
        if d[0].split(":")[0] in ("shape", "colour", "size"):
            f, k = d[0].split(":")
            for s in (sa, sb):
                assert all(s["objects"][int(k)][f] in c.split() for c in s["captions"])
        # the images differ in pixels
        pa = np.asarray(Image.open(root / "images" / sa["file"]), dtype=np.int16)
        pb = np.asarray(Image.open(root / "images" / sb["file"]), dtype=np.int16)
        assert np.abs(pa - pb).max() > 60
    assert len(kinds) >= 3


def test_objects_visible_in_pixels(synth):
    root, _ = synth
    for s in load_scenes(root, "train")[:15]:
        pix = np.asarray(Image.open(root / "images" / s["file"]), dtype=np.int16)
        for k, obj in enumerate(s["objects"]):
            x, y = object_centre(s, k)
            patch = pix[y - 3:y + 4, x - 3:x + 4].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(COLOURS[obj["colour"]])).max() < 40, (s["file"], k)
            assert SIZES[obj["size"]] >= 22  # >= 1.4 cells of a 7x7 grid over 224 px


def test_open_dataset_synthetic(synth):
    root, splits = synth
    s = open_dataset(f"synthetic:{root}", "dev", seed=1, near_miss=0.5, **SMALL)
    assert s.captions == splits["dev"].captions
    with pytest.raises(DataError, match="unknown split 'val'"):
        open_dataset(f"synthetic:{root}", "val", seed=1, near_miss=0.5, **SMALL)


def test_bad_args(tmp_path):
    with pytest.raises(ConfigError, match="n_dev"):
        make_synthetic(tmp_path, 4, 0, 2)
    with pytest.raises(ConfigError, match="near_miss"):
        make_synthetic(tmp_path, 4, 2, 2, near_miss=1.5)
    with pytest.raises(DataError, match="train_scenes.json does not exist"):
        load_scenes(tmp_path, "train")


def test_open_dataset_synthetic_default_root(tmp_path, monkeypatch):
    monkeypatch.delenv("AAHR_SYNTHETIC_DIR", raising=False)
    monkeypatch.setenv("AAHR_CACHE", str(tmp_path))
    a = open_dataset("synthetic", "test", n_train=3, n_dev=2, n_test=2)
    b = open_dataset("synthetic", "test", n_train=3, n_dev=2, n_test=4)
    assert a.num_images == 2 and b.num_images == 4
    assert a.image_paths[0].parent != b.image_paths[0].parent  # per-config folders under the cache
    assert all(p.is_relative_to(tmp_path / "synthetic") for p in a.image_paths + b.image_paths)

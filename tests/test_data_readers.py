"""Tests of ImageTextSplit validation and the dataset readers (small files written by each test, plus
the real Flickr8k files through the ``flickr8k_dir`` fixture)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.data.readers import read_flickr8k
from aahr_fast.utils.errors import DataError


# ----------------------------------------------------------------------------- ImageTextSplit
def _split(**kw):
    base = dict(name="train", source="mem", image_ids=["a", "b"], image_paths=None,
                captions=["x one", "x two", "y one"], caption_image=np.array([0, 0, 1]))
    base.update(kw)
    return ImageTextSplit(**base)


def test_split_helpers_non_contiguous():
    s = _split(captions=["b1", "a1", "b2", "a2", "a3"], caption_image=[1, 0, 1, 0, 0])
    assert s.num_images == 2 and s.num_captions == 5
    assert s.caption_image.dtype == np.int64
    assert s.captions_of(0).tolist() == [1, 3, 4]
    assert s.captions_of(1).tolist() == [0, 2]
    sub = s.subset(1)
    assert sub.image_ids == ["a"] and sub.captions == ["a1", "a2", "a3"]
    assert sub.caption_image.tolist() == [0, 0, 0]
    with pytest.raises(IndexError):
        s.captions_of(2)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(caption_image=np.array([0, 0, 2])), "caption 2"),
        (dict(caption_image=np.array([0, 0, -1])), "caption 2"),
        (dict(caption_image=np.array([0, 0, 0])), "image 1 ('b') has no caption"),
        (dict(captions=["x one", "  ", "y"]), "caption 1"),
        (dict(captions=["x one", "x two", " .,!? "]), "caption 2"),
        (dict(captions=["x one", "x two"]), "2 captions"),
        (dict(image_ids=["a", "a"]), "repeated"),
        (dict(image_paths=[Path("a")]), "image paths"),
        (dict(caption_ids=["1"]), "caption ids"),
        (dict(caption_image=np.array([0.0, 0.0, 1.0])), "integers"),
    ],
)
def test_split_validation(kw, needle):
    with pytest.raises(DataError) as e:
        _split(**kw)
    assert needle in str(e.value) and "mem" in str(e.value)


# ----------------------------------------------------------------------------- Flickr8k
def _write_f8k(root: Path, rows, splits, images=None):
    (root / "images").mkdir(parents=True)
    for name in images if images is not None else {r[0] for r in rows}:
        (root / "images" / name).write_bytes(b"")
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    for split, names in splits.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("".join(n + "\n" for n in names))


def test_flickr8k_small_quoted_commas(tmp_path):
    rows = [("a.jpg", "A dog , a ball ."), ("b.jpg", "Two \"quoted\" cats"), ("a.jpg", "dog, again"),
            ("c.jpg", "unused image")]
    _write_f8k(tmp_path, rows, {"train": ["b.jpg", "a.jpg"], "dev": ["c.jpg"], "test": ["c.jpg"]})
    raw = (tmp_path / "captions.txt").read_text()
    assert '"A dog , a ball ."' in raw  # the test file really is CSV-quoted
    s = read_flickr8k(tmp_path, "train")
    assert s.image_ids == ["b.jpg", "a.jpg"]
    assert s.captions == ['Two "quoted" cats', "A dog , a ball .", "dog, again"]
    assert s.caption_image.tolist() == [0, 1, 1]
    assert s.image_paths[1] == tmp_path / "images" / "a.jpg"


def test_flickr8k_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="captions.txt"):
        read_flickr8k(tmp_path, "train")
    _write_f8k(tmp_path, [("a.jpg", "a dog"), ("b.jpg", "...")],
               {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["a.jpg", "z.jpg"]})
    with pytest.raises(DataError, match="unknown Flickr8k split 'val'"):
        read_flickr8k(tmp_path, "val")
    with pytest.raises(DataError, match=r"captions.txt:3: caption of 'b.jpg' is empty"):
        read_flickr8k(tmp_path, "dev")
    with pytest.raises(DataError, match=r"testImages.txt:2: image 'z.jpg' has no caption"):
        read_flickr8k(tmp_path, "test")
    (tmp_path / "images" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"trainImages.txt:1: image file .*a.jpg does not exist"):
        read_flickr8k(tmp_path, "train")


@pytest.mark.realdata
def test_flickr8k_real(flickr8k_dir):
    sizes = {"train": 6000, "dev": 1000, "test": 1000}
    seen = set()
    for split, n in sizes.items():
        s = read_flickr8k(flickr8k_dir, split)
        assert s.num_images == n and s.num_captions == 5 * n
        assert np.all(np.bincount(s.caption_image) == 5)
        assert all(p.is_file() for p in s.image_paths[:20])
        assert not seen & set(s.image_ids)
        seen |= set(s.image_ids)
    s = read_flickr8k(flickr8k_dir, "train")
    i = s.image_ids.index("1000268201_693b08cb0e.jpg")
    caps = [s.captions[c] for c in s.captions_of(i)]
    assert "A child in a pink dress is climbing up a set of stairs in an entry way ." in caps
    # a caption that is CSV-quoted in the file because it contains a comma
    j = s.image_ids.index("1012212859_01547e3f17.jpg")
    assert "A dog shakes its head near the shore , a red ball next to it ." in [
        s.captions[c] for c in s.captions_of(j)]

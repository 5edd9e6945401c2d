"""Tests of ImageTextSplit validation and the dataset readers (small files written by each test, plus
the real Flickr8k files through the ``flickr8k_dir`` fixture)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.data.readers import open_dataset, read_coco_json, read_flickr8k, read_karpathy, read_precomp
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


# ----------------------------------------------------------------------------- precomp
def _precomp(d: Path, split: str, n_img: int, rows: str, ids_lines: str, caps_per=5):
    d.mkdir(parents=True, exist_ok=True)
    n_rows = n_img * caps_per if rows == "caption" else n_img
    np.save(d / f"{split}_ims.npy", np.zeros((n_rows, 2, 3), np.float32))
    (d / f"{split}_caps.txt").write_text("".join(f"a photo {c} .\n" for c in range(n_img * caps_per)))
    ids = [str(7 * i) for i in range(n_img)]
    lines = [x for x in ids for _ in range(caps_per)] if ids_lines == "caption" else ids
    (d / f"{split}_ids.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("rows, ids_lines, layout", [
    ("caption", "caption", "per_caption"),   # SCAN F30K dev: duplicated image rows
    ("image", "caption", "per_image_ids"),   # SCAN dev/test: one row per image, one id per caption
    ("image", "image", "per_image_div"),     # SCAN train: im_div = 5
])
def test_precomp_row_conventions(tmp_path, rows, ids_lines, layout):
    from aahr_fast.data.readers import precomp_index

    _precomp(tmp_path, "test", 4, rows, ids_lines)
    s = read_precomp(tmp_path, "test")
    assert s.num_images == 4 and s.num_captions == 20 and s.image_paths is None
    assert s.image_ids == ["0", "7", "14", "21"]
    assert s.caption_image.tolist() == np.repeat(np.arange(4), 5).tolist()
    assert s.captions[6] == "a photo 6 ."
    idx = precomp_index(tmp_path, "test")
    assert idx.layout == layout
    assert idx.image_row.tolist() == ([0, 5, 10, 15] if rows == "caption" else [0, 1, 2, 3])


@pytest.mark.parametrize("rows, ids_lines", [("caption", "caption"), ("image", "caption"), ("image", "image")])
def test_precomp_dev_truncation(tmp_path, rows, ids_lines):
    _precomp(tmp_path, "dev", 1014, rows, ids_lines)
    s = read_precomp(tmp_path, "dev")
    assert s.num_images == 1000 and s.num_captions == 5000 and s.image_ids[-1] == str(7 * 999)
    full = read_precomp(tmp_path, "dev", dev_truncate=False)
    assert full.num_images == 1014 and full.num_captions == 5070
    _precomp(tmp_path, "test", 1014, rows, ids_lines)
    assert read_precomp(tmp_path, "test").num_images == 1014  # only 'dev' is truncated


def test_precomp_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="train_caps.txt"):
        read_precomp(tmp_path, "train")
    _precomp(tmp_path, "test", 4, "image", "image")
    (tmp_path / "test_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(DataError, match=r"count mismatch.*test_caps.txt 20 lines, test_ids.txt 3 lines, test_ims.npy 4 rows"):
        read_precomp(tmp_path, "test")
    _precomp(tmp_path, "test", 4, "image", "caption")
    (tmp_path / "test_ids.txt").write_text("".join("1\n" for _ in range(20)))
    with pytest.raises(DataError, match="1 distinct image ids over 20 caption lines"):
        read_precomp(tmp_path, "test")
    _precomp(tmp_path, "test", 4, "image", "image")
    caps = (tmp_path / "test_caps.txt").read_text().splitlines()
    caps[12] = "  ,  "
    (tmp_path / "test_caps.txt").write_text("\n".join(caps) + "\n")
    with pytest.raises(DataError, match=r"test_caps.txt:13: caption is empty"):
        read_precomp(tmp_path, "test")
    np.save(tmp_path / "train_ims.npy", np.zeros((3, 2, 3)))
    (tmp_path / "train_caps.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "train_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(DataError, match="not a multiple of the 3 rows"):
        read_precomp(tmp_path, "train")


# ----------------------------------------------------------------------------- COCO / Karpathy json
def _coco(tmp_path: Path) -> Path:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    images = [{"id": 42, "file_name": "COCO_val2014_42.jpg"}, {"id": 7, "file_name": "COCO_val2014_7.jpg"},
              {"id": 9, "file_name": "COCO_val2014_9.jpg"}]  # image 9 has no caption -> dropped
    anns = [{"id": 100 + k, "image_id": 42, "caption": f"a cat number {k}\n"} for k in range(6)]
    anns += [{"id": 200 + k, "image_id": 7, "caption": f"A dog, {k}."} for k in range(7)]
    anns.insert(3, anns.pop())  # interleave: captions of image 7 are not contiguous in the file
    for im in images:
        (tmp_path / "val2014" / im["file_name"]).write_bytes(b"")
    p = tmp_path / "annotations" / "captions_val2014.json"
    p.write_text(json.dumps({"images": images, "annotations": anns}))
    return p


def test_coco_json_keeps_6_and_7_captions(tmp_path):
    p = _coco(tmp_path)
    s = read_coco_json(p, tmp_path / "val2014")
    assert s.name == "val2014" and s.image_ids == ["42", "7"]
    assert np.bincount(s.caption_image).tolist() == [6, 7]
    assert s.caption_ids[6] == "206" and s.caption_image[6] == 1  # grouped per image, file order inside
    assert s.captions[0] == "a cat number 0"  # whitespace normalised, newline gone
    assert [s.caption_ids[c] for c in s.captions_of(1)] == ["206", "200", "201", "202", "203", "204", "205"]
    assert s.image_paths[0] == tmp_path / "val2014" / "COCO_val2014_42.jpg"
    o = open_dataset(p, "dev")  # image_dir inferred from the COCO layout
    assert o.name == "dev" and o.image_ids == s.image_ids and o.image_paths == s.image_paths


def test_coco_json_bad(tmp_path):
    p = _coco(tmp_path)
    data = json.loads(p.read_text())
    data["annotations"][4]["image_id"] = 5
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[4\].*unknown image_id 5"):
        read_coco_json(p, tmp_path / "val2014")
    data["annotations"][4]["image_id"] = 42
    data["annotations"][5]["caption"] = " . "
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[5\].*empty"):
        read_coco_json(p, tmp_path / "val2014")
    data["annotations"][5]["caption"] = "ok"
    p.write_text(json.dumps(data))
    (tmp_path / "val2014" / "COCO_val2014_7.jpg").unlink()
    with pytest.raises(DataError, match=r"image 1 file .*COCO_val2014_7.jpg does not exist"):
        read_coco_json(p, tmp_path / "val2014")
    assert read_coco_json(p, tmp_path / "val2014", check_images=False).num_images == 2


def _karpathy(tmp_path: Path, coco: bool) -> Path:
    splits = ["train", "restval", "val", "test", "test", "val"]
    images = []
    for i, sp in enumerate(splits):
        im = {"split": sp, "filename": f"img{i}.jpg", "imgid": i,
              "sentences": [{"raw": f"Picture {i} text {k}.", "sentid": 10 * i + k} for k in range(5 + (i == 3))],
              "sentids": [10 * i + k for k in range(5 + (i == 3))]}
        if coco:
            im["filepath"] = "val2014" if i % 2 else "train2014"
            im["cocoid"] = 1000 + i
        images.append(im)
        folder = tmp_path / im.get("filepath", "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / im["filename"]).write_bytes(b"")
    p = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr8k.json")
    p.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr8k"}))
    return p


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy(tmp_path, coco):
    p = _karpathy(tmp_path, coco)
    tr = read_karpathy(p, tmp_path, "train")  # restval folded into train
    assert tr.num_images == 2 and tr.num_captions == 10
    assert tr.image_ids == (["1000", "1001"] if coco else ["img0.jpg", "img1.jpg"])
    assert tr.image_paths[1] == (tmp_path / "val2014" / "img1.jpg" if coco else tmp_path / "img1.jpg")
    te = read_karpathy(p, tmp_path, "test")
    assert te.num_images == 2 and np.bincount(te.caption_image).tolist() == [6, 5]
    assert te.caption_ids[:2] == ["30", "31"] and te.captions[0] == "Picture 3 text 0."
    assert read_karpathy(p, tmp_path, "dev").num_images == 2
    assert open_dataset(p, "test").caption_ids == te.caption_ids
    with pytest.raises(DataError, match="unknown split 'val'"):
        read_karpathy(p, tmp_path, "val")
    data = json.loads(p.read_text())
    data["images"][2]["sentences"][1]["raw"] = ""
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[2\].sentences\[1\].*empty"):
        read_karpathy(p, tmp_path, "dev")


def test_open_dataset_dispatch(tmp_path):
    _write_f8k(tmp_path / "f8k", [("a.jpg", "a dog")], {"train": ["a.jpg"], "dev": ["a.jpg"], "test": ["a.jpg"]})
    assert open_dataset(tmp_path / "f8k", "train").image_ids == ["a.jpg"]
    _precomp(tmp_path / "pre", "test", 3, "image", "caption")
    assert open_dataset(str(tmp_path / "pre"), "test").num_captions == 15
    with pytest.raises(DataError, match="neither captions.txt"):
        open_dataset(tmp_path / "pre", "train")
    with pytest.raises(DataError, match="not 'synthetic"):
        open_dataset(tmp_path / "missing", "train")
    (tmp_path / "x.json").write_text("{\"foo\": 1}")
    with pytest.raises(DataError, match="neither COCO"):
        open_dataset(tmp_path / "x.json", "train")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.booleans())
def test_precomp_any_caption_counts_property(tmp_path_factory, assignment, per_caption_rows):
    """Prepared layout with any number of captions per image, in any order: rows in first-appearance
    order of the per-caption ids; the reader recovers every caption's image."""
    from aahr_fast.data.readers import precomp_index

    d = tmp_path_factory.mktemp("prop")
    ids = [f"img{a}" for a in assignment]
    order = list(dict.fromkeys(ids))  # first-appearance order
    n_rows = len(ids) if per_caption_rows else len(order)
    feats = np.arange(n_rows, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    np.save(d / "test_ims.npy", feats)
    (d / "test_caps.txt").write_text("".join(f"caption {c}\n" for c in range(len(ids))))
    (d / "test_ids.txt").write_text("".join(x + "\n" for x in ids))
    idx = precomp_index(d, "test")
    s = idx.split
    assert s.image_ids == order
    assert [s.image_ids[i] for i in s.caption_image] == ids
    ref = ids if idx.layout == "per_caption" else order  # what row r of the ims file was written for
    for i, iid in enumerate(s.image_ids):
        assert ref[int(idx.image_row[i])] == iid

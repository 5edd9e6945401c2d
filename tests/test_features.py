"""Tests of the toy feature writer and the prepared-feature reader (FeatureSplit, datasets, collate)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aahr_fast.data.features import (
    CaptionDataset,
    FeatureSplit,
    ImageDataset,
    TextDataset,
    collate_captions,
    collate_images,
    collate_texts,
)
from aahr_fast.data.toy import write_toy_features
from aahr_fast.utils.errors import ConfigError, DataError

SIZES = {"train": 40, "dev": 8, "test": 8}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy")
    write_toy_features(d, SIZES, seed=3)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------- toy writer
def test_toy_layout_and_meta(toy):
    meta = json.loads((toy / "meta.json").read_text())
    assert meta["splits"]["train"] == {"images": 40, "captions": 200}
    assert np.load(toy / "train_ims.npy").shape == (40, 12, 64)
    assert np.load(toy / "train_ims.npy").dtype == np.float16
    assert np.load(toy / "train_txt_tokens.npy").shape == (200, 12, 32)
    assert np.load(toy / "train_txt_input_ids.npy").dtype == np.int32
    lens = np.load(toy / "train_txt_lens.npy")
    ids = np.load(toy / "train_txt_input_ids.npy")
    assert np.all(ids[np.arange(200), 0] == 1) and np.all(ids[np.arange(200), lens - 1] == 2)
    assert np.all((ids != 0).sum(1) == lens)  # zero padding after the length
    caps = (toy / "train_caps.txt").read_text().splitlines()
    assert len(caps) == 200 and all(len(c.split()) == n - 2 for c, n in zip(caps, lens))
    assert not list(toy.glob(".*.tmp"))


def test_toy_deterministic_by_seed(tmp_path):
    a, b, c = (write_toy_features(tmp_path / n, {"train": 6}, seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]
    for f in ("train_ims.npy", "train_txt_tokens.npy", "train_caps.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "train_ims.npy").read_bytes() != (tmp_path / "c" / "train_ims.npy").read_bytes()


def test_toy_bad_args(tmp_path):
    with pytest.raises(ConfigError, match="max_tokens"):
        write_toy_features(tmp_path, {"train": 2}, max_tokens=4)
    with pytest.raises(ConfigError, match="'train'"):
        write_toy_features(tmp_path, {"train": 0})


def _recall_at_1(img: np.ndarray, txt: np.ndarray, cap_img: np.ndarray) -> float:
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = img @ txt.T  # (N, M)
    return float(np.mean(s.argmax(0) == cap_img))  # t2i R@1


def test_toy_is_learnable(tmp_path):
    """A ridge map between mean-pooled regions and mean-pooled tokens (and between the global vectors)
    matches held-out captions to images far above chance (chance t2i R@1 = 1/100)."""
    write_toy_features(tmp_path, {"train": 400, "test": 100}, seed=0)
    tr, te = FeatureSplit(tmp_path, "train"), FeatureSplit(tmp_path, "test")

    def pooled(fs):
        reg = np.stack([fs.regions(i).mean(0) for i in range(fs.num_images)])
        tok = np.stack([fs.tokens(c).mean(0) for c in range(fs.num_captions)])
        gi = np.stack([fs.img_global(i) for i in range(fs.num_images)])
        gt = np.stack([fs.txt_global(c) for c in range(fs.num_captions)])
        return (reg, tok), (gi, gt)

    for (xi, xt), (yi, yt) in zip(pooled(tr), pooled(te)):
        x = xi[tr.caption_image]
        w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ xt)
        assert _recall_at_1(yi @ w, yt, te.caption_image) > 0.08  # > 8x chance


# ----------------------------------------------------------------------------- FeatureSplit + datasets
def test_round_trip_and_collate(toy):
    fs = FeatureSplit(toy, "train")
    assert fs.num_images == 40 and fs.num_captions == 200 and fs.index.layout == "per_image_ids"
    assert fs.caption_image.tolist() == np.repeat(np.arange(40), 5).tolist()
    assert fs.image_ids[0] == "toy_train_000000" and fs.captions[0] == (toy / "train_caps.txt").read_text().split("\n")[0]
    raw = np.load(toy / "train_ims.npy")
    np.testing.assert_array_equal(fs.regions(7), raw[7].astype(np.float32))
    lens = np.load(toy / "train_txt_lens.npy")
    np.testing.assert_array_equal(fs.tokens(11), np.load(toy / "train_txt_tokens.npy")[11, : lens[11]].astype(np.float32))

    ds = CaptionDataset(fs, train=False)
    b = collate_captions([ds[c] for c in (0, 3, 17, 199)])
    assert b["regions"].shape == (4, 12, 64) and b["regions"].dtype == torch.float32
    assert b["region_lens"].tolist() == [12] * 4 and b["region_lens"].dtype == torch.int64
    assert b["tokens"].shape == (4, int(lens[[0, 3, 17, 199]].max()), 32)
    assert b["token_lens"].tolist() == lens[[0, 3, 17, 199]].tolist()
    assert b["img_global"].shape == (4, 48) and b["txt_global"].shape == (4, 24)
    assert b["img_index"].tolist() == [0, 0, 3, 39] and b["cap_index"].tolist() == [0, 3, 17, 199]
    for k, n in enumerate(b["token_lens"].tolist()):  # zero padding beyond each length
        assert torch.all(b["tokens"][k, n:] == 0)
    # eval mode: no augmentation, identical to the file
    np.testing.assert_array_equal(b["regions"][2].numpy(), raw[3].astype(np.float32))

    bi = collate_images([ImageDataset(fs)[i] for i in range(5)])
    assert set(bi) == {"regions", "region_lens", "img_global", "img_index"} and bi["regions"].shape == (5, 12, 64)
    bt = collate_texts([TextDataset(fs, text="input_ids")[c] for c in range(3)])
    assert bt["input_ids"].dtype == torch.int64 and bt["input_ids"][:, 0].tolist() == [1, 1, 1]
    assert set(bt) == {"input_ids", "token_lens", "txt_global", "cap_index", "img_index"}


def test_train_augmentation(toy):
    fs = FeatureSplit(toy, "train")
    ds = CaptionDataset(fs, train=True, region_drop=0.2, seed=5)
    lens = [len(ds[c]["regions"]) for c in range(200)]
    assert min(lens) >= 1 and max(lens) <= 12 and np.mean(lens) < 12  # some regions dropped
    assert 0.7 < np.mean(lens) / 12 < 0.9  # keep rate close to 0.8
    # kept rows are rows of the image (a subset, order kept)
    raw = np.load(toy / "train_ims.npy")[0].astype(np.float32)
    got = ds[0]["regions"]
    assert all(any(np.array_equal(r, q) for q in raw) for r in got)
    # reproducible per (seed, epoch, index); a new epoch draws anew
    again = CaptionDataset(fs, train=True, seed=5)
    assert all(np.array_equal(ds[c]["regions"], again[c]["regions"]) for c in range(20))
    again.set_epoch(1)
    assert any(not np.array_equal(ds[c]["regions"], again[c]["regions"]) for c in range(20))
    # extreme drop still keeps one region; token drop keeps [CLS] ... [SEP] and >= 1 inner token
    harsh = CaptionDataset(fs, train=True, region_drop=0.99, token_drop=0.99, text="input_ids")
    for c in range(50):
        it = harsh[c]
        assert len(it["regions"]) >= 1
        ids = it["input_ids"]
        assert ids[0] == 1 and ids[-1] == 2 and len(ids) >= 3
    b = collate_captions([harsh[c] for c in range(8)])
    assert torch.all(b["region_lens"] >= 1)


def test_nan_feature_named(tmp_path, toy):
    d = _copy(toy, tmp_path / "nan")
    ims = np.load(d / "train_ims.npy")
    ims[3, 5, 7] = np.nan
    np.save(d / "train_ims.npy", ims)
    g = np.load(d / "train_txt_global.npy")
    g[12, 0] = np.inf
    np.save(d / "train_txt_global.npy", g)
    fs = FeatureSplit(d, "train")  # lazily checked: opening is fine
    ds = CaptionDataset(fs, train=False)
    ds[0]
    with pytest.raises(DataError, match=r"train_ims.npy: row 3 contains NaN"):
        ds[15]  # caption 15 -> image 3
    with pytest.raises(DataError, match=r"train_txt_global.npy: row 12 contains NaN/Inf"):
        ds[12]


def test_bad_folders(tmp_path, toy):
    with pytest.raises(DataError, match="does not exist"):
        FeatureSplit(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="test2_ims.npy"):
        FeatureSplit(toy, "test2")
    d = _copy(toy, tmp_path / "nometa")
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="incomplete prepare run"):
        FeatureSplit(d, "train")
    d = _copy(toy, tmp_path / "stale")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["train"]["captions"] = 199
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta.json: splits.train.captions = 199 but the files have 200"):
        FeatureSplit(d, "train")
    d = _copy(toy, tmp_path / "short")
    np.save(d / "train_txt_global.npy", np.load(d / "train_txt_global.npy")[:-1])
    with pytest.raises(DataError, match=r"train_txt_global.npy: expected 2-D array with 200 rows"):
        FeatureSplit(d, "train")
    d = _copy(toy, tmp_path / "caps")
    (d / "train_caps.txt").write_text("\n".join(["a dog"] * 199 + [" ... "]) + "\n")
    with pytest.raises(DataError, match=r"train_caps.txt:200: caption is empty"):
        FeatureSplit(d, "train")


def _scan_folder(d: Path, split: str, n_img: int, per_caption: bool, ids_per_caption: bool, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    rows = n_img * 5 if per_caption else n_img
    ims = rng.normal(size=(rows, 4, 6)).astype(np.float32)
    if per_caption:  # SCAN duplicates the image row for each of its captions
        ims = np.repeat(ims[::5], 5, axis=0)
    np.save(d / f"{split}_ims.npy", ims)
    (d / f"{split}_caps.txt").write_text("".join(f"caption {c} of image {c // 5} .\n" for c in range(5 * n_img)))
    ids = [str(1000 + i) for i in range(n_img)]
    lines = [x for x in ids for _ in range(5)] if ids_per_caption else ids
    (d / f"{split}_ids.txt").write_text("\n".join(lines) + "\n")
    return ims


def test_scan_precomp_folder(tmp_path):
    ims = _scan_folder(tmp_path, "test", 6, per_caption=True, ids_per_caption=True)
    fs = FeatureSplit(tmp_path, "test")
    assert fs.meta is None and fs.index.layout == "per_caption"
    assert fs.num_images == 6 and fs.num_captions == 30 and fs.image_ids[1] == "1001"
    np.testing.assert_array_equal(fs.regions(2), ims[10])
    b = collate_captions([CaptionDataset(fs, train=False, text=None, with_global=False)[c] for c in (0, 29)])
    assert set(b) == {"regions", "region_lens", "img_index", "cap_index"} and b["img_index"].tolist() == [0, 5]
    with pytest.raises(DataError, match=r"SCAN precomp folder .*has no test_txt_tokens.npy"):
        CaptionDataset(fs, train=True)
    with pytest.raises(DataError, match=r"test_ims_global.npy"):
        ImageDataset(fs)
    with pytest.raises(DataError, match=r"test_txt_global.npy"):
        fs.txt_global(0)


@pytest.mark.parametrize("per_caption, ids_per_caption", [(True, True), (False, True), (False, False)])
def test_scan_dev_truncation(tmp_path, per_caption, ids_per_caption):
    """F30K-like dev split of 1,014 images: truncated to 1,000 images / 5,000 captions by default."""
    ims = _scan_folder(tmp_path, "dev", 1014, per_caption, ids_per_caption)
    fs = FeatureSplit(tmp_path, "dev")
    assert fs.index.truncated and fs.num_images == 1000 and fs.num_captions == 5000
    assert fs.caption_image[-1] == 999 and fs.image_ids[-1] == "1999"
    np.testing.assert_array_equal(fs.regions(999), ims[999 * 5 if per_caption else 999])
    full = FeatureSplit(tmp_path, "dev", dev_truncate=False)
    assert not full.index.truncated and full.num_images == 1014 and full.num_captions == 5070
    assert full.index.im_div == (5 if not ids_per_caption else 1)


def test_pickle_does_not_copy_arrays(toy):
    """DataLoader workers started with spawn/forkserver pickle the dataset: the mmaps must not travel."""
    import pickle

    fs = FeatureSplit(toy, "train")
    blob = pickle.dumps(CaptionDataset(fs, train=True, seed=2))
    assert len(blob) < (toy / "train_ims.npy").stat().st_size // 2
    ds = pickle.loads(blob)
    ref = CaptionDataset(fs, train=True, seed=2)
    for c in (0, 77):
        for k, v in ref[c].items():
            np.testing.assert_array_equal(ds[c][k], v)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate_captions, num_workers=1,
                                         multiprocessing_context="spawn")
    first = next(iter(loader))
    assert first["regions"].shape[0] == 16 and torch.all(first["region_lens"] >= 1)

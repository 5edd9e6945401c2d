"""``aahr_fast.prepare`` end to end on real Flickr8k images: layout, values, resume after SIGKILL, no-op, errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aahr_fast.backbones import ImageBackbone, TextBackbone
from aahr_fast.data.dataset import ImageTextSplit
from aahr_fast.data.readers import read_flickr8k
from aahr_fast.prepare import KILL_ENV, WORK_DIR, prepare
from aahr_fast.utils.errors import ConfigError, DataError

pytestmark = pytest.mark.realdata

SPLITS = ("dev", "test")
N_IMG = 10  # per split: 20 real images in all
OPTS = dict(num_images=N_IMG, shard_images=4, shard_captions=16, batch_size=3, text_batch_size=7, threads=1,
            progress=False)
ARRAYS = ("ims", "ims_global", "txt_tokens", "txt_lens", "txt_global", "txt_input_ids")
TEXTS = ("caps", "ids", "images")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the previous count


@pytest.fixture(scope="module")
def backbones():
    return ImageBackbone(), TextBackbone()


@pytest.fixture(scope="module")
def reference(flickr8k_dir, backbones, tmp_path_factory) -> Path:
    """One uninterrupted run of 2 splits x 10 images (3 image shards, 4 caption shards per split)."""
    out = tmp_path_factory.mktemp("prepared_ref")
    ib, tb = backbones
    meta = prepare(flickr8k_dir, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **OPTS)
    assert meta["noop"] is False
    return out


def _load_all(folder: Path) -> dict:
    got = {}
    for s in SPLITS:
        for a in ARRAYS:
            got[f"{s}_{a}"] = (folder / f"{s}_{a}.npy").read_bytes()
        for t in TEXTS:
            got[f"{s}_{t}"] = (folder / f"{s}_{t}.txt").read_bytes()
    return got


def test_layout_shapes_dtypes_and_meta(reference, flickr8k_dir):
    meta = json.loads((reference / "meta.json").read_text())
    assert not (reference / WORK_DIR).exists()
    for s in SPLITS:
        split = read_flickr8k(flickr8k_dir, s).subset(N_IMG)
        n, m = split.num_images, split.num_captions
        assert (n, m) == (10, 50)
        ims = np.load(reference / f"{s}_ims.npy")
        glob = np.load(reference / f"{s}_ims_global.npy")
        tok = np.load(reference / f"{s}_txt_tokens.npy")
        lens = np.load(reference / f"{s}_txt_lens.npy")
        tglob = np.load(reference / f"{s}_txt_global.npy")
        ids = np.load(reference / f"{s}_txt_input_ids.npy")
        assert ims.shape == (n, 49, 1280) and ims.dtype == np.float16
        assert glob.shape == (n, 1280) and glob.dtype == np.float16
        lmax = int(lens.max())
        assert tok.shape == (m, lmax, 384) and tok.dtype == np.float16
        assert lens.shape == (m,) and lens.dtype == np.int32
        assert tglob.shape == (m, 384) and tglob.dtype == np.float16
        assert ids.shape == (m, lmax) and ids.dtype == np.int32
        for a in (ims, glob, tok, tglob):
            assert np.isfinite(a).all()
        # padding: ids 0 and tokens 0 exactly beyond each length; [CLS] first, no 0 inside
        pos = np.arange(lmax)[None, :]
        assert (ids[pos >= lens[:, None]] == 0).all() and (ids[pos < lens[:, None]] != 0).all()
        assert (tok[pos >= lens[:, None]] == 0).all()
        assert (ids[:, 0] == 101).all()
        # globals: mean of regions; unit-norm sentence vectors
        np.testing.assert_allclose(glob.astype(np.float32), ims.astype(np.float32).mean(1), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(tglob.astype(np.float32), axis=1), 1.0, atol=2e-3)
        # text files: captions / image id of each caption / image id of each row
        caps = (reference / f"{s}_caps.txt").read_text().splitlines()
        assert caps == split.captions
        assert (reference / f"{s}_ids.txt").read_text().splitlines() == [split.image_ids[i] for i in split.caption_image]
        st = meta["splits"][s]
        assert (st["images"], st["captions"], st["max_len"]) == (n, m, lmax)
        assert st["images_computed"] == n and st["captions_computed"] == m
    assert meta["dtype"] == "float16" and len(meta["content_hash"]) == 64
    assert meta["dims"] == {"region": 1280, "img_global": 1280, "token": 384, "txt_global": 384}
    assert meta["n_regions"] == 49 and meta["vocab_size"] == 30522
    assert set(meta["files"]) == {f"{s}_{a}.npy" for s in SPLITS for a in ARRAYS} | {
        f"{s}_{t}.txt" for s in SPLITS for t in TEXTS}


def test_rows_match_a_direct_backbone_forward(reference, flickr8k_dir, backbones):
    """Row i of the files is image i / caption c of the split (no shard or length-sort misplacement)."""
    ib, tb = backbones
    split = read_flickr8k(flickr8k_dir, "test").subset(N_IMG)
    pick = [7, 2]
    with torch.inference_mode():
        r, g = ib(ib.preprocess([split.image_paths[i] for i in pick]))
        caps = [split.captions[c] for c in (41, 3)]
        t, sg = tb(*tb.tokenize(caps))
    ims = np.load(reference / "test_ims.npy")[pick].astype(np.float32)
    np.testing.assert_allclose(ims, r.numpy(), atol=1e-2, rtol=1e-3)
    tok = np.load(reference / "test_txt_tokens.npy")[[41, 3]].astype(np.float32)
    tglob = np.load(reference / "test_txt_global.npy")[[41, 3]].astype(np.float32)
    np.testing.assert_allclose(tglob, sg.numpy(), atol=2e-3)
    np.testing.assert_allclose(tok[0, : t.shape[1]], t[0].numpy(), atol=2e-2, rtol=2e-3)


def test_rerun_is_noop_and_changed_config_rebuilds(reference, flickr8k_dir, backbones, tmp_path):
    ib, tb = backbones
    mtimes = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    meta = prepare(flickr8k_dir, reference, splits=SPLITS, image_backbone=ib, text_backbone=tb, **OPTS)
    assert meta["noop"] is True
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == mtimes

    # another folder, 3 images of one split: float16 then float32 -> a rebuild with a new hash
    out = tmp_path / "small"
    small = dict(OPTS, num_images=3)
    m16 = prepare(flickr8k_dir, out, splits=("test",), image_backbone=ib, text_backbone=tb, **small)
    m32 = prepare(flickr8k_dir, out, splits=("test",), image_backbone=ib, text_backbone=tb,
                  **dict(small, dtype="float32"))
    assert m32["noop"] is False and m32["content_hash"] != m16["content_hash"]
    ims32 = np.load(out / "test_ims.npy")
    assert ims32.dtype == np.float32 and ims32.shape == (3, 49, 1280)
    ims16 = np.load(reference / "test_ims.npy")[:3]
    np.testing.assert_allclose(ims32, ims16.astype(np.float32), atol=1e-2, rtol=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_gives_byte_equal_files(reference, flickr8k_dir, backbones, tmp_path):
    """A run SIGKILLed right after its 2nd shard leaves no meta.json; the resume reuses both shards and
    produces files byte-equal to an uninterrupted run."""
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "aahr_fast.prepare", str(flickr8k_dir), str(out), "--splits", ",".join(SPLITS),
           "--num-images", str(N_IMG), "--shard-images", "4", "--shard-captions", "16", "--batch-size", "3",
           "--text-batch-size", "7", "--threads", "1", "--no-progress"]
    env = dict(os.environ, **{KILL_ENV: "2"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "meta.json").exists()
    shards = sorted(p.name for p in (out / WORK_DIR).glob("*.npz"))
    assert shards == ["dev_img_00000_0_4.npz", "dev_img_00001_4_8.npz"]

    os.environ.pop(KILL_ENV, None)
    ib, tb = backbones
    meta = prepare(flickr8k_dir, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **OPTS)
    assert meta["splits"]["dev"]["images_computed"] == N_IMG - 8  # only the last image shard was redone
    assert meta["splits"]["test"]["images_computed"] == N_IMG
    assert not (out / WORK_DIR).exists()
    ref, got = _load_all(reference), _load_all(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == ref[k], f"{k} differs after resume"


def _tiny_flickr(root: Path, flickr8k_dir: Path, n: int = 3) -> list[str]:
    """A Flickr8k-layout folder with ``n`` real test images (copied) and their captions."""
    real = read_flickr8k(flickr8k_dir, "test").subset(n)
    (root / "images").mkdir(parents=True)
    rows = ["image,caption"]
    for c, i in enumerate(real.caption_image):
        cap = real.captions[c].replace('"', '""')
        rows.append(f'{real.image_ids[i]},"{cap}"')
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    for name in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt"):
        (root / name).write_text("")
    (root / "Flickr_8k.testImages.txt").write_text("\n".join(real.image_ids) + "\n")
    for iid, p in zip(real.image_ids, real.image_paths):
        (root / "images" / iid).write_bytes(Path(p).read_bytes())
    return real.image_ids


def test_corrupt_jpeg_is_data_error_naming_file(flickr8k_dir, backbones, tmp_path):
    names = _tiny_flickr(tmp_path / "ds", flickr8k_dir)
    bad = tmp_path / "ds" / "images" / names[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 5])  # truncated JPEG
    ib, tb = backbones
    out = tmp_path / "out"
    with pytest.raises(DataError, match=names[1]):
        prepare(tmp_path / "ds", out, splits=("test",), image_backbone=ib, text_backbone=tb, **dict(OPTS, num_images=None))
    assert not (out / "meta.json").exists()
    assert not (out / "test_ims.npy").exists()


def test_in_memory_split_with_line_break_and_config_errors(flickr8k_dir, backbones, tmp_path):
    ib, tb = backbones
    real = read_flickr8k(flickr8k_dir, "dev").subset(2)
    caps = list(real.captions)
    caps[0] = "A dog\nruns on the\r\ngrass ."
    split = ImageTextSplit("dev", "memory", real.image_ids, real.image_paths, caps, real.caption_image)
    out = tmp_path / "mem"
    meta = prepare({"dev": split}, out, splits=("dev",), image_backbone=ib, text_backbone=tb, **dict(OPTS, num_images=None))
    lines = (out / "dev_caps.txt").read_text().splitlines()
    assert len(lines) == split.num_captions == meta["splits"]["dev"]["num_captions"]
    assert lines[0] == "A dog runs on the grass ."

    import fcntl

    with open(out / ".prepare.lock", "a") as fh:  # a concurrent run holds the folder
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another prepare run"):
            prepare({"dev": split}, out, splits=("dev",), image_backbone=ib, text_backbone=tb, force=True,
                    **dict(OPTS, num_images=None))
    assert (out / "meta.json").is_file()  # the refused run touched nothing

    with pytest.raises(ConfigError, match="dtype"):
        prepare({"dev": split}, out, splits=("dev",), dtype="int8")
    with pytest.raises(ConfigError, match="no split 'train'"):
        prepare({"dev": split}, out, splits=("train",))
    featonly = ImageTextSplit("dev", "precomp-folder", real.image_ids, None, real.captions, real.caption_image)
    with pytest.raises(DataError, match="precomp-folder"):
        prepare({"dev": featonly}, tmp_path / "x", splits=("dev",))


def test_feature_split_reads_prepared_folder(reference, flickr8k_dir):
    """The folder is what aahr_fast.data.features.FeatureSplit expects (meta counts/dims checked there)."""
    from aahr_fast.data.features import FeatureSplit

    split = read_flickr8k(flickr8k_dir, "dev").subset(N_IMG)
    fs = FeatureSplit(reference, "dev")
    assert fs.image_ids == split.image_ids and fs.captions == split.captions
    assert np.array_equal(fs.caption_image, split.caption_image)
    ims = np.load(reference / "dev_ims.npy")
    assert np.array_equal(fs.regions(4), ims[4].astype(fs.regions(4).dtype))
    assert fs.token_len(7) == int(np.load(reference / "dev_txt_lens.npy")[7])


def test_images_are_stored_in_first_appearance_order(flickr8k_dir, backbones, tmp_path):
    """Captions listed image 2 first: rows follow ids.txt first appearance (the precomp reader's rule)."""
    from aahr_fast.data.features import FeatureSplit

    ib, tb = backbones
    real = read_flickr8k(flickr8k_dir, "test").subset(3)
    order = np.concatenate([np.flatnonzero(real.caption_image == i) for i in (2, 0, 1)])
    order[[1, 6]] = order[[6, 1]]  # interleave: captions of images 2, 0, 2, ... (not contiguous)
    split = ImageTextSplit("test", "memory", real.image_ids, real.image_paths,
                           [real.captions[c] for c in order], real.caption_image[order])
    out = tmp_path / "perm"
    prepare({"test": split}, out, splits=("test",), image_backbone=ib, text_backbone=tb, **dict(OPTS, num_images=None))
    ids = (out / "test_ids.txt").read_text().splitlines()
    assert ids[0] == real.image_ids[2]
    fs = FeatureSplit(out, "test")
    assert fs.image_ids == [real.image_ids[i] for i in (2, 0, 1)]
    with torch.inference_mode():
        r, _ = ib(ib.preprocess([real.image_paths[2]]))
    np.testing.assert_allclose(np.load(out / "test_ims.npy")[0].astype(np.float32), r[0].numpy(), atol=1e-2, rtol=1e-3)


def _copied_split(name: str, flickr8k_dir: Path, root: Path, n: int = 2) -> ImageTextSplit:
    """``n`` real images of a split, copied under ``root`` (so one can be damaged), as an in-memory split."""
    real = read_flickr8k(flickr8k_dir, name).subset(n)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for iid, p in zip(real.image_ids, real.image_paths):
        (root / iid).write_bytes(Path(p).read_bytes())
        paths.append(root / iid)
    return ImageTextSplit(name, str(root), real.image_ids, paths, real.captions, real.caption_image)


def test_failed_rebuild_keeps_every_split_and_interrupted_swap_finishes(flickr8k_dir, backbones, tmp_path,
                                                                         monkeypatch):
    """Issue 7 gap 1: a rebuild that fails on a corrupt image of the 2nd split leaves every file of the
    complete folder (both splits and meta.json) byte-identical; a rebuild killed halfway through its swap
    leaves no meta.json and the next run finishes the swap from the journal (same files as a clean run)."""
    import aahr_fast.prepare as prep

    ib, tb = backbones
    spec = {s: _copied_split(s, flickr8k_dir, tmp_path / "imgs" / s) for s in SPLITS}
    out = tmp_path / "out"
    opts = dict(OPTS, num_images=None)
    prepare(spec, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    bad = spec["test"].image_paths[1]
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) * 2 // 5])
    with pytest.raises(DataError, match=str(bad)):
        prepare(spec, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    staged = sorted(p.name for p in (out / WORK_DIR / prep.STAGED_DIR).iterdir())
    assert staged == sorted([f"dev_{a}.npy" for a in ARRAYS] + [f"dev_{t}.txt" for t in TEXTS])

    # repaired image (new mtime -> new content hash); the swap dies after 3 files were renamed
    bad.write_bytes(good)
    os.utime(bad, ns=(1, 1))
    real_replace, moved = os.replace, []

    def dying_replace(src, dst):
        if Path(src).parent.name == prep.STAGED_DIR and Path(dst).parent == out:  # the swap, not staging
            if len(moved) == 3:
                raise KeyboardInterrupt("killed mid-swap")
            moved.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(prep.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)
    monkeypatch.setattr(prep.os, "replace", real_replace)
    assert len(moved) == 3
    assert not (out / "meta.json").exists() and (out / WORK_DIR / prep.SWAP_JOURNAL).is_file()
    meta = prepare(spec, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)
    assert meta["noop"] is False and not (out / WORK_DIR).exists()
    assert prepare(spec, out, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)["noop"] is True

    clean = tmp_path / "clean"
    prepare(spec, clean, splits=SPLITS, image_backbone=ib, text_backbone=tb, **opts)
    for s in SPLITS:
        for a in ARRAYS:
            assert (out / f"{s}_{a}.npy").read_bytes() == (clean / f"{s}_{a}.npy").read_bytes(), f"{s}_{a}"
        for t in TEXTS:
            assert (out / f"{s}_{t}.txt").read_bytes() == (clean / f"{s}_{t}.txt").read_bytes(), f"{s}_{t}"

"""Regressions for the newcomer's other frictions (issue 13, item 4), one section per friction:

1. every CLI taking ``--data`` accepts the same values (``index --data synthetic`` was refused);
2. ``search --html`` finds the gallery's image files without ``--image-dir`` (prepare records them),
   and says on stderr which flag fixes it where none are known;
3. a ``.pt`` checkpoint with a truncated ``.safetensors`` sibling: the error names both files and what
   is wrong (tests/test_bad_inputs.py ``*truncated-safetensors*`` cases);
4. prepared-features caches identify backbones by weight-file content, not by their path in a venv;
5. ``prepare`` refuses splits that share images, and combines several sources into one split;
6. every file the project writes follows the user's umask (checkpoints, features, results).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from _stub_backbones import stub_image_backbone, stub_text_backbone

from aahr_fast.utils.errors import ConfigError

TINY_MODEL = {"embed_dim": 16, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 16,
              "graph_ff_dim": 16, "num_prototypes": 8, "queue_size": 16, "ops_backend": "reference"}
TOY_DIMS = {"region_dim": 64, "img_global_dim": 48, "token_dim": 32, "txt_global_dim": 24}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the previous count


def _save_run(run_dir: Path, data: dict, dims: dict = TOY_DIMS, seed: int = 0) -> Path:
    """A tiny initialised AAHR saved as a run folder; ``data``: the config's data section."""
    from aahr_fast.checkpoint import save_checkpoint
    from aahr_fast.config import config_from_dict, config_to_dict
    from aahr_fast.models import build_model

    torch.manual_seed(seed)
    cfg = config_from_dict({"data": data, "model": dict(TINY_MODEL), "optim": {"batch_size": 4},
                            "schedule": {"epochs": 1, "decay_epochs": []},
                            "run": {"device": "cpu", "progress": False, "plots": False, "threads": 1}})
    save_checkpoint(run_dir, build_model(cfg.model, dims), {}, epoch=1, step=1, config=config_to_dict(cfg),
                    dims=dims, pointers=("last", "best"))
    return run_dir


def _flickr(root: Path, names: list[str], seed: int = 0, split_file: str = "Flickr_8k.testImages.txt") -> Path:
    """A Flickr8k-layout folder with random 32x32 JPEGs ``names`` (2 captions each) listed in ``split_file``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name)
    rows = ["image,caption"] + [f"{nm},picture {nm} variant {j}" for nm in names for j in range(2)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / split_file).write_text("".join(nm + "\n" for nm in names))
    return root


def _coco_json(path: Path, ids: list[int]) -> Path:
    """A COCO ``captions_*.json`` with images ``ids`` (files ``<id>.jpg`` beside it), 2 captions each."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(ids[0])
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path.parent / f"{i}.jpg")
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in ids],
           "annotations": [{"id": 10 * i + j, "image_id": i, "caption": f"photo {i} number {j}"}
                           for i in ids for j in range(2)]}
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------------------------------
# 6. every file written follows the umask


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    from aahr_fast import evaluate as evaluate_cli
    from aahr_fast.data.toy import write_toy_features
    from aahr_fast.prepare import prepare

    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"w")
    ds = _flickr(tmp_path / "ds", ["a.jpg", "b.jpg"])
    old = os.umask(mask)
    try:
        toy = tmp_path / "toy"
        write_toy_features(toy, {"train": 3, "dev": 3, "test": 3}, seed=0)           # features (toy)
        prepare(ds, tmp_path / "prep", splits=("test",), image_backbone=stub_image_backbone(weights),
                text_backbone=stub_text_backbone(), threads=1, progress=False)     # features (prepare)
        run = _save_run(tmp_path / "run", {"path": str(toy)})                      # checkpoints
        res = tmp_path / "res"
        assert evaluate_cli.main(["--checkpoint", str(run), "--data", str(toy), "--json", str(res / "m.json"),
                                  "--save-sims", str(res / "sims.npy")]) == 0     # results
    finally:
        os.umask(old)
    files = [p for d in ("toy", "prep", "run", "res") for p in (tmp_path / d).rglob("*")
             if p.is_file() and ".prepare_work" not in p.parts]
    kinds = {p.suffix for p in files}
    assert {".safetensors", ".pt", ".json", ".npy", ".txt"} <= kinds
    want = 0o666 & ~mask
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != want}
    assert not wrong, f"expected mode {oct(want)} under umask {oct(mask)}: {wrong}"


# ----------------------------------------------------------------------------------------------------
# 1. every CLI taking --data accepts the same values


@pytest.fixture
def synthetic_run(tmp_path, monkeypatch):
    """A run trained (initialised) on ``--data synthetic`` with 4/2/3 images, its cache in ``tmp_path``;
    ``prepare`` is replaced by toy features of the same split sizes (the real backbones take ~15 s to
    load), so the test covers how ``--data`` is resolved, not feature extraction."""
    import aahr_fast.prepare as prepare_mod
    from aahr_fast.data.toy import write_toy_features

    calls = []

    def fake_prepare(spec, out, splits=("train", "dev", "test"), **kw):
        calls.append(Path(out))
        write_toy_features(out, {k: spec[k].num_images for k in splits}, seed=0)
        return {"noop": False}

    monkeypatch.setattr(prepare_mod, "prepare", fake_prepare)
    cache = tmp_path / "cache"
    data = {"path": "synthetic", "cache_dir": str(cache), "synthetic_train": 4, "synthetic_dev": 2,
            "synthetic_test": 3, "synthetic_seed": 0}
    run = _save_run(tmp_path / "run", data)
    return run, cache / "prepared" / "synthetic-seed0-4-2-3", calls


@pytest.mark.parametrize("given", [["--data", "synthetic"], []], ids=["data-synthetic", "data-default"])
def test_index_accepts_synthetic_like_evaluate(synthetic_run, tmp_path, given, capsys):
    from aahr_fast import evaluate as evaluate_cli
    from aahr_fast import index as index_cli

    run, prepared, calls = synthetic_run
    assert evaluate_cli.main(["--checkpoint", str(run), *given, "--split", "test"]) == 0
    rc = index_cli.main(["--checkpoint", str(run), *given, "--split", "test", "--modality", "image",
                          "--out", str(tmp_path / "idx")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "does not exist" not in err
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["data"]["folder"] == str(prepared.resolve())  # the folder train / evaluate use
    assert manifest["ntotal"] == 3
    assert calls == [prepared, prepared]


# ----------------------------------------------------------------------------------------------------
# 5. prepare: splits sharing images are refused; several sources combine into one split


def _prepare_kw(tmp_path: Path) -> dict:
    weights = tmp_path / "lite0.pth"
    if not weights.exists():
        weights.write_bytes(b"w")
    return dict(image_backbone=stub_image_backbone(weights), text_backbone=stub_text_backbone(), threads=1,
                progress=False)


def test_prepare_refuses_one_coco_json_as_three_splits(tmp_path):
    from aahr_fast.prepare import prepare

    js = _coco_json(tmp_path / "coco" / "captions_val2017.json", [139, 285, 632])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as ei:
        prepare(str(js), out, **_prepare_kw(tmp_path))  # default splits train, dev, test
    msg = str(ei.value)
    assert "splits train, dev and test share images" in msg
    assert "train & dev: 3 of 3 / 3 images" in msg and "dev & test: 3 of 3 / 3 images" in msg
    assert str(js) in msg and "--split-source" in msg and "--splits test" in msg
    assert not (out / "meta.json").exists() and not list(out.glob("*_ids.txt"))
    # one split of the same json is fine, and so is an overlap asked for
    assert prepare(str(js), out, splits=("test",), **_prepare_kw(tmp_path))["splits"]["test"]["num_images"] == 3
    prepare(str(js), tmp_path / "out2", splits=("dev", "test"), allow_overlap=True, **_prepare_kw(tmp_path))


def test_prepare_cli_overlap_is_exit_2(tmp_path, capsys):
    from aahr_fast.prepare import main

    js = _coco_json(tmp_path / "coco" / "captions_val2017.json", [139, 285])
    assert main([str(js), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare: error: splits train, dev and test share images") and "Traceback" not in err


def test_split_source_combines_jsons_into_one_split(tmp_path, monkeypatch):
    import aahr_fast.prepare as prepare_mod

    a = _coco_json(tmp_path / "coco" / "captions_a.json", [1, 2])
    b = _coco_json(tmp_path / "coco" / "captions_b.json", [3])
    c = _coco_json(tmp_path / "coco" / "captions_c.json", [4, 5])
    kw = _prepare_kw(tmp_path)
    real = prepare_mod.prepare
    monkeypatch.setattr(prepare_mod, "prepare", lambda spec, out, **k: real(spec, out, **{**k, **kw}))
    out = tmp_path / "out"
    assert prepare_mod.main([str(out), "--split-source", f"train={a},{b}", "--split-source", f"test={c}",
                             "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["splits"]) == ["test", "train"]
    assert meta["splits"]["train"]["num_images"] == 3 and meta["splits"]["test"]["num_images"] == 2
    assert (out / "train_ids.txt").read_text().split() == ["1", "1", "2", "2", "3", "3"]
    assert meta["sources"]["train"] == f"{a} + {b}"


@pytest.mark.parametrize("args, needle", [
    (["--split-source", "test"], "expected SPLIT=SOURCE"),
    (["--split-source", "test=a.json,"], "expected SPLIT=SOURCE"),
    (["--split-source", "test=a.json", "--split-source", "test=b.json"], "test=a.json,b.json"),
    (["--split-source", "dev=a.json", "--splits", "test"], "that --splits test does not list"),
    (["--split-source", "dev=a.json", "--splits", "dev,test"], "['test'] have no source"),
])
def test_split_source_bad_arguments(tmp_path, args, needle, capsys):
    from aahr_fast.prepare import main

    assert main([str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_split_source_same_image_in_two_sources_of_one_split(tmp_path):
    from aahr_fast.prepare import prepare
    from aahr_fast.utils.errors import DataError

    a = _coco_json(tmp_path / "x" / "captions_a.json", [1, 2])
    b = _coco_json(tmp_path / "y" / "captions_b.json", [2, 3])
    with pytest.raises(DataError, match=r"split 'test': .*captions_b.json and .*captions_a.json both hold "
                                        r"image id '2' \(1 shared"):
        prepare({"test": [str(a), str(b)]}, tmp_path / "out", splits=("test",), **_prepare_kw(tmp_path))


# ----------------------------------------------------------------------------------------------------
# 4. backbones are identified by the content of their weight files, not by their path in a venv


@pytest.fixture
def venvs(tmp_path, monkeypatch):
    """Two "virtualenvs" holding byte-identical backbone files at different paths, a dataset, and a
    prepare helper taking the venv to load the backbones from."""
    from aahr_fast.prepare import prepare

    monkeypatch.setenv("AAHR_CACHE", str(tmp_path / "cache"))  # the digest cache of this test
    roots = {}
    for name in ("venv_a", "venv_b"):
        root = tmp_path / name / "site-packages"
        (root / "minilm").mkdir(parents=True)
        (root / "lite0.pth").write_bytes(b"efficientnet weights v1")
        (root / "minilm" / "config.json").write_text('{"vocab_size": 1024}')
        (root / "minilm" / "model.safetensors").write_bytes(b"minilm weights v1")
        roots[name] = root
    ds = _flickr(tmp_path / "ds", ["a.jpg", "b.jpg"])

    def run(venv: str, out: Path, **kw):
        root = roots[venv]
        return prepare(ds, out, splits=("test",), image_backbone=stub_image_backbone(root / "lite0.pth"),
                       text_backbone=stub_text_backbone(root / "minilm"), threads=1, progress=False, **kw)

    return roots, run


def _as_legacy(out: Path) -> None:
    """Rewrite ``out/meta.json`` as the code before content identities wrote it: backbones recorded as
    ``[path, size, mtime]`` of their files, and a content hash over those."""
    meta = json.loads((out / "meta.json").read_text())
    stat_id = lambda p: [str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns]  # noqa: E731
    bb = meta["config"]["backbones"]
    bb["image"] = {"name": "efficientnet-lite0", "weights": stat_id(meta["image_backbone"]["weights"])}
    tdir = Path(meta["text_backbone"]["path"])
    bb["text"] = {"name": tdir.name, "files": [stat_id(tdir / n) for n in sorted(bb["text"]["files"])]}
    meta["content_hash"] = "0" * 64
    for k in ("image_backbone", "text_backbone"):
        meta[k].pop("sha256", None)
        meta[k].pop("files_sha256", None)
    (out / "meta.json").write_text(json.dumps(meta))


def test_same_weights_in_another_venv_are_the_same_backbone(venvs, tmp_path):
    roots, run = venvs
    out = tmp_path / "out"
    assert run("venv_a", out)["noop"] is False
    assert run("venv_b", out)["noop"] is True  # was: "already holds prepared features of another image backbone"


def test_legacy_folder_with_path_identities_is_reused_when_the_bytes_match(venvs, tmp_path):
    roots, run = venvs
    out = tmp_path / "out"
    run("venv_a", out)
    _as_legacy(out)
    before = (out / "test_ims.npy").read_bytes()
    assert run("venv_b", out)["noop"] is True  # no re-extraction: the recorded files hash the same
    assert (out / "test_ims.npy").read_bytes() == before


def test_legacy_folder_whose_weights_are_gone_is_refused_not_guessed(venvs, tmp_path):
    roots, run = venvs
    out = tmp_path / "out"
    run("venv_a", out)
    _as_legacy(out)
    (roots["venv_a"] / "lite0.pth").unlink()  # the venv that wrote it was removed
    with pytest.raises(ConfigError, match=r"another image backbone.*content cannot be compared.*Nothing was changed"):
        run("venv_b", out)


@pytest.mark.parametrize("changed, what", [("lite0.pth", "another image backbone"),
                                           ("minilm/model.safetensors", "another text backbone")])
@pytest.mark.parametrize("legacy", [False, True], ids=["new-meta", "legacy-meta"])
def test_different_weights_are_still_refused(venvs, tmp_path, changed, what, legacy):
    roots, run = venvs
    out = tmp_path / "out"
    run("venv_a", out)
    if legacy:
        _as_legacy(out)
    (roots["venv_b"] / changed).write_bytes(b"fine-tuned weights, same architecture")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=what):
        run("venv_b", out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot


def test_file_digest_is_cached_and_notices_changes(tmp_path, monkeypatch):
    from aahr_fast.utils import filehash

    monkeypatch.setenv("AAHR_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    import hashlib

    assert filehash.file_digest(f) == hashlib.sha256(b"abc").hexdigest()
    assert str(f) in json.loads(filehash.digest_cache_path().read_text())
    f.write_bytes(b"abcd")  # size changes: hashed again
    assert filehash.file_digest(f) == hashlib.sha256(b"abcd").hexdigest()
    with pytest.raises(FileNotFoundError):
        filehash.file_digest(tmp_path / "missing.bin")


# ----------------------------------------------------------------------------------------------------
# 2. search --html finds the images the dataset knows, and says so on stderr when it cannot

STUB_DIMS = {"region_dim": 6, "img_global_dim": 6, "token_dim": 8, "txt_global_dim": 8}


@pytest.fixture
def stub_index(tmp_path):
    """A Flickr-layout dataset prepared with the stub backbones, a tiny run on it and its image index."""
    from aahr_fast.index import build_index
    from aahr_fast.prepare import prepare

    ds = _flickr(tmp_path / "ds", ["c.jpg", "a.jpg", "b.jpg"])
    prep = tmp_path / "prep"
    prepare(ds, prep, splits=("test",), **_prepare_kw(tmp_path))
    run = _save_run(tmp_path / "run", {"path": str(prep)}, dims=STUB_DIMS)
    build_index(run, tmp_path / "idx", data=prep, split="test", modality="image", log=lambda m: None)
    return ds, prep, tmp_path / "idx"


def _result(idx: Path) -> dict:
    from aahr_fast.index import GalleryIndex

    gi = GalleryIndex.load(idx)
    return {"index": str(idx), "modality": "image", "index_kind": "flat", "query": {"kind": "text", "value": "q"},
            "results": [{"rank": j + 1, "score": 0.0, **gi.item(j)} for j in range(gi.ntotal)]}


def test_prepare_records_image_files_and_index_stores_them(stub_index):
    ds, prep, idx = stub_index
    rows = (prep / "test_images.txt").read_text().splitlines()
    ids = list(dict.fromkeys((prep / "test_ids.txt").read_text().split()))  # ims row order
    assert rows == [str((ds / "images" / i).resolve()) for i in ids]
    items = json.loads((idx / "items.json").read_text())
    assert items["image_paths"] == rows


def test_html_without_image_dir_shows_the_recorded_images(stub_index, tmp_path):
    from aahr_fast.index import _image_paths
    from aahr_fast.search import missing_images_note, render_html

    ds, prep, idx = stub_index
    res = _result(idx)
    # the dataset folder is the only place the images are: index must not need it re-readable
    (prep / "meta.json").write_text(json.dumps({**json.loads((prep / "meta.json").read_text()), "dataset": None}))
    assert _image_paths({"dataset": None}, "test", [r["image_id"] for r in res["results"]], prep) == \
        [r["image_path"] for r in res["results"]]
    assert render_html(res, tmp_path / "out.html") == 3
    page = (tmp_path / "out.html").read_text()
    assert page.count("<img ") == 3 and "(no image file)" not in page
    assert missing_images_note(res) is None


def test_html_without_any_image_file_says_which_flag_fixes_it(stub_index, tmp_path, monkeypatch, capsys):
    import aahr_fast.search as search_mod

    ds, prep, idx = stub_index
    res = _result(idx)
    for r in res["results"]:
        r["image_path"] = None  # an index that records no image files
    monkeypatch.setattr(search_mod, "search", lambda *a, **k: res)
    assert search_mod.main(["--index", str(idx), "--text", "q", "--html", str(tmp_path / "o.html")]) == 0
    err = capsys.readouterr().err
    assert "3 of 3 results have no image file" in err and "records no image files" in err
    assert "--image-dir FOLDER" in err
    # --image-dir fixes it, and then nothing is said
    assert search_mod.main(["--index", str(idx), "--text", "q", "--html", str(tmp_path / "o.html"),
                            "--image-dir", str(ds / "images")]) == 0
    err = capsys.readouterr().err
    assert "no image file" not in err
    assert (tmp_path / "o.html").read_text().count("<img ") == 3
    # recorded files that are gone are named
    res["results"][0]["image_path"] = str(tmp_path / "gone.jpg")
    assert search_mod.main(["--index", str(idx), "--text", "q", "--html", str(tmp_path / "o.html")]) == 0
    assert "1 image files the index records no longer exist" in capsys.readouterr().err


def test_index_finds_synthetic_images_of_folders_prepared_before_images_txt(tmp_path):
    from aahr_fast.data.synthetic import make_synthetic
    from aahr_fast.index import _image_paths

    root = tmp_path / "synthetic"
    test = make_synthetic(root, n_train=2, n_dev=1, n_test=2, seed=0)["test"]
    meta = {"dataset": "<in-memory splits>", "sources": {"test": str(root)}}
    paths = _image_paths(meta, "test", test.image_ids, tmp_path / "prepared-without-images-txt")
    assert paths == [str(p.resolve()) for p in test.image_paths] and all(Path(p).is_file() for p in paths)


@pytest.mark.parametrize("argv, spec, splits", [
    (["DS", "--splits", "test", "OUT"], "DS", ["test"]),        # options between the two positionals
    (["--splits", "dev,test", "DS", "OUT"], "DS", ["dev", "test"]),
    (["OUT", "--split-source", "test=a.json,b.json"], {"test": ["a.json", "b.json"]}, ["test"]),
    (["DS", "OUT", "--split-source", "test=c.json"], {"train": "DS", "dev": "DS", "test": ["c.json"]},
     ["train", "dev", "test"]),
])
def test_prepare_cli_reads_dataset_out_and_split_sources(monkeypatch, argv, spec, splits):
    import aahr_fast.prepare as prepare_mod

    got = {}
    monkeypatch.setattr(prepare_mod, "prepare", lambda s, out, **kw: got.update(spec=s, out=out, splits=kw["splits"]))
    assert prepare_mod.main(argv) == 0
    assert got == {"spec": spec, "out": "OUT", "splits": splits}


def test_every_cli_with_data_uses_the_one_resolver(tmp_path, monkeypatch, capsys):
    """Every ``python -m aahr_fast.<cli>`` whose parser has ``--data`` resolves it with
    ``aahr_fast.train.resolve_data`` (so they accept the same values): a sentinel resolver is reached
    from each of them."""
    import importlib
    import pkgutil

    import aahr_fast
    import aahr_fast.train as train_mod
    from aahr_fast.data.toy import write_toy_features
    from aahr_fast.utils.errors import DataError

    clis = []
    for info in pkgutil.iter_modules(aahr_fast.__path__):
        try:
            mod = importlib.import_module(f"aahr_fast.{info.name}")
        except ImportError:
            continue
        parser = getattr(mod, "build_parser", None)
        if callable(parser) and any("--data" in a.option_strings for a in parser()._actions):
            clis.append(info.name)
    assert {"train", "evaluate", "index"} <= set(clis)

    def sentinel(cfg, log=print):
        raise DataError(f"SENTINEL resolver reached with {cfg.data.path!r}")

    monkeypatch.setattr(train_mod, "resolve_data", sentinel)
    toy = tmp_path / "toy"
    write_toy_features(toy, {"train": 3, "dev": 3, "test": 3}, seed=0)
    run = _save_run(tmp_path / "run", {"path": str(toy)})
    extra = {"train": ["--out", str(tmp_path / "r")], "evaluate": ["--checkpoint", str(run)],
             "index": ["--checkpoint", str(run), "--modality", "image", "--out", str(tmp_path / "idx")]}
    for name in clis:
        mod = importlib.import_module(f"aahr_fast.{name}")
        assert mod.main([*extra.get(name, []), "--data", "synthetic"]) == 2, name
        err = capsys.readouterr().err
        assert "SENTINEL resolver reached with 'synthetic'" in err, (name, err)

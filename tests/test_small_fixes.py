"""Regression tests of the small reliability / usability fixes from the new-user review (task Q).

1. ``evaluate --eccv`` refuses a non-COCO split before anything is encoded (one ``error:`` line).
2. ``prepare`` refuses an output folder holding features of another dataset / other backbones unless
   ``--overwrite`` (nothing written is lost).
3. ``ops.topk_connection`` raises on NaN scores, naming the op and the first NaN index.
4. Loading our offline text backbone prints no transformers "Loading weights" bar.
5. ``prepare --help`` shows each default once.
6. The public model classes document what they raise.

Every test runs in seconds on toy data (no real images, no MiniLM except test 4).
Run: ``.venv/bin/python -m pytest tests/test_small_fixes.py -q``.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _stub_backbones import stub_text_backbone

from aahr_fast.utils.errors import ConfigError, DataError

TINY_MODEL = {"embed_dim": 32, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 32,
              "graph_ff_dim": 32, "num_prototypes": 8, "queue_size": 16, "ops_backend": "reference"}
TOY_DIMS = {"region_dim": 64, "img_global_dim": 48, "token_dim": 32, "txt_global_dim": 24}
TOY_SPLITS = {"train": 4, "dev": 3, "test": 5}  # images; 5 captions each


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder with an initialised tiny AAHR checkpoint, the toy feature folder it was 'trained' on)."""
    from aahr_fast.checkpoint import save_checkpoint
    from aahr_fast.config import config_from_dict, config_to_dict, save_config
    from aahr_fast.data.toy import write_toy_features
    from aahr_fast.models import build_model

    root = tmp_path_factory.mktemp("small_fixes")
    toy = root / "toy"
    write_toy_features(toy, TOY_SPLITS, seed=0)
    cfg = config_from_dict({"data": {"path": str(toy)}, "model": TINY_MODEL, "optim": {"batch_size": 4},
                            "schedule": {"epochs": 1, "decay_epochs": []},
                            "run": {"device": "cpu", "progress": False, "plots": False, "threads": 1}})
    torch.manual_seed(0)
    net = build_model(cfg.model, TOY_DIMS)
    run = root / "run"
    save_checkpoint(run, net, {}, epoch=1, step=1, config=config_to_dict(cfg), dims=TOY_DIMS,
                    pointers=("last", "best"))
    save_config(cfg, run / "config.yaml")
    return run, toy


# ----------------------------------------------------------------------------------------------------
# 1. evaluate --eccv: checked before any encoding


def test_eccv_on_non_coco_split_fails_before_encoding(toy_run, monkeypatch, capsys):
    import aahr_fast.engine as engine
    import aahr_fast.models as models
    from aahr_fast import evaluate as evaluate_cli

    def must_not_run(*a, **k):
        raise AssertionError("the model was built / the split encoded before the --eccv check")

    monkeypatch.setattr(engine, "evaluate_model", must_not_run)
    monkeypatch.setattr(engine, "encode_split", must_not_run)
    monkeypatch.setattr(models, "build_model", must_not_run)
    run, toy = toy_run
    code = evaluate_cli.main(["--checkpoint", str(run), "--data", str(toy), "--split", "test", "--eccv"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""  # no recall table
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "--eccv needs the COCO 5K test split" in errors[0] and "5 images x 25 captions" in errors[0]
    assert "Traceback" not in err


def test_eccv_without_flag_still_evaluates(toy_run, capsys):
    from aahr_fast import evaluate as evaluate_cli

    run, toy = toy_run
    assert evaluate_cli.main(["--checkpoint", str(run), "--data", str(toy), "--split", "test"]) == 0
    assert "rsum" in capsys.readouterr().out


def _coco_like_split(order_ok: bool, int_ids: bool = True):
    from aahr_fast import evaluation

    cap_img = evaluation.coco_test_caption_image_ids()
    image_ids = list(dict.fromkeys(int(i) for i in cap_img))  # first-appearance order (the precomp rule)
    index = {iid: k for k, iid in enumerate(image_ids)}
    caption_image = np.array([index[int(i)] for i in cap_img], dtype=np.int64)
    if not order_ok:
        caption_image[[7, 12]] = caption_image[[12, 7]]  # two captions of different images swapped
    ids = [str(i) for i in image_ids] if int_ids else [f"COCO_{i}.jpg" for i in image_ids]
    return SimpleNamespace(name="testall", folder=Path("/x/coco_precomp"), num_images=len(image_ids),
                           num_captions=len(caption_image), image_ids=ids, caption_image=caption_image)


def test_check_eccv_split_accepts_testall_order_and_names_the_first_misplaced_caption():
    from aahr_fast.evaluate import check_eccv_split

    check_eccv_split(_coco_like_split(True))  # the COCO 5K test split in testall order: accepted
    with pytest.raises(DataError, match=r"caption 7 belongs to image \d+, the COCO 5K test split has image \d+"):
        check_eccv_split(_coco_like_split(False))
    with pytest.raises(DataError, match="not COCO integer ids"):
        check_eccv_split(_coco_like_split(True, int_ids=False))


# ----------------------------------------------------------------------------------------------------
# 2. prepare refuses an output folder holding another dataset's / other backbones' features


def _stub_backbones(weights: Path, text_dir: Path | None = None):
    """Tiny stand-ins for EfficientNet-Lite0 / MiniLM with their ``prepare`` interface (milliseconds):
    the image stub's identity is ``weights`` (any existing file), the text stub's ``text_dir`` (default:
    the packaged MiniLM folder, whose ``config.json`` prepare reads)."""
    from aahr_fast.backbones import ImageBackbone

    class StubImage(ImageBackbone):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.weights_path, self.image_size, self.grid, self.num_regions, self.region_dim = \
                str(weights), 32, 2, 4, 6
            self.lin = torch.nn.Linear(3, 6)

        def forward(self, x):
            cells = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
            regions = self.lin(cells)
            return regions, regions.mean(1)

    return StubImage(), stub_text_backbone(text_dir, dim=5, vocab=64)


def _flickr_folder(root: Path, seed: int, n: int = 2) -> Path:
    """A Flickr8k-layout folder: ``n`` random 32x32 JPEGs, 2 captions each, all in the test list."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    names = [f"im{seed}_{i}.jpg" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name)
    rows = ["image,caption"] + [f"{nm},a picture {seed} {i} variant {j}" for i, nm in enumerate(names) for j in range(2)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "Flickr_8k.testImages.txt").write_text("".join(nm + "\n" for nm in names))
    return root


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def prep(tmp_path):
    """Two tiny datasets, two stub image-weight identities, a second text-backbone folder and a run helper."""
    from aahr_fast.prepare import prepare

    ds_a, ds_b = _flickr_folder(tmp_path / "ds_a", 1), _flickr_folder(tmp_path / "ds_b", 2)
    w1, w2 = tmp_path / "lite0_a.pth", tmp_path / "lite0_b.pth"
    w1.write_bytes(b"a")
    w2.write_bytes(b"b")
    other_bert = tmp_path / "other-bert"
    other_bert.mkdir()
    (other_bert / "config.json").write_text('{"vocab_size": 64}')

    def run(ds, out, weights=w1, text_dir=None, **kw):
        ib, tb = _stub_backbones(weights, text_dir)
        return prepare(ds, out, splits=("test",), image_backbone=ib, text_backbone=tb, threads=1,
                       progress=False, batch_size=2, **kw)

    return SimpleNamespace(ds_a=ds_a, ds_b=ds_b, w1=w1, w2=w2, other_bert=other_bert, run=run)


def test_prepare_refuses_another_dataset_and_keeps_the_folder(prep, tmp_path):
    out = tmp_path / "out"
    meta = prep.run(prep.ds_a, out)
    assert meta["dataset"] == str(prep.ds_a.resolve()) and meta["sources"] == {"test": str(prep.ds_a / "captions.txt")}
    before = _snapshot(out)
    with pytest.raises(ConfigError) as exc:
        prep.run(prep.ds_b, out)
    msg = str(exc.value)
    for needle in (f"output folder {out} already holds prepared features of another dataset",
                   f"it holds dataset {prep.ds_a.resolve()}", f"asked: dataset {prep.ds_b.resolve()}",
                   f"efficientnet-lite0 ({prep.w1.resolve()})", "--overwrite", "new output folder"):
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    assert _snapshot(out) == before  # nothing written, nothing removed (no lock or work folder either)

    meta = prep.run(prep.ds_b, out, overwrite=True)  # the explicit way on
    assert meta["noop"] is False and meta["dataset"] == str(prep.ds_b.resolve())
    assert (out / "test_ids.txt").read_text().startswith("im2_")


def test_prepare_refuses_other_backbones_but_rebuilds_same_identity(prep, tmp_path):
    out = tmp_path / "out"
    prep.run(prep.ds_a, out)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"another image backbone: .*lite0_a\.pth.*asked: .*lite0_b\.pth"):
        prep.run(prep.ds_a, out, weights=prep.w2)
    with pytest.raises(ConfigError, match=r"another text backbone: .*asked: .*other-bert"):
        prep.run(prep.ds_a, out, text_dir=prep.other_bert)
    assert _snapshot(out) == before
    # same dataset and backbones, another dtype: an ordinary rebuild, no flag needed
    meta = prep.run(prep.ds_a, out, dtype="float32")
    assert meta["noop"] is False and np.load(out / "test_ims.npy").dtype == np.float32


def test_prepare_refuses_foreign_feature_folders(prep, tmp_path):
    from aahr_fast.data.toy import write_toy_features

    toy = tmp_path / "toy"
    write_toy_features(toy, {"test": 2}, seed=0)
    before = _snapshot(toy)
    with pytest.raises(ConfigError, match=r"another image backbone.*it holds dataset toy features.*image backbone toy"):
        prep.run(prep.ds_a, toy)
    assert _snapshot(toy) == before

    scan = tmp_path / "scan"  # SCAN precomp files, no meta.json
    scan.mkdir()
    np.save(scan / "test_ims.npy", np.zeros((2, 3, 4), np.float32))
    (scan / "test_caps.txt").write_text("a\nb\n")
    before = _snapshot(scan)
    with pytest.raises(ConfigError, match=r"test_caps\.txt, test_ims\.npy\) but no meta\.json"):
        prep.run(prep.ds_a, scan)
    assert _snapshot(scan) == before

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable meta.json"):
        prep.run(prep.ds_a, bad)
    assert (bad / "meta.json").read_text() == "{not json"


def test_prepare_cli_refusal_is_one_error_and_exit_2(prep, tmp_path, capsys):
    from aahr_fast import prepare as prepare_cli

    out = tmp_path / "out"
    prep.run(prep.ds_a, out)
    before = _snapshot(out)
    code = prepare_cli.main([str(prep.ds_b), str(out), "--splits", "test", "--no-progress", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"output folder {out} already holds prepared features of another dataset" in err and "--overwrite" in err
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------------------------------
# 3. topk_connection refuses NaN scores


@pytest.mark.parametrize("backend", [None, "reference"])
def test_topk_connection_names_the_first_nan(backend):
    from aahr_fast import ops

    s = torch.randn(4, 6)
    s[1, 3] = float("nan")
    s[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^topk_connection: scores\[1, 3\] is NaN \(2 NaN entries"):
        ops.topk_connection(s, 0.5, backend=backend)
    s[1, 3], s[3, 0] = float("inf"), float("-inf")  # infinities rank; only NaN is refused
    got = ops.topk_connection(s, 0.5, backend=backend)
    assert got.sum(1).tolist() == [3] * 4 and bool(got[1, 3]) and not bool(got[3, 0])


# ----------------------------------------------------------------------------------------------------
# 4. no transformers "Loading weights" bar from our offline backbone loads (search / prepare / finetune)


def test_text_backbone_loads_print_no_progress_bar(capfd):
    from transformers.utils import logging as hf_logging

    from aahr_fast.backbones import TextBackbone, quiet_transformers_loading
    from aahr_fast.models.encoders import TextBackbone as FinetunedTextBackbone

    assert hf_logging.is_progress_bar_enabled()
    tb = TextBackbone()  # the loader QueryEncoder (python -m aahr_fast.search) and prepare use
    FinetunedTextBackbone(tb.model_path)  # text_mode="finetune"
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and "it/s" not in err, err[-500:]
    assert hf_logging.is_progress_bar_enabled()  # restored for everybody else

    hf_logging.disable_progress_bar()  # a caller's own choice is kept
    try:
        with quiet_transformers_loading():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    with pytest.raises(KeyError), quiet_transformers_loading():
        raise KeyError("x")
    assert hf_logging.is_progress_bar_enabled()


# ----------------------------------------------------------------------------------------------------
# 5. prepare --help: each default once


def test_prepare_help_shows_each_default_once(capsys):
    import re

    from aahr_fast import prepare as prepare_cli

    with pytest.raises(SystemExit) as exc:
        prepare_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    entries = {}  # option -> its help text, whitespace collapsed
    for block in re.split(r"\n(?=  -)", options)[1:]:
        flag = block.split()[0].rstrip(",")
        entries[flag] = " ".join(block.split())
    assert {"--batch-size", "--dtype", "--num-images", "--threads", "--force", "--overwrite"} <= set(entries)
    for flag, help_text in entries.items():
        assert help_text.lower().count("default") <= 1, help_text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 32)" in entries["--batch-size"] and "(default: float16)" in entries["--dtype"]
    assert "(default: all)" in entries["--num-images"] and "(default: all cores)" in entries["--threads"]
    assert "default" not in entries["--force"]


# ----------------------------------------------------------------------------------------------------
# 6. the public model classes document what they raise (and the documented checks hold)


@pytest.mark.parametrize("module", ["encoders", "graph", "momentum", "pooling"])
def test_public_model_classes_have_a_raises_section(module):
    import importlib
    import inspect

    mod = importlib.import_module(f"aahr_fast.models.{module}")
    classes = [getattr(mod, n) for n in mod.__all__ if inspect.isclass(getattr(mod, n))]
    assert classes
    missing = [c.__name__ for c in classes if "\nRaises:\n" not in "\n" + (inspect.getdoc(c) or "")]
    assert not missing, f"aahr_fast.models.{module}: no 'Raises:' section in {missing}"


def test_documented_model_errors():
    from aahr_fast.models.encoders import FragmentProjection, MaskedBatchNorm1d
    from aahr_fast.models.graph import BiasedEncoderLayer
    from aahr_fast.models.momentum import FeatureQueue
    from aahr_fast.models.pooling import GlobalGuidedPooling

    with pytest.raises(ConfigError, match="kind='mpl'"):
        FragmentProjection(8, 4, kind="mpl")  # a typo used to give a silent plain Linear
    with pytest.raises(ConfigError, match="norm='batchnorm'"):
        FragmentProjection(8, 4, norm="batchnorm")
    with pytest.raises(ConfigError, match="heads=4 must be a positive divisor of dim=30"):
        BiasedEncoderLayer(30, 4, 16)
    bn = MaskedBatchNorm1d(3).train()
    with pytest.raises(DataError, match="no valid fragment"):
        bn(torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(bn.running_mean, torch.zeros(3))  # the refused batch left the statistics alone
    with pytest.raises(DataError, match=r"expected keys \(n, 4\)"):
        FeatureQueue(8, 4).enqueue(torch.zeros(2, 5), torch.zeros(2))
    pool = GlobalGuidedPooling(4, heads=2)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = pool(torch.randn(2, 3, 4), mask, torch.randn(2, 4))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()  # documented: an all-False row is NaN

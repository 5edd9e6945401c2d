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

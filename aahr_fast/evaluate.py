"""``python -m aahr_fast.evaluate``: R@K of a trained checkpoint on a split of a feature folder.

Usage::

    python -m aahr_fast.evaluate --checkpoint runs/x                 # best.json of the run, its data, test split
    python -m aahr_fast.evaluate --checkpoint runs/x/last.json --data /prepared/folder --split dev
    python -m aahr_fast.evaluate --checkpoint runs/coco --data coco_precomp --split testall \\
        --protocol coco5fold --save-sims sims.npy --eccv

``--checkpoint`` takes a run folder (its ``best.json``, else ``last.json``), a pointer ``.json``, a
``.safetensors`` weights file or a ``.pt`` state file. The model is rebuilt from the config stored
in the weights file; ``--data`` defaults to the data the run was trained on (``data.path``).

Checks (CheckpointError, exit status 2): the feature dims of ``--data`` must equal the ones the
checkpoint was trained on, and when ``--config`` is given its ``model`` section must equal the
checkpoint's; the message names every differing key.

Outputs: the R@K table (i2t R@1/5/10, t2i R@1/5/10, rsum) on stdout; ``--json`` writes the metrics;
``--save-sims`` writes the (N images, M captions) float32 similarity matrix as ``.npy``;
``--eccv`` adds the ECCV Caption metrics (mAP@R, R-Precision, R@1; percent) and the package's
COCO 1K/5K recalls; it needs the COCO 5K test split (5,000 images, 25,000 captions in SCAN
``testall`` order, see data-and-eval.md 1.7), checked when the split is opened, before anything is
encoded (another split: a one-line ``error:`` and exit status 2). All files are written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from aahr_fast.utils.errors import AAHRError, CheckpointError, DataError

__all__ = ["main", "build_parser", "evaluate_checkpoint", "check_eccv_split"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m aahr_fast.evaluate",
                                description="Evaluate an aahr_fast checkpoint (R@K, rsum; optional ECCV Caption).")
    p.add_argument("--checkpoint", required=True, help="run folder, pointer .json, .safetensors or .pt")
    p.add_argument("--data", help="'synthetic', a prepared feature folder, or a raw dataset to prepare; the values "
                                  "train and index accept (default: the data the run was trained on)")
    p.add_argument("--split", default=None, help="split name (default: the run's test split)")
    p.add_argument("--protocol", choices=("1k", "coco5fold", "5k"), default=None,
                   help="1k: whole matrix (Flickr); coco5fold: mean of 5 folds of 1K images; 5k: whole 5K matrix")
    p.add_argument("--which", choices=("best", "last"), default="best", help="pointer used for a run folder")
    p.add_argument("--config", help="config the checkpoint must match (model section); optional")
    p.add_argument("--save-sims", metavar="FILE.npy", help="write the similarity matrix (images x captions)")
    p.add_argument("--eccv", action="store_true", help="ECCV Caption metrics (COCO 5K test split only)")
    p.add_argument("--json", metavar="FILE.json", help="write the metrics as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for --config")
    return p


def evaluate_checkpoint(checkpoint: str, *, data: str | None = None, split: str | None = None,
                        protocol: str | None = None, which: str = "best", config: str | None = None,
                        overrides: Sequence[str] = (), device: str = "auto", batch_size: int | None = None,
                        return_sims: bool = False, eccv: bool = False, log=print):
    """Load a checkpoint, rebuild its model and score it on ``split`` of ``data``.

    ``eccv=True`` checks with :func:`check_eccv_split` that the split is the COCO 5K test split right
    after opening it, before the model is built and anything is encoded.

    Returns:
        (metrics dict, similarity matrix (N, M) float32 tensor or None, the FeatureSplit, the config).
    Raises:
        CheckpointError: unusable checkpoint, differing feature dims or config (named), or ``data`` made
            by other backbones than the run's training folder (both ``meta.json`` readable; see
            :func:`aahr_fast.retrieval.check_trained_backbones`).
        DataError: from the feature folder; with ``eccv``, a split other than the COCO 5K test split.
        ConfigError: ``batch_size`` not an integer >= 1; with ``eccv``, the ``eccv-caption`` package missing.
    """
    import torch

    from aahr_fast.checkpoint import load_weights, read_weights_meta, resolve_checkpoint
    from aahr_fast.config import config_from_dict, config_to_dict, diff_configs, load_config
    from aahr_fast.engine import amp_dtype, evaluate_model, feature_dims, open_feature_split, select_device
    from aahr_fast.retrieval import check_trained_backbones
    from aahr_fast.train import resolve_data
    from aahr_fast.utils.validate import check_positive_int

    if batch_size is not None:  # 0 must not silently mean "the run's default"
        batch_size = check_positive_int("--batch-size", batch_size)
    ref = resolve_checkpoint(checkpoint, prefer=which)
    meta = read_weights_meta(ref.weights, given=ref.given)
    cfg = config_from_dict(meta["config"])
    if config is not None:
        other = load_config(config, overrides, validate=False)
        diffs = diff_configs(meta["config"].get("model", {}), config_to_dict(other.model), "model")
        if diffs:
            raise CheckpointError(f"{ref.weights}: checkpoint was trained with a different model config than "
                                  f"{config}: " + "; ".join(diffs))
    trained_cfg = config_from_dict(meta["config"])  # data.path: the folder the run was trained on
    if data is not None:
        cfg.data.path = data
    folder = resolve_data(cfg, log)
    split = split or cfg.data.test_split
    fs = open_feature_split(folder, split)
    if eccv:  # before any encoding: refuse a split ECCV Caption does not apply to
        check_eccv_split(fs)
    dims = feature_dims(fs)
    bad = [f"{k}: checkpoint {meta['dims'].get(k)} != data {v}" for k, v in dims.items() if meta["dims"].get(k) != v]
    if bad:
        raise CheckpointError(f"{ref.weights} was trained on features with different dims than {folder} "
                              f"(split {split}): " + "; ".join(bad))
    check_trained_backbones(ref.weights, trained_cfg, folder, what="data")
    dev = select_device(device)
    from aahr_fast.models import build_model

    model = build_model(cfg.model, dict(meta["dims"])).to(dev)
    load_weights(model, ref)
    model.eval()
    out = evaluate_model(model, fs, cfg.model, device=dev, batch_size=batch_size or cfg.data.eval_batch_size,
                         protocol=protocol or cfg.data.protocol, autocast=amp_dtype(cfg.run.amp, dev),
                         return_sims=return_sims)
    metrics, sims = out if return_sims else (out, None)
    return metrics, sims, fs, cfg


def check_eccv_split(fs) -> None:
    """Refuse a split ECCV Caption does not apply to; cheap (no features are read).

    ECCV Caption (Chun et al. ECCV 2022; data-and-eval.md 1.7 and 8) scores the COCO 5K test split only:
    5,000 images with COCO integer ids and 25,000 captions in SCAN ``testall`` row order, because the
    caption (annotation) ids are taken by position from the package's ``coco_test_ids.npy``.

    Args:
        fs: a :class:`~aahr_fast.data.features.FeatureSplit` (uses ``name``, ``folder``, ``num_images``,
            ``num_captions``, ``image_ids``, ``caption_image``).
    Raises:
        DataError: other counts, non-integer image ids, or captions whose images are not those of the
            COCO 5K test captions in ``testall`` order (the first differing caption is named); one line,
            starting with ``--eccv needs the COCO 5K test split``.
        ConfigError: the ``eccv-caption`` package is not installed.
    """
    import numpy as np

    from aahr_fast import evaluation

    what = "--eccv needs the COCO 5K test split (5,000 images x 25,000 captions in SCAN testall order)"
    n, m = fs.num_images, fs.num_captions
    if (n, m) != (5000, 25000):
        raise DataError(f"{what}; split {fs.name!r} of {fs.folder} has {n} images x {m} captions")
    try:
        image_ids = np.array([int(i) for i in fs.image_ids], dtype=np.int64)
    except ValueError:
        raise DataError(f"{what}; image ids of {fs.folder} split {fs.name!r} are not COCO integer ids") from None
    got = image_ids[np.asarray(fs.caption_image, dtype=np.int64)]
    want = evaluation.coco_test_caption_image_ids()
    bad = np.flatnonzero(got != want)
    if bad.size:
        k = int(bad[0])
        raise DataError(f"{what}; split {fs.name!r} of {fs.folder}: caption {k} belongs to image {int(got[k])}, "
                        f"the COCO 5K test split has image {int(want[k])} there ({bad.size} captions differ)")


def _eccv(sims, fs) -> dict:
    import numpy as np

    from aahr_fast import evaluation

    check_eccv_split(fs)
    n, m = sims.shape
    if (n, m) != (fs.num_images, fs.num_captions):
        raise DataError(f"--eccv: similarity matrix {n} x {m} does not match split {fs.name!r} of {fs.folder} "
                        f"({fs.num_images} images x {fs.num_captions} captions)")
    image_ids = np.array([int(i) for i in fs.image_ids], dtype=np.int64)
    caption_ids = evaluation.coco_test_caption_ids()
    return evaluation.eccv_metrics(sims, image_ids, caption_ids)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 configuration/data/checkpoint error)."""
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        from aahr_fast.evaluation import format_table
        from aahr_fast.utils.io import atomic_save_json, atomic_save_npy

        need_sims = bool(args.save_sims or args.eccv)
        metrics, sims, fs, cfg = evaluate_checkpoint(
            args.checkpoint, data=args.data, split=args.split, protocol=args.protocol, which=args.which,
            config=args.config, overrides=args.overrides, device=args.device, batch_size=args.batch_size,
            return_sims=need_sims, eccv=args.eccv, log=log)
        protocol = args.protocol or cfg.data.protocol
        log(f"[evaluate] {args.checkpoint}: split {fs.name!r} of {fs.folder} ({fs.num_images} images, "
            f"{fs.num_captions} captions), protocol {protocol}")
        print(format_table(metrics), flush=True)
        result = {"checkpoint": str(args.checkpoint), "split": fs.name, "protocol": protocol,
                  "num_images": fs.num_images, "num_captions": fs.num_captions, "metrics": metrics}
        if args.save_sims:
            atomic_save_npy(sims.numpy().astype("float32"), Path(args.save_sims))
            log(f"[evaluate] similarity matrix {tuple(sims.shape)} written to {args.save_sims}")
        if args.eccv:
            eccv = _eccv(sims.numpy(), fs)
            result["eccv"] = eccv
            print("ECCV Caption:", flush=True)
            for k, v in eccv.items():
                print(f"  {k}: {v}", flush=True)
        if args.json:
            atomic_save_json(result, Path(args.json))
        return 0
    except AAHRError as err:
        from aahr_fast.utils.validate import error_message

        log(f"error: {error_message(err)}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

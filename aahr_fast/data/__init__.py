"""Data layer: the ``ImageTextSplit`` abstraction, dataset readers, the synthetic default dataset,
procedural toy features and the prepared-feature-folder reader (see docs/DESIGN.md, "Data contract").

Submodules are imported lazily so that ``import aahr_fast.data`` stays cheap (no torch / PIL import
until a name that needs it is used).
"""
from __future__ import annotations

import importlib
from typing import Any

from aahr_fast.data.dataset import ImageTextSplit

_LAZY = {
    "read_flickr8k": "readers",
    "read_precomp": "readers",
    "read_coco_json": "readers",
    "read_karpathy": "readers",
    "open_dataset": "readers",
    "make_synthetic": "synthetic",
    "write_toy_features": "toy",
    "FeatureSplit": "features",
    "CaptionDataset": "features",
    "ImageDataset": "features",
    "TextDataset": "features",
    "collate_captions": "features",
    "collate_images": "features",
    "collate_texts": "features",
}

__all__ = ["ImageTextSplit", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aahr_fast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aahr_fast.data.{mod}"), name)

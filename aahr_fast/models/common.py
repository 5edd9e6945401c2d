"""Pieces shared by the AAHR model and the VSE baseline: feature-dim checks, optimiser groups, warm-up
schedule and the training-batch image ids.

Both :mod:`aahr_fast.models.aahr` and :mod:`aahr_fast.models.baseline` import from here, so neither model
module imports the other (``aahr.build_model`` imports the baseline lazily; the baseline needs nothing
from ``aahr``). ``aahr_fast.models.aahr`` re-exports these names for existing callers.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from aahr_fast.models.config import START_SWITCHES, ScheduleWarning, late_start_message, resolve_start
from aahr_fast.utils.errors import ConfigError, DataError

__all__ = ["REQUIRED_DIMS", "check_dims", "split_param_groups", "ScheduleMixin", "check_ids"]

REQUIRED_DIMS = ("region_dim", "img_global_dim", "token_dim", "txt_global_dim")


def check_dims(dims: dict) -> dict:
    """Validate the feature dims read from a feature folder's ``meta.json``; returns ``{name: int}`` with the
    keys of :data:`REQUIRED_DIMS`. The short names of ``meta.json["dims"]`` (``region``, ``img_global``,
    ``token``, ``txt_global``) are accepted too. Raises ConfigError naming the missing / non-positive entry."""
    if not isinstance(dims, dict):
        raise ConfigError(f"dims must be a dict with keys {REQUIRED_DIMS}, got {type(dims).__name__}")
    # also accept the short names of a feature folder's meta.json "dims" entry (region, img_global, ...)
    dims = {**{f"{k}_dim": v for k, v in dims.items() if not str(k).endswith("_dim")}, **dims}
    missing = [k for k in REQUIRED_DIMS if k not in dims]
    if missing:
        raise ConfigError(f"dims is missing {missing} (expected keys {REQUIRED_DIMS}); got {sorted(dims)}")
    out = {}
    for k in REQUIRED_DIMS:
        try:
            out[k] = int(dims[k])
        except (TypeError, ValueError):
            raise ConfigError(f"dims[{k!r}]={dims[k]!r}: expected a positive int") from None
        if out[k] < 1:
            raise ConfigError(f"dims[{k!r}]={dims[k]!r}: expected a positive int")
    return out


def split_param_groups(model: nn.Module, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Optimiser parameter groups: ``{"name": "main", lr}`` and ``{"name": "backbone", lr * mult}`` (the
    fine-tuned text backbone, any parameter under a ``backbone`` submodule). Frozen parameters (the
    momentum key encoders, the frozen lower layers of a partly fine-tuned backbone,
    ``model.text_trainable_layers > 0``) are left out; empty groups are dropped. Raises nothing."""
    main, backbone = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if (".backbone." in f".{name}") else main).append(p)
    groups = [{"name": "main", "params": main, "lr": lr}]
    if backbone:
        groups.append({"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult})
    return [g for g in groups if g["params"]]


class ScheduleMixin:
    """Warm-up starts given in iterations, epochs or fractions (see :mod:`aahr_fast.models.config`)."""

    _SCHEDULE_KEYS: tuple = ()

    def resolve_schedule(self, steps_per_epoch: Optional[int], total_steps: Optional[int]) -> dict:
        """Convert the configured warm-up starts to iteration numbers; call once before training.

        Args: steps_per_epoch, total_steps: optimiser steps per epoch / in the whole run.
        Returns: ``{"proto_start": int, ...}``. Raises ConfigError when a needed count is missing.
        Warns: :class:`~aahr_fast.models.config.ScheduleWarning` for each enabled part (``use_prototypes``,
            ``use_graph``, ``use_moco``) whose start is at or beyond ``total_steps`` (it never runs).
        """
        self._starts = {k: resolve_start(getattr(self.cfg, k), steps_per_epoch, total_steps, k)
                        for k in self._SCHEDULE_KEYS}
        if total_steps:
            for k, start in self._starts.items():
                msg = late_start_message(k, getattr(self.cfg, k), start, int(total_steps))
                if msg and getattr(self.cfg, START_SWITCHES.get(k, ""), True):
                    warnings.warn(msg, ScheduleWarning, stacklevel=2)
        return dict(self._starts)

    def start_of(self, key: str) -> int:
        """Resolved iteration at which ``key`` (e.g. ``"graph_start"``) begins. Integer specs work without
        :meth:`resolve_schedule`; epoch / fraction specs raise ConfigError until it has been called."""
        starts = getattr(self, "_starts", None)
        if starts is not None and key in starts:
            return starts[key]
        return resolve_start(getattr(self.cfg, key), None, None, key)


def check_ids(batch: dict, bsz: int) -> torch.Tensor:
    """``batch["img_index"]`` as int64 (B,): the image index of each training pair (same-image masking).

    Raises:
        DataError: the key is missing, or its shape is not ``(bsz,)``.
    """
    if "img_index" not in batch:
        raise DataError(f"batch has no 'img_index' (image index of each pair, for same-image masking); keys: {sorted(batch)}")
    ids = batch["img_index"]
    if ids.shape != (bsz,):
        raise DataError(f"batch['img_index']: expected shape ({bsz},), got {tuple(ids.shape)}")
    return ids.long()

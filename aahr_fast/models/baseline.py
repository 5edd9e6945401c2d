"""VSE baseline: mean-pooled regions / tokens, one linear head per side, L2-normalised (VSE++-style dual
encoder, Faghri et al. 2018), trained with the same loss family as AAHR (``ModelConfig.loss``).

Same public API as :class:`aahr_fast.models.aahr.AAHR`, so the trainer and evaluation treat both alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast.models.common import ScheduleMixin, check_dims, check_ids, split_param_groups
from aahr_fast.models.config import ModelConfig
from aahr_fast.models.encoders import TextBackbone, check_fragments, text_token_features
from aahr_fast.models.losses import matching_loss
from aahr_fast.models.pooling import lengths_to_mask, masked_mean
from aahr_fast.utils.errors import DataError

__all__ = ["VSEBaseline"]


class VSEBaseline(ScheduleMixin, nn.Module):
    """``f_v = l2(W_v mean_valid(regions))``, ``f_t = l2(W_t mean_valid(tokens))``.

    Args: cfg (uses embed_dim, text_mode, text_backbone_path, text_trainable_layers, backbone_lr_mult, loss,
        margin, dws_*, mask_same_image), dims (``{region_dim, img_global_dim, token_dim, txt_global_dim}``;
        globals unused).
    """

    _SCHEDULE_KEYS = ()

    def __init__(self, cfg: ModelConfig, dims: dict):
        super().__init__()
        cfg.validate()
        dims = check_dims(dims)
        self.cfg, self.dims = cfg, dims
        self.backbone = (TextBackbone(cfg.text_backbone_path, trainable=True,
                                      trainable_layers=cfg.text_trainable_layers)
                         if cfg.text_mode == "finetune" else None)
        tdim = self.backbone.hidden_size if self.backbone is not None else dims["token_dim"]
        self.img_fc = nn.Linear(dims["region_dim"], cfg.embed_dim)
        self.txt_fc = nn.Linear(tdim, cfg.embed_dim)
        self._starts = None
        self._dist = None

    def set_distributed(self, ctx) -> None:
        """Train on one rank of a multi-process run (:class:`aahr_fast.distributed.DistContext` or None):
        the loss is computed on the gathered global batch (aahr_fast/distributed.py)."""
        self._dist = ctx if ctx is not None and ctx.world_size > 1 else None

    def encode_images(self, batch: dict) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings. Needs ``regions, region_lens``; raises DataError otherwise."""
        for key in ("regions", "region_lens"):
            if key not in batch:
                raise DataError(f"batch has no {key!r}; keys: {sorted(batch)}")
        x, lens = batch["regions"], batch["region_lens"].long()
        check_fragments(x, lens, None, "regions", dim=self.img_fc.in_features)
        return F.normalize(self.img_fc(masked_mean(x.float(), lengths_to_mask(lens, x.shape[1]))), dim=-1)

    def encode_texts(self, batch: dict) -> torch.Tensor:
        """(B, D) L2-normalised text embeddings from ``tokens`` (or ``input_ids`` when fine-tuning) and
        ``token_lens``; raises DataError otherwise."""
        x, lens = text_token_features(batch, self.backbone)
        check_fragments(x, lens, None, "tokens", dim=self.txt_fc.in_features)
        return F.normalize(self.txt_fc(masked_mean(x.float(), lengths_to_mask(lens, x.shape[1]))), dim=-1)

    def training_step(self, batch: dict, step: int, generator: torch.Generator) -> dict:
        """``{"loss": scalar, "parts": {"base": float, "total": float}, "embeddings": (f_v, f_t)}`` with the
        configured matching loss; the embeddings are the detached (B, D) ones the loss saw."""
        c = self.cfg
        f_v, f_t = self.encode_images(batch), self.encode_texts(batch)
        if f_v.shape[0] != f_t.shape[0]:
            raise DataError(f"batch has {f_v.shape[0]} images but {f_t.shape[0]} captions")
        ids = check_ids(batch, f_v.shape[0]).to(f_v.device)
        if self._dist is not None:   # in-batch negatives over the global batch (differentiable gather)
            from aahr_fast.distributed import all_gather_grad, all_gather_nograd

            f_v, f_t = all_gather_grad(f_v, self._dist), all_gather_grad(f_t, self._dist)
            ids = all_gather_nograd(ids, self._dist)
        with torch.autocast(f_v.device.type, enabled=False):   # the loss in float32 under mixed precision
            loss = matching_loss(c.loss, f_v.float(), f_t.float(), ids, generator, margin=c.margin, n=c.dws_n,
                                 cutoff=c.dws_cutoff, min_dist=c.dws_min_dist, mask_same_image=c.mask_same_image)
        val = float(loss.detach())
        return {"loss": loss, "parts": {"base": val, "total": val}, "embeddings": (f_v.detach(), f_t.detach())}

    def on_after_optimizer_step(self) -> None:
        """Nothing to do (no momentum encoder)."""

    def param_groups(self, lr: float, backbone_lr_mult: Optional[float] = None) -> list[dict]:
        """``main`` group at ``lr``; the fine-tuned backbone at ``lr * backbone_lr_mult`` (default cfg's)."""
        mult = self.cfg.backbone_lr_mult if backbone_lr_mult is None else backbone_lr_mult
        return split_param_groups(self, lr, mult)

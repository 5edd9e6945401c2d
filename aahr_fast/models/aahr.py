"""The AAHR model (Chen et al., KBS 2025): encoders, prototypes, instance graph, momentum queues, losses.

Training objective (``aahr-method.md`` section 3, "Total (code)"):
``L = L_base(f_v, f_t) + [it >= graph_start] w_g L_gnn + [it >= proto_start] w_p L_proto
+ [it >= moco_start and both queues filled once] w_m L_moco`` with
- ``L_base = Trip(f_v, f_t)`` on the fused embeddings (distance-weighted triplet by default);
- ``L_proto``: swapped prediction over the clustering prototypes on the fused embeddings;
- ``L_gnn = Trip(v^, t~) + Trip(v~, t^) + Trip(v~, t~)``: local-branch ``v^ = l2(v)`` vs graph-enhanced ``~``;
- ``L_moco``: InfoNCE of the local-branch queries ``l2(v), l2(t)`` against the momentum encoders' fused
  keys ``l2(f^k_t), l2(f^k_v)`` and the opposite-modality queue (same-image keys masked by default).

Public API used by the trainer (``aahr_fast/train.py``): :func:`build_model`,
:meth:`AAHR.training_step`, :meth:`AAHR.encode_images`, :meth:`AAHR.encode_texts`,
:meth:`AAHR.param_groups`, :meth:`AAHR.on_after_optimizer_step`, :meth:`AAHR.resolve_schedule`.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast.models.common import REQUIRED_DIMS, ScheduleMixin, check_dims, check_ids, split_param_groups
from aahr_fast.models.config import ModelConfig, ScheduleWarning  # noqa: F401  (ScheduleWarning re-exported)
from aahr_fast.models.encoders import EncoderOutput, ImageEncoder, TextEncoder
from aahr_fast.models.graph import InstanceGraph
from aahr_fast.models.losses import matching_loss, queue_infonce
from aahr_fast.models.momentum import FeatureQueue, ema_update, make_momentum_copy
from aahr_fast.models.prototypes import Prototypes
from aahr_fast.utils.errors import ConfigError, DataError

__all__ = ["AAHR", "build_model", "REQUIRED_DIMS", "check_dims", "ScheduleMixin", "split_param_groups"]

def _gather_step(dctx, img: EncoderOutput, txt: EncoderOutput, keys: Optional[tuple], ids: torch.Tensor):
    """Distributed training: the encoder outputs, momentum keys and image ids of every rank, concatenated
    in rank order (= the global batch). ``local`` / ``fused`` keep their gradient (differentiable
    all-gather); fragments (padded to the largest fragment count), masks, lengths, keys and ids do not
    need one (the relevance is computed from detached fragments)."""
    from aahr_fast.distributed import all_gather_grad, all_gather_nograd

    def one(out: EncoderOutput) -> EncoderOutput:
        return EncoderOutput(frags=all_gather_nograd(out.frags, dctx, pad_dim=1),
                             mask=all_gather_nograd(out.mask, dctx, pad_dim=1),
                             lens=all_gather_nograd(out.lens, dctx),
                             local=all_gather_grad(out.local, dctx), fused=all_gather_grad(out.fused, dctx))

    if keys is not None:
        keys = tuple(all_gather_nograd(k, dctx) for k in keys)
    return one(img), one(txt), keys, all_gather_nograd(ids, dctx)


class AAHR(ScheduleMixin, nn.Module):
    """AAHR dual encoder with its training-only modules (see the module docstring).

    Args:
        cfg: :class:`ModelConfig` (validated). dims: ``{region_dim, img_global_dim, token_dim, txt_global_dim}``.
    Submodules: ``img_enc``, ``txt_enc`` (:mod:`~aahr_fast.models.encoders`); ``prototypes``
    (if ``use_prototypes``); ``graph`` (if ``use_graph``); ``img_key``, ``txt_key``, ``queue_v``,
    ``queue_t`` (if ``use_moco``). Queues, pointers and ids are buffers (in the ``state_dict``).
    """

    _SCHEDULE_KEYS = ("proto_start", "graph_start", "moco_start")

    def __init__(self, cfg: ModelConfig, dims: dict):
        super().__init__()
        cfg.validate()
        dims = check_dims(dims)
        self.cfg, self.dims = cfg, dims
        d = cfg.embed_dim
        self.img_enc = ImageEncoder(dims["region_dim"], dims["img_global_dim"], cfg)
        self.txt_enc = TextEncoder(dims["token_dim"], dims["txt_global_dim"], cfg)
        self.prototypes = (Prototypes(cfg.num_prototypes, d, eps=cfg.sinkhorn_eps, n_iters=cfg.sinkhorn_iters,
                                      tau=cfg.proto_tau, backend=cfg.ops_backend) if cfg.use_prototypes else None)
        self.graph = InstanceGraph(cfg) if cfg.use_graph else None
        if cfg.use_moco:
            self.img_key = make_momentum_copy(self.img_enc)
            # the key text encoder leaves out the frozen lower layers of a partly fine-tuned BERT: the online
            # encoder's lower() output of each batch feeds both (training_losses)
            self.txt_key = make_momentum_copy(self.txt_enc, exclude=self.txt_enc.frozen_modules())
            self.queue_v = FeatureQueue(cfg.queue_size, d)
            self.queue_t = FeatureQueue(cfg.queue_size, d)
        else:
            self.img_key = self.txt_key = self.queue_v = self.queue_t = None
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._starts = None
        self._dist = None

    def set_distributed(self, ctx) -> None:
        """Train on one rank of a multi-process run (:class:`aahr_fast.distributed.DistContext`, or
        None for one process): the encoders see the local shard, the losses, graph and queues the
        gathered global batch, the prototype loss a distributed Sinkhorn (see aahr_fast/distributed.py)."""
        self._dist = ctx if ctx is not None and ctx.world_size > 1 else None
        if self.prototypes is not None:
            self.prototypes.dist = self._dist

    # ------------------------------------------------------------------ inference
    def encode_images(self, batch: dict) -> torch.Tensor:
        """Final fused image embeddings ``f_v`` (B, D) float32 (norm <= 1; retrieval uses dot products).
        Call in eval mode. Needs ``regions, region_lens, img_global``; raises DataError otherwise, for an
        empty batch (B = 0) and for feature sizes other than ``region_dim`` / ``img_global_dim``."""
        return self.img_enc(batch).fused

    def encode_texts(self, batch: dict) -> torch.Tensor:
        """Final fused text embeddings ``f_t`` (B, D) float32. Call in eval mode. Needs ``tokens`` (or
        ``input_ids``), ``token_lens``, ``txt_global``; raises DataError otherwise, for an empty batch
        (B = 0) and for feature sizes other than ``token_dim`` / ``txt_global_dim``."""
        return self.txt_enc(batch).fused

    # ------------------------------------------------------------------ training
    def _trip(self, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        return matching_loss(c.loss, a, b, ids, gen, margin=c.margin, n=c.dws_n, cutoff=c.dws_cutoff,
                             min_dist=c.dws_min_dist, mask_same_image=c.mask_same_image)

    def moco_active(self, step: int) -> bool:
        """True when the MoCo loss is on at ``step``: past ``moco_start`` and both queues filled once."""
        return (self.queue_v is not None and step >= self.start_of("moco_start")
                and self.queue_v.is_full and self.queue_t.is_full)

    def training_step(self, batch: dict, step: int, generator: torch.Generator) -> dict:
        """One training forward: returns ``{"loss": scalar Tensor, "parts": {name: float}, "embeddings":
        (f_v, f_t)}`` (the detached final (B, D) embeddings, global batch when distributed).

        :meth:`training_losses` with the parts read to floats (one host read per part); the trainer calls
        :meth:`training_losses` and reads the parts after the optimiser step instead.
        """
        out = self.training_losses(batch, step, generator)
        return {**out, "parts": {k: float(v) for k, v in out["parts"].items()}}

    def prepare_step(self) -> None:
        """Eager work before a (compiled) :meth:`training_losses`: renormalise the prototypes when an optimiser
        step or a load changed them (a compiled forward cannot read the parameter's version counter), and
        read the queues' fill counters into their host mirrors (once; later steps keep them on the host)."""
        if self.prototypes is not None and self.training:
            self.prototypes.renormalize_if_changed()
        for q in (self.queue_v, self.queue_t):
            if q is not None:
                q.is_full  # noqa: B018  (fills the host mirror)

    def training_losses(self, batch: dict, step: int, generator: torch.Generator) -> dict:
        """One training forward without host reads: ``{"loss": scalar Tensor, "parts": {name: 0-dim Tensor},
        "embeddings": (f_v, f_t)}`` (parts and embeddings detached; read them after the step). Compiles with ``torch.compile(fullgraph=True)`` after
        :meth:`prepare_step` (then the negative sampling draws from the global RNG, not ``generator``).

        Parts: ``base``, and when enabled ``proto``, ``gnn``, ``moco`` (unweighted values; 0.0 before
        their start step, when they are not computed), plus ``total``. The momentum keys of this batch
        are kept for :meth:`on_after_optimizer_step` (train mode only).

        Args:
            batch: the batch dict of ``docs/DESIGN.md`` (needs ``img_index``).
            step: 0-based global iteration (warm-up gating).
            generator: torch.Generator for the triplet negative sampling (determinism).
        Raises:
            DataError for a malformed batch (missing key, empty batch, feature sizes other than the
            model's dims, bad lengths); ConfigError for an unresolved epoch / fraction start.
        """
        dctx = self._dist
        with (dctx.local_rng(step) if dctx is not None else contextlib.nullcontext()):
            # distributed: encoder dropout on the local shard draws from a per-rank stream
            img = self.img_enc(batch)
            txt_low = self.txt_enc.lower(batch)   # frozen part of the text side: computed once per batch
            txt = self.txt_enc.upper(txt_low)
            bsz = img.fused.shape[0]
            if txt.fused.shape[0] != bsz:
                raise DataError(f"batch has {bsz} images but {txt.fused.shape[0]} captions; training pairs them row by row")
            ids = check_ids(batch, bsz).to(img.fused.device)
            keys = None
            if self.queue_v is not None:
                with torch.no_grad():
                    keys = (F.normalize(self.img_key(batch).fused.float(), dim=-1),
                            F.normalize(self.txt_key.upper(self.txt_key.lower(batch, shared=txt_low)).fused.float(),
                                        dim=-1))
        local_fused = None
        if dctx is not None:
            # the losses, graph and queues need the global batch: gather (differentiable) in rank order
            local_fused = (img.fused.float(), txt.fused.float())
            img, txt, keys, ids = _gather_step(dctx, img, txt, keys, ids)
        with torch.autocast(img.fused.device.type, enabled=False):
            # the losses, prototypes, graph and queues run in float32 even under mixed precision:
            # they act on (B, D) / (2B, 2B) tensors, are cheap, and are sensitive (exp, top-k, Sinkhorn)
            return self._losses(img, txt, keys, ids, step, generator, local_fused)

    def _losses(self, img: EncoderOutput, txt: EncoderOutput, keys: Optional[tuple], ids: torch.Tensor,
                step: int, generator: torch.Generator, local_fused: Optional[tuple] = None) -> dict:
        cfg = self.cfg
        img = img._replace(local=img.local.float(), fused=img.fused.float(), frags=img.frags.float())
        txt = txt._replace(local=txt.local.float(), fused=txt.fused.float(), frags=txt.frags.float())
        base = self._trip(img.fused, txt.fused, ids, generator)
        total = base
        zero = base.new_zeros(())
        parts = {"base": base.detach()}

        if self.prototypes is not None:
            if step >= self.start_of("proto_start"):
                # distributed: the local shard with a distributed Sinkhorn (value = global loss)
                lp = self.prototypes(*(local_fused if local_fused is not None else (img.fused, txt.fused)))
                total = total + cfg.proto_weight * lp
                parts["proto"] = lp.detach()
            else:
                parts["proto"] = zero

        v_hat = F.normalize(img.local, dim=-1)
        t_hat = F.normalize(txt.local, dim=-1)
        if self.graph is not None:
            if step >= self.start_of("graph_start"):
                v_til, t_til = self.graph(v_hat, t_hat, img, txt)
                lg = self._trip(v_hat, t_til, ids, generator) + self._trip(v_til, t_hat, ids, generator) \
                    + self._trip(v_til, t_til, ids, generator)
                total = total + cfg.graph_weight * lg
                parts["gnn"] = lg.detach()
            else:
                parts["gnn"] = zero

        if keys is not None:
            k_v, k_t = keys
            if self.training:
                self._pending = (k_v, k_t, ids)
            if self.moco_active(step):
                mask = cfg.moco_mask_same_image   # paper_compat / preset=authors set it False
                lm = queue_infonce(v_hat, k_t, self.queue_t.feats, tau=cfg.moco_tau, q_ids=ids,
                                   queue_ids=self.queue_t.ids, mask_same_image=mask) \
                    + queue_infonce(t_hat, k_v, self.queue_v.feats, tau=cfg.moco_tau, q_ids=ids,
                                    queue_ids=self.queue_v.ids, mask_same_image=mask)
                total = total + cfg.moco_weight * lm
                parts["moco"] = lm.detach()
            else:
                parts["moco"] = zero
        parts["total"] = total.detach()
        # detached final embeddings of the (global) batch: the trainer's collapse check reads their spread
        return {"loss": total, "parts": parts, "embeddings": (img.fused.detach(), txt.fused.detach())}

    @torch.no_grad()
    def on_after_optimizer_step(self) -> None:
        """After each optimiser step (train mode): EMA-update the key encoders towards the query
        encoders (``m = moco_momentum``) and enqueue the keys of the last :meth:`training_step`. The
        keys were computed before this update, so the order equals MoCo's (EMA, keys, loss, enqueue).
        No-op in eval mode, without MoCo, or when no training step is pending."""
        if self.queue_v is None or not self.training or self._pending is None:
            return
        k_v, k_t, ids = self._pending
        self._pending = None
        self.queue_v.enqueue(k_v, ids)
        self.queue_t.enqueue(k_t, ids)
        m = self.cfg.moco_momentum
        ema_update(self.img_key, self.img_enc, m)
        ema_update(self.txt_key, self.txt_enc, m)

    def param_groups(self, lr: float, backbone_lr_mult: Optional[float] = None) -> list[dict]:
        """Optimiser groups: everything trainable at ``lr`` and the fine-tuned text backbone at
        ``lr * backbone_lr_mult`` (default ``cfg.backbone_lr_mult`` = 0.1). Key encoders are excluded."""
        mult = self.cfg.backbone_lr_mult if backbone_lr_mult is None else backbone_lr_mult
        return split_param_groups(self, lr, mult)

    def train(self, mode: bool = True):
        """Switch mode; leaving train mode drops any pending (not yet enqueued) keys."""
        if not mode:
            self._pending = None
        return super().train(mode)


def build_model(cfg: ModelConfig, dims: dict) -> nn.Module:
    """Build the model named by ``cfg.arch``: ``"aahr"`` -> :class:`AAHR`, ``"vse"`` ->
    :class:`~aahr_fast.models.baseline.VSEBaseline`.

    Args: cfg: :class:`ModelConfig`; dims: ``{region_dim, img_global_dim, token_dim, txt_global_dim}``
    (from the feature folder's ``meta.json``). Raises ConfigError for bad config / dims.
    """
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.arch == "vse":
        from aahr_fast.models.baseline import VSEBaseline
        return VSEBaseline(cfg, dims)
    return AAHR(cfg, dims)

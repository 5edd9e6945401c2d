"""AAHR image and text encoders (``aahr-method.md`` sections 2.2 and 2.3).

Both sides share one structure, :class:`FragmentEncoder`:

1. fragment projection ``R = W0 x + MLP(x)`` (GPO/HREM FC+MLP, MLP = Linear -> norm -> ReLU -> Linear) or a
   plain Linear (the paper's text side); the norm is a BatchNorm whose statistics come from the valid
   fragments only (:class:`MaskedBatchNorm1d`), a LayerNorm, or none;
2. max-k residual vector ``v_res`` over the valid fragments (k = 2, HREM);
3. one post-norm Transformer encoder layer over the fragments with a key padding mask (the figure's "GAT");
4. global-guided attention pooling ``v_pool`` with the projected frozen global vector as query (GGLP);
5. ``v = beta v_res + (1 - beta) v_pool`` (paper Eq. 2, beta = 0.8);
6. gated fusion with the projected global vector ``f = z l2(v) + (1 - z) l2(g)``.

:class:`ImageEncoder` reads ``regions / region_lens / img_global`` from the batch dict of
``docs/DESIGN.md``; :class:`TextEncoder` reads ``tokens`` (frozen token features) or ``input_ids``
(a fine-tuned BERT-family backbone from a local folder) plus ``token_lens / txt_global``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast.backbones import TextBackbone, default_text_model
from aahr_fast.models.config import ModelConfig
from aahr_fast.ops import value_checks_enabled
from aahr_fast.models.pooling import GatedFusion, GlobalGuidedPooling, lengths_to_mask, masked_mean, maxk_pool
from aahr_fast.utils.errors import ConfigError, DataError

__all__ = ["authors_linear_init", "MaskedBatchNorm1d", "FragmentProjection", "FragmentEncoder", "ImageEncoder", "TextEncoder",
           "TextBackbone", "TextLower", "EncoderOutput", "text_token_features", "check_fragments",
           "default_backbone_path"]


class EncoderOutput(NamedTuple):
    """What an encoder returns.

    frags: (B, N, D) projected pre-pooling fragments (padded rows zeroed unless pooling or relevance is
    unmasked: ``pool_mask_padding`` / ``relevance_mask_padding`` false, the authors' behaviour);
    mask: (B, N) bool, True = valid; lens: (B,) int64;
    local: (B, D) local-branch embedding ``v`` (not normalised);
    fused: (B, D) final embedding ``f`` (norm <= 1; equals ``l2(v)`` without the global branch).

    Raises:
        Nothing: a plain NamedTuple, its fields are not validated.
    """
    frags: torch.Tensor
    mask: torch.Tensor
    lens: torch.Tensor
    local: torch.Tensor
    fused: torch.Tensor


#: Name of the model dimension each batch key is checked against (the keys of ``build_model``'s ``dims``).
_DIM_NAMES = {"regions": "region_dim", "tokens": "token_dim", "input_ids": "token_dim"}
_GLOBAL_DIM_NAMES = {"regions": "img_global_dim", "tokens": "txt_global_dim"}


def check_fragments(x: torch.Tensor, lens: torch.Tensor, glob: Optional[torch.Tensor], what: str, *,
                    dim: Optional[int] = None, glob_dim: Optional[int] = None) -> None:
    """Validate one side of a batch: x (B, N, D) float with B >= 1, lens (B,) int in [1, N], glob (B, Dg).

    Args:
        x: fragment features (B, N, D) (``batch['regions']`` / ``batch['tokens']``).
        lens: (B,) integer lengths. glob: (B, Dg) global vectors or None.
        what: the batch key of ``x`` (named in every message).
        dim: the feature size D the model was built for (``region_dim`` / ``token_dim``); None = not checked.
        glob_dim: the global width Dg the model was built for (``img_global_dim`` / ``txt_global_dim``); None =
            not checked.
    Raises:
        DataError: ``empty batch`` (B = 0); a feature size other than ``dim`` / ``glob_dim`` (naming
            ``batch[what]``, the size found and the size expected); bad shapes or lengths (naming the key and
            the offending item index). Without these checks the first Linear / attention reshape fails
            deep inside the model with an unhelpful RuntimeError.
    """
    if x.dim() != 3:
        raise DataError(f"batch[{what!r}]: expected (B, N, D) features, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError(f"empty batch: batch[{what!r}] has shape {tuple(x.shape)} (B = 0); encoding and training "
                        f"need at least one item")
    if dim is not None and x.shape[2] != dim:
        name = _DIM_NAMES.get(what, "feature dim")
        raise DataError(f"batch[{what!r}] has feature size {x.shape[2]} (shape {tuple(x.shape)}), but the model "
                        f"was built for {name}={dim}: the features come from another extractor than the "
                        f"model's training data")
    if lens.dim() != 1 or lens.shape[0] != x.shape[0]:
        raise DataError(f"batch lengths for {what!r}: expected shape ({x.shape[0]},), got {tuple(lens.shape)}")
    if lens.dtype.is_floating_point:
        raise DataError(f"batch lengths for {what!r}: expected an integer tensor, got {lens.dtype}")
    bad = (lens < 1) | (lens > x.shape[1])
    if value_checks_enabled(lens) and bool(bad.any()):  # host read: eager callers only (see aahr_fast.ops)
        i = int(bad.nonzero()[0, 0])
        raise DataError(f"batch lengths for {what!r}: item {i} has length {int(lens[i])}, expected 1..{x.shape[1]}")
    if glob is not None and (glob.dim() != 2 or glob.shape[0] != x.shape[0]):
        raise DataError(f"global vector for {what!r}: expected ({x.shape[0]}, Dg), got {tuple(glob.shape)}")
    if glob is not None and glob_dim is not None and glob.shape[1] != glob_dim:
        name = _GLOBAL_DIM_NAMES.get(what, "global dim")
        raise DataError(f"global vector for {what!r} has size {glob.shape[1]} (shape {tuple(glob.shape)}), but the "
                        f"model was built for {name}={glob_dim}")


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm over the feature axis of (B, N, C) fragments whose training statistics use the valid
    fragments only, so padding never pollutes the mean/variance (``data-and-eval.md`` 11.6).

    Same maths and running-stat update as ``nn.BatchNorm1d`` (momentum 0.1, unbiased running variance);
    ``mask=None`` uses every row (the authors' behaviour, ``bn_mask_padding=False``). Eval uses running stats.
    Forward: x (B, N, C) float, mask (B, N) bool or None -> (B, N, C) float32.

    Raises:
        DataError: in training mode, a batch without any valid fragment (``mask`` all False, or no rows):
            its statistics would be NaN and poison the running mean / variance.
        RuntimeError / IndexError: torch's, for ``x`` whose last size is not ``num_features`` or a
            ``mask`` that is not (B, N) (shapes are not checked here; the encoders validate batches with
            :func:`check_fragments`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.training:
            if mask is None:
                flat = x.reshape(-1, x.shape[-1]).float()
                cnt = flat.shape[0]
                mean = flat.mean(dim=0)
                var = flat.var(dim=0, unbiased=False)
                corr = cnt / max(cnt - 1, 1)
            else:
                # masked sums over the valid fragments (fixed shapes, no boolean gather, no host read)
                xf = x.float()
                m = mask.reshape(-1, 1).to(xf.dtype)                           # (B*N, 1)
                flat = xf.reshape(-1, xf.shape[-1])
                cnt = m.sum()
                if value_checks_enabled(cnt) and not bool(cnt > 0):
                    raise DataError(f"MaskedBatchNorm1d: no valid fragment in the training batch (x {tuple(x.shape)}, "
                                    f"mask all False): batch statistics would be NaN")
                mean = (flat * m).sum(0) / cnt
                var = ((flat - mean) * m).square().sum(0) / cnt
                corr = cnt / (cnt - 1).clamp_min(1)
            with torch.no_grad():
                unbiased = var * corr
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x.float() - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class FragmentProjection(nn.Module):
    """``R = W0 x + MLP(x)`` with MLP = Linear(Din -> hidden) -> norm -> ReLU -> Linear(hidden -> D)
    (GPO/HREM FC+MLP; ``aahr-method.md`` 2.2 step 1), or ``R = W0 x`` when ``kind="linear"``.

    Args:
        in_dim: Din. dim: D. kind: "mlp" | "linear". hidden: MLP width (None -> max(D // 2, 1)).
        norm: norm inside the MLP, "masked_bn" (:class:`MaskedBatchNorm1d`) | "layernorm" | "none".
    Forward: x (B, N, Din), mask (B, N) bool or None (None = statistics over all rows) -> (B, N, D).

    Raises:
        ConfigError: ``kind`` or ``norm`` not one of the values above (constructor).
        DataError: from :class:`MaskedBatchNorm1d` (training batch without a valid fragment).
        RuntimeError: torch's, for ``x`` whose last size is not ``in_dim`` (not checked here).
    """

    def __init__(self, in_dim: int, dim: int, kind: str = "mlp", hidden: Optional[int] = None, norm: str = "masked_bn"):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ConfigError(f"FragmentProjection: kind={kind!r}: expected 'mlp' or 'linear'")
        if norm not in ("masked_bn", "layernorm", "none"):
            raise ConfigError(f"FragmentProjection: norm={norm!r}: expected 'masked_bn', 'layernorm' or 'none'")
        self.kind, self.norm_kind = kind, norm
        self.fc = nn.Linear(in_dim, dim)
        if kind == "mlp":
            hidden = hidden or max(dim // 2, 1)
            self.mlp_in = nn.Linear(in_dim, hidden)
            if norm == "masked_bn":
                self.norm = MaskedBatchNorm1d(hidden)
            elif norm == "layernorm":
                self.norm = nn.LayerNorm(hidden)
            else:
                self.norm = None
            self.mlp_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.fc(x)
        if self.kind == "mlp":
            h = self.mlp_in(x)
            if isinstance(self.norm, MaskedBatchNorm1d):
                h = self.norm(h, mask)
            elif self.norm is not None:
                h = self.norm(h)
            out = out + self.mlp_out(F.relu(h))
        return out


def authors_linear_init(*modules: Optional[nn.Module]) -> None:
    """The authors' ``init_weights``: every ``nn.Linear`` inside ``modules`` gets a Xavier-uniform weight and a
    zero bias (their FC_MLP region projection and CLIP projections; ``init: authors``). None entries are
    skipped. Consumes the global torch RNG. Raises nothing."""
    for mod in modules:
        if mod is None:
            continue
        for sub in mod.modules():
            if isinstance(sub, nn.Linear):
                nn.init.xavier_uniform_(sub.weight)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)


class FragmentEncoder(nn.Module):
    """Shared AAHR encoder over fragments (regions or words); see the module docstring for the steps.

    Args:
        in_dim: fragment feature width. global_dim: width of the frozen global vector (ignored when
            ``cfg.use_global`` is False). cfg: :class:`ModelConfig`. proj: "mlp" | "linear".
    Forward:
        x (B, N, in_dim) float, lens (B,) int64, glob (B, global_dim) float or None -> :class:`EncoderOutput`.

    Raises:
        ConfigError: ``proj`` or ``cfg.proj_norm`` unknown (constructor; ``cfg`` is expected validated,
            :meth:`ModelConfig.validate`).
        DataError: ``glob`` is None while the global branch is on (``cfg.use_global``); a training batch
            without a valid fragment. Shapes and lengths are not checked here (the image / text
            encoders do, with :func:`check_fragments`): bad ones raise torch's RuntimeError.
    """

    def __init__(self, in_dim: int, global_dim: int, cfg: ModelConfig, proj: str):
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        self.bn_mask = cfg.bn_mask_padding
        self.pool_mask = cfg.pool_mask_padding
        self.zero_padding = cfg.pool_mask_padding and cfg.relevance_mask_padding
        self.proj = FragmentProjection(in_dim, d, proj, cfg.img_mlp_hidden, cfg.proj_norm)
        self.frag_tf = (nn.TransformerEncoderLayer(d, cfg.frag_heads, cfg.frag_ff_dim or d, cfg.dropout,
                                                   batch_first=True) if cfg.use_fragment_transformer else None)
        self.use_global = cfg.use_global
        self.glob_proj = nn.Linear(global_dim, d) if cfg.use_global else None
        if cfg.use_global or cfg.noglobal_pool == "learned":
            self.pool = GlobalGuidedPooling(d, cfg.pool_heads, cfg.pool_head_dim)
        else:
            self.pool = None
        self.query = nn.Parameter(torch.randn(d) / d ** 0.5) if (not cfg.use_global and cfg.noglobal_pool == "learned") else None
        self.fusion = GatedFusion(d) if (cfg.use_global and cfg.use_gated_fusion) else None
        self.beta = cfg.residual_beta
        self.maxk = cfg.maxk

    def forward(self, x: torch.Tensor, lens: torch.Tensor, glob: Optional[torch.Tensor]) -> EncoderOutput:
        lens = lens.to(x.device)
        mask = lengths_to_mask(lens, x.shape[1])
        stat_mask = mask if self.bn_mask else None
        frags = self.proj(x.float(), stat_mask)
        if self.zero_padding:
            frags = frags * mask[:, :, None].to(frags.dtype)
        v_res = maxk_pool(frags, mask, self.maxk)
        ctx = self.frag_tf(frags, src_key_padding_mask=~mask) if self.frag_tf is not None else frags
        pool_mask = mask if self.pool_mask else None
        g = None
        if self.use_global:
            if glob is None:
                raise DataError("the global branch is on (use_global=True) but the batch has no global vector")
            g = self.glob_proj(glob.float())
            v_pool = self.pool(ctx, pool_mask, g)
        elif self.pool is not None:
            v_pool = self.pool(ctx, pool_mask, self.query)
        else:
            v_pool = masked_mean(ctx, mask)
        v = self.beta * v_res + (1.0 - self.beta) * v_pool
        if self.fusion is not None:
            f = self.fusion(v, g)
        elif g is not None:
            f = F.normalize(F.normalize(v, dim=-1) + F.normalize(g, dim=-1), dim=-1)
        else:
            f = F.normalize(v, dim=-1)
        return EncoderOutput(frags, mask, lens, v, f)


class ImageEncoder(nn.Module):
    """Image side: regions (B, N, Dr) + region_lens + img_global (B, Dg) -> :class:`EncoderOutput` (D wide).

    Args:
        region_dim: Dr. global_dim: Dg. cfg: :class:`ModelConfig` (validated).
    Forward: batch dict of docs/DESIGN.md (``regions``, ``region_lens``, ``img_global`` when
    ``cfg.use_global``) -> :class:`EncoderOutput`.

    Raises:
        ConfigError: ``cfg.img_proj`` / ``cfg.proj_norm`` unknown (constructor).
        DataError: a missing key, an empty batch, feature sizes other than ``region_dim`` / ``global_dim``,
            lengths outside 1..N (the key and item index are named; :func:`check_fragments`).
    """

    def __init__(self, region_dim: int, global_dim: int, cfg: ModelConfig):
        super().__init__()
        self.enc = FragmentEncoder(region_dim, global_dim, cfg, cfg.img_proj)
        if cfg.init == "authors":   # lib/encoders.py: fc (FC_MLP) and fc_clip get Xavier + zero bias
            authors_linear_init(self.enc.proj, self.enc.glob_proj)
        self.use_global = cfg.use_global
        self.region_dim, self.global_dim = int(region_dim), int(global_dim)

    def forward(self, batch: dict) -> EncoderOutput:
        for key in ("regions", "region_lens") + (("img_global",) if self.use_global else ()):
            if key not in batch:
                raise DataError(f"batch has no {key!r} (image side needs regions, region_lens, img_global); keys: {sorted(batch)}")
        x, lens = batch["regions"], batch["region_lens"].long()
        glob = batch.get("img_global") if self.use_global else None
        check_fragments(x, lens, glob, "regions", dim=self.region_dim, glob_dim=self.global_dim)
        return self.enc(x, lens, glob)


def default_backbone_path() -> str:
    """Folder of the offline MiniLM package (:func:`aahr_fast.backbones.default_text_model`).
    Raises ConfigError when the package is not installed."""
    return default_text_model()


def _text_ids(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (B, L), token_lens (B,) int64)`` of a fine-tuning batch, checked. Raises DataError."""
    if "token_lens" not in batch:
        raise DataError(f"batch has no 'token_lens'; keys: {sorted(batch)}")
    lens = batch["token_lens"].long()
    if "input_ids" not in batch:
        raise DataError(f"text_mode='finetune' needs batch['input_ids'] (B, L); keys: {sorted(batch)}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise DataError(f"batch['input_ids']: expected (B, L), got {tuple(ids.shape)}")
    check_fragments(ids[:, :, None], lens, None, "input_ids")
    return ids, lens


def text_token_features(batch: dict, backbone: Optional["TextBackbone"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features of a batch: ``batch["tokens"]`` (B, L, Dt) when ``backbone`` is None, else
    ``backbone.hidden_states(batch["input_ids"], batch["token_lens"])``. Returns (features, lens (B,) int64).
    Raises DataError naming the missing key or the bad shape."""
    if backbone is not None:
        ids, lens = _text_ids(batch)
        return backbone.hidden_states(ids, lens), lens
    if "token_lens" not in batch:
        raise DataError(f"batch has no 'token_lens'; keys: {sorted(batch)}")
    if "tokens" not in batch:
        raise DataError(f"text_mode='frozen' needs batch['tokens'] (B, L, Dt); keys: {sorted(batch)}")
    return batch["tokens"], batch["token_lens"].long()


class TextLower(NamedTuple):
    """Output of :meth:`TextEncoder.lower`, the input of :meth:`TextEncoder.upper`.

    x: (B, L, Dx) float: the frozen token features (``text_mode: frozen``) or the fine-tuned backbone's
    :meth:`~aahr_fast.backbones.TextBackbone.lower` hidden states (``text_mode: finetune``);
    lens: (B,) int64 valid lengths; glob: (B, Dgt) float global text vector, or None without the global branch.

    Raises:
        nothing: a plain NamedTuple; :meth:`TextEncoder.lower` validates what goes into it.
    """
    x: torch.Tensor
    lens: torch.Tensor
    glob: Optional[torch.Tensor]


class TextEncoder(nn.Module):
    """Text side: ``tokens`` (B, L, Dt) frozen features, or ``input_ids`` (B, L) through a fine-tuned
    :class:`TextBackbone` (``cfg.text_mode == "finetune"``), plus token_lens and txt_global (B, Dgt)
    -> :class:`EncoderOutput`.

    ``forward(batch) = upper(lower(batch))``. :meth:`lower` is the part of the text pipeline below the first
    trainable weight when :attr:`lower_is_frozen` (frozen token features; fine-tuning with
    ``cfg.text_trainable_layers = k > 0``: the backbone's embeddings and frozen layers, run without a graph),
    so one batch's :meth:`lower` output can feed both this encoder and its momentum copy
    (:meth:`frozen_modules` names what the copy leaves out). With ``k = 0`` :meth:`lower` is trainable (the
    embeddings) and every encoder computes its own.

    Args:
        token_dim: Dt (ignored when fine-tuning: the backbone's hidden size is used). global_dim: Dgt.
        cfg: :class:`ModelConfig` (validated; ``text_mode``, ``text_backbone_path``, ``text_trainable_layers``,
            ``txt_proj``, ...).

    Raises:
        ConfigError: the fine-tuned text backbone cannot be loaded, or ``cfg.text_trainable_layers`` exceeds its
            layer count; ``cfg.txt_proj`` / ``cfg.proj_norm`` unknown (constructor).
        DataError: a missing key (``tokens`` or ``input_ids``, ``token_lens``, ``txt_global``), an empty
            batch, feature sizes other than the expected ones, lengths outside 1..L (named;
            :func:`text_token_features`, :func:`check_fragments`).
    """

    def __init__(self, token_dim: int, global_dim: int, cfg: ModelConfig):
        super().__init__()
        self.mode = cfg.text_mode
        self.backbone = (TextBackbone(cfg.text_backbone_path, trainable=True,
                                      trainable_layers=cfg.text_trainable_layers)
                         if cfg.text_mode == "finetune" else None)
        in_dim = self.backbone.hidden_size if self.backbone is not None else token_dim
        self.enc = FragmentEncoder(in_dim, global_dim, cfg, cfg.txt_proj)
        if cfg.init == "authors":   # the text Linear(768 -> D) keeps the default init; fc_clip gets Xavier
            authors_linear_init(self.enc.glob_proj)
        self.use_global = cfg.use_global
        self.in_dim, self.global_dim = int(in_dim), int(global_dim)

    @property
    def lower_is_frozen(self) -> bool:
        """True when :meth:`lower` holds no trainable weight (its output may be shared with a momentum copy)."""
        return self.backbone is None or self.backbone.lower_is_frozen

    def frozen_modules(self) -> list[nn.Module]:
        """Submodules a momentum copy need not hold: the backbone's frozen lower part (see
        :meth:`TextBackbone.frozen_modules`), nothing with frozen token features or ``k = 0``. Raises nothing."""
        return self.backbone.frozen_modules() if self.backbone is not None else []

    def token_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, L, Dt), lens (B,)) from the batch, through the backbone when fine-tuning."""
        return text_token_features(batch, self.backbone)

    def lower(self, batch: dict, shared: Optional[TextLower] = None) -> TextLower:
        """The batch's text inputs up to the split (see the class docstring).

        Args:
            batch: the batch dict of docs/DESIGN.md. shared: the online encoder's :meth:`lower` output of the
                same batch; returned as is when this encoder's lower part is frozen (the momentum copy's way of
                reusing it), ignored otherwise (``k = 0``: this encoder computes its own).
        Returns:
            :class:`TextLower`.
        Raises:
            DataError: a missing key or a bad shape / length (named). ConfigError: a momentum copy without its
            own lower part called without ``shared``.
        """
        if shared is not None and self.lower_is_frozen:
            return shared
        if self.backbone is None:
            x, lens = text_token_features(batch, None)
        else:
            ids, lens = _text_ids(batch)
            x = self.backbone.lower(ids, lens)
        if self.use_global and "txt_global" not in batch:
            raise DataError(f"batch has no 'txt_global' (use_global=True); keys: {sorted(batch)}")
        return TextLower(x, lens, batch.get("txt_global") if self.use_global else None)

    def upper(self, low: TextLower) -> EncoderOutput:
        """The trainable part on :meth:`lower`'s output: the backbone's top layers (fine-tuning), then the
        fragment encoder. Returns :class:`EncoderOutput`. Raises DataError for feature sizes other than
        the expected ones and lengths outside 1..L (:func:`check_fragments`)."""
        x = self.backbone.upper(low.x, low.lens) if self.backbone is not None else low.x
        check_fragments(x, low.lens, low.glob, "tokens", dim=self.in_dim, glob_dim=self.global_dim)
        return self.enc(x, low.lens, low.glob)

    def forward(self, batch: dict) -> EncoderOutput:
        return self.upper(self.lower(batch))

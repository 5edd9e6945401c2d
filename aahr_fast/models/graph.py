"""Instance neighbourhood graph (training only), ``aahr-method.md`` section 2.6 (HREM + AAHR's GCNs).

Per batch of B image-caption pairs:

1. inter-modal relevance from the detached pre-pooling fragments (``ops.fragment_word_relevance``,
   SCAN-style LeakyReLU(0.1) cosine, masked by the true region / word counts; ``relevance_mask_padding=False``
   ignores the region counts as the authors' code does, section 6.9) -- or CHAN hard assignment
   (``ops.hard_assignment_similarity``) when ``inter_relevance="chan"``;
2. ``ops.instance_correlation``: 2B x 2B relevance ``[[A_ii, A_i2t], [A_t2i, A_tt]]`` with intra blocks
   ``exp(-||x_i - x_j|| / sigma)`` (paper Eq. 10, differentiable), the top-``floor(rho B)`` connection
   mask and the attention bias ``lam * A`` (``-inf`` where not connected);
3. three single-layer GCNs via ``ops.gcn_layer`` (image graph, text graph, joint graph), dropout 0.6,
   LeakyReLU 0.2, no degree normalisation; residual ``X = l2(H) + [v; t]``;
4. one post-norm Transformer layer over the 2B instances whose attention is ``ops.masked_attention``
   with the additive bias (:class:`BiasedEncoderLayer`); the outputs, split and L2-normalised, are the
   enhanced embeddings ``v~, t~``.

HREM's KL relation regulariser is not implemented: in AAHR both of its inputs are detached, so it adds a
constant with no gradient (section 2.6); it would only be a logged number.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast import ops
from aahr_fast.models.config import ModelConfig
from aahr_fast.models.encoders import EncoderOutput
from aahr_fast.utils.errors import ConfigError

__all__ = ["BiasedEncoderLayer", "InstanceGraph"]


class BiasedEncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer whose self-attention is ``ops.masked_attention`` with an
    additive (n, n) bias (``-inf`` = not connected): ``softmax(QK^T / sqrt(dh) + bias) V`` per head
    ([B:HREM] "fusion interaction" layer with relation mask; ``aahr-method.md`` 2.6 GAT stage).

    ``x = LN(x + Drop(W_o Attn(x)))``, ``x = LN(x + Drop(W_2 Drop(ReLU(W_1 x))))``. Dropout on the
    attention probabilities only with ``attn_dropout > 0`` (the authors' ``nn.TransformerEncoderLayer``
    applies it; ``graph_attn_dropout``): in training the attention is then computed unfused (same maths as
    ``ops.masked_attention``'s reference, rows with no connection give 0) with dropout on the probabilities;
    otherwise, and in eval mode, the fused op runs.

    ``init="authors"`` initialises like PyTorch's ``nn.MultiheadAttention`` (the authors' layer): the
    stacked (3 dim, dim) in-projection Xavier-uniform (bound ``sqrt(6 / (4 dim))``) with zero biases, and a
    zero output-projection bias; ``"torch"`` keeps ``nn.Linear``'s default init.

    Args: dim, heads (dim % heads == 0), ff_dim, dropout, backend (forced ops backend or None),
        attn_dropout (probability on the attention weights, default 0), init ("torch" | "authors").
    Forward: x (n, dim) float, bias (n, n) float -> (n, dim).

    Raises:
        ConfigError: ``heads`` not a positive divisor of ``dim`` (constructor).
        DataError: from :func:`aahr_fast.ops.masked_attention`: ``bias`` not (n, n) floating, tensors on
            different devices, empty input. RuntimeError: torch's, for ``x`` not (n, dim).
        BackendUnavailableError: a forced ``backend`` that cannot run on these tensors.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float = 0.1, backend: Optional[str] = None,
                 attn_dropout: float = 0.0, init: str = "torch"):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ConfigError(f"BiasedEncoderLayer: heads={heads!r} must be a positive divisor of dim={dim}")
        self.heads, self.head_dim, self.backend = heads, dim // heads, backend
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ff_dim)
        self.ff2 = nn.Linear(ff_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.drop_ff = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.attn_dropout = float(attn_dropout)
        if init == "authors":
            w = torch.empty(3 * dim, dim)
            nn.init.xavier_uniform_(w)
            with torch.no_grad():
                for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), w.chunk(3, dim=0)):
                    proj.weight.copy_(part)
                    proj.bias.zero_()
                self.out_proj.bias.zero_()
        elif init != "torch":
            raise ConfigError(f"BiasedEncoderLayer: init={init!r}: expected 'torch' or 'authors'")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.head_dim).transpose(0, 1).contiguous()   # (H, n, dh)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.training and self.attn_dropout > 0:
            logits = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5 + bias                    # (H, n, n)
            connected = ~torch.isneginf(bias).all(dim=-1, keepdim=True)
            p = torch.where(connected, torch.softmax(torch.where(connected, logits, 0), dim=-1), 0)
            att = F.dropout(p, self.attn_dropout, training=True) @ v                            # (H, n, dh)
        else:
            kw = {"backend": self.backend} if self.backend else {}
            att = ops.masked_attention(q, k, v, bias, **kw)                                    # (H, n, dh)
        att = att.transpose(0, 1).reshape(n, -1)
        x = self.norm1(x + self.drop(self.out_proj(att)))
        return self.norm2(x + self.drop2(self.ff2(self.drop_ff(F.relu(self.ff1(x))))))


class InstanceGraph(nn.Module):
    """The instance neighbourhood module of section 2.6 (see the module docstring).

    Args: cfg (:class:`ModelConfig`; uses embed_dim, graph_*, gcn_*, relevance_slope, inter_relevance,
        use_gcn, dropout, relevance_mask_padding, graph_attn_dropout, init, ops_backend).
    Forward:
        v_hat (B, D), t_hat (B, D): L2-normalised local-branch embeddings (row i of each is a pair);
        img, txt: :class:`EncoderOutput` of the two encoders (their ``frags`` are used detached).
        Returns ``(v_tilde (B, D), t_tilde (B, D))``, L2-normalised enhanced embeddings.

    Raises:
        ConfigError: ``cfg.graph_heads`` not a divisor of ``cfg.embed_dim`` (constructor; ``cfg`` is
            expected validated). From the ops in the forward: ConfigError for a bad ``graph_sigma`` /
            ``graph_rho`` / ``graph_lam`` / ``gcn_slope``.
        DataError: from the ops (:func:`~aahr_fast.ops.fragment_word_relevance` or
            :func:`~aahr_fast.ops.hard_assignment_similarity`, :func:`~aahr_fast.ops.instance_correlation`,
            :func:`~aahr_fast.ops.gcn_layer`): shapes or lengths inconsistent (named), empty batch,
            tensors on different devices. NaN embeddings are not refused here (they propagate; the
            trainer's non-finite guard skips such steps).
        BackendUnavailableError: ``cfg.ops_backend`` forces a backend that cannot run.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        self.kw = {"backend": cfg.ops_backend} if cfg.ops_backend else {}
        if cfg.use_gcn:
            self.gcn_w = nn.ParameterList([nn.Parameter(torch.empty(d, d)) for _ in range(3)])
            self.gcn_b = nn.ParameterList([nn.Parameter(torch.zeros(d)) for _ in range(3)])
            for w in self.gcn_w:
                nn.init.xavier_uniform_(w)
            self.gcn_drop = nn.Dropout(cfg.gcn_dropout)
        self.layer = BiasedEncoderLayer(d, cfg.graph_heads, cfg.graph_ff_dim or d, cfg.dropout, cfg.ops_backend,
                                        attn_dropout=cfg.dropout if cfg.graph_attn_dropout else 0.0,
                                        init=cfg.init)

    def inter_relevance(self, img: EncoderOutput, txt: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(rel_i2t (B, B), rel_t2i (B, B)) from detached fragments, no gradient; [i, j] of rel_i2t is
        image i vs caption j, [j, i] of rel_t2i is caption j vs image i."""
        cfg = self.cfg
        with torch.no_grad():
            regions, words = img.frags.detach(), txt.frags.detach()
            rlens = img.lens
            if not cfg.relevance_mask_padding:   # section 6.9: padded region slots enter the max / mean
                rlens = torch.full_like(rlens, regions.shape[1])
            if cfg.inter_relevance == "chan":
                s = ops.hard_assignment_similarity(regions, rlens, words, txt.lens, **self.kw)     # (Bi, Bt)
                return s, s.t().contiguous()
            t2i, i2t = ops.fragment_word_relevance(regions, rlens, words, txt.lens,
                                                   negative_slope=cfg.relevance_slope, **self.kw)
            return i2t, t2i

    def forward(self, v_hat: torch.Tensor, t_hat: torch.Tensor, img: EncoderOutput,
                txt: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        bsz = v_hat.shape[0]
        rel_i2t, rel_t2i = self.inter_relevance(img, txt)
        corr = ops.instance_correlation(v_hat, t_hat, rel_i2t.to(v_hat.dtype), rel_t2i.to(v_hat.dtype),
                                        sigma=cfg.graph_sigma, rho=cfg.graph_rho, lam=cfg.graph_lam, **self.kw)
        x0 = torch.cat([v_hat, t_hat], dim=0)                                                   # (2B, D)
        if cfg.use_gcn:
            rel = corr.relevance
            slope = cfg.gcn_slope
            h_v = ops.gcn_layer(rel[:bsz, :bsz], self.gcn_drop(v_hat), self.gcn_w[0], self.gcn_b[0],
                                negative_slope=slope, **self.kw)
            h_t = ops.gcn_layer(rel[bsz:, bsz:], self.gcn_drop(t_hat), self.gcn_w[1], self.gcn_b[1],
                                negative_slope=slope, **self.kw)
            h = ops.gcn_layer(rel, self.gcn_drop(torch.cat([h_v, h_t], dim=0)), self.gcn_w[2], self.gcn_b[2],
                              negative_slope=slope, **self.kw)
            x = F.normalize(h, dim=-1) + x0
        else:
            x = x0
        out = F.normalize(self.layer(x, corr.attn_bias), dim=-1)
        return out[:bsz], out[bsz:]

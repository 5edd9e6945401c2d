"""Pooling of fragment features (regions / words) into one vector, and the gated global fusion.

- :func:`maxk_pool`: max-k residual vector (HREM), over valid fragments only.
- :func:`masked_mean`: mean over valid fragments.
- :class:`GlobalGuidedPooling`: the "GGLP" global-guided multi-head attention pooling (``aahr-method.md``
  section 2.2 step 5): the projected frozen global vector is the query, fragments are keys/values,
  cosine logits without temperature.
- :class:`GatedFusion`: the adaptive aggregation ``f = z l2(v) + (1-z) l2(g)``, ``z = sigmoid(W[l2 v; l2 g] + b)``
  (section 2.2 step 7).

Masks are boolean, ``True`` = valid fragment, shape (B, N).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["lengths_to_mask", "maxk_pool", "masked_mean", "GlobalGuidedPooling", "GatedFusion"]


def lengths_to_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) int64 lengths -> (B, n) bool mask, ``True`` for positions ``< length``.

    Not validated: lengths above ``n`` give all-True rows, lengths <= 0 all-False rows; a 0-d
    ``lengths`` raises IndexError from torch indexing.
    """
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def maxk_pool(x: torch.Tensor, mask: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Mean of the ``k`` largest values per dimension over the valid fragments (HREM max-k residual).

    Args:
        x: (B, N, D) float fragments. mask: (B, N) bool, True = valid; every row needs >= 1 valid entry.
        k: number of maxima; an item with fewer than ``k`` valid fragments averages over all of them.
    Returns:
        (B, D), dtype of ``x``. A row without any valid fragment returns zeros (not an error).
    Raises:
        RuntimeError: ``mask`` not broadcastable to ``x``'s (B, N) (torch's error; shapes are not
            checked here, the encoders check them with :func:`~aahr_fast.models.encoders.check_fragments`).
    """
    kk = min(k, x.shape[1])
    xm = x.masked_fill(~mask[:, :, None], float("-inf"))
    if kk <= 4:   # k successive maxima: ~3x faster than topk over a middle axis on CPU (k = 2 in AAHR)
        vals = []
        for j in range(kk):
            m, idx = xm.max(dim=1)
            vals.append(m)
            if j + 1 < kk:
                xm = xm.scatter(1, idx[:, None, :], float("-inf"))
        top = torch.stack(vals, dim=1)                                 # (B, kk, D)
    else:
        top = xm.topk(kk, dim=1).values                                # (B, kk, D)
    valid = torch.isfinite(top)
    cnt = mask.sum(dim=1).clamp(min=1, max=kk).to(x.dtype)            # (B,)
    return top.masked_fill(~valid, 0.0).sum(dim=1) / cnt[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid fragments. x (B, N, D) float, mask (B, N) bool -> (B, D), dtype of ``x``.

    A row without any valid fragment returns zeros (denominator clamped to 1). Shapes are not checked:
    a ``mask`` that does not broadcast raises torch's RuntimeError.
    """
    m = mask.to(x.dtype)[:, :, None]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class GlobalGuidedPooling(nn.Module):
    """Global-guided local pooling ("GGLP", ``aahr-method.md`` section 2.2 step 5, [C]/[I]).

    For each head h: ``q_h = l2(W^q_h g)``, ``K_h = l2(W^k_h X)``, ``alpha_h = softmax_n(K_h q_h)``
    (cosine logits, no temperature), ``p_h = sum_n alpha_{h,n} W^v_h X_n``; output = mean over heads of
    ``p_h`` projected back to ``dim``. With ``head_dim = dim`` (the paper) every ``W`` is dim -> dim and
    the output is the plain head mean. The value projection is applied after the attention-weighted sum
    (``W^v (sum_n alpha_n X_n) + b`` equals ``sum_n alpha_n (W^v X_n + b)`` since the weights sum to 1),
    which is exact and N times cheaper.

    Args:
        dim: fragment / query width D. heads: number of heads. head_dim: per-head width (None -> dim).
    Forward:
        x (B, N, D) fragments, mask (B, N) bool or None (None = all valid, the paper's unmasked form),
        query (B, D) or (D,) projected global vector (or a learned query) -> (B, D).

    Raises:
        Nothing of its own: shapes are not checked (the encoders validate batches with
        :func:`~aahr_fast.models.encoders.check_fragments`); ``x`` / ``query`` whose last size is not
        ``dim`` or a ``mask`` that is not (B, N) raise torch's RuntimeError. A ``mask`` row with no True
        entry is not refused and gives a NaN row (softmax over no valid fragment); the encoders
        guarantee lengths >= 1.
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: Optional[int] = None):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = head_dim or dim
        hd = self.heads * self.head_dim
        self.q_proj = nn.Linear(dim, hd)
        self.k_proj = nn.Linear(dim, hd)
        # value projection per head, stored as (H, head_dim, dim) + bias (H, head_dim)
        self.v_weight = nn.Parameter(torch.empty(heads, self.head_dim, dim))
        self.v_bias = nn.Parameter(torch.empty(heads, self.head_dim))
        self.out_proj = None if self.head_dim == dim else nn.Linear(self.head_dim, dim)
        bound = 1.0 / dim ** 0.5
        nn.init.uniform_(self.v_weight, -bound, bound)
        nn.init.uniform_(self.v_bias, -bound, bound)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        if query.dim() == 1:
            query = query.expand(bsz, -1)
        q = F.normalize(self.q_proj(query).view(bsz, self.heads, self.head_dim), dim=-1)      # (B, H, hd)
        k = F.normalize(self.k_proj(x).view(bsz, n, self.heads, self.head_dim), dim=-1)      # (B, N, H, hd)
        logits = torch.einsum("bnhd,bhd->bhn", k, q)                                           # (B, H, N)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        pooled_x = torch.bmm(alpha, x)                                                          # (B, H, D)
        p = torch.einsum("bhd,hed->bhe", pooled_x, self.v_weight) + self.v_bias                 # (B, H, hd)
        p = p.mean(dim=1)
        return p if self.out_proj is None else self.out_proj(p)


class GatedFusion(nn.Module):
    """Adaptive aggregation of the local vector ``v`` and the projected global vector ``g``
    (``aahr-method.md`` section 2.2 step 7, [C] ``GatedFusion``):
    ``f = z * l2(v) + (1 - z) * l2(g)``, ``z = sigmoid(W_z [l2 v; l2 g] + b_z)``, ``W_z``: 2D -> D.
    The output is not re-normalised (norm <= 1). Forward: v (B, D), g (B, D) -> (B, D).

    Args:
        dim: D.
    Raises:
        Nothing of its own: ``v`` / ``g`` not (B, D) with the same B raise torch's RuntimeError
        (not checked here).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        vn, gn = F.normalize(v, dim=-1), F.normalize(g, dim=-1)
        z = torch.sigmoid(self.gate(torch.cat([vn, gn], dim=-1)))
        return z * vn + (1.0 - z) * gn

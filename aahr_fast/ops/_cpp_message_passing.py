"""C++ CPU backend (``backend="cpp"``) of the message-passing ops: autograd glue.

Kernels: ``csrc/cpu/message_passing.cpp`` (``torch.ops.aahr_fast.mp_*``), built by :mod:`aahr_fast.ops._ext`.
Registered into :mod:`aahr_fast.ops._dispatch` for :func:`~aahr_fast.ops.gcn_layer` and
:func:`~aahr_fast.ops.masked_attention`, with the semantics of the references in
:mod:`aahr_fast.ops.message_passing` (aahr-method.md 2.6: AAHR's GCN stage, HREM's relation-masked attention):

* ``gcn_layer``: ``LeakyReLU_s(adj (x W) + b)``; the bias is added inside the BLAS call, the activation in
  place, and its backward mask plus the bias gradient come from one fused pass (the mask is read off the
  output sign, so no pre-activation is kept);
* ``masked_attention``: ``softmax(q k^T / sqrt(dh) + bias) v`` per head, the softmax fused with the scale,
  the bias and the fully-masked-row rule (output 0, zero gradient) in one pass per row; the backward
  reduces ``dS`` over the heads into the bias gradient in the same pass. Keeps the (H, n, n)
  probabilities for the backward (as eager autograd does).

float32 and float64 run in C++; other floating dtypes fall back to the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ext
from ._dispatch import register
from .message_passing import gcn_layer_reference, masked_attention_reference

__all__ = ["gcn_layer_cpp", "masked_attention_cpp"]

_CPP_DTYPES = _ext.CPP_DTYPES
_lib = _ext.ops_namespace


class _GCNLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj, x, weight, bias, slope):
        out, mid, pre = _lib().mp_gcn_fwd(adj, x, weight, bias, slope)
        act = pre if slope < 0 else out  # the mask is act > 0 either way
        ctx.save_for_backward(adj, x, weight, mid, act)
        ctx.slope, ctx.has_bias = slope, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        adj, x, weight, mid, act = ctx.saved_tensors
        na, nx, nw, nb = ctx.needs_input_grad[:4]
        ga, gx, gw, gb = _lib().mp_gcn_bwd(grad, adj, x, weight, mid, act, ctx.slope, [na, nx, nw, nb and ctx.has_bias])
        return (ga if na else None, gx if nx else None, gw if nw else None,
                gb if (nb and ctx.has_bias) else None, None)


class _MaskedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, probs = _lib().mp_attn_fwd(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.per_head = scale, bias.dim() == 3
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        dq, dk, dv, db = _lib().mp_attn_bwd(grad, q, k, v, probs, ctx.scale, ctx.per_head, needs)
        return tuple(g if n else None for g, n in zip((dq, dk, dv, db), needs))


def gcn_layer_cpp(
    adj: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    negative_slope: float = 0.2,
) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.gcn_layer` (same arguments, output and gradients).

    Uses the cheaper association: ``adj @ (x @ W)`` when Dout <= Din, else ``(adj @ x) @ W`` (equal up to
    rounding). Extra memory: the (n, min(Din, Dout)) intermediate product, kept for the backward.
    """
    if x.dtype not in _CPP_DTYPES:
        return gcn_layer_reference(adj, x, weight, bias, negative_slope)
    return _GCNLayerFn.apply(adj, x, weight, bias, float(negative_slope))


def masked_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.masked_attention` (same arguments, output and gradients).

    q, k, v: (H, n, dh); bias: (n, n) or (H, n, n), ``-inf`` = not connected. A row whose logits are all
    ``-inf`` outputs 0 and passes no gradient. NaN in q / k / v / a finite bias entry makes the rows
    that see it NaN (as in the reference). Extra memory: the (H, n, n) probabilities.
    """
    if q.dtype not in _CPP_DTYPES:
        return masked_attention_reference(q, k, v, bias)
    return _MaskedAttentionFn.apply(q, k, v, bias)


register("gcn_layer", "cpp", gcn_layer_cpp)
register("masked_attention", "cpp", masked_attention_cpp)

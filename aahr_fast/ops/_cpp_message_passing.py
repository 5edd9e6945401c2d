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
from ._library import fresh, fused_op, grad_or_none, placeholder
from .message_passing import gcn_layer_reference, masked_attention_reference

__all__ = ["gcn_layer_cpp", "masked_attention_cpp"]

_CPP_DTYPES = _ext.CPP_DTYPES
_lib = _ext.ops_namespace


# ------------------------------------------------------------------ registered operators (aahr::*_cpp)
def _gcn_fwd(adj, x, weight, bias, slope):
    out, mid, pre = _lib().mp_gcn_fwd(adj, x, weight, bias, slope)
    return out, mid, fresh(pre, out)


def _gcn_fwd_fake(adj, x, weight, bias, slope):
    n, din, dout = x.shape[0], x.shape[1], weight.shape[1]
    mid = x.new_empty((n, dout) if dout <= din else (n, din))
    return x.new_empty((n, dout)), mid, (x.new_empty((n, dout)) if slope < 0 else placeholder(x))


def _gcn_bwd(grad, adj, x, weight, mid, act, slope, needs):
    outs = _lib().mp_gcn_bwd(grad.contiguous(), adj, x, weight, mid, act, slope, list(needs))
    likes = (adj, x, weight, act)
    return tuple(o if n and o is not None and o.numel() else placeholder(lk) for o, n, lk in zip(outs, needs, likes))


def _gcn_bwd_fake(grad, adj, x, weight, mid, act, slope, needs):
    shapes = (adj.shape, x.shape, weight.shape, (weight.shape[1],))
    return tuple(x.new_empty(sh) if n else placeholder(x) for sh, n in zip(shapes, needs))


#: ``aahr::gcn_layer_cpp(adj (n, n), x (n, Din), weight (Din, Dout), bias?, slope) -> (out (n, Dout), mid, pre)``;
#: ``mid`` is x W (n, Dout) when Dout <= Din else adj x (n, Din); ``pre`` the pre-activation when slope < 0.
gcn_layer_op = fused_op(
    "gcn_layer_cpp", "(Tensor adj, Tensor x, Tensor weight, Tensor? bias, float slope) -> (Tensor, Tensor, Tensor)",
    _gcn_fwd, _gcn_fwd_fake, device_types="cpu")
gcn_layer_backward_op = fused_op(
    "gcn_layer_cpp_backward",
    "(Tensor grad, Tensor adj, Tensor x, Tensor weight, Tensor mid, Tensor act, float slope, bool[] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _gcn_bwd, _gcn_bwd_fake, device_types="cpu")


def _gcn_setup(ctx, inputs, output):
    adj, x, weight, bias, slope = inputs
    out, mid, pre = output
    act = pre if slope < 0 else out  # the mask is act > 0 either way
    ctx.save_for_backward(adj, x, weight, mid, act)
    ctx.slope, ctx.has_bias = slope, bias is not None
    ctx.mark_non_differentiable(mid, pre)


def _gcn_grad(ctx, grad, _g_mid, _g_pre):
    adj, x, weight, mid, act = ctx.saved_tensors
    na, nx, nw, nb = ctx.needs_input_grad[:4]
    needs = [na, nx, nw, nb and ctx.has_bias]
    if grad is None or not any(needs):
        return (None,) * 5
    ga, gx, gw, gb = gcn_layer_backward_op(grad, adj, x, weight, mid, act, ctx.slope, needs)
    return grad_or_none(ga, needs[0]), grad_or_none(gx, needs[1]), grad_or_none(gw, needs[2]), \
        grad_or_none(gb, needs[3]), None


gcn_layer_op.register_autograd(_gcn_grad, setup_context=_gcn_setup)


def _attn_fwd(q, k, v, bias, scale):
    return tuple(_lib().mp_attn_fwd(q, k, v, bias, scale))


def _attn_fwd_fake(q, k, v, bias, scale):
    h, n = q.shape[0], q.shape[1]
    return q.new_empty((h, n, v.shape[2])), q.new_empty((h, n, k.shape[1]))


def _attn_bwd(grad, q, k, v, probs, scale, per_head, needs):
    outs = _lib().mp_attn_bwd(grad.contiguous(), q, k, v, probs, scale, per_head, list(needs))
    return tuple(o if need and o is not None and o.numel() else placeholder(q) for o, need in zip(outs, needs))


def _attn_bwd_fake(grad, q, k, v, probs, scale, per_head, needs):
    n = q.shape[1]
    shapes = (q.shape, k.shape, v.shape, (q.shape[0], n, n) if per_head else (n, n))
    return tuple(q.new_empty(sh) if need else placeholder(q) for sh, need in zip(shapes, needs))


#: ``aahr::masked_attention_cpp(q, k, v (H, n, dh), bias (n, n) | (H, n, n), scale) -> (out (H, n, dh), probs (H, n, n))``.
masked_attention_op = fused_op(
    "masked_attention_cpp", "(Tensor q, Tensor k, Tensor v, Tensor bias, float scale) -> (Tensor, Tensor)",
    _attn_fwd, _attn_fwd_fake, device_types="cpu")
masked_attention_backward_op = fused_op(
    "masked_attention_cpp_backward",
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, float scale, bool per_head, bool[] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _attn_bwd, _attn_bwd_fake, device_types="cpu")


def _attn_setup(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale, ctx.per_head = scale, bias.dim() == 3
    ctx.mark_non_differentiable(output[1])


def _attn_grad(ctx, grad, _g_probs):
    q, k, v, probs = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad is None or not any(needs):
        return (None,) * 5
    outs = masked_attention_backward_op(grad, q, k, v, probs, ctx.scale, ctx.per_head, needs)
    return tuple(grad_or_none(g, n) for g, n in zip(outs, needs)) + (None,)


masked_attention_op.register_autograd(_attn_grad, setup_context=_attn_setup)


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
    return gcn_layer_op(adj, x, weight, bias, float(negative_slope))[0]


def masked_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.masked_attention` (same arguments, output and gradients).

    q, k, v: (H, n, dh); bias: (n, n) or (H, n, n), ``-inf`` = not connected. A row whose logits are all
    ``-inf`` outputs 0 and passes no gradient. NaN in q / k / v / a finite bias entry makes the rows
    that see it NaN (as in the reference). Extra memory: the (H, n, n) probabilities.
    """
    if q.dtype not in _CPP_DTYPES:
        return masked_attention_reference(q, k, v, bias)
    return masked_attention_op(q, k, v, bias, 1.0 / math.sqrt(q.shape[-1]))[0]


register("gcn_layer", "cpp", gcn_layer_cpp)
register("masked_attention", "cpp", masked_attention_cpp)

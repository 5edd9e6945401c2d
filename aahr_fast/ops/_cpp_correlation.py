"""C++ CPU backend (``backend="cpp"``) of the instance-correlation ops: autograd glue.

Kernels: ``csrc/cpu/correlation.cpp`` (``torch.ops.aahr_fast.corr_*``), built by :mod:`aahr_fast.ops._ext`.
Registered into :mod:`aahr_fast.ops._dispatch` for :func:`~aahr_fast.ops.intra_relevance`,
:func:`~aahr_fast.ops.topk_connection` and :func:`~aahr_fast.ops.instance_correlation`; the semantics are
those of the references in :mod:`aahr_fast.ops.correlation` (aahr-method.md 2.6, paper Eq. (10), HREM):

* ``A[i, j] = exp(-||x_i - x_j||_2 / sigma)`` with exact differences, diagonal exactly 1, gradient 0 (not
  NaN) at zero distance;
* top-``k`` connection with ``k = connection_count(rho, width)``, ties to the lower index, NaN first;
* the (2B, 2B) relevance / connection / attention-bias blocks in one pass; gradients reach ``v`` and
  ``t`` through the intra blocks of ``relevance`` and of ``attn_bias`` (``rel_i2t`` / ``rel_t2i`` are
  constants, as in the reference).

float32 and float64 run in C++; other floating dtypes (float16, bfloat16) fall back to the reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._dispatch import register
from .correlation import (
    Correlation,
    connection_count,
    instance_correlation_reference,
    intra_relevance_reference,
    topk_connection_reference,
)

__all__ = ["intra_relevance_cpp", "topk_connection_cpp", "instance_correlation_cpp"]

_CPP_DTYPES = _ext.CPP_DTYPES
_lib = _ext.ops_namespace


class _IntraRelevanceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x.contiguous()
        rel, dist = _lib().corr_intra_relevance_fwd(x, sigma)
        ctx.save_for_backward(x, rel, dist)
        ctx.sigma = sigma
        return rel

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rel, dist = ctx.saved_tensors
        gx = _lib().corr_intra_relevance_bwd(grad, x, rel, dist, ctx.sigma) if ctx.needs_input_grad[0] else None
        return gx, None


class _InstanceCorrelationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, t, rel_i2t, rel_t2i, score_v, score_t, sigma, k, lam):
        ctx.set_materialize_grads(False)
        v, t = v.contiguous(), t.contiguous()
        rel, conn, bias, dist_v, dist_t = _lib().corr_instance_fwd(
            v, t, score_v, score_t, rel_i2t, rel_t2i, sigma, k, k, lam
        )
        ctx.save_for_backward(v, t, rel, conn, dist_v, dist_t)
        ctx.sigma, ctx.lam = sigma, lam
        ctx.mark_non_differentiable(conn)
        return rel, conn, bias

    @staticmethod
    def backward(ctx, g_rel: Optional[torch.Tensor], _g_conn, g_bias: Optional[torch.Tensor]):
        need_v, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_rel is None and g_bias is None) or not (need_v or need_t):
            return (None,) * 9
        v, t, rel, conn, dist_v, dist_t = ctx.saved_tensors
        gv, gt, _, _ = _lib().corr_instance_bwd(
            g_rel, g_bias, v, t, rel, conn, dist_v, dist_t, ctx.sigma, ctx.lam, [need_v, need_t, False, False]
        )
        return (gv if need_v else None, gt if need_t else None) + (None,) * 7


def intra_relevance_cpp(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.intra_relevance` (same arguments, output and gradient).

    Args: x (B, D) float32/float64 (any strides), sigma > 0. Returns (B, B), dtype of ``x``.
    Extra memory: one (B, B) distance matrix kept for the backward.
    """
    if x.dtype not in _CPP_DTYPES:
        return intra_relevance_reference(x, sigma)
    return _IntraRelevanceFn.apply(x, float(sigma))


def topk_connection_cpp(scores: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.topk_connection`: (B, B') bool, O(B') per row (nth_element)."""
    if scores.dtype not in _CPP_DTYPES:
        return topk_connection_reference(scores, rho)
    return _lib().corr_topk_connection(scores.detach(), connection_count(rho, scores.shape[1]))


def instance_correlation_cpp(
    v: torch.Tensor,
    t: torch.Tensor,
    rel_i2t: torch.Tensor,
    rel_t2i: torch.Tensor,
    *,
    sigma: float = 1.0,
    rho: float = 0.5,
    lam: float = 1.0,
) -> Correlation:
    """C++ implementation of :func:`aahr_fast.ops.instance_correlation` (same arguments and outputs).

    The intra-modal ranking scores ``v v^T`` and ``t t^T`` are computed here with the same expression as
    the reference (so exact ties resolve identically); distances, relevance, both connection blocks and
    the attention bias come from one C++ pass. Differentiable w.r.t. ``v`` and ``t``.
    """
    if v.dtype not in _CPP_DTYPES:
        return instance_correlation_reference(v, t, rel_i2t, rel_t2i, sigma=sigma, rho=rho, lam=lam)
    with torch.no_grad():
        score_v = v @ v.t()
        score_t = t @ t.t()
    k = connection_count(rho, v.shape[0])
    rel, conn, bias = _InstanceCorrelationFn.apply(
        v, t, rel_i2t.detach(), rel_t2i.detach(), score_v, score_t, float(sigma), k, float(lam)
    )
    return Correlation(rel, conn, bias)


register("intra_relevance", "cpp", intra_relevance_cpp)
register("topk_connection", "cpp", topk_connection_cpp)
register("instance_correlation", "cpp", instance_correlation_cpp)

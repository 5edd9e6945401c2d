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

import torch

from . import _ext
from ._dispatch import register
from ._library import fused_op, grad_or_none, placeholder
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


# ------------------------------------------------------------------ registered operators (aahr::*_cpp)
def _intra_fwd(x, sigma):
    return _lib().corr_intra_relevance_fwd(x.contiguous(), sigma)


def _intra_fwd_fake(x, sigma):
    b = x.shape[0]
    return x.new_empty((b, b)), x.new_empty((b, b))


def _intra_bwd(grad, x, rel, dist, sigma):
    return _lib().corr_intra_relevance_bwd(grad.contiguous(), x.contiguous(), rel, dist, sigma)


def _intra_bwd_fake(grad, x, rel, dist, sigma):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


#: ``aahr::intra_relevance_cpp(x (B, D), sigma) -> (rel (B, B), dist (B, B))``; dist is kept for the backward.
intra_relevance_op = fused_op("intra_relevance_cpp", "(Tensor x, float sigma) -> (Tensor, Tensor)",
                              _intra_fwd, _intra_fwd_fake, device_types="cpu")
intra_relevance_backward_op = fused_op(
    "intra_relevance_cpp_backward", "(Tensor grad, Tensor x, Tensor rel, Tensor dist, float sigma) -> Tensor",
    _intra_bwd, _intra_bwd_fake, device_types="cpu")


def _intra_setup(ctx, inputs, output):
    x, sigma = inputs
    rel, dist = output
    ctx.save_for_backward(x, rel, dist)
    ctx.sigma = sigma


def _intra_grad(ctx, g_rel, _g_dist):
    x, rel, dist = ctx.saved_tensors
    if g_rel is None or not ctx.needs_input_grad[0]:
        return None, None
    return intra_relevance_backward_op(g_rel, x, rel, dist, ctx.sigma), None


intra_relevance_op.register_autograd(_intra_grad, setup_context=_intra_setup)


#: ``aahr::topk_connection_cpp(scores (B, B'), k) -> bool (B, B')``; no gradient (boolean output).
topk_connection_op = fused_op(
    "topk_connection_cpp", "(Tensor scores, int k) -> Tensor",
    lambda scores, k: _lib().corr_topk_connection(scores, k),
    lambda scores, k: scores.new_empty(scores.shape, dtype=torch.bool), device_types="cpu")


def _inst_fwd(v, t, rel_i2t, rel_t2i, score_v, score_t, sigma, k, lam):
    return tuple(_lib().corr_instance_fwd(v.contiguous(), t.contiguous(), score_v, score_t, rel_i2t, rel_t2i,
                                          sigma, k, k, lam))


def _inst_fwd_fake(v, t, rel_i2t, rel_t2i, score_v, score_t, sigma, k, lam):
    b = v.shape[0]
    return (v.new_empty((2 * b, 2 * b)), v.new_empty((2 * b, 2 * b), dtype=torch.bool),
            v.new_empty((2 * b, 2 * b)), v.new_empty((b, b)), v.new_empty((b, b)))


def _inst_bwd(g_rel, g_bias, v, t, rel, conn, dist_v, dist_t, sigma, lam, needs):
    gv, gt, _, _ = _lib().corr_instance_bwd(g_rel, g_bias, v.contiguous(), t.contiguous(), rel, conn, dist_v,
                                            dist_t, sigma, lam, [needs[0], needs[1], False, False])
    return (gv if needs[0] else placeholder(v)), (gt if needs[1] else placeholder(t))


def _inst_bwd_fake(g_rel, g_bias, v, t, rel, conn, dist_v, dist_t, sigma, lam, needs):
    return (torch.empty_like(v) if needs[0] else placeholder(v)), (torch.empty_like(t) if needs[1] else placeholder(t))


#: ``aahr::instance_correlation_cpp(v, t, rel_i2t, rel_t2i, score_v, score_t, sigma, k, lam)
#: -> (relevance, connection, attn_bias (2B, 2B), dist_v, dist_t (B, B))``.
instance_correlation_op = fused_op(
    "instance_correlation_cpp",
    "(Tensor v, Tensor t, Tensor rel_i2t, Tensor rel_t2i, Tensor score_v, Tensor score_t, float sigma, int k, "
    "float lam) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _inst_fwd, _inst_fwd_fake, device_types="cpu")
instance_correlation_backward_op = fused_op(
    "instance_correlation_cpp_backward",
    "(Tensor? g_rel, Tensor? g_bias, Tensor v, Tensor t, Tensor rel, Tensor conn, Tensor dist_v, Tensor dist_t, "
    "float sigma, float lam, bool[] needs) -> (Tensor, Tensor)",
    _inst_bwd, _inst_bwd_fake, device_types="cpu")


def _inst_setup(ctx, inputs, output):
    v, t = inputs[0], inputs[1]
    rel, conn, _bias, dist_v, dist_t = output
    ctx.save_for_backward(v, t, rel, conn, dist_v, dist_t)
    ctx.sigma, ctx.lam = inputs[6], inputs[8]
    ctx.mark_non_differentiable(conn, dist_v, dist_t)


def _inst_grad(ctx, g_rel, _g_conn, g_bias, _g_dv, _g_dt):
    need_v, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (g_rel is None and g_bias is None) or not (need_v or need_t):
        return (None,) * 9
    v, t, rel, conn, dist_v, dist_t = ctx.saved_tensors
    gv, gt = instance_correlation_backward_op(g_rel, g_bias, v, t, rel, conn, dist_v, dist_t, ctx.sigma, ctx.lam,
                                              [need_v, need_t])
    return (grad_or_none(gv, need_v), grad_or_none(gt, need_t)) + (None,) * 7


instance_correlation_op.register_autograd(_inst_grad, setup_context=_inst_setup)


def intra_relevance_cpp(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.intra_relevance` (same arguments, output and gradient).

    Args: x (B, D) float32/float64 (any strides), sigma > 0. Returns (B, B), dtype of ``x``.
    Extra memory: one (B, B) distance matrix kept for the backward.
    """
    if x.dtype not in _CPP_DTYPES:
        return intra_relevance_reference(x, sigma)
    return intra_relevance_op(x, float(sigma))[0]


def topk_connection_cpp(scores: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.topk_connection`: (B, B') bool, O(B') per row (nth_element)."""
    if scores.dtype not in _CPP_DTYPES:
        return topk_connection_reference(scores, rho)
    return topk_connection_op(scores.detach(), connection_count(rho, scores.shape[1]))


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
    rel, conn, bias, _, _ = instance_correlation_op(
        v, t, rel_i2t.detach(), rel_t2i.detach(), score_v, score_t, float(sigma), k, float(lam)
    )
    return Correlation(rel, conn, bias)


register("intra_relevance", "cpp", intra_relevance_cpp)
register("topk_connection", "cpp", topk_connection_cpp)
register("instance_correlation", "cpp", instance_correlation_cpp)

"""Triton kernels of the instance correlation: intra-modal relevance (forward + backward) and the
fused 2B x 2B block assembly of relevance / connection / additive attention bias.

Math (aahr-method.md section 2.6, paper Eq. (10); HREM instance graph):

* ``A[i, j] = exp(-||x_i - x_j||_2 / sigma)`` with the distance from exact pairwise differences
  (no ``|a|^2 + |b|^2 - 2ab`` cancellation, like the reference's ``cdist(..., donot_use_mm)``); the
  diagonal is exactly 1. Gradient: ``dx_i = sum_j W_ij (x_i - x_j)`` with
  ``W_ij = -(G_ij + G_ji) A_ij / (sigma d_ij)`` for ``d_ij > 0`` and 0 at zero distance (safe sqrt:
  never NaN), ``G`` = dL/dA.
* Block matrices over the 2B nodes (images first): ``relevance = [[A_ii, rel_i2t], [rel_t2i, A_tt]]``,
  ``attn_bias = lam * relevance`` where connected, ``-inf`` elsewhere.

The top-rho connection masks use torch's stable sort (the reference's exact tie rule), written
straight into the quadrants of the 2B x 2B connection matrix; everything else is Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import interpreting, launch, matmul, next_pow2, unused_arg

__all__ = [
    "pairwise_relevance_forward",
    "pairwise_relevance_backward",
    "topk_into",
    "assemble_correlation",
]


@triton.jit
def _pairwise_fwd_kernel(
    x_ptr, rel_ptr, dist_ptr, conn_ptr, bias_ptr,
    B, D,
    s_xb, s_xd, s_r0, s_r1, s_c0, s_c1, s_b0, s_b1,
    inv_sigma, lam,
    WITH_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Grid (row tiles, col tiles, modalities). Modality m uses rows [m*B, (m+1)*B) of x and writes the
    diagonal block [m*B.., m*B..] of rel (and bias / conn when WITH_BIAS); dist is (M, B, B) fp32."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    mod = tl.program_id(2).to(tl.int64)
    ri = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    rj = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    mi = ri < B
    mj = rj < B
    xi = mod * B + ri
    xj = mod * B + rj
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK).to(tl.int64)
        mk = k < D
        a = tl.load(x_ptr + xi[:, None] * s_xb + k[None, :] * s_xd, mask=mi[:, None] & mk[None, :], other=0.0)
        b = tl.load(x_ptr + xj[:, None] * s_xb + k[None, :] * s_xd, mask=mj[:, None] & mk[None, :], other=0.0)
        diff = a.to(tl.float32)[:, None, :] - b.to(tl.float32)[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    eye = ri[:, None] == rj[None, :]
    dist = tl.where(eye, 0.0, tl.sqrt(acc))
    rel = tl.where(eye, 1.0, tl.exp(-dist * inv_sigma))
    om = mi[:, None] & mj[None, :]
    tl.store(dist_ptr + (mod * B + ri)[:, None] * B + rj[None, :], dist, mask=om)
    r0 = mod * B + ri
    r1 = mod * B + rj
    tl.store(rel_ptr + r0[:, None] * s_r0 + r1[None, :] * s_r1, rel.to(rel_ptr.dtype.element_ty), mask=om)
    if WITH_BIAS:
        conn = tl.load(conn_ptr + r0[:, None] * s_c0 + r1[None, :] * s_c1, mask=om, other=0)
        bias = tl.where(conn != 0, lam * rel.to(rel_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
        tl.store(bias_ptr + r0[:, None] * s_b0 + r1[None, :] * s_b1, bias.to(bias_ptr.dtype.element_ty), mask=om)


@triton.jit
def _offdiag_kernel(
    i2t_ptr, t2i_ptr, rel_ptr, conn_ptr, bias_ptr,
    B,
    s_a0, s_a1, s_t0, s_t1, s_r0, s_r1, s_c0, s_c1, s_b0, s_b1,
    lam,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Grid (row tiles, col tiles, 2): quadrant 0 = [0:B, B:2B] <- rel_i2t, quadrant 1 = [B:2B, 0:B] <- rel_t2i."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    quad = tl.program_id(2)
    ri = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    rj = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    om = (ri < B)[:, None] & (rj < B)[None, :]
    if quad == 0:
        val = tl.load(i2t_ptr + ri[:, None] * s_a0 + rj[None, :] * s_a1, mask=om, other=0.0)
        r0 = ri
        r1 = B + rj
    else:
        val = tl.load(t2i_ptr + ri[:, None] * s_t0 + rj[None, :] * s_t1, mask=om, other=0.0)
        r0 = B + ri
        r1 = rj
    val = val.to(rel_ptr.dtype.element_ty)
    tl.store(rel_ptr + r0[:, None] * s_r0 + r1[None, :] * s_r1, val, mask=om)
    conn = tl.load(conn_ptr + r0[:, None] * s_c0 + r1[None, :] * s_c1, mask=om, other=0)
    bias = tl.where(conn != 0, lam * val.to(tl.float32), float("-inf"))
    tl.store(bias_ptr + r0[:, None] * s_b0 + r1[None, :] * s_b1, bias.to(bias_ptr.dtype.element_ty), mask=om)


@triton.jit
def _pairwise_bwd_weights_kernel(
    grel_ptr, gbias_ptr, conn_ptr, dist_ptr, w_ptr, rowsum_ptr,
    B,
    s_g0, s_g1, s_gb0, s_gb1, s_c0, s_c1,
    inv_sigma, lam,
    HAS_GREL: tl.constexpr, HAS_GBIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Grid (row tiles, modalities). W (M,B,B) fp32 and its row sums (M,B) for modality m's diagonal block.

    G_ij = dL/drel_ij + lam * [conn_ij] * dL/dbias_ij (block [m*B.., m*B..] of the 2B x 2B grads);
    W_ij = -(G_ij + G_ji) * exp(-d_ij/sigma) * inv_sigma / d_ij for d_ij > 0, else 0.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    mod = tl.program_id(1).to(tl.int64)
    ri = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    mi = ri < B
    rs = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, B, BN):
        rj = n0 + tl.arange(0, BN).to(tl.int64)
        mj = rj < B
        om = mi[:, None] & mj[None, :]
        gi = mod * B + ri
        gj = mod * B + rj
        g = tl.zeros((BM, BN), dtype=tl.float32)
        gt = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_GREL:
            g += tl.load(grel_ptr + gi[:, None] * s_g0 + gj[None, :] * s_g1, mask=om, other=0.0).to(tl.float32)
            gt += tl.load(grel_ptr + gj[None, :] * s_g0 + gi[:, None] * s_g1, mask=om, other=0.0).to(tl.float32)
        if HAS_GBIAS:
            c = tl.load(conn_ptr + gi[:, None] * s_c0 + gj[None, :] * s_c1, mask=om, other=0)
            ct = tl.load(conn_ptr + gj[None, :] * s_c0 + gi[:, None] * s_c1, mask=om, other=0)
            gb = tl.load(gbias_ptr + gi[:, None] * s_gb0 + gj[None, :] * s_gb1, mask=om, other=0.0).to(tl.float32)
            gbt = tl.load(gbias_ptr + gj[None, :] * s_gb0 + gi[:, None] * s_gb1, mask=om, other=0.0).to(tl.float32)
            g += tl.where(c != 0, lam * gb, 0.0)
            gt += tl.where(ct != 0, lam * gbt, 0.0)
        d = tl.load(dist_ptr + (mod * B + ri)[:, None] * B + rj[None, :], mask=om, other=0.0)
        pos = d > 0
        w = tl.where(pos, -(g + gt) * tl.exp(-d * inv_sigma) * inv_sigma / tl.where(pos, d, 1.0), 0.0)
        w = tl.where(om, w, 0.0)
        tl.store(w_ptr + (mod * B + ri)[:, None] * B + rj[None, :], w, mask=om)
        rs += tl.sum(w, axis=1)
    tl.store(rowsum_ptr + mod * B + ri, rs, mask=mi)


# ----------------------------------------------------------------------------------------------
# host-side launchers


def _blocks2d(B: int) -> tuple[int, int]:
    if interpreting():
        b = min(next_pow2(B, 16), 128)
        return b, b
    return 32, 32


def pairwise_relevance_forward(
    x: torch.Tensor, modalities: int, sigma: float, *, rel_out: torch.Tensor,
    conn: torch.Tensor | None = None, bias_out: torch.Tensor | None = None, lam: float = 1.0,
) -> torch.Tensor:
    """Intra relevance of ``modalities`` stacked blocks of x ((M*B, D)) into the diagonal blocks of ``rel_out``.

    Args:
        x: (M*B, D) fp32/fp16/bf16, any strides.
        rel_out: (M*B, M*B) output (written on the M diagonal (B,B) blocks only), any floating dtype.
        conn / bias_out: optional (M*B, M*B) bool connection (read) and bias (written) for the same blocks.
    Returns:
        dist: (M, B, B) fp32 pairwise distances (0 on the diagonal), kept for the backward.
    """
    MB, D = x.shape
    B = MB // modalities
    dist = torch.empty((modalities, B, B), device=x.device, dtype=torch.float32)
    if B == 0:
        return dist
    bm, bn = _blocks2d(B)
    bk = 32 if interpreting() else 8
    with_bias = bias_out is not None
    if with_bias and conn is None:
        raise ValueError("pairwise_relevance_forward: bias_out needs conn")
    c = conn if with_bias else unused_arg(rel_out)
    bo = bias_out if with_bias else unused_arg(rel_out)
    grid = (triton.cdiv(B, bm), triton.cdiv(B, bn), modalities)
    launch(_pairwise_fwd_kernel)[grid](
        x, rel_out, dist, c, bo, B, D,
        x.stride(0), x.stride(1), rel_out.stride(0), rel_out.stride(1), c.stride(0), c.stride(1),
        bo.stride(0), bo.stride(1),
        1.0 / float(sigma), float(lam), WITH_BIAS=with_bias, BM=bm, BN=bn, BK=bk, num_warps=4,
    )
    return dist


def pairwise_relevance_backward(
    x: torch.Tensor, dist: torch.Tensor, sigma: float, *, grad_rel: torch.Tensor | None,
    grad_bias: torch.Tensor | None = None, conn: torch.Tensor | None = None, lam: float = 1.0,
) -> torch.Tensor:
    """dL/dx (fp32, (M*B, D)) of the intra relevance of stacked modalities.

    ``grad_rel`` / ``grad_bias``: (M*B, M*B) gradients of the relevance / bias outputs (either may be
    None); only the diagonal (B,B) blocks are read. ``conn`` is needed with ``grad_bias``.
    """
    M, B, _ = dist.shape
    D = x.shape[1]
    dx = torch.zeros((M * B, D), device=x.device, dtype=torch.float32)
    if B == 0 or (grad_rel is None and grad_bias is None):
        return dx
    w = torch.empty((M, B, B), device=x.device, dtype=torch.float32)
    rowsum = torch.empty((M, B), device=x.device, dtype=torch.float32)
    bm, bn = _blocks2d(B)
    g = grad_rel if grad_rel is not None else dist
    gb = grad_bias if grad_bias is not None else dist
    c = conn if conn is not None else dist
    launch(_pairwise_bwd_weights_kernel)[(triton.cdiv(B, bm), M)](
        g, gb, c, dist, w, rowsum, B,
        g.stride(-2), g.stride(-1), gb.stride(-2), gb.stride(-1), c.stride(-2), c.stride(-1),
        1.0 / float(sigma), float(lam),
        HAS_GREL=grad_rel is not None, HAS_GBIAS=grad_bias is not None, BM=bm, BN=bn, num_warps=4,
    )
    for m in range(M):
        xm = x[m * B:(m + 1) * B]
        out = dx[m * B:(m + 1) * B]
        out.copy_(rowsum[m, :, None] * xm.float())
        # out -= W x  (accumulate the negated product: W is fp32, x any dtype)
        matmul(w[m].neg_(), xm, out=out, accumulate=True)
    return dx


def topk_into(scores: torch.Tensor, k: int, out: torch.Tensor) -> None:
    """Write the top-``k`` mask of each row of ``scores`` into the bool view ``out`` (same shape).

    Stable descending sort: ties go to the lower column index, NaN sorts first (exactly the
    reference's rule). Uses torch (allowed for the top-k by the backend design).
    """
    out.zero_()
    if k <= 0:
        return
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices[:, :k]
    out.scatter_(1, order, True)


def assemble_correlation(
    v: torch.Tensor, t: torch.Tensor, rel_i2t: torch.Tensor, rel_t2i: torch.Tensor,
    k_intra: int, k_inter: int, sigma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the instance correlation.

    Returns:
        ``(relevance, connection, attn_bias, dist, x)``: (2B,2B) in the inputs' dtype, (2B,2B) bool,
        (2B,2B) dtype, (2, B, B) fp32 distances, and ``x = [v; t]`` (2B, D) for the backward.
    """
    B, D = v.shape
    dev, dt = v.device, v.dtype
    n = 2 * B
    relevance = torch.empty((n, n), device=dev, dtype=dt)
    attn_bias = torch.empty((n, n), device=dev, dtype=dt)
    connection = torch.empty((n, n), device=dev, dtype=torch.bool)
    x = torch.cat([v, t], dim=0)
    gram_v = matmul(v, v.t())
    gram_t = matmul(t, t.t())
    topk_into(gram_v, k_intra, connection[:B, :B])
    topk_into(gram_t, k_intra, connection[B:, B:])
    topk_into(rel_i2t, k_inter, connection[:B, B:])
    topk_into(rel_t2i, k_inter, connection[B:, :B])
    dist = pairwise_relevance_forward(x, 2, sigma, rel_out=relevance, conn=connection, bias_out=attn_bias, lam=lam)
    bm, bn = _blocks2d(B)
    launch(_offdiag_kernel)[(triton.cdiv(B, bm), triton.cdiv(B, bn), 2)](
        rel_i2t, rel_t2i, relevance, connection, attn_bias, B,
        rel_i2t.stride(0), rel_i2t.stride(1), rel_t2i.stride(0), rel_t2i.stride(1),
        relevance.stride(0), relevance.stride(1), connection.stride(0), connection.stride(1),
        attn_bias.stride(0), attn_bias.stride(1), float(lam), BM=bm, BN=bn, num_warps=4,
    )
    return relevance, connection, attn_bias, dist, x


def _aot_exercise(dtype: torch.dtype) -> None:
    """Run every launcher of this module once on tiny CPU tensors (for :mod:`._aot` capture)."""
    B, D = 5, 16
    v = torch.randn(B, D).to(dtype)
    t = torch.randn(B, D).to(dtype)
    rel = torch.rand(B, B).to(dtype)
    relevance, connection, bias, dist, x = assemble_correlation(v, t, rel, rel, 2, 2, 1.0, 1.0)
    g = torch.zeros(2 * B, 2 * B, dtype=dtype)
    pairwise_relevance_backward(x, dist, 1.0, grad_rel=g, grad_bias=g, conn=connection, lam=1.0)
    out = torch.empty(B, B, dtype=dtype)
    d1 = pairwise_relevance_forward(v, 1, 1.0, rel_out=out)
    pairwise_relevance_backward(v, d1, 1.0, grad_rel=torch.zeros(B, B, dtype=dtype))


from aahr_fast.ops import _triton_glue as _glue  # noqa: E402  (registers the "triton" backend)

_glue.register_family("correlation", __name__)

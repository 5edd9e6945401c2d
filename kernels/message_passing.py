"""Triton kernels of the instance-graph message passing: GCN layer and relation-masked attention.

GCN layer (aahr-method.md section 2.6, GCN stage): ``out = LeakyReLU_slope(adj @ (x @ W) + b)``.
Forward = two strided matmuls, the second with the bias + LeakyReLU fused in its epilogue
(:func:`aahr_fast.kernels._utils.matmul`). Backward: one fused pass gives ``dpre = g * lrelu'(out)``
and the bias gradient (column sums), then four matmuls (dadj = dpre h^T, dh = adj^T dpre,
dx = dh W^T, dW = x^T dh); transposes are strides, nothing is copied.

Masked attention (HREM's relation-masked Transformer attention, section 2.6 GAT stage):
``out = softmax(q k^T / sqrt(dh) + bias) v`` per head, ``bias`` (n,n) shared by the heads or
(H,n,n), ``-inf`` = not connected. Flash-attention style (Dao et al. 2022, FlashAttention-2
backward): the forward streams key blocks with an online softmax and stores the row log-sum-exp;
the backward recomputes the probabilities from it: one kernel per key block for dk/dv, one per
query block for dq and the bias gradient (summed over heads with fp32 atomics when the bias is
shared). A query row without any connection outputs 0 and passes no gradient (its LSE is stored as
+inf so every recomputed probability is 0), matching the reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (dot_config, fdot, interpreting, launch, leaky_relu_backward_colsum, matmul, next_pow2,
                     unused_arg)

__all__ = ["gcn_forward", "gcn_backward", "attention_forward", "attention_backward"]


# ---------------------------------------------------------------------------------------------- GCN
def gcn_forward(adj, x, weight, bias, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, h)``: ``h = x @ W`` (input dtype) and ``out = lrelu(adj @ h + b)`` (input dtype)."""
    h = matmul(x, weight)
    out = matmul(adj, h, bias=bias, leaky_slope=slope)
    return out, h


def gcn_backward(grad_out, adj, x, weight, h, out, slope: float, has_bias: bool, needs=(True, True, True, True)):
    """Gradients ``(d adj, d x, d weight, d bias)`` (fp32, None where not needed)."""
    dpre, db = leaky_relu_backward_colsum(grad_out, out, slope, want_colsum=has_bias and needs[3])
    d_adj = matmul(dpre, h.t(), out_dtype=torch.float32) if needs[0] else None
    d_x = d_w = None
    if needs[1] or needs[2]:
        dh = matmul(adj.t(), dpre, out_dtype=torch.float32)
        if needs[1]:
            d_x = matmul(dh, weight.t(), out_dtype=torch.float32)
        if needs[2]:
            d_w = matmul(x.t(), dh, out_dtype=torch.float32)
    return d_adj, d_x, d_w, db


# ---------------------------------------------------------------------------------------- attention
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, o_ptr, lse_ptr,
    n, DH,
    s_qh, s_qn, s_qd, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd,
    s_bh, s_b0, s_b1, s_oh, s_on, s_od,
    scale,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    # int64 scalar bases per (head, block); int32 offsets inside tiles
    m0 = tl.program_id(0).to(tl.int64) * BM
    hh = tl.program_id(1).to(tl.int64)
    im = tl.arange(0, BM)
    jn = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    mi = (m0 + im) < n
    md = rd < DH
    q = tl.load(q_ptr + hh * s_qh + m0 * s_qn + im[:, None] * s_qn + rd[None, :] * s_qd,
                mask=mi[:, None] & md[None, :], other=0.0)
    k_head = k_ptr + hh * s_kh
    v_head = v_ptr + hh * s_vh
    b_rows = b_ptr + hh * s_bh + m0 * s_b0
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    nconn = tl.zeros((BM,), dtype=tl.int32)  # bias entries != -inf: a row without any outputs exactly 0
    for n0 in range(0, n, BN):
        n64 = m0 * 0 + n0
        mj = (n0 + jn) < n
        kt = tl.load(k_head + n64 * s_kn + jn[None, :] * s_kn + rd[:, None] * s_kd, mask=md[:, None] & mj[None, :], other=0.0)
        s = fdot(q, kt, tl.zeros((BM, BN), dtype=tl.float32), FP32_DOT, PREC) * scale
        bias = tl.load(b_rows + n64 * s_b1 + im[:, None] * s_b0 + jn[None, :] * s_b1,
                       mask=mi[:, None] & mj[None, :], other=float("-inf")).to(tl.float32)
        nconn += tl.sum(tl.where(mj[None, :] & (bias != float("-inf")), 1, 0), axis=1)
        s = tl.where(mj[None, :], s + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + n64 * s_vn + jn[:, None] * s_vn + rd[None, :] * s_vd, mask=mj[:, None] & md[None, :], other=0.0)
        if FP32_DOT:
            acc = fdot(p, v, acc * alpha[:, None], FP32_DOT, PREC)
        else:
            acc = fdot(p.to(v.dtype), v, acc * alpha[:, None], FP32_DOT, PREC)
        m_i = m_new
    has = l_i > 0
    # a fully masked row (decided from the bias alone, as in the reference) is exactly 0 even when q / k / v
    # hold NaN or inf (NaN logits, 0 * inf in P v)
    conn = nconn > 0
    out = tl.where(conn[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has & conn, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(o_ptr + hh * s_oh + m0 * s_on + im[:, None] * s_on + rd[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
             mask=mi[:, None] & md[None, :])
    tl.store(lse_ptr + hh * n + m0 + im, lse, mask=mi)


@triton.jit
def _attn_probs(q, kt, b_blk, im, jn, mi, mj, s_b0, s_b1, lse, scale,
                FP32_DOT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Recomputed probabilities P (BM,BN) fp32 of one (query block, key block) pair; b_blk = bias tile base."""
    s = fdot(q, kt, tl.zeros((BM, BN), dtype=tl.float32), FP32_DOT, PREC) * scale
    bias = tl.load(b_blk + im[:, None] * s_b0 + jn[None, :] * s_b1,
                   mask=mi[:, None] & mj[None, :], other=float("-inf")).to(tl.float32)
    s = tl.where(mj[None, :], s + bias, float("-inf"))
    return tl.exp(s - lse[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    n, DH,
    s_qh, s_qn, s_qd, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd,
    s_bh, s_b0, s_b1, s_dh, s_dn, s_dd,
    scale,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    n0 = tl.program_id(0).to(tl.int64) * BN
    hh = tl.program_id(1).to(tl.int64)
    jn = tl.arange(0, BN)
    im = tl.arange(0, BM)
    rd = tl.arange(0, BD)
    mj = (n0 + jn) < n
    md = rd < DH
    kt = tl.load(k_ptr + hh * s_kh + n0 * s_kn + jn[None, :] * s_kn + rd[:, None] * s_kd,
                 mask=md[:, None] & mj[None, :], other=0.0)
    vt = tl.load(v_ptr + hh * s_vh + n0 * s_vn + jn[None, :] * s_vn + rd[:, None] * s_vd,
                 mask=md[:, None] & mj[None, :], other=0.0)
    q_head = q_ptr + hh * s_qh
    do_head = do_ptr + hh * s_dh
    b_cols = b_ptr + hh * s_bh + n0 * s_b1
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dv = tl.zeros((BN, BD), dtype=tl.float32)
    for m0 in range(0, n, BM):
        m64 = n0 * 0 + m0
        mi = (m0 + im) < n
        q = tl.load(q_head + m64 * s_qn + im[:, None] * s_qn + rd[None, :] * s_qd, mask=mi[:, None] & md[None, :], other=0.0)
        do = tl.load(do_head + m64 * s_dn + im[:, None] * s_dn + rd[None, :] * s_dd, mask=mi[:, None] & md[None, :], other=0.0)
        lse = tl.load(lse_ptr + hh * n + m64 + im, mask=mi, other=float("inf"))
        delta = tl.load(delta_ptr + hh * n + m64 + im, mask=mi, other=0.0)
        p = _attn_probs(q, kt, b_cols + m64 * s_b0, im, jn, mi, mj, s_b0, s_b1, lse, scale, FP32_DOT, PREC, BM, BN)
        dp = fdot(do, vt, tl.zeros((BM, BN), dtype=tl.float32), FP32_DOT, PREC)
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dv = fdot(tl.trans(p), do, dv, FP32_DOT, PREC)
            dk = fdot(tl.trans(ds), q, dk, FP32_DOT, PREC)
        else:
            dv = fdot(tl.trans(p.to(do.dtype)), do, dv, FP32_DOT, PREC)
            dk = fdot(tl.trans(ds.to(q.dtype)), q, dk, FP32_DOT, PREC)
    om = mj[:, None] & md[None, :]
    out_off = hh * n * DH + n0 * DH
    tl.store(dk_ptr + out_off + jn[:, None] * DH + rd[None, :], dk * scale, mask=om)
    tl.store(dv_ptr + out_off + jn[:, None] * DH + rd[None, :], dv, mask=om)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, db_ptr,
    n, DH,
    s_qh, s_qn, s_qd, s_kh, s_kn, s_kd, s_vh, s_vn, s_vd,
    s_bh, s_b0, s_b1, s_dh, s_dn, s_dd, s_dbh,
    scale,
    BIAS_GRAD: tl.constexpr, BIAS_SHARED: tl.constexpr,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    m0 = tl.program_id(0).to(tl.int64) * BM
    hh = tl.program_id(1).to(tl.int64)
    im = tl.arange(0, BM)
    jn = tl.arange(0, BN)
    rd = tl.arange(0, BD)
    mi = (m0 + im) < n
    md = rd < DH
    q = tl.load(q_ptr + hh * s_qh + m0 * s_qn + im[:, None] * s_qn + rd[None, :] * s_qd,
                mask=mi[:, None] & md[None, :], other=0.0)
    do = tl.load(do_ptr + hh * s_dh + m0 * s_dn + im[:, None] * s_dn + rd[None, :] * s_dd,
                 mask=mi[:, None] & md[None, :], other=0.0)
    lse = tl.load(lse_ptr + hh * n + m0 + im, mask=mi, other=float("inf"))
    delta = tl.load(delta_ptr + hh * n + m0 + im, mask=mi, other=0.0)
    k_head = k_ptr + hh * s_kh
    v_head = v_ptr + hh * s_vh
    b_rows = b_ptr + hh * s_bh + m0 * s_b0
    if BIAS_SHARED:
        db_rows = db_ptr + m0 * n
    else:
        db_rows = db_ptr + hh * s_dbh + m0 * n
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, n, BN):
        n64 = m0 * 0 + n0
        mj = (n0 + jn) < n
        kt = tl.load(k_head + n64 * s_kn + jn[None, :] * s_kn + rd[:, None] * s_kd, mask=md[:, None] & mj[None, :], other=0.0)
        vt = tl.load(v_head + n64 * s_vn + jn[None, :] * s_vn + rd[:, None] * s_vd, mask=md[:, None] & mj[None, :], other=0.0)
        p = _attn_probs(q, kt, b_rows + n64 * s_b1, im, jn, mi, mj, s_b0, s_b1, lse, scale, FP32_DOT, PREC, BM, BN)
        dp = fdot(do, vt, tl.zeros((BM, BN), dtype=tl.float32), FP32_DOT, PREC)
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dq = fdot(ds, tl.trans(kt), dq, FP32_DOT, PREC)
        else:
            dq = fdot(ds.to(kt.dtype), tl.trans(kt), dq, FP32_DOT, PREC)
        if BIAS_GRAD:
            bm = mi[:, None] & mj[None, :]
            if BIAS_SHARED:
                tl.atomic_add(db_rows + n64 + im[:, None] * n + jn[None, :], ds, mask=bm)
            else:
                tl.store(db_rows + n64 + im[:, None] * n + jn[None, :], ds, mask=bm)
    tl.store(dq_ptr + hh * n * DH + m0 * DH + im[:, None] * DH + rd[None, :], dq * scale, mask=mi[:, None] & md[None, :])


def _attn_blocks(n: int, dh: int, fp32_dot: bool) -> tuple[int, int, int, int]:
    bd = next_pow2(dh, 16)
    if interpreting():
        b = min(next_pow2(n, 16), 128)
        return b, b, bd, 4
    # register budgets checked with ptxas (kernels/_aot.py, sm_90, dh = 64): 16-bit operands fit
    # 64x64 tiles in 8 warps (113-215 registers, no spills); fp32 operands run three TF32 products
    # per dot (tf32x3) and need 32x32 tiles to keep spills small
    if fp32_dot:
        return 32, 32, bd, 4
    return 64, 64, bd, 8


def _bias_strides(bias: torch.Tensor) -> tuple[int, int, int]:
    if bias.dim() == 2:
        return 0, bias.stride(0), bias.stride(1)
    return bias.stride(0), bias.stride(1), bias.stride(2)


def attention_forward(q, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (H,n,dh) in q's dtype, lse (H,n) fp32; +inf for rows without any connection)``."""
    H, n, dh = q.shape
    out = torch.empty((H, n, dh), device=q.device, dtype=q.dtype)
    lse = torch.empty((H, n), device=q.device, dtype=torch.float32)
    fp32_dot, prec = dot_config(q.dtype, k.dtype, v.dtype)
    bm, bn, bd, warps = _attn_blocks(n, dh, fp32_dot)
    sb = _bias_strides(bias)
    launch(_attn_fwd_kernel)[(triton.cdiv(n, bm), H)](
        q, k, v, bias, out, lse, n, dh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sb[0], sb[1], sb[2],
        out.stride(0), out.stride(1), out.stride(2),
        1.0 / math.sqrt(dh), FP32_DOT=fp32_dot, PREC=prec, BM=bm, BN=bn, BD=bd, num_warps=warps,
    )
    return out, lse


def attention_backward(grad_out, q, k, v, bias, out, lse, need_bias_grad: bool):
    """``(dq, dk, dv, dbias)`` fp32 (contiguous); ``dbias`` has bias's shape, or None."""
    H, n, dh = q.shape
    dev = q.device
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (H, n): rowsum(dO * O)
    dq = torch.empty((H, n, dh), device=dev, dtype=torch.float32)
    dk = torch.empty((H, n, dh), device=dev, dtype=torch.float32)
    dv = torch.empty((H, n, dh), device=dev, dtype=torch.float32)
    shared = bias.dim() == 2
    dbias = None
    if need_bias_grad:
        dbias = torch.zeros(bias.shape, device=dev, dtype=torch.float32)
    fp32_dot, prec = dot_config(q.dtype, k.dtype, v.dtype, grad_out.dtype)
    bm, bn, bd, warps = _attn_blocks(n, dh, fp32_dot)
    sb = _bias_strides(bias)
    common = (
        n, dh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sb[0], sb[1], sb[2],
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    scale = 1.0 / math.sqrt(dh)
    launch(_attn_bwd_dkdv_kernel)[(triton.cdiv(n, bn), H)](
        q, k, v, bias, grad_out, lse, delta, dk, dv, *common, scale,
        FP32_DOT=fp32_dot, PREC=prec, BM=bm, BN=bn, BD=bd, num_warps=warps,
    )
    db = dbias if dbias is not None else unused_arg(dq)
    launch(_attn_bwd_dq_kernel)[(triton.cdiv(n, bm), H)](
        q, k, v, bias, grad_out, lse, delta, dq, db, *common, 0 if shared else n * n, scale,
        BIAS_GRAD=need_bias_grad, BIAS_SHARED=shared,
        FP32_DOT=fp32_dot, PREC=prec, BM=bm, BN=bn, BD=bd, num_warps=warps,
    )
    return dq, dk, dv, dbias


def _aot_exercise(dtype: torch.dtype) -> None:
    """Run every launcher of this module once on tiny CPU tensors (for :mod:`._aot` capture)."""
    n, din, dout = 10, 24, 20
    adj = torch.rand(n, n).to(dtype)
    x = torch.randn(n, din).to(dtype)
    w = torch.randn(din, dout).to(dtype)
    b = torch.randn(dout).to(dtype)
    out, h = gcn_forward(adj, x, w, b, 0.2)
    gcn_backward(torch.randn(n, dout).to(dtype), adj, x, w, h, out, 0.2, True)
    H, dh = 2, 64
    q = torch.randn(H, n, dh).to(dtype)
    for bias in (torch.zeros(n, n).to(dtype), torch.zeros(H, n, n).to(dtype)):
        o, lse = attention_forward(q, q, q, bias)
        attention_backward(torch.randn(H, n, dh).to(dtype), q, q, q, bias, o, lse, True)


from aahr_fast.ops import _triton_glue as _glue  # noqa: E402  (registers the "triton" backend)

_glue.register_family("message_passing", __name__)

"""Triton kernels of the clustering-prototype loss: log-domain Sinkhorn-Knopp and the SwAV
swapped-prediction loss (forward + backward).

Sinkhorn (aahr-method.md 2.5; SwAV ``distributed_sinkhorn``): the reference's iterations on the
log-codes, in its order of operations, on a materialised fp32 (B, K) buffer ``W`` (``log Q^T``):
``W = S / eps - LSE_all(S / eps)``, then per iteration {each prototype column of W shifted by its
log-sum-exp and ``log K``, each sample row by its log-sum-exp and ``log B``}; codes ``exp(W + log B)``.
One kernel streams columns (their log-sum-exps), one streams rows (applies them, normalises the row and
writes W back; on the last iteration it writes the codes). All reductions are online log-sum-exps in
fp32. Carrying dual potentials instead (``S / eps + u + v``, no W) is exact in real arithmetic but
cancels numbers of size ``|S| / eps``: at scores ~1e4 the codes were off by 3e-3 and rows summed to
1.0026; on W the entries that matter stay O(1) and the codes match the reference to ~1e-7.

Swapped prediction (aahr-method.md 3, item 2): ``loss = -1/B sum_i sum_k q_t[i,k] log softmax(S_v[i]/tau)_k
- 1/B sum_i sum_k q_v[i,k] log softmax(S_t[i]/tau)_k``. One row-streaming kernel computes both row
losses and the score gradients ``dS_v = (softmax(S_v/tau) * sum_k q_t - q_t) / (tau B)`` (likewise
for t); the embedding and prototype gradients are then strided matmuls (``dx = dS C``,
``dC = dS_v^T x_v + dS_t^T x_t``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import interpreting, launch, matmul, next_pow2, unused_arg

__all__ = ["sinkhorn_codes", "swav_loss_forward", "swav_loss_backward"]


@triton.jit
def _sk_col_kernel(src_ptr, g_ptr, c_ptr, Bt, K, s_b, s_k, eps,
                   MODE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Column log-sum-exps ``c[k] = LSE_b z[b,k]`` for a block of BK prototypes (grid over K), where
    MODE 0: ``z = S / eps`` and a column holding a non-finite ``S / eps`` gets ``c[k] = NaN`` (poison);
    MODE 1: ``z = S / eps - g`` (``g = *g_ptr``, the global log-sum-exp); MODE 2: ``z = W`` (log-codes)."""
    pid = tl.program_id(0).to(tl.int64)
    rk = pid * BK + tl.arange(0, BK).to(tl.int64)
    mk = rk < K
    m = tl.full((BK,), float("-inf"), tl.float32)
    acc = tl.zeros((BK,), dtype=tl.float32)
    nbad = tl.zeros((BK,), dtype=tl.int32)
    if MODE == 1:
        g = tl.load(g_ptr)
    for b0 in range(0, Bt, BM):
        rb = b0 + tl.arange(0, BM).to(tl.int64)
        msk = (rb < Bt)[:, None] & mk[None, :]
        x = tl.load(src_ptr + rb[:, None] * s_b + rk[None, :] * s_k, mask=msk, other=0.0).to(tl.float32)
        if MODE == 0:
            x = x / eps
            ok = tl.abs(x) < float("inf")  # False for NaN and +-inf
            nbad += tl.sum(tl.where(msk & (ok == 0), 1, 0), axis=0)
            msk = msk & ok
        elif MODE == 1:
            x = x / eps - g
        z = tl.where(msk, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[None, :]), axis=0)
        m = m_new
    lse = tl.where(acc > 0, m + tl.log(tl.where(acc > 0, acc, 1.0)), float("-inf"))
    if MODE == 0:
        lse = tl.where(nbad > 0, float("nan"), lse)
    tl.store(c_ptr + rk, lse, mask=mk)


@triton.jit
def _sk_row_kernel(src_ptr, g_ptr, c_ptr, w_ptr, q_ptr, Bt, K, s_b, s_k, s_qb, s_qk, eps, log_k, log_b,
                   FIRST: tl.constexpr, LAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """One reference iteration on a block of BM samples, in the reference's order of operations:
    ``z = (X - c[k]) - log K`` (prototype step; ``X = S / eps - g`` when FIRST, else the log-codes W),
    ``r[b] = LSE_k z``, ``W = (z - r[b]) - log B`` (sample step) written back in place (row-major fp32
    (Bt, K)), and on the LAST iteration the codes ``exp(W + log B)``."""
    pid = tl.program_id(0).to(tl.int64)
    rb = pid * BM + tl.arange(0, BM).to(tl.int64)
    mb = rb < Bt
    if FIRST:
        g = tl.load(g_ptr)
    m = tl.full((BM,), float("-inf"), tl.float32)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        mk = rk < K
        msk = mb[:, None] & mk[None, :]
        if FIRST:
            x = tl.load(src_ptr + rb[:, None] * s_b + rk[None, :] * s_k, mask=msk, other=0.0).to(tl.float32) / eps - g
        else:
            x = tl.load(w_ptr + rb[:, None] * K + rk[None, :], mask=msk, other=0.0)
        c = tl.load(c_ptr + rk, mask=mk, other=0.0)
        z = tl.where(msk, (x - c[None, :]) - log_k, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    r = tl.where(acc > 0, m + tl.log(tl.where(acc > 0, acc, 1.0)), float("-inf"))
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        mk = rk < K
        msk = mb[:, None] & mk[None, :]
        if FIRST:
            x = tl.load(src_ptr + rb[:, None] * s_b + rk[None, :] * s_k, mask=msk, other=0.0).to(tl.float32) / eps - g
        else:
            x = tl.load(w_ptr + rb[:, None] * K + rk[None, :], mask=msk, other=0.0)
        c = tl.load(c_ptr + rk, mask=mk, other=0.0)
        w = (((x - c[None, :]) - log_k) - r[:, None]) - log_b
        if LAST:
            code = tl.exp(w + log_b)
            tl.store(q_ptr + rb[:, None] * s_qb + rk[None, :] * s_qk, code.to(q_ptr.dtype.element_ty), mask=msk)
        else:
            tl.store(w_ptr + rb[:, None] * K + rk[None, :], w, mask=msk)


@triton.jit
def _swav_loss_kernel(
    sv_ptr, st_ptr, qv_ptr, qt_ptr, dsv_ptr, dst_ptr, loss_ptr,
    B, K, s_sv0, s_sv1, s_st0, s_st1, s_qv0, s_qv1, s_qt0, s_qt1,
    inv_tau, inv_b,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """Per row i: loss_i = -sum_k q_t log softmax(S_v/tau) - sum_k q_v log softmax(S_t/tau) and dS (fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    rb = pid * BM + tl.arange(0, BM).to(tl.int64)
    mb = rb < B
    # pass 1: per-element (BM, BK) running max / sum-of-exp of both logit rows, sums of both code rows
    # and of q * logits, reduced across K only after the loop (an `acc += tl.sum(...)` loop carrying
    # several accumulators trips an assertion in Triton 3.6's OptimizeThreadLocality pass)
    mv2 = tl.full((BM, BK), float("-inf"), tl.float32)
    lv2 = tl.zeros((BM, BK), dtype=tl.float32)
    mt2 = tl.full((BM, BK), float("-inf"), tl.float32)
    lt2 = tl.zeros((BM, BK), dtype=tl.float32)
    sqt2 = tl.zeros((BM, BK), dtype=tl.float32)
    sqv2 = tl.zeros((BM, BK), dtype=tl.float32)
    dotv2 = tl.zeros((BM, BK), dtype=tl.float32)
    dott2 = tl.zeros((BM, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        msk = mb[:, None] & (rk < K)[None, :]
        zv = tl.load(sv_ptr + rb[:, None] * s_sv0 + rk[None, :] * s_sv1, mask=msk, other=0.0).to(tl.float32) * inv_tau
        zt = tl.load(st_ptr + rb[:, None] * s_st0 + rk[None, :] * s_st1, mask=msk, other=0.0).to(tl.float32) * inv_tau
        qv = tl.load(qv_ptr + rb[:, None] * s_qv0 + rk[None, :] * s_qv1, mask=msk, other=0.0).to(tl.float32)
        qt = tl.load(qt_ptr + rb[:, None] * s_qt0 + rk[None, :] * s_qt1, mask=msk, other=0.0).to(tl.float32)
        zv_m = tl.where(msk, zv, float("-inf"))
        zt_m = tl.where(msk, zt, float("-inf"))
        nv = tl.maximum(mv2, zv_m)
        nt = tl.maximum(mt2, zt_m)
        nv_s = tl.where(nv == float("-inf"), 0.0, nv)
        nt_s = tl.where(nt == float("-inf"), 0.0, nt)
        lv2 = lv2 * tl.exp(mv2 - nv_s) + tl.exp(zv_m - nv_s)
        lt2 = lt2 * tl.exp(mt2 - nt_s) + tl.exp(zt_m - nt_s)
        mv2 = nv
        mt2 = nt
        sqt2 += qt
        sqv2 += qv
        dotv2 += qt * zv
        dott2 += qv * zt
    mv = tl.max(mv2, axis=1)
    mt = tl.max(mt2, axis=1)
    mv_s = tl.where(mv == float("-inf"), 0.0, mv)
    mt_s = tl.where(mt == float("-inf"), 0.0, mt)
    lv = tl.sum(lv2 * tl.exp(mv2 - mv_s[:, None]), axis=1)
    lt = tl.sum(lt2 * tl.exp(mt2 - mt_s[:, None]), axis=1)
    sqt = tl.sum(sqt2, axis=1)
    sqv = tl.sum(sqv2, axis=1)
    dotv = tl.sum(dotv2, axis=1)
    dott = tl.sum(dott2, axis=1)
    lse_v = tl.where(lv > 0, mv_s + tl.log(tl.where(lv > 0, lv, 1.0)), 0.0)  # 0 only on padded rows
    lse_t = tl.where(lt > 0, mt_s + tl.log(tl.where(lt > 0, lt, 1.0)), 0.0)
    # -sum_k q log softmax(z) = sum_k q * lse - sum_k q z
    row_loss = (sqt * lse_v - dotv) + (sqv * lse_t - dott)
    tl.store(loss_ptr + rb, row_loss, mask=mb)
    # pass 2: dS = (softmax(z) * sum_k q - q) / (tau * B)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        msk = mb[:, None] & (rk < K)[None, :]
        zv = tl.load(sv_ptr + rb[:, None] * s_sv0 + rk[None, :] * s_sv1, mask=msk, other=0.0).to(tl.float32) * inv_tau
        zt = tl.load(st_ptr + rb[:, None] * s_st0 + rk[None, :] * s_st1, mask=msk, other=0.0).to(tl.float32) * inv_tau
        qv = tl.load(qv_ptr + rb[:, None] * s_qv0 + rk[None, :] * s_qv1, mask=msk, other=0.0).to(tl.float32)
        qt = tl.load(qt_ptr + rb[:, None] * s_qt0 + rk[None, :] * s_qt1, mask=msk, other=0.0).to(tl.float32)
        dsv = (tl.exp(zv - lse_v[:, None]) * sqt[:, None] - qt) * (inv_tau * inv_b)
        dst = (tl.exp(zt - lse_t[:, None]) * sqv[:, None] - qv) * (inv_tau * inv_b)
        tl.store(dsv_ptr + rb[:, None] * K + rk[None, :], dsv, mask=msk)
        tl.store(dst_ptr + rb[:, None] * K + rk[None, :], dst, mask=msk)


def _sk_blocks(Bt: int, K: int) -> tuple[int, int]:
    if interpreting():
        return min(next_pow2(Bt, 16), 256), min(next_pow2(K, 16), 512)
    return 32, 128


def sinkhorn_codes(scores: torch.Tensor, eps: float, n_iters: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp codes (B,K) of ``scores`` (B,K) (any strides, fp32/fp16/bf16), rows summing to 1.

    Follows the reference's order of operations on materialised fp32 log-codes ``W`` (B, K) (the fp32
    codes buffer itself when ``out_dtype`` is fp32, else one scratch buffer): ``S / eps`` minus its global
    log-sum-exp ``g`` (computed on the device: no host sync), then per iteration a column pass (the
    prototype log-sum-exps) and a row pass that applies them, normalises each sample and writes W back.
    The log-codes of the entries that matter stay O(1), so scores of any size keep fp32 accuracy
    (potentials ``S / eps + u + v`` of size ~1e5 lose ~1e-2 to cancellation). A non-finite ``S / eps``
    anywhere (NaN, +-inf, overflow) makes ``g`` NaN and so every code NaN, as in the reference.

    Raises:
        ValueError: ``n_iters < 1``.
    """
    if n_iters < 1:
        raise ValueError(f"sinkhorn_codes: n_iters must be >= 1, got {n_iters}")
    Bt, K = scores.shape
    dev = scores.device
    out_dtype = out_dtype or scores.dtype
    codes = torch.empty((Bt, K), device=dev, dtype=out_dtype)
    w = codes if out_dtype == torch.float32 else torch.empty((Bt, K), device=dev, dtype=torch.float32)
    c = torch.empty((K,), device=dev, dtype=torch.float32)
    bm, bk = _sk_blocks(Bt, K)
    eps = float(eps)
    col_grid, row_grid = (triton.cdiv(K, bk),), (triton.cdiv(Bt, bm),)
    sb, sk = scores.stride(0), scores.stride(1)
    launch(_sk_col_kernel)[col_grid](scores, unused_arg(c), c, Bt, K, sb, sk, eps, MODE=0, BM=bm, BK=bk,
                                     num_warps=4)
    g = torch.logsumexp(c, 0).reshape(1)  # NaN when any S / eps is non-finite
    log_k, log_b = math.log(K), math.log(Bt)
    for it in range(n_iters):
        first = it == 0
        if first:
            launch(_sk_col_kernel)[col_grid](scores, g, c, Bt, K, sb, sk, eps, MODE=1, BM=bm, BK=bk, num_warps=4)
        else:
            launch(_sk_col_kernel)[col_grid](w, g, c, Bt, K, K, 1, eps, MODE=2, BM=bm, BK=bk, num_warps=4)
        launch(_sk_row_kernel)[row_grid](
            scores, g, c, w, codes, Bt, K, sb, sk, codes.stride(0), codes.stride(1), eps, log_k, log_b,
            FIRST=first, LAST=(it == n_iters - 1), BM=bm, BK=bk, num_warps=4,
        )
    return codes


def swav_loss_forward(x_v, x_t, prototypes, eps: float, n_iters: int, tau: float, queue_v=None, queue_t=None):
    """Forward of the swapped-prediction loss.

    Returns:
        ``(loss (0-dim fp32), ds_v (B,K) fp32, ds_t (B,K) fp32)``: the score gradients of a unit
        upstream gradient, kept for the backward.
    """
    B = x_v.shape[0]
    K = prototypes.shape[0]
    ct = prototypes.t()
    full_v = x_v if queue_v is None else torch.cat([x_v, queue_v], dim=0)
    full_t = x_t if queue_t is None else torch.cat([x_t, queue_t], dim=0)
    s_v_all = matmul(full_v, ct, out_dtype=torch.float32)
    s_t_all = matmul(full_t, ct, out_dtype=torch.float32)
    q_v = sinkhorn_codes(s_v_all, eps, n_iters, torch.float32)[:B]
    q_t = sinkhorn_codes(s_t_all, eps, n_iters, torch.float32)[:B]
    s_v, s_t = s_v_all[:B], s_t_all[:B]
    ds_v = torch.empty((B, K), device=x_v.device, dtype=torch.float32)
    ds_t = torch.empty((B, K), device=x_v.device, dtype=torch.float32)
    rows = torch.empty((B,), device=x_v.device, dtype=torch.float32)
    # GPU: 4 rows x 256 prototypes per step and 4 warps: 128 registers, no spills (ptxas, sm_80/sm_90);
    # 16 x 128 spilled ~600 bytes per thread
    bm = min(next_pow2(B, 16), 64) if interpreting() else 4
    bk = min(next_pow2(K, 16), 512) if interpreting() else 256
    launch(_swav_loss_kernel)[(triton.cdiv(B, bm),)](
        s_v, s_t, q_v, q_t, ds_v, ds_t, rows, B, K,
        s_v.stride(0), s_v.stride(1), s_t.stride(0), s_t.stride(1),
        q_v.stride(0), q_v.stride(1), q_t.stride(0), q_t.stride(1),
        1.0 / float(tau), 1.0 / B, BM=bm, BK=bk, num_warps=4,
    )
    return rows.sum() / B, ds_v, ds_t


def swav_loss_backward(grad, x_v, x_t, prototypes, ds_v, ds_t, needs=(True, True, True)):
    """``(d x_v, d x_t, d prototypes)`` fp32 for upstream gradient ``grad`` (0-dim), None where not needed."""
    gv = ds_v * grad
    gt = ds_t * grad
    d_xv = matmul(gv, prototypes, out_dtype=torch.float32) if needs[0] else None
    d_xt = matmul(gt, prototypes, out_dtype=torch.float32) if needs[1] else None
    d_c = None
    if needs[2]:
        d_c = matmul(gv.t(), x_v, out_dtype=torch.float32)
        matmul(gt.t(), x_t, out=d_c, accumulate=True)
    return d_xv, d_xt, d_c


def _aot_exercise(dtype: torch.dtype) -> None:
    """Run every launcher of this module once on tiny CPU tensors (for :mod:`._aot` capture)."""
    B, K, D = 6, 10, 16
    x = torch.randn(B, D).to(dtype)
    c = torch.randn(K, D).to(dtype)
    sinkhorn_codes(torch.randn(B, K).to(dtype), 0.1, 2)
    loss, dsv, dst = swav_loss_forward(x, x, c, 0.1, 2, 0.1, queue_v=x, queue_t=x)
    swav_loss_backward(torch.ones(()), x, x, c, dsv, dst)


from aahr_fast.ops import _triton_glue as _glue  # noqa: E402  (registers the "triton" backend)

_glue.register_family("prototypes", __name__)

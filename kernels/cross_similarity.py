"""Triton kernels of the fused region-word cross similarity (both modes), forward and backward.

One tile = a block of ``BI`` images x ``BT`` captions. Its cosine scores ``(BI*NP, BT*LP)`` come from
one ``tl.dot`` K-loop over the feature dimension (regions as rows, words as columns, padded to
powers of two ``NP >= N``, ``LP >= L``), scaled by precomputed inverse norms. The tile is then viewed
as ``(BI, NP, BT, LP)`` and every per-pair reduction (normalisation, max, mean, LSE) runs in
registers, so memory is O(Bi*Bt) for any gallery size (never O(Bi*Bt*N*L)).

Modes (``MODE`` constexpr):

* 0, AAHR / SCAN relevance (aahr-method.md section 2.6, "inter-modal"; SCAN, Lee et al. ECCV 2018):
  ``s = LeakyReLU_slope(cos(word w, region r))`` over valid pairs;
  ``t2i[t,i] = mean_w max_r s[r,w] / (||s[r,:]||_2 + eps)`` (normalise over the caption's valid
  words, max over valid regions, mean over valid words), and symmetrically
  ``i2t[i,t] = mean_r max_w s[r,w] / (||s[:,w]||_2 + eps)``.
* 1, CHAN hard assignment, mean (Pan et al., CVPR 2023): ``sim[i,t] = mean_w max_r cos``.
* 2, CHAN hard assignment, LSE: ``sim[i,t] = T * log sum_w exp(max_r cos / T)``.

Backward recomputes the tile (no O(Bi*Bt*N*L) residuals), forms the gradient w.r.t. the cosine tile
and contracts it with the other side's normalised features. Two launches: one owns image blocks
(gradient of the normalised regions), one owns caption blocks (normalised words); each program
accumulates into rows it owns, optionally split over ``SPLIT`` partial buffers that are summed on the
host: deterministic, no atomics. The chain rule through the L2 normalisation of the raw features is
applied on the host (:func:`unnormalize_grad`).

Argmax ties (equal scores of two regions for one word) route the gradient to the lowest index.
NaN: a NaN cosine in a valid slot makes the scores of its (image, caption) pair NaN, as in the
reference (``tl.max`` alone would silently skip it); gradients of such pairs are unspecified.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import inverse_norms, unnormalize_grad
from ._utils import dot_config, fdot, interpreting, launch, next_pow2, num_sms, unused_arg

__all__ = [
    "MODE_RELEVANCE",
    "MODE_HARD_MEAN",
    "MODE_HARD_LSE",
    "inverse_norms",
    "unnormalize_grad",
    "cross_similarity_forward",
    "cross_similarity_backward",
]

MODE_RELEVANCE = 0
MODE_HARD_MEAN = 1
MODE_HARD_LSE = 2


@triton.jit
def _cos_tile(
    r_ptr, w_ptr, rinv_ptr, winv_ptr, i0, t0,
    Bi, Bt, N, L, D,
    s_rb, s_rn, s_rd, s_wb, s_wl, s_wd,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BI: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, LP: tl.constexpr, BK: tl.constexpr,
):
    """Cosine tile (BI*NP, BT*LP) of images [i0, i0+BI) x captions [t0, t0+BT), fp32, 0 where padded."""
    m = tl.arange(0, BI * NP).to(tl.int64)
    img = i0 + m // NP
    r = m % NP
    c = tl.arange(0, BT * LP).to(tl.int64)
    cap = t0 + c // LP
    w = c % LP
    rowok = (img < Bi) & (r < N)
    colok = (cap < Bt) & (w < L)
    rbase = img * s_rb + r * s_rn
    wbase = cap * s_wb + w * s_wl
    acc = tl.zeros((BI * NP, BT * LP), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK).to(tl.int64)
        kok = k < D
        a = tl.load(r_ptr + rbase[:, None] + k[None, :] * s_rd, mask=rowok[:, None] & kok[None, :], other=0.0)
        b = tl.load(w_ptr + wbase[None, :] + k[:, None] * s_wd, mask=kok[:, None] & colok[None, :], other=0.0)
        acc = fdot(a, b, acc, FP32_DOT, PREC)
    rinv = tl.load(rinv_ptr + img * N + r, mask=rowok, other=0.0)
    winv = tl.load(winv_ptr + cap * L + w, mask=colok, other=0.0)
    return acc * rinv[:, None] * winv[None, :]


@triton.jit
def _valid_masks(rlen_ptr, wlen_ptr, i0, t0, Bi, Bt,
                 BI: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, LP: tl.constexpr):
    """Validity masks of a tile: regions (BI,NP,1,1), words (1,1,BT,LP); per-pair lengths (BI,) (BT,)."""
    bi = tl.arange(0, BI).to(tl.int64)
    bt = tl.arange(0, BT).to(tl.int64)
    rlen = tl.load(rlen_ptr + i0 + bi, mask=(i0 + bi) < Bi, other=0)
    wlen = tl.load(wlen_ptr + t0 + bt, mask=(t0 + bt) < Bt, other=0)
    rv = tl.arange(0, NP)[None, :] < rlen[:, None]  # (BI, NP)
    wv = tl.arange(0, LP)[None, :] < wlen[:, None]  # (BT, LP)
    rv4 = tl.reshape(rv, (BI, NP, 1, 1))
    wv4 = tl.reshape(wv, (1, 1, BT, LP))
    rlen_f = tl.maximum(rlen, 1).to(tl.float32)
    wlen_f = tl.maximum(wlen, 1).to(tl.float32)
    return rv4, wv4, rlen_f, wlen_f


@triton.jit
def _xsim_fwd_kernel(
    r_ptr, w_ptr, rlen_ptr, wlen_ptr, rinv_ptr, winv_ptr, o1_ptr, o2_ptr,
    Bi, Bt, N, L, D,
    s_rb, s_rn, s_rd, s_wb, s_wl, s_wd,
    s_o1t, s_o1i, s_o2t, s_o2i,
    slope, eps, inv_temp,
    MODE: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BI: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, LP: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_tb = tl.cdiv(Bt, BT)
    i0 = (pid // n_tb) * BI
    t0 = (pid % n_tb) * BT
    cos = _cos_tile(r_ptr, w_ptr, rinv_ptr, winv_ptr, i0, t0, Bi, Bt, N, L, D,
                    s_rb, s_rn, s_rd, s_wb, s_wl, s_wd, FP32_DOT, PREC, BI, NP, BT, LP, BK)
    cos4 = tl.reshape(cos, (BI, NP, BT, LP))
    rv4, wv4, rlen_f, wlen_f = _valid_masks(rlen_ptr, wlen_ptr, i0, t0, Bi, Bt, BI, NP, BT, LP)
    valid = rv4 & wv4
    wv3 = tl.reshape(wv4, (1, BT, LP))
    rv3 = tl.reshape(rv4, (BI, NP, 1))
    bi = tl.arange(0, BI).to(tl.int64)
    bt = tl.arange(0, BT).to(tl.int64)
    omask = ((i0 + bi) < Bi)[:, None] & ((t0 + bt) < Bt)[None, :]
    # a NaN cosine in a valid slot makes its pair NaN (like torch.max in the reference); tl.max drops NaN
    nan4 = tl.where(valid & (cos4 != cos4), 1, 0)
    nan_pair = tl.max(tl.max(nan4, axis=3), axis=1) > 0  # (BI, BT)
    if MODE == 0:
        p = tl.where(valid, tl.where(cos4 > 0, cos4, cos4 * slope), 0.0)
        psq = p * p
        # t2i: normalise over words, max over regions, mean over words
        den_w = tl.sqrt(tl.sum(psq, axis=3)) + eps  # (BI, NP, BT)
        q = tl.where(valid, p / den_w[:, :, :, None], float("-inf"))
        mw = tl.max(q, axis=1)  # (BI, BT, LP)
        t2i = tl.sum(tl.where(wv3, mw, 0.0), axis=2) / wlen_f[None, :]
        # i2t: normalise over regions, max over words, mean over regions
        den_r = tl.sqrt(tl.sum(psq, axis=1)) + eps  # (BI, BT, LP)
        q2 = tl.where(valid, p / den_r[:, None, :, :], float("-inf"))
        mr = tl.max(q2, axis=3)  # (BI, NP, BT)
        i2t = tl.sum(tl.where(rv3, mr, 0.0), axis=1) / rlen_f[:, None]
        t2i = tl.where(nan_pair, float("nan"), t2i)
        i2t = tl.where(nan_pair, float("nan"), i2t)
        tl.store(o1_ptr + (t0 + bt)[None, :] * s_o1t + (i0 + bi)[:, None] * s_o1i, t2i, mask=omask)
        tl.store(o2_ptr + (t0 + bt)[None, :] * s_o2t + (i0 + bi)[:, None] * s_o2i, i2t, mask=omask)
    else:
        cm = tl.where(valid, cos4, float("-inf"))
        mw = tl.max(cm, axis=1)  # (BI, BT, LP)
        if MODE == 1:
            sim = tl.sum(tl.where(wv3, mw, 0.0), axis=2) / wlen_f[None, :]
        else:
            z = tl.where(wv3, mw * inv_temp, float("-inf"))
            zmax = tl.max(z, axis=2)
            zmax = tl.where(zmax == float("-inf"), 0.0, zmax)  # padded pairs: no -inf - -inf
            zs = tl.sum(tl.where(wv3, tl.exp(tl.where(wv3, z, 0.0) - zmax[:, :, None]), 0.0), axis=2)
            sim = (zmax + tl.log(tl.maximum(zs, 1e-30))) / inv_temp
        sim = tl.where(nan_pair, float("nan"), sim)
        tl.store(o1_ptr + (t0 + bt)[None, :] * s_o1t + (i0 + bi)[:, None] * s_o1i, sim, mask=omask)


@triton.jit
def _argmax_onehot(x, AXIS: tl.constexpr, IDX):
    """One-hot (same shape as x) of the first maximum of x along AXIS; IDX = broadcastable index grid.
    NaN ranks above every number (as in torch.max, whose index is the first NaN): x is never +inf here
    (cosines, normalised scores, -inf padding), so NaN is mapped to +inf."""
    x = tl.where(x != x, float("inf"), x)
    mx = tl.max(x, axis=AXIS)
    mx = tl.expand_dims(mx, AXIS)
    big = tl.full(IDX.shape, 1 << 30, tl.int32)
    first = tl.min(tl.where(x == mx, IDX, big), axis=AXIS)
    return IDX == tl.expand_dims(first, AXIS)


@triton.jit
def _dcos_tile(
    cos4, valid, rv4, wv4, rlen_f, wlen_f, g1, g2, slope, eps, inv_temp,
    MODE: tl.constexpr, BI: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, LP: tl.constexpr,
):
    """Gradient of the loss w.r.t. the cosine tile (BI,NP,BT,LP), given output grads g1, g2 (BI,BT)."""
    ridx = tl.reshape(tl.arange(0, NP), (1, NP, 1, 1))
    widx = tl.reshape(tl.arange(0, LP), (1, 1, 1, LP))
    if MODE == 0:
        p = tl.where(valid, tl.where(cos4 > 0, cos4, cos4 * slope), 0.0)
        psq = p * p
        # t2i branch: q = p / (||p[r,:]|| + eps), max over r, mean over w
        nw = tl.sqrt(tl.sum(psq, axis=3))
        den_w = nw + eps
        q = tl.where(valid, p / den_w[:, :, :, None], float("-inf"))
        hot = _argmax_onehot(q, 1, ridx) & valid
        dq = tl.where(hot, (g1 / wlen_f[None, :])[:, None, :, None], 0.0)
        sdp = tl.sum(dq * p, axis=3)  # (BI, NP, BT)
        coef = tl.where(nw > 0, sdp / (den_w * den_w * tl.where(nw > 0, nw, 1.0)), 0.0)
        dp = dq / den_w[:, :, :, None] - p * coef[:, :, :, None]
        # i2t branch: q2 = p / (||p[:,w]|| + eps), max over w, mean over r
        nr = tl.sqrt(tl.sum(psq, axis=1))
        den_r = nr + eps
        q2 = tl.where(valid, p / den_r[:, None, :, :], float("-inf"))
        hot2 = _argmax_onehot(q2, 3, widx) & valid
        dq2 = tl.where(hot2, (g2 / rlen_f[:, None])[:, None, :, None], 0.0)
        sdp2 = tl.sum(dq2 * p, axis=1)  # (BI, BT, LP)
        coef2 = tl.where(nr > 0, sdp2 / (den_r * den_r * tl.where(nr > 0, nr, 1.0)), 0.0)
        dp = dp + dq2 / den_r[:, None, :, :] - p * coef2[:, None, :, :]
        dc = tl.where(valid, tl.where(cos4 > 0, dp, dp * slope), 0.0)
    else:
        cm = tl.where(valid, cos4, float("-inf"))
        hot = _argmax_onehot(cm, 1, ridx) & valid
        wv3 = tl.reshape(wv4, (1, BT, LP))
        if MODE == 1:
            wgt = tl.where(wv3, (g1 / wlen_f[None, :])[:, :, None], 0.0)  # (BI, BT, LP)
        else:
            mw = tl.max(cm, axis=1)
            z = tl.where(wv3, mw * inv_temp, float("-inf"))
            zmax = tl.max(z, axis=2)
            zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
            e = tl.where(wv3, tl.exp(tl.where(wv3, z, 0.0) - zmax[:, :, None]), 0.0)
            wgt = g1[:, :, None] * e / tl.maximum(tl.sum(e, axis=2), 1e-30)[:, :, None]
        dc = tl.where(hot, wgt[:, None, :, :], 0.0)
    return dc


@triton.jit
def _xsim_bwd_kernel(
    r_ptr, w_ptr, rlen_ptr, wlen_ptr, rinv_ptr, winv_ptr, g1_ptr, g2_ptr, gacc_ptr,
    Bi, Bt, N, L, D,
    s_rb, s_rn, s_rd, s_wb, s_wl, s_wd,
    s_g1t, s_g1i, s_g2t, s_g2i,
    slope, eps, inv_temp,
    OWN_IMAGES: tl.constexpr, SPLIT: tl.constexpr,
    MODE: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BI: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, LP: tl.constexpr, BK: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    if OWN_IMAGES:
        n_other = tl.cdiv(Bt, BT)
        n_own_rows = Bi
        own_len = N
    else:
        n_other = tl.cdiv(Bi, BI)
        n_own_rows = Bt
        own_len = L
    bi = tl.arange(0, BI).to(tl.int64)
    bt = tl.arange(0, BT).to(tl.int64)
    m = tl.arange(0, BI * NP).to(tl.int64)
    c = tl.arange(0, BT * LP).to(tl.int64)
    for j in range(sp, n_other, SPLIT):
        if OWN_IMAGES:
            i0 = pid * BI
            t0 = j * BT  # < Bt: fits int32; widened below via int64 aranges
        else:
            i0 = j * BI
            t0 = pid * BT
        cos = _cos_tile(r_ptr, w_ptr, rinv_ptr, winv_ptr, i0, t0, Bi, Bt, N, L, D,
                        s_rb, s_rn, s_rd, s_wb, s_wl, s_wd, FP32_DOT, PREC, BI, NP, BT, LP, BK)
        cos4 = tl.reshape(cos, (BI, NP, BT, LP))
        rv4, wv4, rlen_f, wlen_f = _valid_masks(rlen_ptr, wlen_ptr, i0, t0, Bi, Bt, BI, NP, BT, LP)
        valid = rv4 & wv4
        gmask = ((i0 + bi) < Bi)[:, None] & ((t0 + bt) < Bt)[None, :]
        g1 = tl.load(g1_ptr + (t0 + bt)[None, :] * s_g1t + (i0 + bi)[:, None] * s_g1i, mask=gmask, other=0.0)
        if MODE == 0:
            g2 = tl.load(g2_ptr + (t0 + bt)[None, :] * s_g2t + (i0 + bi)[:, None] * s_g2i, mask=gmask, other=0.0)
        else:
            g2 = g1
        dc4 = _dcos_tile(cos4, valid, rv4, wv4, rlen_f, wlen_f, g1.to(tl.float32), g2.to(tl.float32),
                         slope, eps, inv_temp, MODE, BI, NP, BT, LP)
        dc = tl.reshape(dc4, (BI * NP, BT * LP))
        img = i0 + m // NP
        r = m % NP
        cap = t0 + c // LP
        w = c % LP
        rowok = (img < Bi) & (r < N)
        colok = (cap < Bt) & (w < L)
        # padded slots must not be read as dot operands below: 0 * NaN garbage would leak into valid rows
        row_valid = rowok & (r < tl.load(rlen_ptr + img, mask=img < Bi, other=0))
        col_valid = colok & (w < tl.load(wlen_ptr + cap, mask=cap < Bt, other=0))
        if OWN_IMAGES:
            winv = tl.load(winv_ptr + cap * L + w, mask=col_valid, other=0.0)
            lhs = dc * winv[None, :]  # (BI*NP, BT*LP)
            obase = ((sp * n_own_rows + img) * own_len + r) * D
            omask = rowok
            src_base = cap * s_wb + w * s_wl
            src_ok = col_valid
            src_sd = s_wd
            src_ptr = w_ptr
        else:
            rinv = tl.load(rinv_ptr + img * N + r, mask=row_valid, other=0.0)
            lhs = tl.trans(dc * rinv[:, None])  # (BT*LP, BI*NP)
            obase = ((sp * n_own_rows + cap) * own_len + w) * D
            omask = colok
            src_base = img * s_rb + r * s_rn
            src_ok = row_valid
            src_sd = s_rd
            src_ptr = r_ptr
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD).to(tl.int64)
            dok = d < D
            src = tl.load(src_ptr + src_base[:, None] + d[None, :] * src_sd,
                          mask=src_ok[:, None] & dok[None, :], other=0.0)
            part = tl.zeros((lhs.shape[0], BD), dtype=tl.float32)
            if FP32_DOT:
                part = fdot(lhs, src, part, FP32_DOT, PREC)
            else:  # 16-bit features: the cosine-gradient tile is rounded to the same dtype (flash-attn style)
                part = fdot(lhs.to(src.dtype), src, part, FP32_DOT, PREC)
            optr = gacc_ptr + obase[:, None] + d[None, :]
            om = omask[:, None] & dok[None, :]
            tl.store(optr, tl.load(optr, mask=om, other=0.0) + part, mask=om)


# ----------------------------------------------------------------------------------------------
# host-side launchers


def _tile_config(N: int, L: int, Bi: int, Bt: int, backward: bool = False, own_images: bool = True,
                 fp32_dot: bool = True) -> dict:
    np_ = next_pow2(N)
    lp = next_pow2(L)
    if interpreting():
        row_target, col_target, bk, bd, warps = 256, 256, 128, 128, 4
    elif backward:
        # the backward keeps many tile-sized fp32 temporaries live. Register use read back from ptxas
        # (kernels/_aot.py + cuobjdump, sm_80 and sm_90, N=36, L=32): with 16-bit features the image-owner
        # kernel fits 64x64 tiles with BD=64 (<= 208 registers, no spills); fp32 (tf32x3 dots) and the
        # caption-owner kernel only 64x32 with BD=32
        if own_images and not fp32_dot:
            row_target, col_target, bk, bd, warps = 64, 64, 32, 64, 8
        else:
            row_target, col_target, bk, bd, warps = 64, 32, 32, 32, 8
    else:
        row_target, col_target, bk, bd, warps = 64, 128, 32, 64, 8
    bi = max(1, min(next_pow2(Bi), max(16 // np_, row_target // np_)))
    bt = max(1, min(next_pow2(Bt), max(16 // lp, col_target // lp)))
    # tl.dot needs both tile extents >= 16
    while bi * np_ < 16:
        bi *= 2
    while bt * lp < 16:
        bt *= 2
    return dict(BI=bi, NP=np_, BT=bt, LP=lp, BK=bk, BD=bd, num_warps=warps)


def cross_similarity_forward(
    regions: torch.Tensor, region_lens: torch.Tensor, words: torch.Tensor, word_lens: torch.Tensor,
    rinv: torch.Tensor, winv: torch.Tensor, *, mode: int, negative_slope: float = 0.1, eps: float = 1e-8,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel.

    Args:
        regions (Bi,N,D), words (Bt,L,D): fp32/fp16/bf16, any strides, same device.
        region_lens (Bi,), word_lens (Bt,): int64 valid counts in [1, N] / [1, L] (validated by caller).
        rinv (Bi,N), winv (Bt,L): fp32 contiguous inverse norms (:func:`inverse_norms`).
        mode: MODE_RELEVANCE, MODE_HARD_MEAN or MODE_HARD_LSE.
    Returns:
        MODE_RELEVANCE: ``(t2i (Bt,Bi), i2t (Bi,Bt))`` fp32; hard modes: ``(sim (Bi,Bt), None)`` fp32.
    """
    Bi, N, D = regions.shape
    Bt, L, _ = words.shape
    dev = regions.device
    cfg = _tile_config(N, L, Bi, Bt)
    fp32_dot, prec = dot_config(regions.dtype, words.dtype)
    if mode == MODE_RELEVANCE:
        o1 = torch.empty((Bt, Bi), device=dev, dtype=torch.float32)
        o2 = torch.empty((Bi, Bt), device=dev, dtype=torch.float32)
        s1 = (o1.stride(0), o1.stride(1))
        s2 = (o2.stride(1), o2.stride(0))
    else:
        o1 = torch.empty((Bi, Bt), device=dev, dtype=torch.float32)
        o2 = None
        s1 = (o1.stride(1), o1.stride(0))
        s2 = (0, 0)
    if Bi == 0 or Bt == 0:
        return o1, o2
    grid = (triton.cdiv(Bi, cfg["BI"]) * triton.cdiv(Bt, cfg["BT"]),)
    launch(_xsim_fwd_kernel)[grid](
        regions, words, region_lens, word_lens, rinv, winv, o1, o2 if o2 is not None else unused_arg(o1),
        Bi, Bt, N, L, D,
        regions.stride(0), regions.stride(1), regions.stride(2), words.stride(0), words.stride(1), words.stride(2),
        s1[0], s1[1], s2[0], s2[1],
        float(negative_slope), float(eps), 1.0 / float(temperature),
        MODE=mode, FP32_DOT=fp32_dot, PREC=prec,
        BI=cfg["BI"], NP=cfg["NP"], BT=cfg["BT"], LP=cfg["LP"], BK=cfg["BK"], num_warps=cfg["num_warps"],
    )
    return o1, o2


def cross_similarity_backward(
    regions: torch.Tensor, region_lens: torch.Tensor, words: torch.Tensor, word_lens: torch.Tensor,
    rinv: torch.Tensor, winv: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor | None, *, mode: int,
    negative_slope: float = 0.1, eps: float = 1e-8, temperature: float = 1.0,
    need_regions: bool = True, need_words: bool = True, split: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. the *normalised* regions and words (fp32, shapes (Bi,N,D), (Bt,L,D)).

    ``g1``/``g2`` are the output gradients in the layout returned by :func:`cross_similarity_forward`
    (``g1`` = d t2i (Bt,Bi) and ``g2`` = d i2t (Bi,Bt) for MODE_RELEVANCE; ``g1`` = d sim (Bi,Bt) otherwise).
    Padded region/word slots get zero gradient. Combine with :func:`unnormalize_grad` for raw inputs.
    """
    Bi, N, D = regions.shape
    Bt, L, _ = words.shape
    dev = regions.device
    fp32_dot, prec = dot_config(regions.dtype, words.dtype)
    if mode == MODE_RELEVANCE:
        sg1 = (g1.stride(0), g1.stride(1))
        sg2 = (g2.stride(1), g2.stride(0))
    else:
        sg1 = (g1.stride(1), g1.stride(0))
        sg2 = (0, 0)
    outs: list[torch.Tensor | None] = []
    for own_images, need in ((True, need_regions), (False, need_words)):
        if not need:
            outs.append(None)
            continue
        cfg = _tile_config(N, L, Bi, Bt, backward=True, own_images=own_images, fp32_dot=fp32_dot)
        n_own = triton.cdiv(Bi, cfg["BI"]) if own_images else triton.cdiv(Bt, cfg["BT"])
        n_other = triton.cdiv(Bt, cfg["BT"]) if own_images else triton.cdiv(Bi, cfg["BI"])
        if split is None:
            sp = 1 if interpreting() else max(1, min(n_other, 8, triton.cdiv(2 * num_sms(dev), max(n_own, 1))))
        else:
            sp = max(1, min(int(split), max(n_other, 1)))
        rows, length = (Bi, N) if own_images else (Bt, L)
        acc = torch.zeros((sp, rows, length, D), device=dev, dtype=torch.float32)
        if Bi > 0 and Bt > 0:
            launch(_xsim_bwd_kernel)[(n_own, sp)](
                regions, words, region_lens, word_lens, rinv, winv, g1, g2 if g2 is not None else g1, acc,
                Bi, Bt, N, L, D,
                regions.stride(0), regions.stride(1), regions.stride(2),
                words.stride(0), words.stride(1), words.stride(2),
                sg1[0], sg1[1], sg2[0], sg2[1],
                float(negative_slope), float(eps), 1.0 / float(temperature),
                OWN_IMAGES=own_images, SPLIT=sp, MODE=mode, FP32_DOT=fp32_dot, PREC=prec,
                BI=cfg["BI"], NP=cfg["NP"], BT=cfg["BT"], LP=cfg["LP"], BK=cfg["BK"], BD=cfg["BD"],
                num_warps=cfg["num_warps"],
            )
        outs.append(acc[0] if sp == 1 else acc.sum(0))
    return outs[0], outs[1]


def _aot_exercise(dtype: torch.dtype) -> None:
    """Run every launcher of this module once on tiny CPU tensors (for :mod:`._aot` capture)."""
    Bi, Bt, N, L, D = 3, 4, 36, 32, 64
    regions = torch.randn(Bi, N, D).to(dtype)
    words = torch.randn(Bt, L, D).to(dtype)
    rl = torch.full((Bi,), N, dtype=torch.int64)
    wl = torch.full((Bt,), L, dtype=torch.int64)
    rinv = inverse_norms(regions, 1e-8)
    winv = inverse_norms(words, 1e-8)
    for mode in (MODE_RELEVANCE, MODE_HARD_MEAN, MODE_HARD_LSE):
        cross_similarity_forward(regions, rl, words, wl, rinv, winv, mode=mode)
        g1 = torch.zeros((Bt, Bi) if mode == MODE_RELEVANCE else (Bi, Bt))
        g2 = torch.zeros((Bi, Bt)) if mode == MODE_RELEVANCE else None
        cross_similarity_backward(regions, rl, words, wl, rinv, winv, g1, g2, mode=mode, split=2)


from aahr_fast.ops import _triton_glue as _glue  # noqa: E402  (registers the "triton" backend)

_glue.register_family("cross_similarity", __name__)

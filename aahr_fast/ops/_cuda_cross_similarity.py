"""The ``"cuda"`` backend of the cross-similarity ops: autograd glue around the CUDA kernels.

Plugin module of :mod:`aahr_fast.ops._dispatch` (the dispatcher imports ``aahr_fast.ops._cuda_<family>``
for the cuda backend). Kernels: ``csrc/cuda/cross_similarity.cu`` (torch-free), bound by
``csrc/cuda/cuda_ops_binding.cpp`` as ``torch.ops.aahr_fast.xsim_cuda_forward`` / ``xsim_cuda_backward``;
both are built into the one extension by :mod:`aahr_fast.ops._ext` only when torch has CUDA.

Same contract as the reference (:func:`aahr_fast.ops.fragment_word_relevance`,
:func:`aahr_fast.ops.hard_assignment_similarity`): outputs in the input dtype; inputs are made
contiguous; float64 runs the reference; ``chunk_size`` is ignored (tiled kernel, O(Bi*Bt) memory).
The backward accumulates with fp32 atomics, so its summation order (last bits) is not deterministic.
"""
from __future__ import annotations

import torch

from ..kernels._host import inverse_norms, unnormalize_grad
from . import _ext
from ._dispatch import get_impl, register

__all__ = ["fragment_word_relevance_cuda", "hard_assignment_similarity_cuda"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODE_RELEVANCE, MODE_HARD_MEAN, MODE_HARD_LSE = 0, 1, 2


_ops = _ext.ops_namespace


class _XsimCudaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, regions, words, region_lens, word_lens, mode, slope, eps, temperature):
        n, l = regions.shape[1], words.shape[1]
        rvalid = torch.arange(n, device=regions.device)[None, :] < region_lens[:, None]
        wvalid = torch.arange(l, device=words.device)[None, :] < word_lens[:, None]
        rinv = inverse_norms(regions, eps, rvalid)
        winv = inverse_norms(words, eps, wvalid)
        a, b = _ops().xsim_cuda_forward(regions, region_lens, words, word_lens, rinv, winv, mode, slope, eps,
                                        temperature)
        ctx.save_for_backward(regions, words, region_lens, word_lens, rinv, winv, rvalid, wvalid)
        ctx.cfg = (mode, slope, eps, temperature)
        if mode != MODE_RELEVANCE:
            return a.to(regions.dtype)
        return a.to(regions.dtype), b.to(regions.dtype)

    @staticmethod
    def backward(ctx, *grads):
        regions, words, region_lens, word_lens, rinv, winv, rvalid, wvalid = ctx.saved_tensors
        mode, slope, eps, temperature = ctx.cfg
        bi, bt = regions.shape[0], words.shape[0]
        if mode == MODE_RELEVANCE:
            ga = grads[0] if grads[0] is not None else torch.zeros((bt, bi), device=regions.device)
            gb = grads[1] if grads[1] is not None else torch.zeros((bi, bt), device=regions.device)
        else:
            ga = grads[0]
            gb = ga
        need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_r, g_w = _ops().xsim_cuda_backward(regions, region_lens, words, word_lens, rinv, winv, ga.float(),
                                             gb.float(), mode, slope, eps, temperature, need_r, need_w)
        dr = unnormalize_grad(regions, rinv, g_r, eps, rvalid).to(regions.dtype) if need_r else None
        dw = unnormalize_grad(words, winv, g_w, eps, wvalid).to(words.dtype) if need_w else None
        return dr, dw, None, None, None, None, None, None


def fragment_word_relevance_cuda(regions, region_lens, words, word_lens, *, negative_slope=0.1, eps=1e-8,
                                 chunk_size=None, paper_compat=False):
    """CUDA backend of :func:`aahr_fast.ops.fragment_word_relevance` (same contract)."""
    if regions.dtype not in _KERNEL_DTYPES:
        return get_impl("fragment_word_relevance", "reference")(
            regions, region_lens, words, word_lens, negative_slope=negative_slope, eps=eps, chunk_size=chunk_size,
            paper_compat=paper_compat)
    if paper_compat:
        region_lens = torch.full_like(region_lens, regions.shape[1])
    return _XsimCudaFn.apply(regions, words, region_lens, word_lens, MODE_RELEVANCE, float(negative_slope),
                             float(eps), 1.0)


def hard_assignment_similarity_cuda(regions, region_lens, words, word_lens, *, agg="mean", temperature=0.1,
                                    eps=1e-8, chunk_size=None):
    """CUDA backend of :func:`aahr_fast.ops.hard_assignment_similarity` (same contract)."""
    if regions.dtype not in _KERNEL_DTYPES:
        return get_impl("hard_assignment_similarity", "reference")(
            regions, region_lens, words, word_lens, agg=agg, temperature=temperature, eps=eps, chunk_size=chunk_size)
    mode = MODE_HARD_MEAN if agg == "mean" else MODE_HARD_LSE
    return _XsimCudaFn.apply(regions, words, region_lens, word_lens, mode, 0.0, float(eps), float(temperature))


register("fragment_word_relevance", "cuda", fragment_word_relevance_cuda)
register("hard_assignment_similarity", "cuda", hard_assignment_similarity_cuda)

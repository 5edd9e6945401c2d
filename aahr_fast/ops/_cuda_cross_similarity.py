"""The ``"cuda"`` backend of the cross-similarity ops: registered operators around the CUDA kernels.

Plugin module of :mod:`aahr_fast.ops._dispatch` (the dispatcher imports ``aahr_fast.ops._cuda_<family>``
for the cuda backend). Kernels: ``csrc/cuda/cross_similarity.cu`` (torch-free), bound by
``csrc/cuda/cuda_ops_binding.cpp`` as ``torch.ops.aahr_fast.xsim_cuda_forward`` / ``xsim_cuda_backward``;
both are built into the one extension by :mod:`aahr_fast.ops._ext` only when torch has CUDA.

Operators (:mod:`aahr_fast.ops._library`, ``torch.library.custom_op`` with ``device_types="cuda"``):
``aahr::cross_similarity_cuda`` and ``aahr::cross_similarity_cuda_backward``, the same schemas as the
triton / cpp operators (mode argument, shared by both public ops), each with a fake implementation (no data
read, no extension needed: the module imports and the fakes run on a CPU-only machine) and wired with
``register_autograd``. Under ``torch.compile`` they are opaque calls (no graph break).

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
from ._library import fused_op, placeholder
from ._schemas import define_cross_similarity

__all__ = ["fragment_word_relevance_cuda", "hard_assignment_similarity_cuda", "cross_similarity_op",
           "cross_similarity_backward_op"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODE_RELEVANCE, MODE_HARD_MEAN, MODE_HARD_LSE = 0, 1, 2
_MODES = {"relevance": MODE_RELEVANCE, "hard_mean": MODE_HARD_MEAN, "hard_lse": MODE_HARD_LSE}


_ops = _ext.ops_namespace


def _norms(regions, region_lens, words, word_lens, eps):
    n, l = regions.shape[1], words.shape[1]
    rvalid = torch.arange(n, device=regions.device)[None, :] < region_lens[:, None]
    wvalid = torch.arange(l, device=words.device)[None, :] < word_lens[:, None]
    return inverse_norms(regions, eps, rvalid), inverse_norms(words, eps, wvalid), rvalid, wvalid


def _xsim_fwd(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    rinv, winv, _, _ = _norms(regions, region_lens, words, word_lens, eps)
    a, b = _ops().xsim_cuda_forward(regions.contiguous(), region_lens, words.contiguous(), word_lens, rinv, winv,
                                    _MODES[mode], slope, eps, temperature)
    a = a.to(regions.dtype)
    return a, (b.to(regions.dtype) if mode == "relevance" else placeholder(a))


def _xsim_bwd(grad_a, grad_b, regions, region_lens, words, word_lens, mode, slope, eps, temperature, needs):
    rinv, winv, rvalid, wvalid = _norms(regions, region_lens, words, word_lens, eps)
    ga = grad_a.float()
    gb = grad_b.float() if mode == "relevance" else ga
    g_r, g_w = _ops().xsim_cuda_backward(regions.contiguous(), region_lens, words.contiguous(), word_lens, rinv, winv,
                                         ga, gb, _MODES[mode], slope, eps, temperature, needs[0], needs[1])
    dr = unnormalize_grad(regions, rinv, g_r, eps, rvalid).to(regions.dtype) if needs[0] else placeholder(regions)
    dw = unnormalize_grad(words, winv, g_w, eps, wvalid).to(words.dtype) if needs[1] else placeholder(words)
    return dr, dw


#: ``aahr::cross_similarity_cuda`` / ``aahr::cross_similarity_cuda_backward``: the schemas, fakes and autograd of
#: :func:`aahr_fast.ops._schemas.define_cross_similarity`. CUDA tensors only (NotImplementedError on other devices).
cross_similarity_op, cross_similarity_backward_op = define_cross_similarity(
    "cuda", _xsim_fwd, _xsim_bwd, lambda name, schema, impl, fake: fused_op(name, schema, impl, fake,
                                                                            device_types="cuda"))


def fragment_word_relevance_cuda(regions, region_lens, words, word_lens, *, negative_slope=0.1, eps=1e-8,
                                 chunk_size=None, paper_compat=False):
    """CUDA backend of :func:`aahr_fast.ops.fragment_word_relevance` (same contract; one operator)."""
    if regions.dtype not in _KERNEL_DTYPES:
        return get_impl("fragment_word_relevance", "reference")(
            regions, region_lens, words, word_lens, negative_slope=negative_slope, eps=eps, chunk_size=chunk_size,
            paper_compat=paper_compat)
    if paper_compat:
        region_lens = torch.full_like(region_lens, regions.shape[1])
    return cross_similarity_op(regions, region_lens, words, word_lens, "relevance", float(negative_slope), float(eps),
                               1.0)


def hard_assignment_similarity_cuda(regions, region_lens, words, word_lens, *, agg="mean", temperature=0.1,
                                    eps=1e-8, chunk_size=None):
    """CUDA backend of :func:`aahr_fast.ops.hard_assignment_similarity` (same contract; one operator)."""
    if regions.dtype not in _KERNEL_DTYPES:
        return get_impl("hard_assignment_similarity", "reference")(
            regions, region_lens, words, word_lens, agg=agg, temperature=temperature, eps=eps, chunk_size=chunk_size)
    mode = "hard_mean" if agg == "mean" else "hard_lse"
    return cross_similarity_op(regions, region_lens, words, word_lens, mode, 0.0, float(eps), float(temperature))[0]


register("fragment_word_relevance", "cuda", fragment_word_relevance_cuda)
register("hard_assignment_similarity", "cuda", hard_assignment_similarity_cuda)

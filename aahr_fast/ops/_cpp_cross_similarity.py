"""C++ CPU backend of the cross-similarity ops (``csrc/cpu/cross_similarity.cpp``).

Imported by the dispatcher on first use of the ``cpp`` backend; registers
``fragment_word_relevance`` and ``hard_assignment_similarity``. The padded (B, M, D) inputs are packed to
their valid rows here (a view when nothing is padded), so the kernel never sees padding; autograd's
indexing backward scatters the packed gradients back (zeros in the padding). float16 / bfloat16 inputs
run in float32 and the outputs are cast back. ``chunk_size`` is ignored: the kernel is tiled and needs
O(Bi*Bt) extra memory. Not twice differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import _ext
from ._common import length_mask
from ._dispatch import register


def _pack(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, M, D) padded -> (sum(lens), D) valid rows in order (a reshape when nothing is padded)."""
    b, m, d = x.shape
    if bool((lens == m).all()):
        return x.reshape(b * m, d)
    return x[length_mask(lens, m)]


class CrossSimilarityCpp(torch.autograd.Function):
    """Autograd wrapper of ``torch.ops.aahr_fast.cross_similarity_{forward,backward}`` on packed inputs.

    forward(regions (Sr, D), region_lens (Bi,) int64, words (Sw, D), word_lens (Bt,) int64, mode, slope,
    eps, temperature) -> (a, b): relevance: t2i (Bt, Bi), i2t (Bi, Bt); hard modes: sim (Bi, Bt), empty.
    """

    @staticmethod
    def forward(ctx, regions, region_lens, words, word_lens, mode, slope, eps, temperature):
        a, b = torch.ops.aahr_fast.cross_similarity_forward(
            regions, region_lens, words, word_lens, mode, slope, eps, temperature
        )
        ctx.save_for_backward(regions, region_lens, words, word_lens)
        ctx.cfg = (mode, slope, eps, temperature)
        if mode != "relevance":
            ctx.mark_non_differentiable(b)
        return a, b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a, grad_b):
        regions, region_lens, words, word_lens = ctx.saved_tensors
        mode = ctx.cfg[0]
        bi, bt = region_lens.numel(), word_lens.numel()
        if grad_a is None:
            grad_a = regions.new_zeros((bt, bi) if mode == "relevance" else (bi, bt))
        if grad_b is None or mode != "relevance":
            grad_b = regions.new_zeros((bi, bt) if mode == "relevance" else (0,))
        d_regions, d_words = torch.ops.aahr_fast.cross_similarity_backward(
            grad_a, grad_b, regions, region_lens, words, word_lens, *ctx.cfg
        )
        return d_regions, None, d_words, None, None, None, None, None


def _run(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    _ext.load_extension()
    out_dtype = regions.dtype
    if out_dtype not in (torch.float32, torch.float64):
        regions, words = regions.float(), words.float()
    a, b = CrossSimilarityCpp.apply(
        _pack(regions, region_lens), region_lens, _pack(words, word_lens), word_lens, mode,
        float(slope), float(eps), float(temperature),
    )
    return a.to(out_dtype), b.to(out_dtype)


def fragment_word_relevance_cpp(
    regions: torch.Tensor,
    region_lens: torch.Tensor,
    words: torch.Tensor,
    word_lens: torch.Tensor,
    *,
    negative_slope: float = 0.1,
    eps: float = 1e-8,
    chunk_size: Optional[int] = None,
    paper_compat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ backend of :func:`aahr_fast.ops.fragment_word_relevance` (validated inputs; same outputs)."""
    if paper_compat:
        region_lens = torch.full_like(region_lens, regions.shape[1])
    return _run(regions, region_lens, words, word_lens, "relevance", negative_slope, eps, 1.0)


def hard_assignment_similarity_cpp(
    regions: torch.Tensor,
    region_lens: torch.Tensor,
    words: torch.Tensor,
    word_lens: torch.Tensor,
    *,
    agg: str = "mean",
    temperature: float = 0.1,
    eps: float = 1e-8,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """C++ backend of :func:`aahr_fast.ops.hard_assignment_similarity` (validated inputs; same output)."""
    mode = "hard_mean" if agg == "mean" else "hard_lse"
    return _run(regions, region_lens, words, word_lens, mode, 0.0, eps, temperature)[0]


register("fragment_word_relevance", "cpp", fragment_word_relevance_cpp)
register("hard_assignment_similarity", "cpp", hard_assignment_similarity_cpp)

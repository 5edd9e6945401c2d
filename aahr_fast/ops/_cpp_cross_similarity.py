"""C++ CPU backend of the cross-similarity ops (``csrc/cpu/cross_similarity.cpp``).

Imported by the dispatcher on first use of the ``cpp`` backend; registers
``fragment_word_relevance`` and ``hard_assignment_similarity`` through the operators
``aahr::cross_similarity_cpp`` / ``aahr::cross_similarity_cpp_backward`` (:mod:`aahr_fast.ops._library`). The
padded (B, M, D) inputs are packed to their valid rows inside the operator, so the kernel never sees padding
and the packed (data-dependent) size never appears in a traced graph; the backward operator scatters the packed
gradients back (zeros in the padding). float16 / bfloat16 inputs
run in float32 and the outputs are cast back. ``chunk_size`` is ignored: the kernel is tiled and needs
O(Bi*Bt) extra memory. Not twice differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._common import length_mask
from ._dispatch import register
from ._library import fused_op
from ._schemas import XSIM_ARGS, register_xsim_autograd, xsim_fwd_fake


def _pack(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, M, D) padded -> (sum(lens), D) valid rows in order (boolean-mask gather, inside the operator)."""
    return x[length_mask(lens, x.shape[1])]


def _unpack(packed: torch.Tensor, like: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(sum(lens), D) -> (B, M, D) with zeros in the padding."""
    out = packed.new_zeros(like.shape)
    out[length_mask(lens, like.shape[1])] = packed
    return out


def _xsim_fwd(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    a, b = _ext.ops_namespace().cross_similarity_forward(
        _pack(regions, region_lens), region_lens, _pack(words, word_lens), word_lens, mode, slope, eps, temperature)
    return a, b


def _xsim_bwd(grad_a, grad_b, regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    d_r, d_w = _ext.ops_namespace().cross_similarity_backward(
        grad_a.contiguous(), grad_b.contiguous(), _pack(regions, region_lens), region_lens, _pack(words, word_lens),
        word_lens, mode, slope, eps, temperature)
    return _unpack(d_r, regions, region_lens), _unpack(d_w, words, word_lens)


def _xsim_bwd_fake(grad_a, grad_b, regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    return regions.new_empty(regions.shape), words.new_empty(words.shape)


#: ``aahr::cross_similarity_cpp(regions (Bi, N, D), region_lens (Bi,), words (Bt, L, D), word_lens (Bt,), mode,
#: slope, eps, temperature) -> (a, b)``: mode "relevance": t2i (Bt, Bi), i2t (Bi, Bt); "hard_mean" / "hard_lse":
#: sim (Bi, Bt), empty (0,). Padded inputs; the operator packs the valid rows for the kernel.
cross_similarity_op = fused_op("cross_similarity_cpp", f"({XSIM_ARGS}) -> (Tensor, Tensor)", _xsim_fwd, xsim_fwd_fake,
                               device_types="cpu")
cross_similarity_backward_op = fused_op(
    "cross_similarity_cpp_backward", f"(Tensor grad_a, Tensor grad_b, {XSIM_ARGS}) -> (Tensor, Tensor)",
    _xsim_bwd, _xsim_bwd_fake, device_types="cpu")


register_xsim_autograd(cross_similarity_op, lambda needs, inputs: cross_similarity_backward_op(*inputs))


def _run(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    out_dtype = regions.dtype
    if out_dtype not in (torch.float32, torch.float64):
        regions, words = regions.float(), words.float()
    a, b = cross_similarity_op(regions, region_lens, words, word_lens, mode, float(slope), float(eps),
                               float(temperature))
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

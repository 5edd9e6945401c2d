"""Region-word cross similarity: AAHR/SCAN fragment relevance and CHAN hard-assignment coding.

Public ops (dispatching, see :mod:`aahr_fast.ops._dispatch`): :func:`fragment_word_relevance`,
:func:`hard_assignment_similarity`. Their plain-PyTorch references, which define correctness, are
:func:`fragment_word_relevance_reference` and :func:`hard_assignment_similarity_reference`.

Notation: ``Bi`` images with ``N`` region slots, ``Bt`` captions with ``L`` word (token) slots, feature
size ``D``. ``region_lens[i]`` / ``word_lens[j]`` are the numbers of valid slots; padding slots (at
the end) are masked everywhere: they never enter a normalisation, a max or a mean, and receive zero
gradient. The reference builds the full (Bt, Bi, L, N) score tensor (``chunk_size`` images at a time when
given); the C++ backend tiles it and needs O(Bi*Bt) extra memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError, DataError
from ._common import (
    check_lengths,
    check_nonempty,
    check_positive,
    check_same_device,
    check_tensor,
    common_float_dtype,
    length_mask,
)
from ._dispatch import dispatch, register

__all__ = [
    "fragment_word_relevance",
    "hard_assignment_similarity",
    "fragment_word_relevance_reference",
    "hard_assignment_similarity_reference",
]


def _validate(op, regions, region_lens, words, word_lens, chunk_size, eps):
    check_tensor(op, "regions", regions, 3)
    check_tensor(op, "words", words, 3)
    check_same_device(op, regions=regions, words=words)
    bi, n, d = regions.shape
    bt, l, dw = words.shape
    check_nonempty(op, **{"regions.shape[0] (Bi)": bi, "words.shape[0] (Bt)": bt,
                          "regions.shape[1] (N)": n, "words.shape[1] (L)": l, "feature size D": d})
    if dw != d:
        raise DataError(f"{op}: feature sizes differ: regions D={d}, words D={dw}")
    region_lens = check_lengths(op, "region_lens", region_lens, bi, n, regions.device)
    word_lens = check_lengths(op, "word_lens", word_lens, bt, l, words.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(f"{op}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    check_positive(op, "eps", eps)
    dt = common_float_dtype(op, regions=regions, words=words)
    return regions.to(dt), region_lens, words.to(dt), word_lens


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(||x||_2, eps) over the last dim (F.normalize; an all-zero vector stays zero)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _image_chunks(bi: int, chunk_size: Optional[int]):
    step = bi if chunk_size is None else chunk_size
    for i0 in range(0, bi, step):
        yield i0, min(bi, i0 + step)


def fragment_word_relevance_reference(
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
    """Plain-PyTorch reference of :func:`fragment_word_relevance` (same arguments, no validation).

    Differentiable through autograd. Builds (Bt, chunk, L, N) score tensors.
    """
    bi, n, _ = regions.shape
    bt, l, _ = words.shape
    if paper_compat:
        region_lens = torch.full_like(region_lens, n)
    rmask = length_mask(region_lens, n)  # (Bi, N)
    wmask = length_mask(word_lens, l)  # (Bt, L)
    # zero the padding first so that garbage (even NaN) there cannot leak into values or gradients
    r_hat = _normalize(torch.where(rmask[..., None], regions, 0), eps)
    w_hat = _normalize(torch.where(wmask[..., None], words, 0), eps)
    t2i_parts, i2t_parts = [], []
    for i0, i1 in _image_chunks(bi, chunk_size):
        rm = rmask[i0:i1]
        valid = wmask[:, None, :, None] & rm[None, :, None, :]  # (Bt, b, L, N)
        cos = torch.einsum("jwd,ird->jiwr", w_hat, r_hat[i0:i1])
        s = torch.where(valid, F.leaky_relu(cos, negative_slope), 0)
        # t2i: for each region, L2-normalise over the caption's valid words; max over valid regions;
        # mean over valid words.
        u = s / (torch.linalg.vector_norm(s, dim=2, keepdim=True) + eps)
        best_region = u.masked_fill(~valid, float("-inf")).max(dim=3).values  # (Bt, b, L)
        t2i = torch.where(wmask[:, None, :], best_region, 0).sum(2) / word_lens[:, None]
        # i2t: for each word, L2-normalise over the image's valid regions; max over valid words;
        # mean over valid regions.
        v = s / (torch.linalg.vector_norm(s, dim=3, keepdim=True) + eps)
        best_word = v.masked_fill(~valid, float("-inf")).max(dim=2).values  # (Bt, b, N)
        i2t = torch.where(rm[None], best_word, 0).sum(2) / region_lens[None, i0:i1]
        t2i_parts.append(t2i)
        i2t_parts.append(i2t.t())
    return torch.cat(t2i_parts, dim=1), torch.cat(i2t_parts, dim=0)


def hard_assignment_similarity_reference(
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
    """Plain-PyTorch reference of :func:`hard_assignment_similarity` (same arguments, no validation)."""
    bi, n, _ = regions.shape
    bt, l, _ = words.shape
    rmask = length_mask(region_lens, n)
    wmask = length_mask(word_lens, l)
    r_hat = _normalize(torch.where(rmask[..., None], regions, 0), eps)
    w_hat = _normalize(torch.where(wmask[..., None], words, 0), eps)
    parts = []
    for i0, i1 in _image_chunks(bi, chunk_size):
        cos = torch.einsum("jwd,ird->jiwr", w_hat, r_hat[i0:i1])
        best = cos.masked_fill(~rmask[None, i0:i1, None, :], float("-inf")).max(dim=3).values  # (Bt, b, L)
        if agg == "mean":
            h = torch.where(wmask[:, None, :], best, 0).sum(2) / word_lens[:, None]
        else:
            h = temperature * torch.logsumexp(
                torch.where(wmask[:, None, :], best / temperature, float("-inf")), dim=2
            )
        parts.append(h.t())
    return torch.cat(parts, dim=0)


def fragment_word_relevance(
    regions: torch.Tensor,
    region_lens: torch.Tensor,
    words: torch.Tensor,
    word_lens: torch.Tensor,
    *,
    negative_slope: float = 0.1,
    eps: float = 1e-8,
    chunk_size: Optional[int] = None,
    paper_compat: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AAHR / SCAN fine-grained region-word relevance of every (caption, image) pair.

    With ``s[w, r] = LeakyReLU_slope(cos(words[j, w], regions[i, r]))`` for valid word ``w`` and valid
    region ``r`` (cosine of ``x / max(||x||, eps)`` vectors, so an all-zero vector scores 0):

    * ``t2i[j, i] = mean_w max_r s[w, r] / (sqrt(sum_w' s[w', r]^2) + eps)``
      (normalise each region's column over the caption's valid words, best region per word, mean over words)
    * ``i2t[i, j] = mean_r max_w s[w, r] / (sqrt(sum_r' s[w, r']^2) + eps)``
      (normalise each word's row over the image's valid regions, best word per region, mean over regions)

    Source: aahr-method.md section 2.6 (inter-modal relevance, from HREM / SCAN, LeakyReLU 0.1; SCAN's
    ``l2norm`` adds ``eps`` to the norm). AAHR's code does not mask padded regions; this op masks
    both sides. ``paper_compat=True`` reproduces the authors' behaviour: every region slot counts as
    valid (``region_lens`` is ignored) in the normalisation, the max and the mean.

    Args:
        regions: (Bi, N, D) floating region features (any strides; expanded views are fine).
        region_lens: (Bi,) integer, valid regions per image, each in [1, N].
        words: (Bt, L, D) floating word/token features, same device; dtypes are promoted to a common one.
        word_lens: (Bt,) integer, valid words per caption, each in [1, L].
        negative_slope: LeakyReLU slope (>= 0), 0.1 in AAHR.
        eps: added to the L2 norms (and the floor of the cosine norms), > 0.
        chunk_size: images per chunk in the reference (bounds its (Bt, chunk, L, N) buffer); the C++
            backend is tiled and ignores it.
        paper_compat: see above.
        backend: ``None`` (auto), ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
    Returns:
        ``(t2i, i2t)``: ``t2i`` (Bt, Bi) and ``i2t`` (Bi, Bt), dtype of the inputs, unitless scores
        (each a mean of values in [-1, 1]). Differentiable w.r.t. ``regions`` and ``words`` (ties in a
        max send the gradient to the lowest index). A NaN in a valid slot makes the scores of the
        pairs that contain it NaN; NaN in padding is ignored.
    Non-finite input:
        Not checked, nothing raised. ``+inf`` / ``-inf`` in a valid slot act as NaN (the cosine normalises the
        vector to inf / inf): the (image, caption) pairs that contain it are NaN in ``t2i`` and ``i2t``, the
        other pairs are unchanged; in padding they are ignored. Identical on every backend (tested in
        tests/test_hostile_inputs.py). Gradients are specified for finite inputs only.
    Raises:
        DataError (a ValueError): wrong ranks, mismatched D, lengths outside [1, N] / [1, L], tensors
            on different devices, empty batch or zero-size N / L / D.
        ConfigError: bad ``chunk_size``, ``eps`` or ``negative_slope``; unknown backend.
        BackendUnavailableError: a forced backend that cannot run.
    """
    op = "fragment_word_relevance"
    regions, region_lens, words, word_lens = _validate(op, regions, region_lens, words, word_lens, chunk_size, eps)
    check_positive(op, "negative_slope", negative_slope, allow_zero=True)
    opts = dict(negative_slope=float(negative_slope), eps=float(eps), chunk_size=chunk_size,
                paper_compat=bool(paper_compat))
    _, fn = dispatch(op, backend, regions, words, options=opts)
    return fn(regions, region_lens, words, word_lens, **opts)


def hard_assignment_similarity(
    regions: torch.Tensor,
    region_lens: torch.Tensor,
    words: torch.Tensor,
    word_lens: torch.Tensor,
    *,
    agg: str = "mean",
    temperature: float = 0.1,
    eps: float = 1e-8,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """CHAN hard-assignment coding: each word is coded by its single best region.

    ``m[j, i, w] = max_{valid r} cos(words[j, w], regions[i, r])`` and
    ``sim[i, j] = mean_{valid w} m`` (``agg="mean"``) or
    ``sim[i, j] = temperature * log sum_{valid w} exp(m / temperature)`` (``agg="lse"``).
    Source: CHAN (Pan et al., CVPR 2023) hard assignment coding with its mean / LogSumExp word
    aggregation (CHAN's ``lambda`` is ``1 / temperature``); named as the op's second mode in
    aahr-method.md (lineage). No LeakyReLU, no normalisation of the scores.

    Args:
        regions, region_lens, words, word_lens: as in :func:`fragment_word_relevance`.
        agg: ``"mean"`` or ``"lse"``.
        temperature: > 0, used by ``"lse"`` only.
        eps: floor of the feature norms in the cosine (> 0).
        chunk_size: images per chunk in the reference; ignored by the C++ backend.
        backend: as in :func:`fragment_word_relevance`.
    Returns:
        (Bi, Bt) similarities, input dtype; differentiable (ties -> lowest region index). A NaN in a valid
        slot makes the pairs that contain it NaN; NaN in padding is ignored.
    Non-finite input:
        As :func:`fragment_word_relevance`: ``+inf`` / ``-inf`` in a valid slot act as NaN (pairs that
        contain it are NaN, on every backend), in padding they are ignored; not checked. Gradients are
        specified for finite inputs only (a NaN cosine wins the max, as in ``torch.max``, on every backend).
    Raises:
        DataError / ConfigError / BackendUnavailableError: as in :func:`fragment_word_relevance`, plus
        ConfigError for an unknown ``agg`` or a non-positive ``temperature``.
    """
    op = "hard_assignment_similarity"
    regions, region_lens, words, word_lens = _validate(op, regions, region_lens, words, word_lens, chunk_size, eps)
    if agg not in ("mean", "lse"):
        raise ConfigError(f"{op}: agg must be 'mean' or 'lse', got {agg!r}")
    check_positive(op, "temperature", temperature)
    opts = dict(agg=agg, temperature=float(temperature), eps=float(eps), chunk_size=chunk_size)
    _, fn = dispatch(op, backend, regions, words, options=opts)
    return fn(regions, region_lens, words, word_lens, **opts)


register("fragment_word_relevance", "reference", fragment_word_relevance_reference)
register("hard_assignment_similarity", "reference", hard_assignment_similarity_reference)

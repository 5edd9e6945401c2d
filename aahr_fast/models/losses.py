"""Matching losses: distance-weighted triplet (AAHR/HREM default), VSE++ hardest negative,
sum of hinges, and InfoNCE against a momentum queue.

Conventions: ``a`` (B, D) are image-side embeddings, ``b`` (B, D) text-side embeddings, row ``i`` of
``a`` is paired with row ``i`` of ``b``; ``ids`` (B,) int64 are image indices, so two rows with equal
ids are positives of each other (several captions of one image in a batch). Similarities are dot
products (the embeddings are L2-normalised, or have norm <= 1 after gated fusion). Hinge losses are
**summed** over anchors (as in every VSE-family repo, ``data-and-eval.md`` 11.4); InfoNCE is a mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from aahr_fast.utils.errors import ConfigError, DataError

__all__ = ["dws_triplet", "dws_triplet_oneway", "dws_negative_probs", "vse_loss", "queue_infonce", "matching_loss"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, ids: Optional[torch.Tensor], name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise DataError(f"{name}: expected two (B, D) tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if ids is not None and (ids.dim() != 1 or ids.shape[0] != a.shape[0]):
        raise DataError(f"{name}: ids must be (B,)={a.shape[0]}, got {tuple(ids.shape)}")


def dws_negative_probs(s: torch.Tensor, ids: torch.Tensor, *, n: int = 512, cutoff: float = 1.7,
                       min_dist: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling distribution of the distance-weighted negatives (Wu et al. 2017; HREM; ``aahr-method.md`` 3).

    With ``d = sqrt(2 - 2 s)`` clamped to ``>= min_dist`` and
    ``log w = (2 - n) log d - (n - 3)/2 log(1 - d^2 / 4)``, row ``i`` is ``w[i] / sum w[i]`` over the
    negatives (other image id) with ``d < cutoff``; when row ``i`` has no negative within the cutoff it
    is uniform over its negatives ([I], as the Sampling-Matters reference code does).

    Args: s (B, B') similarities anchor x candidate (no grad needed); ids: (B,) and (B',) share an id space,
        given as one (B,) tensor when B == B' (anchors and candidates are the two sides of the same pairs).
    Returns: (probs (B, B') float32, has_neg (B,) bool). Rows without any negative are uniform
        placeholders and flagged ``False`` in ``has_neg``.
    Raises: nothing is validated here (callers check shapes with ``_check_pair``); ``ids`` that do not
        broadcast against ``s`` raise torch's RuntimeError.
    """
    with torch.no_grad():
        sd = s.detach().float()
        d = (2.0 - 2.0 * sd).clamp_min(0.0).sqrt().clamp_min(min_dist)
        log_w = (2.0 - n) * d.log() - 0.5 * (n - 3.0) * (1.0 - 0.25 * d * d).clamp_min(1e-8).log()
        neg = ids[:, None] != ids[None, :]
        near = neg & (d < cutoff)
        has_near = near.any(dim=1, keepdim=True)
        allowed = torch.where(has_near, near, neg)                     # fallback: uniform over negatives
        logits = torch.where(near, log_w, torch.zeros_like(log_w))     # uniform (0) where falling back
        logits = logits.masked_fill(~allowed, float("-inf"))
        has_neg = neg.any(dim=1)
        logits[~has_neg] = 0.0                                          # placeholder row
        return torch.softmax(logits, dim=1), has_neg


def dws_triplet_oneway(anchor: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor, generator: torch.Generator, *,
                       margin: float = 0.2, n: int = 512, cutoff: float = 1.7, min_dist: float = 0.5) -> torch.Tensor:
    """Distance-weighted-sampling triplet loss, one direction (anchors ``anchor``, candidates ``cand``).

    Formula (``aahr-method.md`` section 3, HREM after Wu et al. "Sampling Matters", 2017): with
    ``s = anchor @ cand.T``, for every (anchor i, positive j) with ``ids[i] == ids[j]`` (the diagonal
    included) one negative ``k`` is drawn from :func:`dws_negative_probs` row ``i`` using ``generator``,
    and the loss is ``sum_(i,j) max(0, margin + s[i,k] - s[i,j])`` (summed, not averaged). An anchor
    without any negative contributes 0. The draw is inverse-CDF sampling of one uniform per (i, j) from
    ``generator`` (when it is None or under ``torch.compile``: from the global RNG), with fixed shapes and no
    host read.

    Args:
        anchor, cand: (B, D) float. ids: (B,) int64 image ids. generator: torch.Generator (any device;
            sampling happens on the generator's device, so runs are reproducible).
    Returns:
        scalar tensor, differentiable w.r.t. ``anchor`` and ``cand``.
    Raises:
        DataError on shape mismatch.
    """
    _check_pair(anchor, cand, ids, "dws_triplet")
    s = anchor @ cand.t()                                              # (B, B)
    probs, has_neg = dws_negative_probs(s, ids, n=n, cutoff=cutoff, min_dist=min_dist)
    with torch.no_grad():
        # every (anchor i, positive j) pair draws one negative by inverse-CDF sampling of row i: fixed
        # (B, B) shapes, no nonzero / host read, so the loss compiles into one graph and never syncs
        pair = (ids[:, None] == ids[None, :]) & has_neg[:, None]         # (B, B) anchor-positive pairs
        if generator is None or torch.compiler.is_compiling():  # Dynamo cannot take a Generator: global RNG
            u = torch.rand(s.shape, device=s.device, dtype=torch.float32)
        else:
            u = torch.rand(s.shape, generator=generator, device=generator.device, dtype=torch.float32).to(s.device)
        cdf = probs.double().cumsum(dim=1)  # float64 sums (as torch.multinomial's): boundaries stable to rounding
        k = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).clamp_max(s.shape[1] - 1)   # (B, B)
    hinge = (margin + s.gather(1, k) - s).clamp_min(0.0)
    return torch.where(pair, hinge, 0.0).sum()


def dws_triplet(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, generator: torch.Generator, *,
                margin: float = 0.2, n: int = 512, cutoff: float = 1.7, min_dist: float = 0.5) -> torch.Tensor:
    """Trip(a, b): :func:`dws_triplet_oneway` in both directions (image anchors over texts, then text
    anchors over images), summed. Same arguments; returns a scalar. Source: ``aahr-method.md`` section 3.

    Args: a, b: (B, D) float image / caption embeddings; ids: (B,) int64 image ids; generator: as
        :func:`dws_triplet_oneway` (drawn from twice, a-anchors first).
    Returns: 0-dim tensor (sum over both directions), differentiable w.r.t. ``a`` and ``b``.
    Raises: DataError on shape mismatch (from :func:`dws_triplet_oneway`).
    """
    kw = dict(margin=margin, n=n, cutoff=cutoff, min_dist=min_dist)
    return dws_triplet_oneway(a, b, ids, generator, **kw) + dws_triplet_oneway(b, a, ids, generator, **kw)


def vse_loss(a: torch.Tensor, b: torch.Tensor, ids: Optional[torch.Tensor] = None, *, margin: float = 0.2,
             max_violation: bool = True, mask_same_image: bool = True) -> torch.Tensor:
    """VSE++ hinge loss (Faghri et al. 2018): hardest negative (``max_violation=True``) or sum of hinges.

    Positive of row i is the aligned pair ``(a_i, b_i)``. Negatives are all other rows, except those of
    the same image when ``mask_same_image`` and ``ids`` are given (HREM ``mask_repeat``); otherwise only
    the diagonal is excluded. ``cost_ij = max(0, margin + s_ij - s_ii)`` for i2t and
    ``max(0, margin + s_ij - s_jj)`` for t2i; hardest takes the row/column max, sum-of-hinges sums all;
    both directions are summed over the batch.

    Args: a, b (B, D) float; ids (B,) int64 or None. Returns: scalar. Raises: DataError on shapes.
    """
    _check_pair(a, b, ids, "vse_loss")
    s = a @ b.t()
    pos = s.diagonal()
    bsz = s.shape[0]
    if ids is not None and mask_same_image:
        excl = ids[:, None] == ids[None, :]
    else:
        excl = torch.eye(bsz, dtype=torch.bool, device=s.device)
    cost_i2t = (margin + s - pos[:, None]).clamp_min(0.0).masked_fill(excl, 0.0)   # anchor image i, neg text j
    cost_t2i = (margin + s - pos[None, :]).clamp_min(0.0).masked_fill(excl, 0.0)   # anchor text j, neg image i
    if max_violation:
        return cost_i2t.max(dim=1).values.sum() + cost_t2i.max(dim=0).values.sum()
    return cost_i2t.sum() + cost_t2i.sum()


def queue_infonce(q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor, *, tau: float = 0.07,
                  q_ids: Optional[torch.Tensor] = None, queue_ids: Optional[torch.Tensor] = None,
                  mask_same_image: bool = True) -> torch.Tensor:
    """InfoNCE of queries against their positive key and a queue of negatives (MoCo, He et al. 2020).

    ``L = mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_m exp(q_i.Q_m/tau)) )``
    (``aahr-method.md`` section 3, item 5). When ``mask_same_image`` and both id tensors are given,
    queue entries with ``queue_ids[m] == q_ids[i]`` are removed from the negatives of query i (the
    authors' code keeps them, section 6.8). Inputs are used as given (normalise them beforehand).

    Args:
        q: (B, D) queries. k_pos: (B, D) positive keys (no grad expected). queue: (M, D) negatives.
        q_ids: (B,) int64; queue_ids: (M,) int64 (-1 = empty slot, never equal to an image index).
    Returns: scalar mean over the batch.
    Raises: DataError on shape mismatch.
    """
    if q.dim() != 2 or k_pos.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise DataError(f"queue_infonce: expected q, k_pos (B, D) and queue (M, D); got {tuple(q.shape)}, "
                        f"{tuple(k_pos.shape)}, {tuple(queue.shape)}")
    k_pos, queue = k_pos.to(q.dtype), queue.to(q.dtype)
    l_pos = (q * k_pos).sum(dim=1, keepdim=True)                       # (B, 1)
    l_neg = q @ queue.t()                                              # (B, M)
    if mask_same_image and q_ids is not None and queue_ids is not None:
        if queue_ids.shape != (queue.shape[0],) or q_ids.shape != (q.shape[0],):
            raise DataError(f"queue_infonce: ids must be (B,) and (M,), got {tuple(q_ids.shape)}, {tuple(queue_ids.shape)}")
        l_neg = l_neg.masked_fill(q_ids[:, None] == queue_ids[None, :], float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def matching_loss(kind: str, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, generator: torch.Generator, *,
                  margin: float = 0.2, n: int = 512, cutoff: float = 1.7, min_dist: float = 0.5,
                  mask_same_image: bool = True) -> torch.Tensor:
    """Dispatch the configured matching loss: ``"dws"`` (:func:`dws_triplet`), ``"hardest"`` or ``"sum"``
    (:func:`vse_loss`). Raises ConfigError for an unknown ``kind``."""
    if kind == "dws":
        return dws_triplet(a, b, ids, generator, margin=margin, n=n, cutoff=cutoff, min_dist=min_dist)
    if kind in ("hardest", "sum"):
        return vse_loss(a, b, ids, margin=margin, max_violation=kind == "hardest", mask_same_image=mask_same_image)
    raise ConfigError(f"unknown loss {kind!r}: expected 'dws', 'hardest' or 'sum'")

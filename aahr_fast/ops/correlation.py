"""Instance-level correlation of a batch: intra-modal relevance, top-rho connection, block matrices.

Public ops: :func:`intra_relevance`, :func:`topk_connection`, :func:`instance_correlation`; their
plain-PyTorch references are the ``*_reference`` functions (they define correctness).
Source: aahr-method.md section 2.6 (HREM instance graph as used by AAHR; paper Eq. (10)).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..utils.errors import ConfigError, DataError
from ._common import check_nonempty, check_positive, check_same_device, check_tensor, common_float_dtype, \
    value_checks_enabled
from ._dispatch import dispatch, register

__all__ = [
    "Correlation",
    "intra_relevance",
    "topk_connection",
    "instance_correlation",
    "intra_relevance_reference",
    "topk_connection_reference",
    "instance_correlation_reference",
    "connection_count",
]


class Correlation(NamedTuple):
    """Output of :func:`instance_correlation` (all (2B, 2B), images first then captions).

    relevance: floating ``[[A_ii, rel_i2t], [rel_t2i, A_tt]]``.
    connection: bool, True where node j is among the top-rho neighbours of node i (same block layout).
    attn_bias: floating ``lam * relevance`` where connected, ``-inf`` elsewhere (an additive attention mask).
    """

    relevance: torch.Tensor
    connection: torch.Tensor
    attn_bias: torch.Tensor


def connection_count(rho: float, width: int) -> int:
    """Neighbours kept per row: ``floor(rho * width + 1e-9)`` (the 1e-9 absorbs binary rounding, e.g. 0.29*100)."""
    return int(math.floor(rho * width + 1e-9))


# ----------------------------------------------------------------------------------------- references
def intra_relevance_reference(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Reference of :func:`intra_relevance` (no validation)."""
    # exact pairwise differences (no |a|^2+|b|^2-2ab cancellation); cdist's backward gives 0, not NaN,
    # at zero distance (the safe-sqrt subgradient)
    dist = torch.cdist(x[None], x[None], p=2.0, compute_mode="donot_use_mm_for_euclid_dist")[0]
    rel = torch.exp(-dist / sigma)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.ones((), dtype=rel.dtype, device=rel.device), rel)


def topk_connection_reference(scores: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """Reference of :func:`topk_connection` (no validation)."""
    k = connection_count(rho, scores.shape[1])
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    conn = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return conn.scatter_(1, order[:, :k], True)


def instance_correlation_reference(
    v: torch.Tensor,
    t: torch.Tensor,
    rel_i2t: torch.Tensor,
    rel_t2i: torch.Tensor,
    *,
    sigma: float = 1.0,
    rho: float = 0.5,
    lam: float = 1.0,
) -> Correlation:
    """Reference of :func:`instance_correlation` (no validation)."""
    with torch.no_grad():
        c_ii = topk_connection_reference(v @ v.t(), rho)
        c_tt = topk_connection_reference(t @ t.t(), rho)
        c_it = topk_connection_reference(rel_i2t, rho)
        c_ti = topk_connection_reference(rel_t2i, rho)
    a_ii = intra_relevance_reference(v, sigma)
    a_tt = intra_relevance_reference(t, sigma)
    relevance = torch.cat(
        [torch.cat([a_ii, rel_i2t.detach()], dim=1), torch.cat([rel_t2i.detach(), a_tt], dim=1)], dim=0
    )
    connection = torch.cat([torch.cat([c_ii, c_it], dim=1), torch.cat([c_ti, c_tt], dim=1)], dim=0)
    neg_inf = torch.full((), float("-inf"), dtype=relevance.dtype, device=relevance.device)
    attn_bias = torch.where(connection, lam * relevance, neg_inf)
    return Correlation(relevance, connection, attn_bias)


# ----------------------------------------------------------------------------------------- public ops
def _check_no_nan(op: str, name: str, x: torch.Tensor) -> None:
    """Raise DataError naming the first NaN of ``x`` (row-major); one reduction and one host sync when
    there is none (a NaN makes the sum NaN; the exact scan runs only then, so +inf and -inf together
    cannot raise). A host-reading value check: skipped where :func:`~aahr_fast.ops.value_checks_enabled` says so
    (compiled, meta / fake tensors, ``value_checks(False)``, ``AAHR_OPS_VALUE_CHECKS=0``)."""
    if not value_checks_enabled(x):
        return
    with torch.no_grad():
        if not bool(torch.isnan(x.sum())):
            return
        nan = torch.isnan(x).nonzero()
    if nan.shape[0]:
        idx = ", ".join(str(int(v)) for v in nan[0])
        raise DataError(f"{op}: {name}[{idx}] is NaN ({nan.shape[0]} NaN entries in {name} of shape "
                        f"{tuple(x.shape)}); a NaN score has no rank (diverged embeddings upstream?)")


def _check_rho(op: str, rho: float) -> None:
    if not isinstance(rho, (int, float)) or not (0.0 < float(rho) <= 1.0):
        raise ConfigError(f"{op}: rho must be in (0, 1], got {rho!r}")


def intra_relevance(x: torch.Tensor, sigma: float = 1.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """Intra-modal relevance ``A[i, j] = exp(-||x_i - x_j||_2 / sigma)`` (paper Eq. (10), sigma = 1).

    Args:
        x: (B, D) floating embeddings (AAHR: the L2-normalised local-branch embeddings).
        sigma: kernel width, > 0, in the units of ``x``.
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        (B, B) tensor in (0, 1], dtype of ``x``; the diagonal is exactly 1. Differentiable w.r.t. ``x``
        with a safe square root: at zero distance (the diagonal, duplicate rows) the gradient is 0, never NaN.
        A NaN in row i of ``x`` makes row and column i NaN except the diagonal entry (still 1); no error.
    Non-finite input:
        Not checked. ``+inf`` / ``-inf`` in row i of ``x`` put row i at infinite distance: ``A[i, j] =
        A[j, i] = 0`` for j != i (diagonal 1); two rows infinite in the same coordinate with the same sign
        are NaN to each other (inf - inf). Identical on every backend; gradients specified for finite ``x``.
    Raises:
        DataError: ``x`` not 2-D floating, or empty (B = 0 or D = 0).
        ConfigError: ``sigma`` not > 0; unknown backend.
    """
    op = "intra_relevance"
    check_tensor(op, "x", x, 2)
    check_nonempty(op, **{"x.shape[0] (B)": x.shape[0], "x.shape[1] (D)": x.shape[1]})
    check_positive(op, "sigma", sigma)
    opts = dict(sigma=float(sigma))
    _, fn = dispatch(op, backend, x, options=opts)
    return fn(x, **opts)


def topk_connection(scores: torch.Tensor, rho: float = 0.5, *, backend: Optional[str] = None) -> torch.Tensor:
    """Binary neighbourhood: True for the top ``floor(rho * B')`` scores of each row.

    Ties are broken towards the lower column index (a stable descending sort). ``+inf`` / ``-inf`` rank
    first / last; a NaN score has no rank and is refused (every backend goes through this check). No
    gradient.
    Source: aahr-method.md section 2.6 (top 50% of the batch per row, ``threshold`` = 0.5; HREM).

    Args:
        scores: (B, B') floating scores.
        rho: fraction in (0, 1]; k = ``floor(rho * B' + 1e-9)`` (k = 0 gives an all-False row).
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        (B, B') bool tensor with exactly k True entries per row.
    Non-finite input:
        ``+inf`` ranks first and ``-inf`` last (ties among equal infinities go to the lower index), on every
        backend; NaN raises DataError (this check runs even with value checks off).
    Raises:
        DataError (a ValueError): ``scores`` not 2-D floating or empty, or holding a NaN (the message
            names the op and the first NaN index in row-major order). ConfigError: ``rho`` outside (0, 1].
    """
    op = "topk_connection"
    check_tensor(op, "scores", scores, 2)
    check_nonempty(op, **{"scores.shape[0]": scores.shape[0], "scores.shape[1]": scores.shape[1]})
    _check_rho(op, rho)
    _check_no_nan(op, "scores", scores)
    opts = dict(rho=float(rho))
    _, fn = dispatch(op, backend, scores, options=opts)
    return fn(scores, **opts)


def instance_correlation(
    v: torch.Tensor,
    t: torch.Tensor,
    rel_i2t: torch.Tensor,
    rel_t2i: torch.Tensor,
    *,
    sigma: float = 1.0,
    rho: float = 0.5,
    lam: float = 1.0,
    backend: Optional[str] = None,
) -> Correlation:
    """Instance graph of a batch of B images and B captions (2B nodes, images first).

    * intra connection: top-rho of each row of ``v v^T`` (images) and ``t t^T`` (captions);
    * inter connection: top-rho of each row of ``rel_i2t`` (image -> captions) and ``rel_t2i``
      (in every block, ties go to the lower column index, as in :func:`topk_connection`);
    * relevance ``[[A_ii, rel_i2t], [rel_t2i, A_tt]]`` with ``A_ii = intra_relevance(v, sigma)``,
      ``A_tt = intra_relevance(t, sigma)``;
    * ``attn_bias = lam * relevance`` where connected, ``-inf`` elsewhere (HREM's relation mask, lambda
      = ``mask_weight``: 1.0 Flickr30K, 1.5 COCO).

    Gradients flow to ``v`` and ``t`` through ``A_ii`` / ``A_tt`` only; the connection is computed without
    gradient and ``rel_i2t`` / ``rel_t2i`` are taken as given constants (detached; AAHR computes them from
    detached fragments with :func:`fragment_word_relevance`).
    NaN is not refused here (unlike :func:`topk_connection`) but stays visible: a NaN ranking score ranks
    first (connected), a NaN row of ``v`` / ``t`` gives NaN relevance off the diagonal of its row and column,
    and a NaN in ``rel_i2t`` / ``rel_t2i`` is copied into ``relevance`` and ``attn_bias``.
    Source: aahr-method.md section 2.6 (paper Eq. (10); HREM).

    Args:
        v: (B, D) image embeddings; t: (B, D) caption embeddings (AAHR: L2-normalised local branch).
        rel_i2t: (B, B) image-to-caption relevance, row i = image i. rel_t2i: (B, B), row j = caption j.
        sigma: > 0. rho: in (0, 1]. lam: finite real.
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        :class:`Correlation` of (2B, 2B) tensors (floating dtype promoted over the inputs, bool).
    Non-finite input:
        Not checked; identical on every backend. ``+inf`` / ``-inf`` in ``v`` / ``t``: zero relevance between
        that row and the others (see :func:`intra_relevance`), and infinite or NaN ranking scores (NaN ranks
        first). ``+inf`` / ``-inf`` in ``rel_i2t`` / ``rel_t2i`` are copied into ``relevance``; ``+inf`` ranks
        first (connected, so ``attn_bias`` = ``lam * inf``: +-inf, NaN for lam = 0) and ``-inf`` last (not
        connected: ``attn_bias`` -inf).
    Raises:
        DataError: shapes inconsistent (named), not floating, different devices, empty batch.
        ConfigError: bad ``sigma``, ``rho`` or ``lam``.
    """
    op = "instance_correlation"
    for name, x in (("v", v), ("t", t), ("rel_i2t", rel_i2t), ("rel_t2i", rel_t2i)):
        check_tensor(op, name, x, 2)
    check_same_device(op, v=v, t=t, rel_i2t=rel_i2t, rel_t2i=rel_t2i)
    b = v.shape[0]
    check_nonempty(op, **{"v.shape[0] (B)": b, "v.shape[1] (D)": v.shape[1]})
    if t.shape != v.shape:
        raise DataError(f"{op}: t must have the shape of v {tuple(v.shape)}, got {tuple(t.shape)}")
    for name, x in (("rel_i2t", rel_i2t), ("rel_t2i", rel_t2i)):
        if x.shape != (b, b):
            raise DataError(f"{op}: {name} must have shape ({b}, {b}), got {tuple(x.shape)}")
    check_positive(op, "sigma", sigma)
    _check_rho(op, rho)
    if not isinstance(lam, (int, float)) or not math.isfinite(float(lam)):
        raise ConfigError(f"{op}: lam must be a finite number, got {lam!r}")
    dt = common_float_dtype(op, v=v, t=t, rel_i2t=rel_i2t, rel_t2i=rel_t2i)
    v, t, rel_i2t, rel_t2i = (x.to(dt) for x in (v, t, rel_i2t, rel_t2i))
    opts = dict(sigma=float(sigma), rho=float(rho), lam=float(lam))
    _, fn = dispatch(op, backend, v, t, rel_i2t, rel_t2i, options=opts)
    return fn(v, t, rel_i2t, rel_t2i, **opts)


register("intra_relevance", "reference", intra_relevance_reference)
register("topk_connection", "reference", topk_connection_reference)
register("instance_correlation", "reference", instance_correlation_reference)

"""Clustering prototypes: SwAV Sinkhorn-Knopp codes and the cross-modal swapped-prediction loss.

Public ops: :func:`sinkhorn`, :func:`swapped_prediction_loss`; references: the ``*_reference`` functions.
Source: aahr-method.md sections 2.5 and 3 (item 2), after SwAV (Caron et al., 2020).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..utils.errors import ConfigError, DataError
from ._common import (check_no_inf, check_nonempty, check_positive, check_same_device, check_tensor, common_float_dtype,
                      value_checks_enabled)
from ._dispatch import dispatch, register

__all__ = ["sinkhorn", "swapped_prediction_loss", "sinkhorn_reference", "swapped_prediction_loss_reference"]


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, eps: float = 0.1, n_iters: int = 3) -> torch.Tensor:
    """Reference of :func:`sinkhorn` (no validation)."""
    out_dtype = scores.dtype
    s = scores.detach()
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    b, k = s.shape
    log_q = (s / eps).t()  # (K, B): Q = exp(S / eps)^T
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)  # divide by the total sum
    log_k, log_b = math.log(k), math.log(b)
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_k  # rows: each prototype gets 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b  # columns: each sample gets 1/B
    codes = (log_q + log_b).exp().t()  # times B: every sample's code sums to 1
    # contract: any non-finite S / eps (NaN, +-inf, overflow) makes every code NaN (a lone -inf would otherwise
    # be a zero-mass entry here but not in the other backends); a device-side where, no host sync
    codes = torch.where(torch.isfinite(s / eps).all(), codes, float("nan"))
    return codes.to(out_dtype)


def swapped_prediction_loss_reference(
    x_v: torch.Tensor,
    x_t: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    eps: float = 0.1,
    n_iters: int = 3,
    tau: float = 0.1,
    queue_v: Optional[torch.Tensor] = None,
    queue_t: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`swapped_prediction_loss` (no validation)."""
    b = x_v.shape[0]
    s_v = x_v @ prototypes.t()  # (B, K)
    s_t = x_t @ prototypes.t()
    with torch.no_grad():
        full_v = s_v if queue_v is None else torch.cat([s_v, queue_v @ prototypes.t()], dim=0)
        full_t = s_t if queue_t is None else torch.cat([s_t, queue_t @ prototypes.t()], dim=0)
        q_v = sinkhorn_reference(full_v, eps, n_iters)[:b]
        q_t = sinkhorn_reference(full_t, eps, n_iters)[:b]
    loss_v = -(q_t * torch.log_softmax(s_v / tau, dim=1)).sum(dim=1).mean()  # image predicts caption's code
    loss_t = -(q_v * torch.log_softmax(s_t / tau, dim=1)).sum(dim=1).mean()  # caption predicts image's code
    return loss_v + loss_t


_INF_WHY = "Sinkhorn needs finite scores (with value checks off every code would be NaN)"


def _check_iters(op: str, n_iters: int) -> None:
    if not isinstance(n_iters, int) or isinstance(n_iters, bool) or n_iters < 1:
        raise ConfigError(f"{op}: n_iters must be an int >= 1, got {n_iters!r}")


def sinkhorn(scores: torch.Tensor, eps: float = 0.1, n_iters: int = 3, *, backend: Optional[str] = None) -> torch.Tensor:
    """SwAV Sinkhorn-Knopp soft assignment (codes) of B samples to K prototypes, in the log domain.

    ``Q = exp(S / eps)^T`` (K, B) divided by its sum, then ``n_iters`` rounds of {each prototype row
    normalised to 1/K, each sample column normalised to 1/B}, then times B. Computed with log-sum-exp, so
    ``S / eps`` of any size neither overflows nor underflows to NaN. AAHR: eps = 0.1, 3 iterations.
    Source: aahr-method.md 2.5 (SwAV ``distributed_sinkhorn`` semantics).

    Args:
        scores: (B, K) floating prototype scores ``x C^T``. Half precision is computed in float32.
        eps: > 0 (entropic regularisation; smaller = harder codes).
        n_iters: int >= 1.
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        (B, K) codes, dtype of ``scores``, non-negative, each row summing to 1. No gradient. No argmax, so
        no tie rule: identical score columns get identical codes. NaN is not checked: one NaN score makes
        every code NaN (the normalisations spread it).
    Non-finite input:
        ``+inf`` / ``-inf`` scores raise DataError (op, tensor, first (row, col) and value) while value checks
        are on (see :func:`~aahr_fast.ops.value_checks`; eager default). With checks off, and for NaN always,
        every backend returns all-NaN codes (B, K) whenever any ``scores / eps`` is non-finite (NaN, +-inf, or
        a finite score whose ``/ eps`` overflows): ``-inf`` is not a mask. No host sync decides this.
        Finite scores of any size keep full accuracy (``|S| / eps`` ~ 1e5: codes within ~1e-7 of the
        reference in float32).
    Raises:
        DataError: ``scores`` not 2-D floating or empty, or holding +-inf (value checks on).
        ConfigError: bad ``eps`` or ``n_iters``.
    """
    op = "sinkhorn"
    check_tensor(op, "scores", scores, 2)
    check_nonempty(op, **{"scores.shape[0] (B)": scores.shape[0], "scores.shape[1] (K)": scores.shape[1]})
    check_positive(op, "eps", eps)
    _check_iters(op, n_iters)
    opts = dict(eps=float(eps), n_iters=n_iters)
    _, fn = dispatch(op, backend, scores, options=opts)
    codes = fn(scores, **opts)
    # Non-finite scores make every code NaN on every backend, so one code tells whether the input needs
    # scanning for +-inf: a one-element host read instead of a reduction over all B x K scores per call.
    if value_checks_enabled(scores) and bool(torch.isnan(codes[0, 0])):
        check_no_inf(op, why=_INF_WHY, scores=scores)
    return codes


def swapped_prediction_loss(
    x_v: torch.Tensor,
    x_t: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    eps: float = 0.1,
    n_iters: int = 3,
    tau: float = 0.1,
    queue_v: Optional[torch.Tensor] = None,
    queue_t: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Cross-modal SwAV swapped-prediction loss (AAHR's prototype loss, weight 0.2 in the total).

    ``S_v = x_v C^T``, ``S_t = x_t C^T``; codes ``q_v = sinkhorn(S_v)``, ``q_t = sinkhorn(S_t)`` (no grad;
    with a queue, Sinkhorn runs over ``[S; queue C^T]`` and the batch rows are kept);
    ``loss = -mean_i sum_k q_t[i,k] log softmax(S_v[i] / tau)_k - mean_i sum_k q_v[i,k] log softmax(S_t[i] / tau)_k``.
    The prototypes are used as given (AAHR re-normalises them row-wise before each forward: the caller's job).
    Source: aahr-method.md 2.5 and 3 (item 2); SwAV.

    Args:
        x_v: (B, D) image embeddings; x_t: (B, D) caption embeddings (AAHR: the fused ones).
        prototypes: (K, D).
        eps, n_iters: Sinkhorn parameters (see :func:`sinkhorn`). tau: softmax temperature, > 0.
        queue_v / queue_t: optional (Q, D) queued image / caption embeddings (only used for the codes).
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        0-dim tensor (nats), promoted floating dtype; gradient to x_v, x_t and prototypes, none through
        the codes. NaN is not checked: a NaN in any input (queues included) makes the loss NaN.
    Non-finite input:
        ``+inf`` / ``-inf`` in ``x_v``, ``x_t``, ``prototypes`` or a queue raise DataError (op, tensor, first
        (row, col) and value) while value checks are on (eager default). With checks off (and for NaN, and for
        finite inputs whose scores overflow) the codes of the affected modality are all NaN (see
        :func:`sinkhorn`), so the loss is NaN on every backend; the gradients are then non-finite wherever
        the reference's are (their mix of NaN and +-inf is not specified).
    Raises:
        DataError: ranks or sizes inconsistent (named), different devices, empty batch, +-inf in an input
            (value checks on).
        ConfigError: bad eps / n_iters / tau.
    """
    op = "swapped_prediction_loss"
    check_tensor(op, "x_v", x_v, 2)
    check_tensor(op, "x_t", x_t, 2)
    check_tensor(op, "prototypes", prototypes, 2)
    for name, q in (("queue_v", queue_v), ("queue_t", queue_t)):
        if q is not None:
            check_tensor(op, name, q, 2)
    check_same_device(op, x_v=x_v, x_t=x_t, prototypes=prototypes, queue_v=queue_v, queue_t=queue_t)
    b, d = x_v.shape
    check_nonempty(op, **{"x_v.shape[0] (B)": b, "x_v.shape[1] (D)": d, "prototypes.shape[0] (K)": prototypes.shape[0]})
    if x_t.shape != x_v.shape:
        raise DataError(f"{op}: x_t must have the shape of x_v {tuple(x_v.shape)}, got {tuple(x_t.shape)}")
    if prototypes.shape[1] != d:
        raise DataError(f"{op}: prototypes must have D={d} columns, got {tuple(prototypes.shape)}")
    for name, q in (("queue_v", queue_v), ("queue_t", queue_t)):
        if q is not None and q.shape[1] != d:
            raise DataError(f"{op}: {name} must have D={d} columns, got {tuple(q.shape)}")
    check_positive(op, "eps", eps)
    check_positive(op, "tau", tau)
    _check_iters(op, n_iters)
    dt = common_float_dtype(op, x_v=x_v, x_t=x_t, prototypes=prototypes, queue_v=queue_v, queue_t=queue_t)
    x_v, x_t, prototypes = x_v.to(dt), x_t.to(dt), prototypes.to(dt)
    queue_v = queue_v.to(dt) if queue_v is not None else None
    queue_t = queue_t.to(dt) if queue_t is not None else None
    opts = dict(eps=float(eps), n_iters=n_iters, tau=float(tau), queue_v=queue_v, queue_t=queue_t)
    _, fn = dispatch(op, backend, x_v, x_t, prototypes, options=dict(eps=eps, n_iters=n_iters, tau=tau))
    loss = fn(x_v, x_t, prototypes, **opts)
    # +-inf anywhere makes the loss NaN on every backend: read the 0-d loss once, scan the inputs only then.
    if value_checks_enabled(x_v) and not bool(torch.isfinite(loss)):
        check_no_inf(op, why=_INF_WHY, x_v=x_v, x_t=x_t, prototypes=prototypes, queue_v=queue_v, queue_t=queue_t)
    return loss


register("sinkhorn", "reference", sinkhorn_reference)
register("swapped_prediction_loss", "reference", swapped_prediction_loss_reference)

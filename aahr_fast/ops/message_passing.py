"""Message passing on the instance graph: one GCN layer and relation-masked attention.

Public ops: :func:`gcn_layer`, :func:`masked_attention`; references: the ``*_reference`` functions.
Source: aahr-method.md section 2.6 (AAHR's GCN stage; HREM's relation-masked Transformer attention).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..utils.errors import DataError
from ._common import check_nonempty, check_positive, check_same_device, check_tensor, common_float_dtype
from ._dispatch import dispatch, register

__all__ = ["gcn_layer", "masked_attention", "gcn_layer_reference", "masked_attention_reference"]


def gcn_layer_reference(
    adj: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    negative_slope: float = 0.2,
) -> torch.Tensor:
    """Reference of :func:`gcn_layer` (no validation)."""
    h = adj @ (x @ weight)
    if bias is not None:
        h = h + bias
    return F.leaky_relu(h, negative_slope)


def masked_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`masked_attention` (no validation)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-1, -2)) * scale + bias  # (H, n, n)
    connected = ~torch.isneginf(bias).all(dim=-1, keepdim=True)  # (n, 1) or (H, n, 1)
    # a row without any connection would be softmax(all -inf) = NaN: give it zero logits, then zero weights
    p = torch.softmax(torch.where(connected, logits, 0), dim=-1)
    p = torch.where(connected, p, 0)
    return torch.where(connected, p @ v, 0)  # exactly 0 even where v holds NaN / inf (0 * inf)


def gcn_layer(
    adj: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    negative_slope: float = 0.2,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One GCN layer without degree normalisation: ``LeakyReLU_slope(adj @ (x @ weight) + bias)``.

    AAHR applies it with the raw relevance matrix as ``adj`` (no self-loops added: its diagonal is
    already 1) and LeakyReLU 0.2; dropout on ``x`` is the caller's. Source: aahr-method.md 2.6 (GCN stage).

    Args:
        adj: (n, n) floating adjacency / relevance weights.
        x: (n, Din) node features.
        weight: (Din, Dout). bias: (Dout,) or None.
        negative_slope: >= 0.
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        (n, Dout), promoted floating dtype; differentiable w.r.t. every input. NaN is not checked: a NaN in
        ``x`` / ``weight`` / ``adj`` / ``bias`` spreads through the products to every output it reaches (with a
        dense ``adj``: every row).
    Non-finite input:
        Not checked. ``+inf`` / ``-inf`` follow IEEE arithmetic through the two products and the LeakyReLU
        (``inf * 0`` and ``inf - inf`` give NaN): every backend returns the reference's NaN / +-inf positions.
        Gradients are specified for finite inputs only.
    Raises:
        DataError: ranks or sizes inconsistent (named), different devices, empty.
        ConfigError: negative ``negative_slope``.
    """
    op = "gcn_layer"
    check_tensor(op, "adj", adj, 2)
    check_tensor(op, "x", x, 2)
    check_tensor(op, "weight", weight, 2)
    if bias is not None:
        check_tensor(op, "bias", bias, 1)
    check_same_device(op, adj=adj, x=x, weight=weight, bias=bias)
    n, din = x.shape
    check_nonempty(op, **{"x.shape[0] (n)": n, "x.shape[1] (Din)": din, "weight.shape[1] (Dout)": weight.shape[1]})
    if adj.shape != (n, n):
        raise DataError(f"{op}: adj must have shape ({n}, {n}) to match x {tuple(x.shape)}, got {tuple(adj.shape)}")
    if weight.shape[0] != din:
        raise DataError(f"{op}: weight must have {din} rows (x has Din={din}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[1]:
        raise DataError(f"{op}: bias must have shape ({weight.shape[1]},), got {tuple(bias.shape)}")
    check_positive(op, "negative_slope", negative_slope, allow_zero=True)
    dt = common_float_dtype(op, adj=adj, x=x, weight=weight, bias=bias)
    adj, x, weight = adj.to(dt), x.to(dt), weight.to(dt)
    bias = bias.to(dt) if bias is not None else None
    opts = dict(negative_slope=float(negative_slope))
    _, fn = dispatch(op, backend, adj, x, weight, *(() if bias is None else (bias,)), options=opts)
    return fn(adj, x, weight, bias, **opts)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """Relation-masked scaled dot-product attention ``softmax(q k^T / sqrt(dh) + bias) v`` per head.

    ``bias`` is an additive mask such as :class:`Correlation`'s ``attn_bias``: ``-inf`` = not connected,
    finite = connected with that logit offset. A query row whose bias is ``-inf`` everywhere (no
    connection at all) outputs exactly 0 and passes no gradient (instead of softmax's NaN).
    Source: aahr-method.md 2.6 (GAT stage; HREM), logits ``QK^T / sqrt(dh) + M``.

    Args:
        q, k, v: (H, n, dh) floating, same shape.
        bias: (n, n) shared by all heads, or (H, n, n); floating, may require grad.
        backend: see :mod:`aahr_fast.ops._dispatch`.
    Returns:
        (H, n, dh), promoted floating dtype; differentiable w.r.t. q, k, v and bias. NaN is not checked: a
        NaN in q / k / v or in a finite bias entry makes the output rows that see it NaN (fully masked rows
        stay 0).
    Non-finite input:
        ``-inf`` in ``bias`` is the mask, never an error. ``+inf`` in ``bias`` (softmax of inf) and ``+inf`` /
        ``-inf`` in ``q`` / ``k`` / ``v`` (``inf - inf``, ``0 * inf``) make the output rows that see them NaN;
        a fully masked row (decided from ``bias`` alone) is exactly 0 whatever ``q`` / ``k`` / ``v`` hold.
        Not checked; identical on every backend. Gradients are specified for finite inputs only.
    Raises:
        DataError: ranks or sizes inconsistent (named), different devices, empty.
    """
    op = "masked_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, x, 3)
    if not isinstance(bias, torch.Tensor) or bias.dim() not in (2, 3) or not bias.is_floating_point():
        raise DataError(f"{op}: bias must be a floating (n, n) or (H, n, n) tensor, got "
                        f"{getattr(bias, 'shape', type(bias).__name__)}")
    check_same_device(op, q=q, k=k, v=v, bias=bias)
    h, n, dh = q.shape
    check_nonempty(op, **{"q.shape[0] (H)": h, "q.shape[1] (n)": n, "q.shape[2] (dh)": dh})
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise DataError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    if bias.shape not in ((n, n), (h, n, n)):
        raise DataError(f"{op}: bias must have shape ({n}, {n}) or ({h}, {n}, {n}), got {tuple(bias.shape)}")
    dt = common_float_dtype(op, q=q, k=k, v=v, bias=bias)
    q, k, v, bias = (x.to(dt) for x in (q, k, v, bias))
    _, fn = dispatch(op, backend, q, k, v, bias, options={})
    return fn(q, k, v, bias)


register("gcn_layer", "reference", gcn_layer_reference)
register("masked_attention", "reference", masked_attention_reference)

"""Torch-only host helpers shared by the Triton and CUDA backends of the cross similarity.

No Triton import here: the CUDA backend (``aahr_fast/ops/_cuda_cross_similarity.py``) uses these on
machines without Triton.
"""
from __future__ import annotations

import torch

__all__ = ["inverse_norms", "unnormalize_grad"]


def inverse_norms(x: torch.Tensor, eps: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / max(||x||_2, eps)`` over the last dim, fp32, contiguous (shape ``x.shape[:-1]``).

    The normalisation ``x / max(||x||, eps)`` of ``torch.nn.functional.normalize``. ``valid``
    (x.shape[:-1] bool) sets padded slots to 0, so garbage there (even NaN) cannot reach a product.
    """
    n = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    inv = 1.0 / n.clamp_min(eps)
    if valid is not None:
        inv = torch.where(valid, inv, 0.0)
    return inv.contiguous()


def unnormalize_grad(
    x: torch.Tensor, inv: torch.Tensor, g_hat: torch.Tensor, eps: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Chain rule through ``x_hat = x * inv``, ``inv = 1 / max(||x||, eps)``.

    ``g_hat`` is dL/dx_hat (fp32). Where ``||x|| > eps``: ``dL/dx = inv * (g_hat - (g_hat . x_hat) x_hat)``;
    where clamped: ``dL/dx = inv * g_hat``. ``valid`` (x.shape[:-1] bool) zeroes padded slots (whose
    features may be garbage, even NaN). Returns fp32 of ``x``'s shape.
    """
    xf = x.float()
    if valid is not None:
        xf = torch.where(valid.unsqueeze(-1), xf, 0.0)
    x_hat = xf * inv.unsqueeze(-1)
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    radial = (g_hat * x_hat).sum(-1, keepdim=True) * x_hat
    grad = inv.unsqueeze(-1) * torch.where(norm > eps, g_hat - radial, g_hat)
    if valid is not None:
        grad = torch.where(valid.unsqueeze(-1), grad, 0.0)
    return grad

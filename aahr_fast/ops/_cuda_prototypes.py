"""The ``"cuda"`` backend of the prototype ops: Sinkhorn codes and the swapped-prediction loss.

Plugin module of :mod:`aahr_fast.ops._dispatch` (imported for the cuda backend). Kernels:
``csrc/cuda/prototypes.cu`` (log-domain Sinkhorn-Knopp; per-row loss + score gradients), bound by
``csrc/cuda/cuda_ops_binding.cpp`` as ``torch.ops.aahr_fast.sinkhorn_cuda`` / ``swav_rows_cuda``. The
GEMMs around them (scores ``x C^T``, ``dx = dS C``, ``dC = dS^T x``) are cuBLAS through torch.
Same contract as the reference; float64 runs the reference.
"""
from __future__ import annotations

import torch

from . import _ext
from ._dispatch import get_impl, register

__all__ = ["sinkhorn_cuda", "swapped_prediction_loss_cuda"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_ops = _ext.ops_namespace


def sinkhorn_cuda(scores, *, eps=0.1, n_iters=3):
    """CUDA backend of :func:`aahr_fast.ops.sinkhorn` (same contract; no gradient)."""
    if scores.dtype not in _KERNEL_DTYPES:
        return get_impl("sinkhorn", "reference")(scores, eps, n_iters)
    with torch.no_grad():
        return _ops().sinkhorn_cuda(scores.detach(), float(eps), int(n_iters)).to(scores.dtype)


class _SwAVCudaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
        ops = _ops()
        b = x_v.shape[0]
        ct = prototypes.float().t()
        full_v = x_v if queue_v is None else torch.cat([x_v, queue_v], dim=0)
        full_t = x_t if queue_t is None else torch.cat([x_t, queue_t], dim=0)
        s_v_all = full_v.float() @ ct
        s_t_all = full_t.float() @ ct
        q_v = ops.sinkhorn_cuda(s_v_all, eps, n_iters)[:b]
        q_t = ops.sinkhorn_cuda(s_t_all, eps, n_iters)[:b]
        rows, ds_v, ds_t = ops.swav_rows_cuda(s_v_all[:b], s_t_all[:b], q_v, q_t, tau)
        ctx.save_for_backward(x_v, x_t, prototypes, ds_v, ds_t)
        return (rows.sum() / b).to(x_v.dtype)

    @staticmethod
    def backward(ctx, g):
        x_v, x_t, c, ds_v, ds_t = ctx.saved_tensors
        gv, gt = ds_v * g.float(), ds_t * g.float()
        need = ctx.needs_input_grad
        d_xv = (gv @ c.float()).to(x_v.dtype) if need[0] else None
        d_xt = (gt @ c.float()).to(x_t.dtype) if need[1] else None
        d_c = (gv.t() @ x_v.float() + gt.t() @ x_t.float()).to(c.dtype) if need[2] else None
        return d_xv, d_xt, d_c, None, None, None, None, None


def swapped_prediction_loss_cuda(x_v, x_t, prototypes, *, eps=0.1, n_iters=3, tau=0.1, queue_v=None, queue_t=None):
    """CUDA backend of :func:`aahr_fast.ops.swapped_prediction_loss` (same contract)."""
    if any(t is not None and t.dtype not in _KERNEL_DTYPES for t in (x_v, x_t, prototypes, queue_v, queue_t)):
        return get_impl("swapped_prediction_loss", "reference")(
            x_v, x_t, prototypes, eps=eps, n_iters=n_iters, tau=tau, queue_v=queue_v, queue_t=queue_t)
    qv = None if queue_v is None else queue_v.detach()
    qt = None if queue_t is None else queue_t.detach()
    return _SwAVCudaFn.apply(x_v, x_t, prototypes, qv, qt, float(eps), int(n_iters), float(tau))


register("sinkhorn", "cuda", sinkhorn_cuda)
register("swapped_prediction_loss", "cuda", swapped_prediction_loss_cuda)

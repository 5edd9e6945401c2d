"""The ``"cuda"`` backend of the prototype ops: Sinkhorn codes and the swapped-prediction loss.

Plugin module of :mod:`aahr_fast.ops._dispatch` (imported for the cuda backend). Kernels:
``csrc/cuda/prototypes.cu`` (log-domain Sinkhorn-Knopp; per-row loss + score gradients), bound by
``csrc/cuda/cuda_ops_binding.cpp`` as ``torch.ops.aahr_fast.sinkhorn_cuda`` / ``swav_rows_cuda``. The
GEMMs around them (scores ``x C^T``, ``dx = dS C``, ``dC = dS^T x``) are cuBLAS through torch.

Operators (:mod:`aahr_fast.ops._library`, ``torch.library.custom_op`` with ``device_types="cuda"``):
``aahr::sinkhorn_cuda`` (no gradient), ``aahr::swapped_prediction_loss_cuda`` and its
``aahr::swapped_prediction_loss_cuda_backward``, each with a fake implementation (no data read, importable and
checkable on a CPU-only machine). Same contract as the reference; float64 runs the reference.
"""
from __future__ import annotations

import torch

from . import _ext
from ._dispatch import get_impl, register
from ._library import fused_op, placeholder
from ._schemas import define_swapped_prediction_loss

__all__ = ["sinkhorn_cuda", "swapped_prediction_loss_cuda", "sinkhorn_op", "swapped_prediction_loss_op",
           "swapped_prediction_loss_backward_op"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_ops = _ext.ops_namespace


#: ``aahr::sinkhorn_cuda(scores (B, K), eps, n_iters) -> codes (B, K)`` in the scores' dtype; no gradient.
sinkhorn_op = fused_op(
    "sinkhorn_cuda", "(Tensor scores, float eps, int n_iters) -> Tensor",
    lambda scores, eps, n_iters: _ops().sinkhorn_cuda(scores, eps, n_iters).to(scores.dtype),
    lambda scores, eps, n_iters: scores.new_empty(scores.shape), device_types="cuda")


def _swav_fwd(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
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
    return (rows.sum() / b).to(x_v.dtype), ds_v, ds_t


def _swav_bwd(grad, x_v, x_t, prototypes, ds_v, ds_t, needs):
    gv, gt = ds_v * grad.float(), ds_t * grad.float()
    c = prototypes.float()
    d_xv = (gv @ c).to(x_v.dtype) if needs[0] else placeholder(x_v)
    d_xt = (gt @ c).to(x_t.dtype) if needs[1] else placeholder(x_t)
    d_c = (gv.t() @ x_v.float() + gt.t() @ x_t.float()).to(prototypes.dtype) if needs[2] else placeholder(prototypes)
    return d_xv, d_xt, d_c


#: ``aahr::swapped_prediction_loss_cuda`` / ``_backward``: the schemas, fakes and autograd of
#: :func:`aahr_fast.ops._schemas.define_swapped_prediction_loss`. CUDA tensors only.
swapped_prediction_loss_op, swapped_prediction_loss_backward_op = define_swapped_prediction_loss(
    "cuda", _swav_fwd, _swav_bwd, lambda name, schema, impl, fake: fused_op(name, schema, impl, fake,
                                                                            device_types="cuda"))


def sinkhorn_cuda(scores, *, eps=0.1, n_iters=3):
    """CUDA backend of :func:`aahr_fast.ops.sinkhorn` (same contract; no gradient; ``aahr::sinkhorn_cuda``)."""
    if scores.dtype not in _KERNEL_DTYPES:
        return get_impl("sinkhorn", "reference")(scores, eps, n_iters)
    return sinkhorn_op(scores.detach(), float(eps), int(n_iters))


def swapped_prediction_loss_cuda(x_v, x_t, prototypes, *, eps=0.1, n_iters=3, tau=0.1, queue_v=None, queue_t=None):
    """CUDA backend of :func:`aahr_fast.ops.swapped_prediction_loss` (same contract; one operator)."""
    if any(t is not None and t.dtype not in _KERNEL_DTYPES for t in (x_v, x_t, prototypes, queue_v, queue_t)):
        return get_impl("swapped_prediction_loss", "reference")(
            x_v, x_t, prototypes, eps=eps, n_iters=n_iters, tau=tau, queue_v=queue_v, queue_t=queue_t)
    qv = None if queue_v is None else queue_v.detach()
    qt = None if queue_t is None else queue_t.detach()
    return swapped_prediction_loss_op(x_v, x_t, prototypes, qv, qt, float(eps), int(n_iters), float(tau))[0]


register("sinkhorn", "cuda", sinkhorn_cuda)
register("swapped_prediction_loss", "cuda", swapped_prediction_loss_cuda)

"""C++ CPU backend (``backend="cpp"``) of the prototype ops: autograd glue.

Kernels: ``csrc/cpu/prototypes.cpp`` (``torch.ops.aahr_fast.proto_*``), built by :mod:`aahr_fast.ops._ext`.
Registered into :mod:`aahr_fast.ops._dispatch` for :func:`~aahr_fast.ops.sinkhorn` and
:func:`~aahr_fast.ops.swapped_prediction_loss`, with the semantics of the references in
:mod:`aahr_fast.ops.prototypes` (aahr-method.md 2.5 and 3 item 2; SwAV):

* ``sinkhorn``: SwAV Sinkhorn-Knopp with dual potentials (exp-free scaling steps on ``exp(S / eps)`` while every
  factor is within exp(-G) of 1, log-sum-exp sweeps otherwise; no (K, B) transpose); the codes are
  ``softmax_k(S / eps + u)``;
* ``swapped_prediction_loss``: the scores of the batch and of the queues are written by GEMMs into one
  buffer, the two Sinkhorn problems, both log-softmaxes, the loss and its closed-form score gradient
  ``dS = (p * sum(q) - q) / (B tau)`` come from one C++ call; the backward is two GEMMs
  (``dX = dS C``, ``dC = dS_v^T x_v + dS_t^T x_t``). No gradient reaches the queues or the codes.

float32 and float64 run in C++; float16 / bfloat16 scores are computed in float32 (as the reference) and
the loss falls back to the reference for them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ext
from ._dispatch import register
from ._library import fused_op, grad_or_none, placeholder
from .prototypes import swapped_prediction_loss_reference

__all__ = ["sinkhorn_cpp", "swapped_prediction_loss_cpp"]

_CPP_DTYPES = _ext.CPP_DTYPES
_lib = _ext.ops_namespace


# ------------------------------------------------------------------ registered operators (aahr::*_cpp)
#: ``aahr::sinkhorn_cpp(scores (B, K), eps, n_iters) -> codes (B, K)``; no gradient flows to the scores.
sinkhorn_op = fused_op(
    "sinkhorn_cpp", "(Tensor scores, float eps, int n_iters) -> Tensor",
    lambda scores, eps, n_iters: _lib().proto_sinkhorn(scores, eps, n_iters),
    lambda scores, eps, n_iters: torch.empty_like(scores, memory_format=torch.contiguous_format),
    device_types="cpu")


def _swap_fwd(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
    return tuple(_lib().proto_swap_fwd(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau, 1.0))


def _swap_fwd_fake(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
    return x_v.new_empty(()), x_v.new_empty((2 * x_v.shape[0], prototypes.shape[0]))


def _swap_bwd(grad, dscores, x_v, x_t, prototypes, needs):
    outs = list(_lib().proto_swap_bwd(grad, dscores, x_v, x_t, prototypes, list(needs)))
    if needs[0] and needs[1] and outs[0].untyped_storage().data_ptr() == outs[1].untyped_storage().data_ptr():
        outs[1] = outs[1].clone()  # the kernel writes both (B, D) blocks of one GEMM; outputs must not alias
    return tuple(o if n and o is not None and o.numel() else placeholder(x_v) for o, n in zip(outs, needs))


def _swap_bwd_fake(grad, dscores, x_v, x_t, prototypes, needs):
    return tuple(x_v.new_empty(t.shape) if n else placeholder(x_v) for t, n in zip((x_v, x_t, prototypes), needs))


#: ``aahr::swapped_prediction_loss_cpp(x_v, x_t (B, D), prototypes (K, D), queue_v?, queue_t?, eps, n_iters, tau)
#: -> (loss (), dscores (2B, K))``; dscores (the closed-form score gradient) is kept for the backward.
swapped_prediction_loss_op = fused_op(
    "swapped_prediction_loss_cpp",
    "(Tensor x_v, Tensor x_t, Tensor prototypes, Tensor? queue_v, Tensor? queue_t, float eps, int n_iters, "
    "float tau) -> (Tensor, Tensor)",
    _swap_fwd, _swap_fwd_fake, device_types="cpu")
swapped_prediction_loss_backward_op = fused_op(
    "swapped_prediction_loss_cpp_backward",
    "(Tensor grad, Tensor dscores, Tensor x_v, Tensor x_t, Tensor prototypes, bool[] needs) -> (Tensor, Tensor, Tensor)",
    _swap_bwd, _swap_bwd_fake, device_types="cpu")


def _swap_setup(ctx, inputs, output):
    x_v, x_t, prototypes = inputs[:3]
    ctx.save_for_backward(output[1], x_v, x_t, prototypes)
    ctx.mark_non_differentiable(output[1])


def _swap_grad(ctx, grad, _g_ds):
    dscores, x_v, x_t, prototypes = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    if grad is None or not any(needs):
        return (None,) * 8
    gv, gt, gc = swapped_prediction_loss_backward_op(grad, dscores, x_v, x_t, prototypes, needs)
    return (grad_or_none(gv, needs[0]), grad_or_none(gt, needs[1]), grad_or_none(gc, needs[2])) + (None,) * 5


swapped_prediction_loss_op.register_autograd(_swap_grad, setup_context=_swap_setup)


@torch.no_grad()
def sinkhorn_cpp(scores: torch.Tensor, eps: float = 0.1, n_iters: int = 3) -> torch.Tensor:
    """C++ implementation of :func:`aahr_fast.ops.sinkhorn`: (B, K) codes, rows summing to 1, no gradient.

    Extra memory besides the codes: two (B, K) scratch buffers (``scores / eps`` and its exp), taken from the
    torch allocator, so :func:`aahr_fast.utils.memory.peak_extra_bytes` counts them.
    """
    s = scores.detach()
    out_dtype = s.dtype
    if s.dtype not in _CPP_DTYPES:
        s = s.float()
    return sinkhorn_op(s, float(eps), int(n_iters)).to(out_dtype)


def swapped_prediction_loss_cpp(
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
    """C++ implementation of :func:`aahr_fast.ops.swapped_prediction_loss` (same arguments, value, gradients).

    Extra memory: the ((B + Qv) + (B + Qt), K) scores, the (2B, K) codes and the (2B, K) score gradient
    kept for the backward, plus two ((B + Q), K) Sinkhorn scratch buffers while each modality's codes are computed.
    """
    if x_v.dtype not in _CPP_DTYPES:
        return swapped_prediction_loss_reference(x_v, x_t, prototypes, eps=eps, n_iters=n_iters, tau=tau,
                                                 queue_v=queue_v, queue_t=queue_t)
    qv = queue_v.detach() if queue_v is not None else None
    qt = queue_t.detach() if queue_t is not None else None
    return swapped_prediction_loss_op(x_v, x_t, prototypes, qv, qt, float(eps), int(n_iters), float(tau))[0]


register("sinkhorn", "cpp", sinkhorn_cpp)
register("swapped_prediction_loss", "cpp", swapped_prediction_loss_cpp)

"""Operator pairs whose schema, fakes and autograd formula are the same on the triton and cuda backends.

Only the kernels differ between ``aahr::cross_similarity_triton`` and ``aahr::cross_similarity_cuda`` (and the
two swapped-prediction operators), so each backend module passes its forward / backward implementations and
its way of defining an operator (``define(name, schema, impl, fake) -> CustomOpDef``: a triton_op for triton,
``fused_op(..., device_types="cuda")`` for cuda) and gets both operators back, autograd wired. The cpp
backend has its own schemas (its backward takes no ``needs`` list) in ``_cpp_<family>.py``; its cross-similarity
operator reuses this module's fake forward and autograd formula (:func:`register_xsim_autograd`).

Conventions of :mod:`aahr_fast.ops._library`: outputs never alias inputs; a gradient not listed in ``needs``
is a zero-size placeholder, mapped to ``None`` by the autograd formula.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._library import grad_or_none, placeholder

__all__ = ["XSIM_ARGS", "define_cross_similarity", "define_swapped_prediction_loss", "register_xsim_autograd",
           "xsim_fwd_fake"]

Define = Callable[[str, str, Callable, Callable], object]

XSIM_ARGS = ("Tensor regions, Tensor region_lens, Tensor words, Tensor word_lens, str mode, float slope, float eps, "
             "float temperature")


def xsim_fwd_fake(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    """Fake (meta) forward of every ``cross_similarity_<backend>`` operator: the output shapes of the mode."""
    bi, bt = regions.shape[0], words.shape[0]
    if mode == "relevance":
        return regions.new_empty((bt, bi)), regions.new_empty((bi, bt))
    return regions.new_empty((bi, bt)), regions.new_empty((0,))


def _xsim_bwd_fake(grad_a, grad_b, regions, region_lens, words, word_lens, mode, slope, eps, temperature, needs):
    return (regions.new_empty(regions.shape) if needs[0] else placeholder(regions),
            words.new_empty(words.shape) if needs[1] else placeholder(words))


def register_xsim_autograd(op, backward: Callable) -> None:
    """Register the autograd formula shared by every ``cross_similarity_<backend>`` operator on ``op``.

    Saves the four tensors and the (mode, slope, eps, temperature) settings; outside mode "relevance" the second output
    is not differentiable. In the backward, a ``None`` upstream gradient becomes zeros of its output's shape (grad_b is
    the (0,) placeholder outside mode "relevance"), and no kernel runs when no gradient flows.

    Args:
        op: the forward operator (a ``CustomOpDef``).
        backward: ``backward(needs [regions, words], (grad_a, grad_b, regions, region_lens, words, word_lens, mode,
            slope, eps, temperature)) -> (d regions, d words)``: how the backend calls its backward operator.
    """
    def setup(ctx, inputs, output):
        regions, region_lens, words, word_lens = inputs[:4]
        ctx.save_for_backward(regions, region_lens, words, word_lens)
        ctx.cfg = tuple(inputs[4:])
        if ctx.cfg[0] != "relevance":
            ctx.mark_non_differentiable(output[1])

    def grad(ctx, grad_a, grad_b):
        regions, region_lens, words, word_lens = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2]]
        if not any(needs) or (grad_a is None and grad_b is None):
            return (None,) * 8
        relevance = ctx.cfg[0] == "relevance"
        bi, bt = regions.shape[0], words.shape[0]
        if grad_a is None:
            grad_a = regions.new_zeros((bt, bi) if relevance else (bi, bt))
        if grad_b is None or not relevance:
            grad_b = regions.new_zeros((bi, bt) if relevance else (0,))
        d_r, d_w = backward(needs, (grad_a, grad_b, regions, region_lens, words, word_lens, *ctx.cfg))
        return grad_or_none(d_r, needs[0]), None, grad_or_none(d_w, needs[1]), None, None, None, None, None

    op.register_autograd(grad, setup_context=setup)


def define_cross_similarity(backend: str, fwd: Callable, bwd: Callable, define: Define) -> tuple:
    """Define ``aahr::cross_similarity_<backend>`` and ``aahr::cross_similarity_<backend>_backward``.

    Forward ``(regions (Bi, N, D), region_lens (Bi,) int64, words (Bt, L, D), word_lens (Bt,) int64, mode, slope,
    eps, temperature) -> (a, b)`` in the features' dtype: mode "relevance": t2i (Bt, Bi), i2t (Bi, Bt);
    "hard_mean" / "hard_lse": sim (Bi, Bt) and an empty (0,) tensor (not differentiable). Backward
    ``(grad_a, grad_b, <forward args>, needs [regions, words]) -> (d regions, d words)``; a gradient not in
    ``needs`` is a (0,) placeholder. Both public cross-similarity ops share the pair (mode argument).

    Args:
        backend: the name suffix ("triton", "cuda"). fwd / bwd: implementations with those signatures.
        define: how the backend defines one operator (see the module docstring).
    Returns:
        ``(forward_op, backward_op)``, autograd registered on the forward.
    Raises:
        whatever ``define`` raises for a bad schema (RuntimeError / ValueError from torch.library).
    """
    op = define(f"cross_similarity_{backend}", f"({XSIM_ARGS}) -> (Tensor, Tensor)", fwd, xsim_fwd_fake)
    backward_op = define(f"cross_similarity_{backend}_backward",
                         f"(Tensor grad_a, Tensor grad_b, {XSIM_ARGS}, bool[] needs) -> (Tensor, Tensor)",
                         bwd, _xsim_bwd_fake)

    register_xsim_autograd(op, lambda needs, inputs: backward_op(*inputs, needs))
    return op, backward_op


def _swav_fwd_fake(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
    b, k = x_v.shape[0], prototypes.shape[0]
    return x_v.new_empty(()), x_v.new_empty((b, k), dtype=torch.float32), x_v.new_empty((b, k), dtype=torch.float32)


def _swav_bwd_fake(grad, x_v, x_t, prototypes, ds_v, ds_t, needs):
    return tuple(like.new_empty(like.shape) if n else placeholder(like)
                 for like, n in zip((x_v, x_t, prototypes), needs))


def define_swapped_prediction_loss(backend: str, fwd: Callable, bwd: Callable, define: Define) -> tuple:
    """Define ``aahr::swapped_prediction_loss_<backend>`` and its ``_backward``.

    Forward ``(x_v, x_t (B, D), prototypes (K, D), queue_v?, queue_t? (Q, D), eps, n_iters, tau) -> (loss ()
    in x_v's dtype, ds_v, ds_t (B, K) float32)``; ds_* (the score gradients of a unit upstream gradient) are kept
    for the backward and are not differentiable; the queues are constants. Backward ``(grad (), x_v, x_t,
    prototypes, ds_v, ds_t, needs [x_v, x_t, prototypes]) -> (d x_v, d x_t, d prototypes)``.

    Args / Returns / Raises: as :func:`define_cross_similarity`.
    """
    op = define(f"swapped_prediction_loss_{backend}",
                "(Tensor x_v, Tensor x_t, Tensor prototypes, Tensor? queue_v, Tensor? queue_t, float eps, "
                "int n_iters, float tau) -> (Tensor, Tensor, Tensor)", fwd, _swav_fwd_fake)
    backward_op = define(f"swapped_prediction_loss_{backend}_backward",
                         "(Tensor grad, Tensor x_v, Tensor x_t, Tensor prototypes, Tensor ds_v, Tensor ds_t, "
                         "bool[] needs) -> (Tensor, Tensor, Tensor)", bwd, _swav_bwd_fake)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2], output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def grad(ctx, grad, _g_dsv, _g_dst):
        needs = list(ctx.needs_input_grad[:3])
        if grad is None or not any(needs):
            return (None,) * 8
        x_v, x_t, c, ds_v, ds_t = ctx.saved_tensors
        grads = backward_op(grad, x_v, x_t, c, ds_v, ds_t, needs)
        return tuple(grad_or_none(g, n) for g, n in zip(grads, needs)) + (None,) * 5

    op.register_autograd(grad, setup_context=setup)
    return op, backward_op

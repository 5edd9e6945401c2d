"""The ``"triton"`` backend of the public ops: registered operators around :mod:`aahr_fast.kernels`.

Registered into :mod:`aahr_fast.ops._dispatch` by :func:`register_family`, which each kernel module
(``aahr_fast.kernels.<family>``, the module the dispatcher imports for the triton backend) calls at
import time. Each implementation takes exactly the reference's arguments (already validated by the
public op) and returns the same outputs in the same dtypes, through one registered operator per kernel
(:mod:`aahr_fast.ops._library`): ``aahr::<op>_triton`` and ``aahr::<op>_triton_backward`` (its own fake),
wired with ``register_autograd``; ``OPERATORS`` lists them. The two cross-similarity ops share
``aahr::cross_similarity_triton`` (mode argument); ``topk_connection_triton`` and ``sinkhorn_triton`` have no
gradient. Saved tensors the backward needs (distances, log-sum-exps, score gradients, ``x W``) are extra
outputs marked non-differentiable; a gradient not asked for is a zero-size placeholder.

How they are registered: with ``torch.library.triton_op`` (kernels launched through
``torch.library.wrap_triton``, so ``torch.compile`` decomposes the operator and Inductor sees the Triton
kernels) when Triton compiles kernels; under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests)
the same names, schemas, fakes and autograd formulas are registered as opaque ``torch.library.custom_op``
operators instead, because interpreter kernels cannot be captured into a graph
(:func:`aahr_fast.ops._library.triton_traceable`).

Devices: CUDA tensors (compiled kernels), or CPU tensors when the Triton interpreter is on
(``TRITON_INTERPRET=1`` before import; tests only). dtypes: float32 / float16 / bfloat16 run the
kernels (fp32 accumulation); float64 inputs run the reference (Triton has no fp64 tensor-core path
worth a kernel). ``chunk_size`` of the cross-similarity ops is ignored: the kernels are tiled and use
O(Bi*Bt) memory for any gallery size. ``topk_connection`` uses torch's stable sort (the reference's
exact tie rule); everything else in the forward and backward passes is Triton. Not twice differentiable.
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._library import fused_op, grad_or_none, note_triton_kernels, placeholder, triton_traceable
from ._schemas import define_cross_similarity, define_swapped_prediction_loss

__all__ = ["register_family", "KERNEL_DTYPES", "OPERATORS"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: family -> its kernel module (``aahr_fast.kernels.<family>``), filled by :func:`register_family`. The glue
#: never imports a kernel module by name: the kernel modules import the glue (to register), so the
#: dependency runs one way only (no import cycle, tests/test_import_graph.py).
_KERNEL_MODULES: dict = {}


def _kernels(family: str):
    """The kernel module of ``family``. Before its first registration, the dispatcher's plugin import
    (the same one a triton op call triggers) loads it.

    Raises:
        BackendUnavailableError: the kernel module cannot be imported (Triton missing, ...).
    """
    mod = _KERNEL_MODULES.get(family)
    if mod is None:
        _dispatch.get_impl(next(iter(_FAMILIES[family])), "triton")   # imports aahr_fast.kernels.<family>
        mod = _KERNEL_MODULES.get(family)
        if mod is None:
            raise _dispatch.BackendUnavailableError(f"triton kernels of {family!r} are not registered")
    return mod


def _kernel_ok(*tensors) -> bool:
    return all(t is None or t.dtype in KERNEL_DTYPES for t in tensors)


def _reference(op: str):
    return _dispatch.get_impl(op, "reference")


def _check_device(op: str, *tensors) -> None:
    from aahr_fast.kernels._utils import interpreting

    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise _dispatch.BackendUnavailableError(
                f"{op}: the triton backend needs CUDA tensors (got {t.device}) or TRITON_INTERPRET=1"
            )


# ------------------------------------------------------------------------------ registered operators
def _body(fn):
    """The body of an ``aahr::*_triton`` operator: ``fn`` with its kernel launches made traceable.

    Inside :func:`aahr_fast.kernels._utils.traced_launches` the launchers hand kernels to
    ``torch.library.wrap_triton`` (a no-op in eager mode and under the interpreter).
    """
    import functools

    @functools.wraps(fn)
    def body(*args):
        from aahr_fast.kernels._utils import traced_launches

        with traced_launches():
            return fn(*args)

    return body


def _top(name: str, schema: str, impl, fake):
    """``fused_op(name, schema, impl, fake, triton=True)``: a triton_op, or the opaque custom_op fallback."""
    return fused_op(name, schema, _body(impl), fake, triton=True)


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype)


# ............................................................................. cross similarity
_XSIM_MODES = ("relevance", "hard_mean", "hard_lse")


def _xsim_mode(xk, mode: str) -> int:
    return {"relevance": xk.MODE_RELEVANCE, "hard_mean": xk.MODE_HARD_MEAN, "hard_lse": xk.MODE_HARD_LSE}[mode]


def _xsim_norms(xk, regions, region_lens, words, word_lens, eps):
    n, l = regions.shape[1], words.shape[1]
    rvalid = torch.arange(n, device=regions.device)[None, :] < region_lens[:, None]
    wvalid = torch.arange(l, device=words.device)[None, :] < word_lens[:, None]
    return xk.inverse_norms(regions, eps, rvalid), xk.inverse_norms(words, eps, wvalid), rvalid, wvalid


def _xsim_fwd(regions, region_lens, words, word_lens, mode, slope, eps, temperature):
    xk = _kernels("cross_similarity")
    rinv, winv, _, _ = _xsim_norms(xk, regions, region_lens, words, word_lens, eps)
    o1, o2 = xk.cross_similarity_forward(
        regions, region_lens, words, word_lens, rinv, winv, mode=_xsim_mode(xk, mode), negative_slope=slope,
        eps=eps, temperature=temperature)
    o1 = _cast(o1, regions)
    return o1, (placeholder(o1) if o2 is None else _cast(o2, regions))


def _xsim_bwd(grad_a, grad_b, regions, region_lens, words, word_lens, mode, slope, eps, temperature, needs):
    xk = _kernels("cross_similarity")
    rinv, winv, rvalid, wvalid = _xsim_norms(xk, regions, region_lens, words, word_lens, eps)
    m = _xsim_mode(xk, mode)
    g2 = grad_b.float() if m == xk.MODE_RELEVANCE else None
    gr_hat, gw_hat = xk.cross_similarity_backward(
        regions, region_lens, words, word_lens, rinv, winv, grad_a.float(), g2, mode=m, negative_slope=slope,
        eps=eps, temperature=temperature, need_regions=needs[0], need_words=needs[1])
    gr = _cast(xk.unnormalize_grad(regions, rinv, gr_hat, eps, rvalid), regions) if needs[0] else placeholder(regions)
    gw = _cast(xk.unnormalize_grad(words, winv, gw_hat, eps, wvalid), words) if needs[1] else placeholder(words)
    return gr, gw


#: ``aahr::cross_similarity_triton`` / ``aahr::cross_similarity_triton_backward``: the schemas, fakes and autograd
#: of :func:`aahr_fast.ops._schemas.define_cross_similarity`. Padded inputs (the kernels mask the padding).
cross_similarity_op, cross_similarity_backward_op = define_cross_similarity("triton", _xsim_fwd, _xsim_bwd, _top)


def fragment_word_relevance_triton(regions, region_lens, words, word_lens, *, negative_slope=0.1, eps=1e-8,
                                   chunk_size=None, paper_compat=False):
    """Triton backend of :func:`aahr_fast.ops.fragment_word_relevance` (same contract; one operator)."""
    op = "fragment_word_relevance"
    if not _kernel_ok(regions, words):
        return _reference(op)(regions, region_lens, words, word_lens, negative_slope=negative_slope, eps=eps,
                              chunk_size=chunk_size, paper_compat=paper_compat)
    _check_device(op, regions, words)
    if paper_compat:
        region_lens = torch.full_like(region_lens, regions.shape[1])
    return cross_similarity_op(regions, region_lens, words, word_lens, "relevance", float(negative_slope), float(eps),
                               1.0)


def hard_assignment_similarity_triton(regions, region_lens, words, word_lens, *, agg="mean", temperature=0.1,
                                      eps=1e-8, chunk_size=None):
    """Triton backend of :func:`aahr_fast.ops.hard_assignment_similarity` (same contract; one operator)."""
    op = "hard_assignment_similarity"
    if not _kernel_ok(regions, words):
        return _reference(op)(regions, region_lens, words, word_lens, agg=agg, temperature=temperature, eps=eps,
                              chunk_size=chunk_size)
    _check_device(op, regions, words)
    mode = "hard_mean" if agg == "mean" else "hard_lse"
    return cross_similarity_op(regions, region_lens, words, word_lens, mode, 0.0, float(eps), float(temperature))[0]


# ..................................................................................... correlation
def _intra_fwd(x, sigma):
    ck = _kernels("correlation")
    b = x.shape[0]
    rel = torch.empty((b, b), device=x.device, dtype=x.dtype)
    dist = ck.pairwise_relevance_forward(x, 1, sigma, rel_out=rel)
    return rel, dist


def _intra_fwd_fake(x, sigma):
    b = x.shape[0]
    return x.new_empty((b, b)), x.new_empty((1, b, b), dtype=torch.float32)


def _intra_bwd(grad, x, dist, sigma):
    ck = _kernels("correlation")
    return _cast(ck.pairwise_relevance_backward(x, dist, sigma, grad_rel=grad), x)


def _intra_bwd_fake(grad, x, dist, sigma):
    return x.new_empty(x.shape)


#: ``aahr::intra_relevance_triton(x (B, D), sigma) -> (rel (B, B) x.dtype, dist (1, B, B) float32)``; dist (the
#: pairwise distances) is kept for the backward and is not differentiable.
intra_relevance_op = _top("intra_relevance_triton", "(Tensor x, float sigma) -> (Tensor, Tensor)", _intra_fwd,
                          _intra_fwd_fake)
#: ``aahr::intra_relevance_triton_backward(grad (B, B), x, dist, sigma) -> d x (B, D)``.
intra_relevance_backward_op = _top(
    "intra_relevance_triton_backward", "(Tensor grad, Tensor x, Tensor dist, float sigma) -> Tensor", _intra_bwd,
    _intra_bwd_fake)


def _intra_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.sigma = inputs[1]
    ctx.mark_non_differentiable(output[1])


def _intra_grad(ctx, g_rel, _g_dist):
    x, dist = ctx.saved_tensors
    if g_rel is None or not ctx.needs_input_grad[0]:
        return None, None
    return intra_relevance_backward_op(g_rel, x, dist, ctx.sigma), None


intra_relevance_op.register_autograd(_intra_grad, setup_context=_intra_setup)


def intra_relevance_triton(x, *, sigma=1.0):
    """Triton backend of :func:`aahr_fast.ops.intra_relevance` (same contract; ``aahr::intra_relevance_triton``)."""
    if not _kernel_ok(x):
        return _reference("intra_relevance")(x, sigma)
    _check_device("intra_relevance", x)
    return intra_relevance_op(x, float(sigma))[0]


def _topk_fwd(scores, k):
    ck = _kernels("correlation")
    out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    ck.topk_into(scores, k, out)
    return out


#: ``aahr::topk_connection_triton(scores (B, B'), k) -> bool (B, B')``; no gradient (boolean output).
topk_connection_op = _top("topk_connection_triton", "(Tensor scores, int k) -> Tensor", _topk_fwd,
                          lambda scores, k: scores.new_empty(scores.shape, dtype=torch.bool))


def topk_connection_triton(scores, *, rho=0.5):
    """Triton-backend entry of :func:`aahr_fast.ops.topk_connection`: torch stable sort (no kernel), one operator."""
    from .correlation import connection_count

    return topk_connection_op(scores.detach(), connection_count(rho, scores.shape[1]))


def _inst_fwd(v, t, rel_i2t, rel_t2i, sigma, k, lam):
    ck = _kernels("correlation")
    relevance, connection, attn_bias, dist, _x = ck.assemble_correlation(v, t, rel_i2t, rel_t2i, k, k, sigma, lam)
    return relevance, connection, attn_bias, dist


def _inst_fwd_fake(v, t, rel_i2t, rel_t2i, sigma, k, lam):
    b = v.shape[0]
    return (v.new_empty((2 * b, 2 * b)), v.new_empty((2 * b, 2 * b), dtype=torch.bool), v.new_empty((2 * b, 2 * b)),
            v.new_empty((2, b, b), dtype=torch.float32))


def _inst_bwd(g_rel, g_bias, v, t, conn, dist, sigma, lam, needs):
    ck = _kernels("correlation")
    b = v.shape[0]
    x = torch.cat([v, t], dim=0)
    dx = ck.pairwise_relevance_backward(x, dist, sigma, grad_rel=g_rel, grad_bias=g_bias, conn=conn, lam=lam)
    # copies: the two halves of one buffer must not be returned as aliasing outputs
    gv = dx[:b].to(v.dtype, copy=True) if needs[0] else placeholder(v)
    gt = dx[b:].to(t.dtype, copy=True) if needs[1] else placeholder(t)
    return gv, gt


def _inst_bwd_fake(g_rel, g_bias, v, t, conn, dist, sigma, lam, needs):
    return (v.new_empty(v.shape) if needs[0] else placeholder(v),
            t.new_empty(t.shape) if needs[1] else placeholder(t))


#: ``aahr::instance_correlation_triton(v, t (B, D), rel_i2t, rel_t2i (B, B), sigma, k, lam) -> (relevance,
#: connection bool, attn_bias (2B, 2B), dist (2, B, B) float32)``; connection and dist are not differentiable,
#: ``rel_i2t`` / ``rel_t2i`` are constants (no gradient), as in the reference.
instance_correlation_op = _top(
    "instance_correlation_triton",
    "(Tensor v, Tensor t, Tensor rel_i2t, Tensor rel_t2i, float sigma, int k, float lam) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _inst_fwd, _inst_fwd_fake)
#: ``aahr::instance_correlation_triton_backward(g_rel?, g_bias? (2B, 2B), v, t, conn, dist, sigma, lam, needs [v, t])
#: -> (d v, d t)``.
instance_correlation_backward_op = _top(
    "instance_correlation_triton_backward",
    "(Tensor? g_rel, Tensor? g_bias, Tensor v, Tensor t, Tensor conn, Tensor dist, float sigma, float lam, "
    "bool[] needs) -> (Tensor, Tensor)", _inst_bwd, _inst_bwd_fake)


def _inst_setup(ctx, inputs, output):
    v, t = inputs[0], inputs[1]
    _rel, conn, _bias, dist = output
    ctx.save_for_backward(v, t, conn, dist)
    ctx.sigma, ctx.lam = inputs[4], inputs[6]
    ctx.mark_non_differentiable(conn, dist)


def _inst_grad(ctx, g_rel, _g_conn, g_bias, _g_dist):
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if (g_rel is None and g_bias is None) or not any(needs):
        return (None,) * 7
    v, t, conn, dist = ctx.saved_tensors
    gv, gt = instance_correlation_backward_op(g_rel, g_bias, v, t, conn, dist, ctx.sigma, ctx.lam, needs)
    return (grad_or_none(gv, needs[0]), grad_or_none(gt, needs[1])) + (None,) * 5


instance_correlation_op.register_autograd(_inst_grad, setup_context=_inst_setup)


def instance_correlation_triton(v, t, rel_i2t, rel_t2i, *, sigma=1.0, rho=0.5, lam=1.0):
    """Triton backend of :func:`aahr_fast.ops.instance_correlation` (same contract; one operator)."""
    from .correlation import Correlation, connection_count

    if not _kernel_ok(v, t, rel_i2t, rel_t2i):
        return _reference("instance_correlation")(v, t, rel_i2t, rel_t2i, sigma=sigma, rho=rho, lam=lam)
    _check_device("instance_correlation", v, t, rel_i2t, rel_t2i)
    relevance, connection, attn_bias, _dist = instance_correlation_op(
        v, t, rel_i2t.detach(), rel_t2i.detach(), float(sigma), connection_count(rho, v.shape[0]), float(lam))
    return Correlation(relevance, connection, attn_bias)


# ................................................................................. message passing
def _gcn_fwd(adj, x, weight, bias, slope):
    mk = _kernels("message_passing")
    out, h = mk.gcn_forward(adj, x, weight, bias, slope)
    return out, h


def _gcn_fwd_fake(adj, x, weight, bias, slope):
    return x.new_empty((adj.shape[0], weight.shape[1])), x.new_empty((x.shape[0], weight.shape[1]))


def _gcn_bwd(grad, adj, x, weight, h, out, slope, has_bias, needs):
    mk = _kernels("message_passing")
    grads = mk.gcn_backward(grad, adj, x, weight, h, out, slope, has_bias, tuple(needs))
    likes = (adj, x, weight, out)
    return tuple(_cast(g, like) if n and g is not None else placeholder(like)
                 for g, like, n in zip(grads, likes, needs))


def _gcn_bwd_fake(grad, adj, x, weight, h, out, slope, has_bias, needs):
    shapes = (adj.shape, x.shape, weight.shape, (out.shape[1],))
    likes = (adj, x, weight, out)
    return tuple(like.new_empty(s) if n and (i < 3 or has_bias) else placeholder(like)
                 for i, (s, like, n) in enumerate(zip(shapes, likes, needs)))


#: ``aahr::gcn_layer_triton(adj (N, N), x (N, Din), weight (Din, Dout), bias? (Dout,), slope) -> (out (N, Dout),
#: h = x W (N, Dout))``; h is kept for the backward and is not differentiable.
gcn_layer_op = _top("gcn_layer_triton", "(Tensor adj, Tensor x, Tensor weight, Tensor? bias, float slope) "
                    "-> (Tensor, Tensor)", _gcn_fwd, _gcn_fwd_fake)
#: ``aahr::gcn_layer_triton_backward(grad, adj, x, weight, h, out, slope, has_bias, needs [adj, x, weight, bias])
#: -> (d adj, d x, d weight, d bias)``.
gcn_layer_backward_op = _top(
    "gcn_layer_triton_backward",
    "(Tensor grad, Tensor adj, Tensor x, Tensor weight, Tensor h, Tensor out, float slope, bool has_bias, "
    "bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)", _gcn_bwd, _gcn_bwd_fake)


def _gcn_setup(ctx, inputs, output):
    adj, x, weight, bias, slope = inputs
    out, h = output
    ctx.save_for_backward(adj, x, weight, h, out)
    ctx.slope, ctx.has_bias = slope, bias is not None
    ctx.mark_non_differentiable(h)


def _gcn_grad(ctx, grad, _g_h):
    needs = list(ctx.needs_input_grad[:4])
    needs[3] = needs[3] and ctx.has_bias
    if grad is None or not any(needs):
        return (None,) * 5
    adj, x, weight, h, out = ctx.saved_tensors
    grads = gcn_layer_backward_op(grad, adj, x, weight, h, out, ctx.slope, ctx.has_bias, needs)
    return tuple(grad_or_none(g, n) for g, n in zip(grads, needs)) + (None,)


gcn_layer_op.register_autograd(_gcn_grad, setup_context=_gcn_setup)


def gcn_layer_triton(adj, x, weight, bias=None, negative_slope=0.2):
    """Triton backend of :func:`aahr_fast.ops.gcn_layer` (same contract; ``aahr::gcn_layer_triton``)."""
    if not _kernel_ok(adj, x, weight, bias):
        return _reference("gcn_layer")(adj, x, weight, bias, negative_slope)
    _check_device("gcn_layer", adj, x, weight, bias)
    return gcn_layer_op(adj, x, weight, bias, float(negative_slope))[0]


def _attn_fwd(q, k, v, bias):
    mk = _kernels("message_passing")
    return mk.attention_forward(q, k, v, bias)


def _attn_fwd_fake(q, k, v, bias):
    h, n, dh = q.shape
    return q.new_empty((h, n, dh)), q.new_empty((h, n), dtype=torch.float32)


def _attn_bwd(grad, q, k, v, bias, out, lse, needs):
    mk = _kernels("message_passing")
    grads = mk.attention_backward(grad, q, k, v, bias, out, lse, needs[3])
    likes = (q, k, v, bias)
    return tuple(_cast(g, like) if n else placeholder(like) for g, like, n in zip(grads, likes, needs))


def _attn_bwd_fake(grad, q, k, v, bias, out, lse, needs):
    return tuple(like.new_empty(like.shape) if n else placeholder(like) for like, n in zip((q, k, v, bias), needs))


#: ``aahr::masked_attention_triton(q, k, v (H, n, dh), bias (n, n) or (H, n, n)) -> (out (H, n, dh), lse (H, n)
#: float32)``; lse (row log-sum-exps, +inf for rows without a connection) is kept for the backward.
masked_attention_op = _top("masked_attention_triton", "(Tensor q, Tensor k, Tensor v, Tensor bias) -> (Tensor, Tensor)",
                           _attn_fwd, _attn_fwd_fake)
#: ``aahr::masked_attention_triton_backward(grad, q, k, v, bias, out, lse, needs [q, k, v, bias]) -> (dq, dk, dv,
#: d bias)``.
masked_attention_backward_op = _top(
    "masked_attention_triton_backward",
    "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, bool[] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor)", _attn_bwd, _attn_bwd_fake)


def _attn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _attn_grad(ctx, grad, _g_lse):
    needs = list(ctx.needs_input_grad[:4])
    if grad is None or not any(needs):
        return (None,) * 4
    q, k, v, bias, out, lse = ctx.saved_tensors
    grads = masked_attention_backward_op(grad, q, k, v, bias, out, lse, needs)
    return tuple(grad_or_none(g, n) for g, n in zip(grads, needs))


masked_attention_op.register_autograd(_attn_grad, setup_context=_attn_setup)


def masked_attention_triton(q, k, v, bias):
    """Triton backend of :func:`aahr_fast.ops.masked_attention` (same contract; ``aahr::masked_attention_triton``)."""
    if not _kernel_ok(q, k, v, bias):
        return _reference("masked_attention")(q, k, v, bias)
    _check_device("masked_attention", q, k, v, bias)
    return masked_attention_op(q, k, v, bias)[0]


# ------------------------------------------------------------------------------------- prototypes
def _sinkhorn_fwd(scores, eps, n_iters):
    pk = _kernels("prototypes")
    return pk.sinkhorn_codes(scores, eps, n_iters, scores.dtype)


#: ``aahr::sinkhorn_triton(scores (B, K), eps, n_iters) -> codes (B, K)`` in the scores' dtype; no gradient.
sinkhorn_op = _top("sinkhorn_triton", "(Tensor scores, float eps, int n_iters) -> Tensor", _sinkhorn_fwd,
                   lambda scores, eps, n_iters: scores.new_empty(scores.shape))


def sinkhorn_triton(scores, *, eps=0.1, n_iters=3):
    """Triton backend of :func:`aahr_fast.ops.sinkhorn` (same contract; no gradient; ``aahr::sinkhorn_triton``)."""
    if not _kernel_ok(scores):
        return _reference("sinkhorn")(scores, eps, n_iters)
    _check_device("sinkhorn", scores)
    return sinkhorn_op(scores.detach(), float(eps), int(n_iters))


def _swav_fwd(x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
    pk = _kernels("prototypes")
    loss, ds_v, ds_t = pk.swav_loss_forward(x_v, x_t, prototypes, eps, n_iters, tau, queue_v, queue_t)
    return _cast(loss, x_v), ds_v, ds_t


def _swav_bwd(grad, x_v, x_t, prototypes, ds_v, ds_t, needs):
    pk = _kernels("prototypes")
    grads = pk.swav_loss_backward(grad.float(), x_v, x_t, prototypes, ds_v, ds_t, tuple(needs))
    likes = (x_v, x_t, prototypes)
    return tuple(_cast(g, like) if n else placeholder(like) for g, like, n in zip(grads, likes, needs))


#: ``aahr::swapped_prediction_loss_triton`` / ``_backward``: the schemas, fakes and autograd of
#: :func:`aahr_fast.ops._schemas.define_swapped_prediction_loss`.
swapped_prediction_loss_op, swapped_prediction_loss_backward_op = define_swapped_prediction_loss(
    "triton", _swav_fwd, _swav_bwd, _top)


def swapped_prediction_loss_triton(x_v, x_t, prototypes, *, eps=0.1, n_iters=3, tau=0.1, queue_v=None, queue_t=None):
    """Triton backend of :func:`aahr_fast.ops.swapped_prediction_loss` (same contract; one operator)."""
    if not _kernel_ok(x_v, x_t, prototypes, queue_v, queue_t):
        return _reference("swapped_prediction_loss")(x_v, x_t, prototypes, eps=eps, n_iters=n_iters, tau=tau,
                                                     queue_v=queue_v, queue_t=queue_t)
    _check_device("swapped_prediction_loss", x_v, x_t, prototypes, queue_v, queue_t)
    qv = None if queue_v is None else queue_v.detach()
    qt = None if queue_t is None else queue_t.detach()
    return swapped_prediction_loss_op(x_v, x_t, prototypes, qv, qt, float(eps), int(n_iters), float(tau))[0]


#: every triton operator: forward name -> (forward op, backward op or None)
OPERATORS = {
    "cross_similarity_triton": (cross_similarity_op, cross_similarity_backward_op),
    "intra_relevance_triton": (intra_relevance_op, intra_relevance_backward_op),
    "topk_connection_triton": (topk_connection_op, None),
    "instance_correlation_triton": (instance_correlation_op, instance_correlation_backward_op),
    "gcn_layer_triton": (gcn_layer_op, gcn_layer_backward_op),
    "masked_attention_triton": (masked_attention_op, masked_attention_backward_op),
    "sinkhorn_triton": (sinkhorn_op, None),
    "swapped_prediction_loss_triton": (swapped_prediction_loss_op, swapped_prediction_loss_backward_op),
}


# ------------------------------------------------------------------------------------ registration
_FAMILIES = {
    "cross_similarity": {
        "fragment_word_relevance": fragment_word_relevance_triton,
        "hard_assignment_similarity": hard_assignment_similarity_triton,
    },
    "correlation": {
        "intra_relevance": intra_relevance_triton,
        "topk_connection": topk_connection_triton,
        "instance_correlation": instance_correlation_triton,
    },
    "message_passing": {"gcn_layer": gcn_layer_triton, "masked_attention": masked_attention_triton},
    "prototypes": {"sinkhorn": sinkhorn_triton, "swapped_prediction_loss": swapped_prediction_loss_triton},
}


#: family -> its registered operators (names inside ``aahr``)
_FAMILY_OPERATORS = {
    "cross_similarity": ["cross_similarity_triton", "cross_similarity_triton_backward"],
    "correlation": ["intra_relevance_triton", "intra_relevance_triton_backward", "topk_connection_triton",
                    "instance_correlation_triton", "instance_correlation_triton_backward"],
    "message_passing": ["gcn_layer_triton", "gcn_layer_triton_backward", "masked_attention_triton",
                        "masked_attention_triton_backward"],
    "prototypes": ["sinkhorn_triton", "swapped_prediction_loss_triton", "swapped_prediction_loss_triton_backward"],
}


def register_family(family: str, module: str | None = None) -> None:
    """Register the triton implementations of every op of ``family`` (called by the kernel modules).

    Args:
        family: ``cross_similarity`` / ``correlation`` / ``message_passing`` / ``prototypes``.
        module: the kernel module's ``__name__`` (it calls this at import, so it is in ``sys.modules``);
            None means ``aahr_fast.kernels.<family>``.
    Raises:
        KeyError: unknown family name, or ``module`` not imported.
    """
    import sys

    mod = _KERNEL_MODULES[family] = sys.modules[module or f"aahr_fast.kernels.{family}"]
    for op, fn in _FAMILIES[family].items():
        _dispatch.register(op, "triton", fn)
    if triton_traceable():  # the kernels each triton_op launches (the family's and the shared _utils ones)
        from triton.runtime.jit import JITFunction

        utils = sys.modules.get("aahr_fast.kernels._utils")
        jitted = [v for m in (mod, utils) if m is not None for v in vars(m).values() if isinstance(v, JITFunction)]
        for name in _FAMILY_OPERATORS[family]:
            note_triton_kernels(f"aahr::{name}", jitted)


def implementations() -> dict[str, object]:
    """op name -> triton implementation (for tests and :mod:`aahr_fast.gpucheck`)."""
    return {op: fn for fams in _FAMILIES.values() for op, fn in fams.items()}


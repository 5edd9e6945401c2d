"""The ``"triton"`` backend of the public ops: autograd Functions around :mod:`aahr_fast.kernels`.

Registered into :mod:`aahr_fast.ops._dispatch` by :func:`register_family`, which each kernel module
(``aahr_fast.kernels.<family>``, the module the dispatcher imports for the triton backend) calls at
import time. Each implementation takes exactly the reference's arguments (already validated by the
public op) and returns the same outputs in the same dtypes, differentiable through its own
``torch.autograd.Function`` whose backward runs Triton kernels.

Devices: CUDA tensors (compiled kernels), or CPU tensors when the Triton interpreter is on
(``TRITON_INTERPRET=1`` before import; tests only). dtypes: float32 / float16 / bfloat16 run the
kernels (fp32 accumulation); float64 inputs run the reference (Triton has no fp64 tensor-core path
worth a kernel). ``chunk_size`` of the cross-similarity ops is ignored: the kernels are tiled and use
O(Bi*Bt) memory for any gallery size. ``topk_connection`` uses torch's stable sort (the reference's
exact tie rule); everything else in the forward and backward passes is Triton.
"""
from __future__ import annotations

import torch

from . import _dispatch

__all__ = ["register_family", "KERNEL_DTYPES"]

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


# ------------------------------------------------------------------------------ cross similarity
class _CrossSimilarityFn(torch.autograd.Function):
    """Fused region-word similarity (both modes); see :mod:`aahr_fast.kernels.cross_similarity`."""

    @staticmethod
    def forward(ctx, regions, words, region_lens, word_lens, mode, slope, eps, temperature):
        xk = _kernels("cross_similarity")

        n, l = regions.shape[1], words.shape[1]
        rvalid = torch.arange(n, device=regions.device)[None, :] < region_lens[:, None]
        wvalid = torch.arange(l, device=words.device)[None, :] < word_lens[:, None]
        rinv = xk.inverse_norms(regions, eps, rvalid)
        winv = xk.inverse_norms(words, eps, wvalid)
        o1, o2 = xk.cross_similarity_forward(
            regions, region_lens, words, word_lens, rinv, winv, mode=mode, negative_slope=slope, eps=eps,
            temperature=temperature,
        )
        ctx.save_for_backward(regions, words, region_lens, word_lens, rinv, winv, rvalid, wvalid)
        ctx.cfg = (mode, slope, eps, temperature)
        if o2 is None:
            return o1.to(regions.dtype)
        return o1.to(regions.dtype), o2.to(regions.dtype)

    @staticmethod
    def backward(ctx, *grads):
        xk = _kernels("cross_similarity")

        regions, words, region_lens, word_lens, rinv, winv, rvalid, wvalid = ctx.saved_tensors
        mode, slope, eps, temperature = ctx.cfg
        if mode == xk.MODE_RELEVANCE:
            g1, g2 = grads
            bi, bt = regions.shape[0], words.shape[0]
            g1 = torch.zeros((bt, bi), device=regions.device) if g1 is None else g1.float()
            g2 = torch.zeros((bi, bt), device=regions.device) if g2 is None else g2.float()
        else:
            g1, g2 = grads[0].float(), None
        need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gr_hat, gw_hat = xk.cross_similarity_backward(
            regions, region_lens, words, word_lens, rinv, winv, g1, g2, mode=mode, negative_slope=slope,
            eps=eps, temperature=temperature, need_regions=need_r, need_words=need_w,
        )
        gr = xk.unnormalize_grad(regions, rinv, gr_hat, eps, rvalid).to(regions.dtype) if need_r else None
        gw = xk.unnormalize_grad(words, winv, gw_hat, eps, wvalid).to(words.dtype) if need_w else None
        return gr, gw, None, None, None, None, None, None


def fragment_word_relevance_triton(regions, region_lens, words, word_lens, *, negative_slope=0.1, eps=1e-8,
                                   chunk_size=None, paper_compat=False):
    """Triton backend of :func:`aahr_fast.ops.fragment_word_relevance` (same contract)."""
    op = "fragment_word_relevance"
    if not _kernel_ok(regions, words):
        return _reference(op)(regions, region_lens, words, word_lens, negative_slope=negative_slope, eps=eps,
                              chunk_size=chunk_size, paper_compat=paper_compat)
    _check_device(op, regions, words)
    xk = _kernels("cross_similarity")

    if paper_compat:
        region_lens = torch.full_like(region_lens, regions.shape[1])
    return _CrossSimilarityFn.apply(regions, words, region_lens, word_lens, xk.MODE_RELEVANCE,
                                    float(negative_slope), float(eps), 1.0)


def hard_assignment_similarity_triton(regions, region_lens, words, word_lens, *, agg="mean", temperature=0.1,
                                      eps=1e-8, chunk_size=None):
    """Triton backend of :func:`aahr_fast.ops.hard_assignment_similarity` (same contract)."""
    op = "hard_assignment_similarity"
    if not _kernel_ok(regions, words):
        return _reference(op)(regions, region_lens, words, word_lens, agg=agg, temperature=temperature, eps=eps,
                              chunk_size=chunk_size)
    _check_device(op, regions, words)
    xk = _kernels("cross_similarity")

    mode = xk.MODE_HARD_MEAN if agg == "mean" else xk.MODE_HARD_LSE
    return _CrossSimilarityFn.apply(regions, words, region_lens, word_lens, mode, 0.0, float(eps), float(temperature))


# ------------------------------------------------------------------------------------ correlation
class _IntraRelevanceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sigma):
        ck = _kernels("correlation")

        b = x.shape[0]
        rel = torch.empty((b, b), device=x.device, dtype=x.dtype)
        dist = ck.pairwise_relevance_forward(x, 1, sigma, rel_out=rel)
        ctx.save_for_backward(x, dist)
        ctx.sigma = sigma
        return rel

    @staticmethod
    def backward(ctx, g):
        ck = _kernels("correlation")

        x, dist = ctx.saved_tensors
        dx = ck.pairwise_relevance_backward(x, dist, ctx.sigma, grad_rel=g)
        return dx.to(x.dtype), None


def intra_relevance_triton(x, *, sigma=1.0):
    """Triton backend of :func:`aahr_fast.ops.intra_relevance` (same contract)."""
    if not _kernel_ok(x):
        return _reference("intra_relevance")(x, sigma)
    _check_device("intra_relevance", x)
    return _IntraRelevanceFn.apply(x, float(sigma))


def topk_connection_triton(scores, *, rho=0.5):
    """Triton-backend entry of :func:`aahr_fast.ops.topk_connection`: torch stable sort (no kernel)."""
    ck = _kernels("correlation")

    from .correlation import connection_count

    out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    ck.topk_into(scores, connection_count(rho, scores.shape[1]), out)
    return out


class _InstanceCorrelationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, t, rel_i2t, rel_t2i, sigma, rho, lam):
        ck = _kernels("correlation")

        from .correlation import connection_count

        b = v.shape[0]
        k = connection_count(rho, b)
        relevance, connection, attn_bias, dist, x = ck.assemble_correlation(
            v, t, rel_i2t.detach(), rel_t2i.detach(), k, k, sigma, lam
        )
        ctx.save_for_backward(x, dist, connection)
        ctx.cfg = (sigma, lam)
        ctx.mark_non_differentiable(connection)
        return relevance, connection, attn_bias

    @staticmethod
    def backward(ctx, g_rel, g_conn, g_bias):
        ck = _kernels("correlation")

        x, dist, connection = ctx.saved_tensors
        sigma, lam = ctx.cfg
        b = dist.shape[1]
        dx = ck.pairwise_relevance_backward(x, dist, sigma, grad_rel=g_rel, grad_bias=g_bias, conn=connection, lam=lam)
        return dx[:b].to(x.dtype), dx[b:].to(x.dtype), None, None, None, None, None


def instance_correlation_triton(v, t, rel_i2t, rel_t2i, *, sigma=1.0, rho=0.5, lam=1.0):
    """Triton backend of :func:`aahr_fast.ops.instance_correlation` (same contract)."""
    from .correlation import Correlation

    if not _kernel_ok(v, t, rel_i2t, rel_t2i):
        return _reference("instance_correlation")(v, t, rel_i2t, rel_t2i, sigma=sigma, rho=rho, lam=lam)
    _check_device("instance_correlation", v, t, rel_i2t, rel_t2i)
    relevance, connection, attn_bias = _InstanceCorrelationFn.apply(
        v, t, rel_i2t, rel_t2i, float(sigma), float(rho), float(lam)
    )
    return Correlation(relevance, connection, attn_bias)


# -------------------------------------------------------------------------------- message passing
class _GCNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj, x, weight, bias, slope):
        mk = _kernels("message_passing")

        out, h = mk.gcn_forward(adj, x, weight, bias, slope)
        ctx.save_for_backward(adj, x, weight, h, out)
        ctx.cfg = (slope, bias is not None)
        return out

    @staticmethod
    def backward(ctx, g):
        mk = _kernels("message_passing")

        adj, x, weight, h, out = ctx.saved_tensors
        slope, has_bias = ctx.cfg
        needs = ctx.needs_input_grad[:4]
        d_adj, d_x, d_w, d_b = mk.gcn_backward(g, adj, x, weight, h, out, slope, has_bias, needs)
        cast = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
        return cast(d_adj, adj), cast(d_x, x), cast(d_w, weight), (cast(d_b, out) if has_bias else None), None


def gcn_layer_triton(adj, x, weight, bias=None, negative_slope=0.2):
    """Triton backend of :func:`aahr_fast.ops.gcn_layer` (same contract)."""
    if not _kernel_ok(adj, x, weight, bias):
        return _reference("gcn_layer")(adj, x, weight, bias, negative_slope)
    _check_device("gcn_layer", adj, x, weight, bias)
    return _GCNFn.apply(adj, x, weight, bias, float(negative_slope))


class _MaskedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias):
        mk = _kernels("message_passing")

        out, lse = mk.attention_forward(q, k, v, bias)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        mk = _kernels("message_passing")

        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, db = mk.attention_backward(g, q, k, v, bias, out, lse, ctx.needs_input_grad[3])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (None if db is None else db.to(bias.dtype))


def masked_attention_triton(q, k, v, bias):
    """Triton backend of :func:`aahr_fast.ops.masked_attention` (same contract)."""
    if not _kernel_ok(q, k, v, bias):
        return _reference("masked_attention")(q, k, v, bias)
    _check_device("masked_attention", q, k, v, bias)
    return _MaskedAttentionFn.apply(q, k, v, bias)


# ------------------------------------------------------------------------------------- prototypes
def sinkhorn_triton(scores, *, eps=0.1, n_iters=3):
    """Triton backend of :func:`aahr_fast.ops.sinkhorn` (same contract; no gradient)."""
    if not _kernel_ok(scores):
        return _reference("sinkhorn")(scores, eps, n_iters)
    _check_device("sinkhorn", scores)
    pk = _kernels("prototypes")

    with torch.no_grad():
        return pk.sinkhorn_codes(scores.detach(), eps, n_iters, scores.dtype)


class _SwAVLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_v, x_t, prototypes, queue_v, queue_t, eps, n_iters, tau):
        pk = _kernels("prototypes")

        loss, ds_v, ds_t = pk.swav_loss_forward(x_v, x_t, prototypes, eps, n_iters, tau, queue_v, queue_t)
        ctx.save_for_backward(x_v, x_t, prototypes, ds_v, ds_t)
        return loss.to(x_v.dtype)

    @staticmethod
    def backward(ctx, g):
        pk = _kernels("prototypes")

        x_v, x_t, c, ds_v, ds_t = ctx.saved_tensors
        d_xv, d_xt, d_c = pk.swav_loss_backward(g.float(), x_v, x_t, c, ds_v, ds_t, ctx.needs_input_grad[:3])
        cast = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
        return cast(d_xv, x_v), cast(d_xt, x_t), cast(d_c, c), None, None, None, None, None


def swapped_prediction_loss_triton(x_v, x_t, prototypes, *, eps=0.1, n_iters=3, tau=0.1, queue_v=None, queue_t=None):
    """Triton backend of :func:`aahr_fast.ops.swapped_prediction_loss` (same contract)."""
    if not _kernel_ok(x_v, x_t, prototypes, queue_v, queue_t):
        return _reference("swapped_prediction_loss")(x_v, x_t, prototypes, eps=eps, n_iters=n_iters, tau=tau,
                                                     queue_v=queue_v, queue_t=queue_t)
    _check_device("swapped_prediction_loss", x_v, x_t, prototypes, queue_v, queue_t)
    qv = None if queue_v is None else queue_v.detach()
    qt = None if queue_t is None else queue_t.detach()
    return _SwAVLossFn.apply(x_v, x_t, prototypes, qv, qt, float(eps), int(n_iters), float(tau))


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

    _KERNEL_MODULES[family] = sys.modules[module or f"aahr_fast.kernels.{family}"]
    for op, fn in _FAMILIES[family].items():
        _dispatch.register(op, "triton", fn)


def implementations() -> dict[str, object]:
    """op name -> triton implementation (for tests and :mod:`aahr_fast.gpucheck`)."""
    return {op: fn for fams in _FAMILIES.values() for op, fn in fams.items()}


"""C++ CPU backend of the message-passing ops against the plain-PyTorch references.

Covers ``gcn_layer`` and ``masked_attention`` (csrc/cpu/message_passing.cpp,
aahr_fast/ops/_cpp_message_passing.py): forward and backward in float32 / float64, gradcheck, odd sizes,
both GEMM associations, non-contiguous and expanded inputs, all-zero inputs, fully-masked rows, NaN,
empty inputs and random shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch
from aahr_fast.utils.errors import ConfigError, DataError

CPP = dict(backend="cpp")
REF = dict(backend="reference")
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


pytestmark = pytest.mark.usefixtures("cpp_extension")


def _compare(fn, inputs, *, dtype, grad_scale=10.0):
    """Run fn(*inputs, backend=...) for both backends; compare outputs and input gradients."""
    leaves_r = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                for x in inputs]
    leaves_c = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                for x in inputs]
    ref = fn(*leaves_r, **REF)
    got = fn(*leaves_c, **CPP)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL[dtype], equal_nan=True)
    diff_r = [x for x in leaves_r if isinstance(x, torch.Tensor) and x.requires_grad]
    diff_c = [x for x in leaves_c if isinstance(x, torch.Tensor) and x.requires_grad]
    if diff_r:
        g = torch.randn_like(ref)
        gr = torch.autograd.grad(ref, diff_r, g, allow_unused=True)
        gc = torch.autograd.grad(got, diff_c, g, allow_unused=True)
        tol = {k: v * grad_scale for k, v in TOL[dtype].items()}
        for a, b in zip(gc, gr):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)
    return got


def _gcn_inputs(n, din, dout, dtype, bias=True):
    adj = torch.rand(n, n, dtype=dtype, requires_grad=True)
    x = torch.randn(n, din, dtype=dtype, requires_grad=True)
    w = (torch.randn(din, dout, dtype=dtype) / math.sqrt(din)).requires_grad_()
    b = torch.randn(dout, dtype=dtype, requires_grad=True) if bias else None
    return adj, x, w, b


def _gcn(adj, x, w, b, slope=0.2, **kw):
    return ops.gcn_layer(adj, x, w, b, negative_slope=slope, **kw)


def _attn_inputs(h, n, dh, dtype, p_mask=0.4, masked_rows=(), per_head=False, gen=None):
    q, k, v = (torch.randn(h, n, dh, dtype=dtype, generator=gen) for _ in range(3))
    shape = (h, n, n) if per_head else (n, n)
    bias = torch.randn(*shape, dtype=dtype, generator=gen)
    bias[torch.rand(*shape, generator=gen) < p_mask] = float("-inf")
    for r in masked_rows:
        bias[..., r, :] = float("-inf")
    return [x.requires_grad_() for x in (q, k, v, bias)]


# ----------------------------------------------------------------------------- gcn_layer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,din,dout", [(1, 4, 3), (7, 5, 3), (129, 6, 5), (5, 1000, 7), (6, 3, 11)])
def test_gcn_matches_reference(dtype, n, din, dout):
    _compare(_gcn, _gcn_inputs(n, din, dout, dtype), dtype=dtype)


@pytest.mark.parametrize("slope", [0.0, 0.2, 1.0, 3.0])
def test_gcn_slopes_and_no_bias(slope):
    _compare(lambda *a, **kw: _gcn(*a, slope=slope, **kw), _gcn_inputs(9, 6, 4, torch.float64, bias=False),
             dtype=torch.float64)
    _compare(lambda *a, **kw: _gcn(*a, slope=slope, **kw), _gcn_inputs(9, 4, 6, torch.float64), dtype=torch.float64)


def test_gcn_gradcheck_both_associations():
    for din, dout in ((5, 3), (3, 5)):
        adj, x, w, b = _gcn_inputs(4, din, dout, torch.float64)
        assert torch.autograd.gradcheck(lambda *a: _gcn(*a, **CPP), (adj, x, w, b))


def test_gcn_noncontiguous_expanded_and_zero_inputs():
    dt = torch.float64
    adj = torch.rand(6, 6, dtype=dt).t().requires_grad_()
    x = torch.randn(4, 6, dtype=dt).t().requires_grad_()  # (6, 4) non-contiguous
    w = torch.randn(5, 4, dtype=dt).t().requires_grad_()  # (4, 5) non-contiguous
    b = torch.randn(1, dtype=dt).expand(5).requires_grad_()  # expanded bias
    _compare(_gcn, [adj, x, w, b], dtype=dt)
    adj_e = torch.rand(1, 6, dtype=dt).expand(6, 6).requires_grad_()
    zero_x = torch.zeros(6, 4, dtype=dt, requires_grad=True)  # every pre-activation = bias
    _compare(_gcn, [adj_e, zero_x, w.detach().clone().requires_grad_(), torch.zeros(5, dtype=dt, requires_grad=True)],
             dtype=dt)


def test_gcn_only_some_gradients():
    adj, x, w, b = _gcn_inputs(8, 5, 4, torch.float64)
    adj.requires_grad_(False)
    b.requires_grad_(False)
    _compare(_gcn, [adj, x, w, b], dtype=torch.float64)


def test_gcn_nan_propagates_like_reference():
    adj, x, w, b = _gcn_inputs(6, 4, 3, torch.float64)
    with torch.no_grad():
        x[2, 1] = float("nan")
    got = _compare(_gcn, [adj, x, w, b], dtype=torch.float64)
    assert torch.isnan(got).all()  # every node aggregates node 2 (adj > 0 everywhere)


def test_gcn_two_threads():
    torch.set_num_threads(2)
    _compare(_gcn, _gcn_inputs(130, 40, 300, torch.float64), dtype=torch.float64)


def test_gcn_errors():
    with pytest.raises(DataError, match="empty"):
        ops.gcn_layer(torch.zeros(0, 0), torch.zeros(0, 3), torch.zeros(3, 2), None, **CPP)
    with pytest.raises(DataError, match="adj"):
        ops.gcn_layer(torch.zeros(3, 3), torch.zeros(4, 3), torch.zeros(3, 2), None, **CPP)
    with pytest.raises(ConfigError):
        ops.gcn_layer(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 2), None, negative_slope=-0.1, **CPP)


# ----------------------------------------------------------------------------- masked_attention
def _attn(q, k, v, bias, **kw):
    return ops.masked_attention(q, k, v, bias, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h,n,dh", [(1, 1, 4), (3, 7, 5), (2, 129, 8), (1, 5, 1000), (4, 6, 1)])
def test_attention_matches_reference(dtype, h, n, dh):
    _compare(_attn, _attn_inputs(h, n, dh, dtype, masked_rows=(0,) if n > 2 else ()), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_per_head_bias(dtype):
    _compare(_attn, _attn_inputs(3, 9, 4, dtype, per_head=True, masked_rows=(2,)), dtype=dtype)


def test_attention_fully_masked_rows_output_zero_and_pass_no_gradient():
    q, k, v, bias = _attn_inputs(2, 6, 3, torch.float64, masked_rows=(1, 4))
    out = _attn(q, k, v, bias, **CPP)
    assert torch.equal(out[:, [1, 4]], torch.zeros(2, 2, 3, dtype=torch.float64))
    gq, gb = torch.autograd.grad(out.sum(), (q, bias))
    assert torch.equal(gq[:, [1, 4]], torch.zeros(2, 2, 3, dtype=torch.float64))
    assert torch.equal(gb[[1, 4]], torch.zeros(2, 6, dtype=torch.float64))
    assert torch.isfinite(gb).all()
    # every row masked: all zeros, finite gradients
    q, k, v, bias = _attn_inputs(2, 4, 3, torch.float64, p_mask=1.1)
    out = _attn(q, k, v, bias, **CPP)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_attention_gradcheck():
    for per_head in (False, True):
        q, k, v, bias = _attn_inputs(2, 5, 3, torch.float64, masked_rows=(3,), per_head=per_head)
        assert torch.autograd.gradcheck(lambda *a: _attn(*a, **CPP), (q, k, v, bias))


def test_attention_noncontiguous_and_expanded_inputs():
    dt = torch.float64
    qkv = torch.randn(7, 3, 3 * 4, dtype=dt)  # (n, H, 3 dh): the model's layout before the head split
    q, k, v = (x.transpose(0, 1).requires_grad_() for x in qkv.split(4, dim=-1))
    bias = torch.randn(1, 7, dtype=dt).expand(7, 7).requires_grad_()  # every row the same bias
    _compare(_attn, [q, k, v, bias], dtype=dt)
    kz = torch.zeros(3, 7, 4, dtype=dt, requires_grad=True)  # all-zero keys: uniform over connected
    _compare(_attn, [q.detach().clone().requires_grad_(), kz, v.detach().clone().requires_grad_(),
                     bias.detach().clone().requires_grad_()], dtype=dt)


def test_attention_nan_propagates_like_reference():
    q, k, v, bias = _attn_inputs(2, 6, 3, torch.float64, masked_rows=(5,))
    with torch.no_grad():
        q[0, 1, 0] = float("nan")
        bias[3, 2] = float("nan") if torch.isfinite(bias[3, 2]) else bias[3, 2]
    got = _compare(_attn, [q, k, v, bias], dtype=torch.float64)
    assert torch.isnan(got[0, 1]).all() and torch.equal(got[:, 5], torch.zeros(2, 3, dtype=torch.float64))


def test_attention_two_threads():
    torch.set_num_threads(2)
    _compare(_attn, _attn_inputs(4, 67, 8, torch.float64, masked_rows=(3,)), dtype=torch.float64)


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_is_bitwise_identical_at_one_and_two_threads(per_head):
    """The heads run in parallel with the same arithmetic per head, and a shared bias sums its gradient
    over the heads in head order: outputs and every gradient are bitwise equal at 1 and 2 threads."""
    gen = torch.Generator().manual_seed(11)
    inputs = _attn_inputs(5, 67, 16, torch.float32, masked_rows=(3,), per_head=per_head, gen=gen)
    upstream = torch.randn(5, 67, 16, generator=gen)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs = [x.detach().clone().requires_grad_() for x in inputs]
            out = ops.masked_attention(*xs, backend="cpp")
            results.append([out.detach()] + list(torch.autograd.grad((out * upstream).sum(), xs)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_attention_errors():
    z = torch.zeros(2, 0, 4)
    with pytest.raises(DataError, match="empty"):
        ops.masked_attention(z, z, z, torch.zeros(0, 0), **CPP)
    q = torch.zeros(2, 3, 4)
    with pytest.raises(DataError, match="bias"):
        ops.masked_attention(q, q, q, torch.zeros(3, 4), **CPP)


def test_cpp_is_the_default_backend_on_cpu():
    x = torch.randn(3, 2)
    for op in ("gcn_layer", "masked_attention"):
        assert _dispatch.resolve_backend(None, x, op=op) == "cpp"


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 20), din=st.integers(1, 24), dout=st.integers(1, 24), slope=st.floats(0.0, 1.0),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gcn_property(n, din, dout, slope, bias, seed):
    torch.manual_seed(seed)
    _compare(lambda *a, **kw: _gcn(*a, slope=slope, **kw), _gcn_inputs(n, din, dout, torch.float64, bias=bias),
             dtype=torch.float64)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 4), n=st.integers(1, 20), dh=st.integers(1, 12), p_mask=st.floats(0.0, 1.0),
       per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_property(h, n, dh, p_mask, per_head, seed):
    gen = torch.Generator().manual_seed(seed)
    _compare(_attn, _attn_inputs(h, n, dh, torch.float64, p_mask=p_mask, per_head=per_head, gen=gen),
             dtype=torch.float64)


def test_instance_graph_composition_matches_reference():
    """correlation -> 3 GCNs -> relation-masked attention (AAHR's instance graph, aahr-method.md 2.6),
    all C++ vs all reference: values and gradients back to the embeddings and weights, including the
    path attention bias -> attn_bias -> intra relevance -> v, t."""
    dt, b, d, h = torch.float64, 6, 16, 4
    gen = torch.Generator().manual_seed(5)
    v0 = torch.nn.functional.normalize(torch.randn(b, d, dtype=dt, generator=gen), dim=1)
    t0 = torch.nn.functional.normalize(torch.randn(b, d, dtype=dt, generator=gen), dim=1)
    ri, rt = torch.rand(b, b, dtype=dt, generator=gen), torch.rand(b, b, dtype=dt, generator=gen)
    ws = [torch.randn(d, d, dtype=dt, generator=gen) / 4 for _ in range(3)]
    bs = [torch.randn(d, dtype=dt, generator=gen) for _ in range(3)]

    def run(backend):
        kw = dict(backend=backend)
        leaves = [x.clone().requires_grad_() for x in [v0, t0, *ws, *bs]]
        v, t, w1, w2, w3, b1, b2, b3 = leaves
        c = ops.instance_correlation(v, t, ri, rt, sigma=1.0, rho=0.5, lam=1.5, **kw)
        hv = ops.gcn_layer(c.relevance[:b, :b], v, w1, b1, **kw)
        ht = ops.gcn_layer(c.relevance[b:, b:], t, w2, b2, **kw)
        x = ops.gcn_layer(c.relevance, torch.cat([hv, ht]), w3, b3, **kw) + torch.cat([v, t])
        q = x.view(2 * b, h, d // h).transpose(0, 1)
        out = ops.masked_attention(q, q * 0.5, q.flip(-1), c.attn_bias, **kw)
        loss = (out.square().sum(-1).sqrt() * torch.arange(2 * b, dtype=dt)).sum()
        return loss, torch.autograd.grad(loss, leaves)

    loss_r, grads_r = run("reference")
    loss_c, grads_c = run("cpp")
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-10, atol=1e-10)
    for a, b_ in zip(grads_c, grads_r):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-10)

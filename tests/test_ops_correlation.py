"""C++ CPU backend of the instance-correlation ops against the plain-PyTorch references.

Covers ``intra_relevance``, ``topk_connection`` and ``instance_correlation`` (csrc/cpu/correlation.cpp,
aahr_fast/ops/_cpp_correlation.py): forward and backward in float32 / float64, gradcheck, odd sizes,
non-contiguous and expanded inputs, all-zero rows, ties, NaN, empty batch and random shapes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch
from aahr_fast.utils.errors import DataError

from _ops_helpers import unit_rows as _unit

CPP = dict(backend="cpp")
REF = dict(backend="reference")
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


pytestmark = pytest.mark.usefixtures("cpp_extension")


def _corr_inputs(b, d, dtype):
    v, t = _unit(b, d, dtype), _unit(b, d, dtype)
    return v, t, torch.rand(b, b, dtype=dtype), torch.rand(b, b, dtype=dtype)


def _corr_loss(c, g_rel, g_bias):
    """A scalar using both differentiable outputs (the -inf bias entries are masked out)."""
    return (c.relevance * g_rel).sum() + (torch.where(c.connection, c.attn_bias, 0) * g_bias).sum()


def _check_corr(v, t, ri, rt, *, sigma=1.0, rho=0.5, lam=1.0, grads=True):
    dtype = v.dtype
    vr, tr = v.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    vc, tc = v.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref = ops.instance_correlation(vr, tr, ri, rt, sigma=sigma, rho=rho, lam=lam, **REF)
    got = ops.instance_correlation(vc, tc, ri, rt, sigma=sigma, rho=rho, lam=lam, **CPP)
    assert torch.equal(got.connection, ref.connection)
    torch.testing.assert_close(got.relevance, ref.relevance, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(got.attn_bias, ref.attn_bias, **TOL[dtype], equal_nan=True)
    assert got.relevance.dtype == dtype and got.attn_bias.dtype == dtype and got.connection.dtype == torch.bool
    if grads:
        n = 2 * v.shape[0]
        g_rel, g_bias = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        gr = torch.autograd.grad(_corr_loss(ref, g_rel, g_bias), (vr, tr))
        gc = torch.autograd.grad(_corr_loss(got, g_rel, g_bias), (vc, tc))
        for a, b in zip(gc, gr):
            torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)
    return got


# ----------------------------------------------------------------------------- intra_relevance
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d", [(1, 8), (7, 5), (129, 8), (6, 1000)])
def test_intra_relevance_matches_reference(dtype, b, d):
    x = torch.randn(b, d, dtype=dtype)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = ops.intra_relevance(xr, 0.7, **REF)
    got = ops.intra_relevance(xc, 0.7, **CPP)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    assert torch.equal(got.diagonal(), torch.ones(b, dtype=dtype))
    assert torch.equal(got, got.t())  # exactly symmetric
    g = torch.randn(b, b, dtype=dtype)
    (gr,) = torch.autograd.grad((ref * g).sum(), xr)
    (gc,) = torch.autograd.grad((got * g).sum(), xc)
    torch.testing.assert_close(gc, gr, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


def test_intra_relevance_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.intra_relevance(x, 1.3, **CPP), (x,))


def test_intra_relevance_near_duplicates_are_exact():
    # rows 1e-6 apart: a Gram-matrix distance would lose all digits; exact differences keep them
    base = torch.randn(1, 64, dtype=torch.float64)
    x = torch.cat([base, base + 1e-6 * torch.randn(1, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)])
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, got = ops.intra_relevance(xr, **REF), ops.intra_relevance(xc, **CPP)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    (gc,) = torch.autograd.grad(got.sum(), xc)
    torch.testing.assert_close(gc, gr, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_intra_relevance_clustered_rows(dtype):
    # tight clusters: many pairs take the backward's exact near-pair path, the rest the GEMM path
    centers = torch.randn(3, 32, dtype=torch.float64)
    x = (centers.repeat(6, 1) + 0.05 * torch.randn(18, 32, dtype=torch.float64)).to(dtype)
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, got = ops.intra_relevance(xr, 0.5, **REF), ops.intra_relevance(xc, 0.5, **CPP)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    g = torch.randn(18, 18, dtype=dtype)
    (gr,) = torch.autograd.grad((ref * g).sum(), xr)
    (gc,) = torch.autograd.grad((got * g).sum(), xc)
    torch.testing.assert_close(gc, gr, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_intra_relevance_zero_and_duplicate_rows_have_zero_not_nan_gradient(dtype):
    x = torch.zeros(4, 6, dtype=dtype)
    x[3] = 1.0  # rows 0..2 are identical all-zero vectors
    x.requires_grad_()
    rel = ops.intra_relevance(x, **CPP)
    assert torch.equal(rel[:3, :3], torch.ones(3, 3, dtype=dtype))
    (g,) = torch.autograd.grad(rel.sum(), x)
    assert torch.isfinite(g).all()
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ops.intra_relevance(xr, **REF).sum(), xr)
    torch.testing.assert_close(g, gr, **TOL[dtype])


def test_intra_relevance_noncontiguous_and_expanded():
    x = torch.randn(9, 7, dtype=torch.float64).t()  # (7, 9) non-contiguous
    torch.testing.assert_close(ops.intra_relevance(x, **CPP), ops.intra_relevance(x, **REF), **TOL[torch.float64])
    row = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    xe = row.expand(4, 5)  # stride 0: every pair at distance 0
    rel = ops.intra_relevance(xe, **CPP)
    assert torch.equal(rel, torch.ones(4, 4, dtype=torch.float64))
    (g,) = torch.autograd.grad(rel.sum(), row)
    assert torch.equal(g, torch.zeros_like(row))


def test_intra_relevance_nan_row():
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    ref, got = ops.intra_relevance(x, **REF), ops.intra_relevance(x, **CPP)
    torch.testing.assert_close(got, ref, **TOL[torch.float32], equal_nan=True)
    # documented: row/column 2 are NaN off the diagonal, the diagonal stays exactly 1, the rest is finite
    assert torch.isnan(got[2, [0, 1, 3, 4]]).all() and got[2, 2] == 1
    assert torch.isfinite(got[[0, 1, 3, 4]][:, [0, 1, 3, 4]]).all()


# ----------------------------------------------------------------------------- topk_connection
@pytest.mark.parametrize("rho", [0.01, 0.3, 0.5, 0.99, 1.0])
def test_topk_connection_matches_reference(rho):
    s = torch.randn(13, 29)
    assert torch.equal(ops.topk_connection(s, rho, **CPP), ops.topk_connection(s, rho, **REF))


def test_topk_connection_ties_go_to_lower_index_and_nan_first():
    s = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [float("nan"), 1.0, float("nan"), 5.0, -0.0, 0.0]])
    got = ops.topk_connection(s[:2], 0.5, **CPP)
    assert torch.equal(got, ops.topk_connection(s[:2], 0.5, **REF))
    assert got[0].tolist() == [False, True, True, False, True, False]
    assert got[1].tolist() == [True, True, True, False, False, False]
    # the public op refuses NaN (every backend, DataError is a ValueError) ...
    for kw in (CPP, REF):
        with pytest.raises(ValueError, match=r"topk_connection: scores\[2, 0\] is NaN"):
            ops.topk_connection(s, 0.5, **kw)
    # ... the backends themselves (used inside instance_correlation) still agree: NaN ranks first
    from aahr_fast.ops._cpp_correlation import topk_connection_cpp
    from aahr_fast.ops.correlation import topk_connection_reference

    got = topk_connection_cpp(s, 0.5)
    assert torch.equal(got, topk_connection_reference(s, 0.5))
    assert got[2].tolist() == [True, False, True, True, False, False]


def test_topk_connection_quantised_scores_many_ties():
    s = torch.randint(0, 3, (40, 57)).double()
    for rho in (0.1, 0.5, 0.77):
        assert torch.equal(ops.topk_connection(s, rho, **CPP), ops.topk_connection(s, rho, **REF))


# ----------------------------------------------------------------------------- instance_correlation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d", [(1, 6), (5, 7), (129, 8), (4, 1000)])
def test_instance_correlation_matches_reference(dtype, b, d):
    v, t, ri, rt = _corr_inputs(b, d, dtype)
    _check_corr(v, t, ri, rt, sigma=0.9, rho=0.5, lam=1.5)


@pytest.mark.parametrize("rho,lam", [(0.2, 1.0), (1.0, -0.5), (0.74, 0.0)])
def test_instance_correlation_options(rho, lam):
    v, t, ri, rt = _corr_inputs(11, 9, torch.float64)
    _check_corr(v, t, ri, rt, sigma=2.0, rho=rho, lam=lam)


def test_instance_correlation_two_threads():
    torch.set_num_threads(2)
    v, t, ri, rt = _corr_inputs(67, 33, torch.float64)
    _check_corr(v, t, ri, rt)


def test_instance_correlation_gradcheck():
    v, t, ri, rt = _corr_inputs(5, 4, torch.float64)
    v.requires_grad_()
    t.requires_grad_()

    def fn(v, t):
        c = ops.instance_correlation(v, t, ri, rt, sigma=0.8, rho=0.6, lam=1.5, **CPP)
        return c.relevance, torch.where(c.connection, c.attn_bias, 0)

    assert torch.autograd.gradcheck(fn, (v, t))


def test_instance_correlation_ties_duplicates_and_zero_rows():
    v, t, ri, rt = _corr_inputs(8, 6, torch.float64)
    v[3] = v[1]  # duplicated image embedding: tied Gram entries
    t[5] = 0.0  # all-zero caption
    t[6] = 0.0
    ri = torch.round(ri * 2) / 2  # heavily tied inter-modal scores
    rt = torch.zeros_like(rt)
    got = _check_corr(v, t, ri, rt)
    assert torch.isfinite(got.relevance).all()


def test_instance_correlation_noncontiguous_and_expanded_inputs():
    b, d = 6, 5
    v = torch.randn(d, b, dtype=torch.float64).t()
    t = _unit(1, d).expand(b, d)
    ri = torch.rand(b, b, dtype=torch.float64).t()
    rt = torch.rand(1, b, dtype=torch.float64).expand(b, b)
    _check_corr(v, t, ri, rt)


def test_instance_correlation_nan_input():
    v, t, ri, rt = _corr_inputs(6, 5, torch.float64)
    v[2, 0] = float("nan")
    ri[1, 3] = float("nan")
    got = _check_corr(v, t, ri, rt, grads=False)
    assert bool(got.connection[1, 6 + 3])  # a NaN score ranks first
    assert torch.isnan(got.relevance[2, [0, 1, 3, 4, 5]]).all() and got.relevance[2, 2] == 1


def test_instance_correlation_only_bias_or_only_relevance_gradient():
    v, t, ri, rt = _corr_inputs(7, 5, torch.float64)
    for pick in ("relevance", "attn_bias"):
        vr, vc = v.clone().requires_grad_(), v.clone().requires_grad_()
        out_r = getattr(ops.instance_correlation(vr, t, ri, rt, **REF), pick)
        out_c = getattr(ops.instance_correlation(vc, t, ri, rt, **CPP), pick)
        g = torch.randn_like(out_r)
        (a,) = torch.autograd.grad(torch.where(torch.isfinite(out_r), out_r, 0).mul(g).sum(), vr)
        (b,) = torch.autograd.grad(torch.where(torch.isfinite(out_c), out_c, 0).mul(g).sum(), vc)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_empty_batch_raises_clearly():
    with pytest.raises(DataError, match="empty"):
        ops.intra_relevance(torch.zeros(0, 4), **CPP)
    with pytest.raises(DataError, match="empty"):
        ops.topk_connection(torch.zeros(0, 4), **CPP)
    z = torch.zeros(0, 4)
    with pytest.raises(DataError, match="empty"):
        ops.instance_correlation(z, z, torch.zeros(0, 0), torch.zeros(0, 0), **CPP)


def test_cpp_is_the_default_backend_on_cpu():
    x = torch.randn(3, 2)
    for op in ("intra_relevance", "topk_connection", "instance_correlation"):
        assert _dispatch.resolve_backend(None, x, op=op) == "cpp"


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 24), d=st.integers(1, 40), rho=st.floats(0.05, 1.0), sigma=st.floats(0.2, 3.0),
       lam=st.floats(-2.0, 2.0), seed=st.integers(0, 2**16))
def test_instance_correlation_property(b, d, rho, sigma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    v, t = _unit(b, d, gen=gen), _unit(b, d, gen=gen)
    ri, rt = torch.rand(b, b, dtype=torch.float64, generator=gen), torch.rand(b, b, dtype=torch.float64, generator=gen)
    got = _check_corr(v, t, ri, rt, sigma=sigma, rho=rho, lam=lam)
    k = ops.correlation.connection_count(rho, b)
    assert (got.connection.sum(1) == 2 * k).all()

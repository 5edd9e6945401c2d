"""C++ CPU backend of the prototype ops against the plain-PyTorch references.

Covers ``sinkhorn`` and ``swapped_prediction_loss`` (csrc/cpu/prototypes.cpp,
aahr_fast/ops/_cpp_prototypes.py): values and gradients in float32 / float64, gradcheck, queues, odd
sizes, non-contiguous and expanded inputs, all-zero inputs, extreme scores, NaN, empty batch, half
precision and random shapes.
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
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


pytestmark = pytest.mark.usefixtures("cpp_extension")


def _check_loss(x_v, x_t, protos, *, queue_v=None, queue_t=None, eps=0.1, n_iters=3, tau=0.1, grads=True):
    dtype = x_v.dtype
    kw = dict(eps=eps, n_iters=n_iters, tau=tau, queue_v=queue_v, queue_t=queue_t)
    lr = [x.detach().clone().requires_grad_() for x in (x_v, x_t, protos)]
    lc = [x.detach().clone().requires_grad_() for x in (x_v, x_t, protos)]
    ref = ops.swapped_prediction_loss(*lr, **kw, **REF)
    got = ops.swapped_prediction_loss(*lc, **kw, **CPP)
    assert got.shape == () and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, **TOL[dtype], equal_nan=True)
    if grads:
        gr = torch.autograd.grad(ref * 1.7, lr)
        gc = torch.autograd.grad(got * 1.7, lc)
        for a, b in zip(gc, gr):
            torch.testing.assert_close(a, b, **TOL[dtype], equal_nan=True)
    return got


# ----------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,k", [(1, 5), (7, 1), (9, 13), (129, 7), (5, 1000)])
@pytest.mark.parametrize("n_iters", [1, 3, 6])
def test_sinkhorn_matches_reference(dtype, b, k, n_iters):
    s = _unit(b, 16, dtype) @ _unit(k, 16, dtype).t()
    got = ops.sinkhorn(s, 0.1, n_iters, **CPP)
    torch.testing.assert_close(got, ops.sinkhorn(s, 0.1, n_iters, **REF), **TOL[dtype])
    torch.testing.assert_close(got.sum(1), torch.ones(b, dtype=dtype), **TOL[dtype])
    assert (got >= 0).all() and not got.requires_grad


def test_sinkhorn_extreme_scores_do_not_overflow():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [999.0, 1000.0, -5.0]], dtype=torch.float32)
    got = ops.sinkhorn(s, 0.05, 3, **CPP)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ops.sinkhorn(s, 0.05, 3, **REF), **TOL[torch.float32])


@pytest.mark.parametrize("dtype,spans", [(torch.float32, [5, 35, 45, 70, 150]),
                                          (torch.float64, [50, 250, 350, 800])])
def test_sinkhorn_exp_free_and_log_domain_steps_agree_across_the_switch(dtype, spans):
    """The C++ Sinkhorn runs exp-free scaling steps while every factor stays within exp(-G) (G = 40 float,
    300 double) and log-domain steps otherwise; score spans (max - min) / eps on both sides of G, and a
    dominated row (large dual v_b: the switch happens between iterations), all match the reference."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(50, 24, generator=g, dtype=dtype)
    for span in spans:
        s = base * span * 0.1  # eps = 0.1: (max - min) / eps ~ span
        for dominated in (False, True):
            t = s.clone()
            if dominated:
                t[7] -= 0.6 * span * 0.1  # every entry of row 7 far below the others: a large v_7
            got = ops.sinkhorn(t, 0.1, 4, **CPP)
            assert torch.isfinite(got).all(), (span, dominated)
            torch.testing.assert_close(got, ops.sinkhorn(t, 0.1, 4, **REF), **TOL[dtype], msg=f"span {span}")
            rows = ops.sinkhorn(torch.cat([t, t[:3]]), 0.1, 2, **CPP)  # odd row count, queue-like rows
            torch.testing.assert_close(rows, ops.sinkhorn(torch.cat([t, t[:3]]), 0.1, 2, **REF), **TOL[dtype])


def test_sinkhorn_ties_zero_scores_and_layouts():
    z = torch.zeros(4, 6)  # all ties: uniform codes
    torch.testing.assert_close(ops.sinkhorn(z, **CPP), torch.full((4, 6), 1 / 6))
    s = torch.randn(11, 8, dtype=torch.float64).t()  # (8, 11) non-contiguous
    torch.testing.assert_close(ops.sinkhorn(s, **CPP), ops.sinkhorn(s, **REF), **TOL[torch.float64])
    e = torch.randn(1, 8, dtype=torch.float64).expand(5, 8)  # expanded: identical rows
    torch.testing.assert_close(ops.sinkhorn(e, **CPP), ops.sinkhorn(e, **REF), **TOL[torch.float64])


def test_sinkhorn_nan_spreads_like_reference():
    s = torch.randn(5, 4)
    s[2, 1] = float("nan")
    got = ops.sinkhorn(s, **CPP)
    torch.testing.assert_close(got, ops.sinkhorn(s, **REF), equal_nan=True)
    assert torch.isnan(got).all()  # documented: one NaN score poisons every code via the normalisations


def test_sinkhorn_half_precision_runs_in_float32():
    s = torch.randn(6, 5).to(torch.bfloat16)
    got = ops.sinkhorn(s, **CPP)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ops.sinkhorn(s, **REF))


def test_sinkhorn_requires_grad_input_gives_no_grad():
    s = torch.randn(3, 4, requires_grad=True)
    assert not ops.sinkhorn(s, **CPP).requires_grad


# ----------------------------------------------------------------------------- swapped_prediction_loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d,k", [(1, 8, 5), (6, 10, 7), (129, 8, 6), (4, 1000, 5)])
def test_loss_matches_reference(dtype, b, d, k):
    _check_loss(_unit(b, d, dtype), _unit(b, d, dtype), _unit(k, d, dtype))


@pytest.mark.parametrize("qv,qt", [(16, 16), (7, None), (None, 3)])
def test_loss_with_queues(qv, qt):
    dt = torch.float64
    b, d, k = 5, 9, 6
    queue_v = _unit(qv, d) if qv else None
    queue_t = _unit(qt, d) if qt else None
    with_q = _check_loss(_unit(b, d), _unit(b, d), _unit(k, d), queue_v=queue_v, queue_t=queue_t)
    assert with_q.dtype == dt


def test_loss_queue_changes_the_codes():
    torch.manual_seed(3)
    xv, xt, c = _unit(4, 6), _unit(4, 6), _unit(5, 6)
    q = _unit(32, 6) * 3
    a = ops.swapped_prediction_loss(xv, xt, c, **CPP)
    b = ops.swapped_prediction_loss(xv, xt, c, queue_v=q, queue_t=q, **CPP)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("eps,n_iters,tau", [(0.05, 1, 0.1), (0.1, 3, 0.2), (1.0, 5, 1.0)])
def test_loss_options(eps, n_iters, tau):
    _check_loss(_unit(7, 6), _unit(7, 6), _unit(5, 6), eps=eps, n_iters=n_iters, tau=tau)


def test_loss_gradcheck():
    # The codes are a stop-gradient, so finite differences of the loss also see the codes move. With a
    # huge Sinkhorn eps the codes are uniform up to O(1/eps) = 1e-7 and the numerical gradient is the
    # fixed-code gradient the op defines; tau stays small so the softmax part is far from trivial.
    xv, xt, c = (x.requires_grad_() for x in (_unit(4, 5), _unit(4, 5), _unit(3, 5)))
    qv = _unit(6, 5)
    assert torch.autograd.gradcheck(
        lambda a, b, p: ops.swapped_prediction_loss(a, b, p, eps=1e7, tau=0.3, queue_v=qv, **CPP), (xv, xt, c))


def test_loss_noncontiguous_expanded_and_zero_inputs():
    xv = torch.randn(8, 5, dtype=torch.float64).t()  # (5, 8) non-contiguous
    xt = _unit(1, 8).expand(5, 8)  # identical captions
    c = torch.randn(8, 6, dtype=torch.float64).t()  # (6, 8) non-contiguous prototypes
    _check_loss(xv, xt, c)
    _check_loss(torch.zeros(3, 8, dtype=torch.float64), _unit(3, 8), _unit(4, 8))  # all-zero image embeddings


def test_loss_only_prototype_gradient():
    xv, xt, c = _unit(5, 6), _unit(5, 6), _unit(4, 6).requires_grad_()
    got = ops.swapped_prediction_loss(xv, xt, c, **CPP)
    (g,) = torch.autograd.grad(got, c)
    cr = c.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ops.swapped_prediction_loss(xv, xt, cr, **REF), cr)
    torch.testing.assert_close(g, gr, **TOL[torch.float64])


def test_loss_queue_gets_no_gradient():
    q = _unit(6, 5).requires_grad_()
    xv = _unit(3, 5).requires_grad_()
    loss = ops.swapped_prediction_loss(xv, _unit(3, 5), _unit(4, 5), queue_v=q, **CPP)
    (gq,) = torch.autograd.grad(loss, q, allow_unused=True)
    assert gq is None


def test_loss_nan_like_reference():
    xv, xt, c = _unit(4, 5), _unit(4, 5), _unit(3, 5)
    xv[1, 2] = float("nan")
    got = _check_loss(xv, xt, c, grads=False)
    assert torch.isnan(got)


def test_loss_two_threads():
    torch.set_num_threads(2)
    _check_loss(_unit(67, 40), _unit(67, 40), _unit(70, 40), queue_v=_unit(64, 40), queue_t=_unit(64, 40))


def test_loss_half_precision_falls_back_to_reference():
    xv, xt, c = (x.to(torch.bfloat16) for x in (_unit(4, 8), _unit(4, 8), _unit(5, 8)))
    got = ops.swapped_prediction_loss(xv, xt, c, **CPP)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ops.swapped_prediction_loss(xv, xt, c, **REF))


def test_empty_batch_raises_clearly():
    with pytest.raises(DataError, match="empty"):
        ops.sinkhorn(torch.zeros(0, 4), **CPP)
    z = torch.zeros(0, 4)
    with pytest.raises(DataError, match="empty"):
        ops.swapped_prediction_loss(z, z, torch.zeros(3, 4), **CPP)


def test_cpp_is_the_default_backend_on_cpu():
    x = torch.randn(3, 2)
    for op in ("sinkhorn", "swapped_prediction_loss"):
        assert _dispatch.resolve_backend(None, x, op=op) == "cpp"


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 20), d=st.integers(1, 24), k=st.integers(1, 20), m=st.integers(0, 24),
       eps=st.floats(0.05, 1.0), n_iters=st.integers(1, 4), tau=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_loss_property(b, d, k, m, eps, n_iters, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    xv, xt, c = _unit(b, d, gen=gen), _unit(b, d, gen=gen), _unit(k, d, gen=gen)
    queue = _unit(m, d, gen=gen) if m else None
    _check_loss(xv, xt, c, queue_v=queue, queue_t=queue, eps=eps, n_iters=n_iters, tau=tau)
    codes = ops.sinkhorn(xv @ c.t(), eps, n_iters, **CPP)
    torch.testing.assert_close(codes.sum(1), torch.ones(b, dtype=codes.dtype))


def test_sinkhorn_scratch_memory_is_seen_by_the_profiler_measure():
    """The C++ Sinkhorn's (N, K) scratch buffers (S / eps and exp of it) come from the torch allocator, so
    ``peak_extra_bytes`` (the benchmarks' memory column) counts them: codes + two scratch copies. With
    ``std::vector`` scratch the measure saw only the codes (a third of the real peak, measured 76 vs
    229 MiB of max-RSS growth at 20000 x 1000 float32)."""
    from aahr_fast.utils.memory import peak_extra_bytes

    s = torch.rand(300, 200, generator=torch.Generator().manual_seed(3)) * 0.1
    one = s.numel() * s.element_size()
    peak, codes = peak_extra_bytes(ops.sinkhorn, s, 0.1, 3, **CPP)
    torch.testing.assert_close(codes, ops.sinkhorn(s, 0.1, 3, **REF), **TOL[torch.float32])
    assert 3 * one <= peak <= 3 * one + 2**16, (peak, one)

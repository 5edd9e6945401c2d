"""Triton backend of the prototype ops (Sinkhorn-Knopp codes, swapped-prediction loss) vs the reference,
forward and backward (GPU, or the Triton interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aahr_fast import ops
from aahr_fast.kernels._testing import max_abs_diff, run_backend, triton_device

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)")
ON_GPU = DEV == "cuda"


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("b,k", [(37, 19), (1, 5), (129, 7), (16, 384)])
def test_sinkhorn_fp32(b, k):
    s = _rand(b, k, seed=b + k) * 0.5
    a = ops.sinkhorn(s, 0.1, 3, backend="triton")
    r = ops.sinkhorn(s, 0.1, 3, backend="reference")
    assert a.dtype == s.dtype
    assert max_abs_diff(a, r) < 2e-5
    assert torch.allclose(a.sum(1), torch.ones(b, device=DEV), atol=1e-5)


def test_sinkhorn_huge_logits_and_strided_input():
    s = (_rand(9, 26, seed=1) * 1e3)[:, ::2]  # S/eps ~ 1e4: exp would overflow outside the log domain
    a = ops.sinkhorn(s, 0.1, 5, backend="triton")
    r = ops.sinkhorn(s, 0.1, 5, backend="reference")
    assert torch.isfinite(a).all()
    # |S/eps| ~ 1e4: one fp32 ulp of a log-potential is ~1e-3, so both sides carry ~1e-3 relative error
    assert max_abs_diff(a, r) < 2e-3
    assert torch.allclose(a.sum(1), torch.ones(9, device=DEV), atol=2e-3)


def test_sinkhorn_fp16():
    s = _rand(12, 10, seed=2, dtype=torch.float16)
    a = ops.sinkhorn(s, 0.1, 3, backend="triton")
    r = ops.sinkhorn(s.float(), 0.1, 3, backend="reference")
    assert a.dtype == torch.float16
    assert max_abs_diff(a.float(), r) < 2e-3


def _loss(xv, xt, c, backend):
    return ops.swapped_prediction_loss(xv, xt, c, eps=0.1, n_iters=3, tau=0.1, backend=backend)


def _loss_queue(xv, xt, c, qv, qt, backend):
    return ops.swapped_prediction_loss(xv, xt, c, eps=0.1, n_iters=3, tau=0.1, queue_v=qv, queue_t=qt, backend=backend)


def _compare(fn, inputs, atol_out, atol_grad, ref_inputs=None, n_grads=3):
    out_t, g_t = run_backend(fn, inputs, "triton")
    out_r, g_r = run_backend(fn, ref_inputs if ref_inputs is not None else inputs, "reference")
    assert out_t[0].shape == torch.Size([])
    assert out_t[0].dtype == inputs[0].dtype
    assert max_abs_diff(out_t[0].float(), out_r[0].float()) <= atol_out * max(1.0, abs(float(out_r[0])))
    for a, b in zip(g_t[:n_grads], g_r[:n_grads]):
        scale = max(1.0, float(b.float().abs().max()))
        assert max_abs_diff(a.float(), b.float()) <= atol_grad * scale, f"grad differs by {max_abs_diff(a, b)}"
    for a in g_t[n_grads:]:  # queues get no gradient
        assert a is None or float(a.abs().max()) == 0.0


@pytest.mark.parametrize("b,k,d", [(37, 19, 40), (1, 6, 1000), (129, 7, 8)])
def test_swapped_prediction_fp32(b, k, d):
    c = F.normalize(_rand(k, d, seed=3), dim=-1)
    xv = F.normalize(_rand(b, d, seed=4), dim=-1)
    xt = F.normalize(_rand(b, d, seed=5), dim=-1)
    _compare(_loss, (xv, xt, c), 1e-5, 1e-5)


def test_swapped_prediction_with_queue_and_non_contiguous_prototypes():
    b, k, d = 10, 13, 24
    c = F.normalize(_rand(d, k, seed=6), dim=0).t()  # (K, D) transposed view
    xv, xt = _rand(b, d, seed=7), _rand(b, d, seed=8)
    qv, qt = _rand(20, d, seed=9), _rand(20, d, seed=10)
    _compare(_loss_queue, (xv, xt, c, qv, qt), 1e-5, 1e-5)


def test_swapped_prediction_fp16():
    b, k, d = 12, 9, 32
    ins = (F.normalize(_rand(b, d, seed=11), dim=-1).half(), F.normalize(_rand(b, d, seed=12), dim=-1).half(),
           F.normalize(_rand(k, d, seed=13), dim=-1).half())
    _compare(_loss, ins, 5e-3, 3e-2, ref_inputs=tuple(x.float() for x in ins))


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong under the Triton interpreter; bf16 is checked on GPU only")
def test_swapped_prediction_bf16_on_gpu():
    b, k, d = 128, 384, 1024
    ins = tuple(F.normalize(_rand(*sh, seed=s), dim=-1).bfloat16() for sh, s in (((b, d), 14), ((b, d), 15), ((k, d), 16)))
    _compare(_loss, ins, 2e-2, 6e-2, ref_inputs=tuple(x.float() for x in ins))

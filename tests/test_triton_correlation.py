"""Triton backend of the correlation ops (intra relevance, top-rho connection, instance correlation)
vs the plain-PyTorch reference, forward and backward (GPU, or the Triton interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aahr_fast import ops
from aahr_fast.kernels._testing import max_abs_diff, run_backend, triton_device

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)")
ON_GPU = DEV == "cuda"


def _unit(b, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEV, dtype)


def _intra(x, backend, sigma=0.7):
    return ops.intra_relevance(x, sigma, backend=backend)


def _corr(v, t, ri, rt, backend, sigma=0.8, rho=0.5, lam=1.5):
    return tuple(ops.instance_correlation(v, t, ri, rt, sigma=sigma, rho=rho, lam=lam, backend=backend))


def _compare(fn, inputs, atol_out=2e-6, atol_grad=2e-5):
    out_t, g_t = run_backend(fn, inputs, "triton")
    out_r, g_r = run_backend(fn, inputs, "reference")
    for a, b in zip(out_t, out_r):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert max_abs_diff(a, b) <= atol_out, f"forward differs by {max_abs_diff(a, b)}"
    for a, b in zip(g_t, g_r):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        assert max_abs_diff(a, b) <= atol_grad * max(1.0, float(b.abs().max())), f"grad differs by {max_abs_diff(a, b)}"
    return out_t, g_t


@pytest.mark.parametrize("b,d", [(37, 100), (1, 1000), (129, 8)])
def test_intra_relevance_fp32(b, d):
    out, _ = _compare(_intra, (_unit(b, d, seed=b),))
    assert torch.all(torch.diagonal(out[0]) == 1.0)


def test_intra_relevance_duplicates_give_zero_not_nan_gradient():
    x = _unit(6, 16, seed=1)
    x[4] = x[1]  # zero off-diagonal distance
    _, grads = _compare(_intra, (x,))
    assert torch.isfinite(grads[0]).all()


def test_intra_relevance_non_contiguous():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 13, generator=g).to(DEV).t()  # (13, 24) transposed view
    _compare(_intra, (x,))


def test_intra_relevance_fp16():
    x16 = _unit(17, 40, seed=3, dtype=torch.float16)
    out_t, g_t = run_backend(_intra, (x16,), "triton")
    out_r, g_r = run_backend(_intra, (x16.float(),), "reference")
    assert out_t[0].dtype == torch.float16
    assert max_abs_diff(out_t[0].float(), out_r[0]) < 2e-3
    assert max_abs_diff(g_t[0].float(), g_r[0]) < 2e-2 * max(1.0, float(g_r[0].abs().max()))


@pytest.mark.parametrize("b", [37, 1, 2])
def test_instance_correlation_fp32(b):
    v, t = _unit(b, 48, seed=4), _unit(b, 48, seed=5)
    g = torch.Generator().manual_seed(6)
    ri = torch.rand(b, b, generator=g).to(DEV)
    rt = torch.rand(b, b, generator=g).to(DEV)
    out, grads = _compare(_corr, (v, t, ri, rt))
    relevance, connection, bias = out
    assert connection.dtype == torch.bool
    k = int(0.5 * b + 1e-9)
    assert torch.all(connection.sum(1) == 2 * k)  # k intra-modal + k inter-modal neighbours per node
    assert torch.all(torch.isneginf(bias[~connection]))
    assert grads[2] is None or float(grads[2].abs().max()) == 0.0  # rel_i2t is a constant


def test_instance_correlation_ties_and_non_contiguous():
    b = 9
    v = _unit(b, 16, seed=7)
    v[3] = v[5]  # tied Gram rows/cols
    t = _unit(2 * b, 16, seed=8)[::2]  # strided view
    ri = torch.zeros(b, b, device=DEV)  # all ties: lowest indices win
    rt = torch.rand(b, b, device=DEV).t()
    out, _ = _compare(lambda *a, backend: _corr(*a, backend=backend, rho=0.34), (v, t, ri, rt))
    assert torch.all(out[1][:b, b:][:, : int(0.34 * b + 1e-9)])


def test_instance_correlation_fp16():
    b = 11
    v, t = _unit(b, 32, seed=9, dtype=torch.float16), _unit(b, 32, seed=10, dtype=torch.float16)
    g = torch.Generator().manual_seed(11)
    ri = torch.rand(b, b, generator=g).to(DEV, torch.float16)
    rt = torch.rand(b, b, generator=g).to(DEV, torch.float16)
    out_t, g_t = run_backend(_corr, (v, t, ri, rt), "triton")
    out_r, g_r = run_backend(_corr, tuple(x.float() for x in (v, t, ri, rt)), "reference")
    assert out_t[0].dtype == torch.float16
    assert max_abs_diff(out_t[0].float(), out_r[0]) < 3e-3
    for a, bb in zip(g_t[:2], g_r[:2]):
        assert max_abs_diff(a.float(), bb) < 3e-2 * max(1.0, float(bb.abs().max()))


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong under the Triton interpreter; bf16 is checked on GPU only")
def test_instance_correlation_bf16_on_gpu():
    b = 64
    v, t = _unit(b, 256, seed=12, dtype=torch.bfloat16), _unit(b, 256, seed=13, dtype=torch.bfloat16)
    ri = torch.rand(b, b, device=DEV, dtype=torch.bfloat16)
    out_t, g_t = run_backend(_corr, (v, t, ri, ri), "triton")
    out_r, g_r = run_backend(_corr, tuple(x.float() for x in (v, t, ri, ri)), "reference")
    assert max_abs_diff(out_t[0].float(), out_r[0]) < 2e-2
    for a, bb in zip(g_t[:2], g_r[:2]):
        assert max_abs_diff(a.float(), bb) < 5e-2 * max(1.0, float(bb.abs().max()))


def test_topk_connection_matches_reference_with_ties_and_nan():
    from aahr_fast.ops._triton_glue import topk_connection_triton
    from aahr_fast.ops.correlation import topk_connection_reference

    g = torch.Generator().manual_seed(14)
    s = torch.randint(0, 3, (7, 13), generator=g).float().to(DEV)
    for rho in (0.5, 0.3, 1.0, 0.05):
        a = ops.topk_connection(s, rho, backend="triton")
        b = ops.topk_connection(s, rho, backend="reference")
        assert torch.equal(a, b)
    s[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"topk_connection: scores\[2, 5\] is NaN"):
        ops.topk_connection(s, 0.5, backend="triton")
    for rho in (0.5, 0.3, 1.0, 0.05):  # the backend entry itself (instance_correlation's path) ranks NaN first
        assert torch.equal(topk_connection_triton(s, rho=rho), topk_connection_reference(s, rho))

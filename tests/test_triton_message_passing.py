"""Triton backend of the message-passing ops (GCN layer, masked multi-head attention) vs the reference,
forward and backward (GPU, or the Triton interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from aahr_fast import ops
from aahr_fast.kernels._testing import max_abs_diff, run_backend, triton_device

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)")
ON_GPU = DEV == "cuda"


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def _gcn(adj, x, w, b, backend):
    return ops.gcn_layer(adj, x, w, b, 0.2, backend=backend)


def _gcn_nobias(adj, x, w, backend):
    return ops.gcn_layer(adj, x, w, None, 0.2, backend=backend)


def _attn(q, k, v, bias, backend):
    return ops.masked_attention(q, k, v, bias, backend=backend)


def _compare(fn, inputs, atol_out, atol_grad, ref_inputs=None):
    out_t, g_t = run_backend(fn, inputs, "triton")
    out_r, g_r = run_backend(fn, ref_inputs if ref_inputs is not None else inputs, "reference")
    for a, b in zip(out_t, out_r):
        assert a.shape == b.shape
        scale = max(1.0, float(b.float().abs().max()))
        assert max_abs_diff(a.float(), b.float()) <= atol_out * scale, f"forward differs by {max_abs_diff(a, b)}"
    for a, b in zip(g_t, g_r):
        assert (a is None) == (b is None)
        if b is not None:
            scale = max(1.0, float(b.float().abs().max()))
            assert max_abs_diff(a.float(), b.float()) <= atol_grad * scale, f"grad differs by {max_abs_diff(a, b)}"
    return out_t, g_t


@pytest.mark.parametrize("n,din,dout", [(37, 50, 33), (1, 1000, 3), (129, 8, 5)])
def test_gcn_fp32(n, din, dout):
    adj = torch.rand(n, n, device=DEV)
    _compare(_gcn, (adj, _rand(n, din, seed=1), _rand(din, dout, seed=2) * 0.1, _rand(dout, seed=3)), 1e-5, 1e-5)


def test_gcn_without_bias_and_non_contiguous():
    n = 23
    adj = torch.rand(n, n, device=DEV).t()  # transposed view
    x = _rand(40, n, seed=4).t()
    w = _rand(17, 40, seed=5).t() * 0.1
    assert not (adj.is_contiguous() or x.is_contiguous() or w.is_contiguous())
    _compare(_gcn_nobias, (adj, x, w), 1e-5, 1e-5)


def test_gcn_fp16():
    n = 19
    ins = (torch.rand(n, n, device=DEV).half(), _rand(n, 24, seed=6, dtype=torch.float16),
           (_rand(24, 16, seed=7) * 0.1).half(), _rand(16, seed=8, dtype=torch.float16))
    out, _ = _compare(_gcn, ins, 5e-3, 3e-2, ref_inputs=tuple(x.float() for x in ins))
    assert out[0].dtype == torch.float16


def _bias(n, seed, dead_rows=(), per_head=0):
    g = torch.Generator().manual_seed(seed)
    shape = (per_head, n, n) if per_head else (n, n)
    bias = torch.rand(shape, generator=g)
    bias = bias.masked_fill(torch.rand(shape, generator=g) < 0.4, float("-inf"))
    for r in dead_rows:
        bias[..., r, :] = float("-inf")  # a node without any connection
    return bias.to(DEV)


@pytest.mark.parametrize("h,n,dh", [(3, 37, 24), (1, 1, 16), (2, 129, 8)])
def test_attention_shared_bias_fp32(h, n, dh):
    dead = (min(3, n - 1),) if n > 1 else ()
    ins = (_rand(h, n, dh, seed=9), _rand(h, n, dh, seed=10), _rand(h, n, dh, seed=11), _bias(n, 12, dead))
    out, grads = _compare(_attn, ins, 2e-6, 2e-5)
    for r in dead:
        assert torch.all(out[0][:, r] == 0)
        assert torch.all(grads[0][:, r] == 0)


def test_attention_per_head_bias_and_non_contiguous():
    h, n, dh = 3, 21, 16
    q = _rand(n, h, dh, seed=13).transpose(0, 1)  # (H, n, dh) view of an (n, H, dh) buffer
    k = _rand(h, n, 2 * dh, seed=14)[..., ::2]
    v = _rand(h, n, dh, seed=15)
    bias = _bias(n, 16, dead_rows=(0,), per_head=h)
    _compare(_attn, (q, k, v, bias), 2e-6, 2e-5)


def test_attention_fp16():
    h, n, dh = 2, 33, 32
    ins = (_rand(h, n, dh, seed=17, dtype=torch.float16), _rand(h, n, dh, seed=18, dtype=torch.float16),
           _rand(h, n, dh, seed=19, dtype=torch.float16), _bias(n, 20).half())
    out, _ = _compare(_attn, ins, 5e-3, 2e-2, ref_inputs=tuple(x.float() for x in ins))
    assert out[0].dtype == torch.float16


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong under the Triton interpreter; bf16 is checked on GPU only")
def test_attention_and_gcn_bf16_on_gpu():
    h, n, dh = 16, 256, 64
    ins = tuple(_rand(h, n, dh, seed=s, dtype=torch.bfloat16) for s in (21, 22, 23)) + (_bias(n, 24).bfloat16(),)
    _compare(_attn, ins, 3e-2, 6e-2, ref_inputs=tuple(x.float() for x in ins))
    gins = (torch.rand(n, n, device=DEV).bfloat16(), _rand(n, 1024, seed=25, dtype=torch.bfloat16),
            (_rand(1024, 1024, seed=26) * 0.03).bfloat16(), _rand(1024, seed=27, dtype=torch.bfloat16))
    _compare(_gcn, gins, 3e-2, 6e-2, ref_inputs=tuple(x.float() for x in gins))

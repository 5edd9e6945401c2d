"""Benchmarks of the message-passing ops (``gcn_layer``, ``masked_attention``), issue 4.

Run: ``.venv/bin/python -m pytest benchmarks/bench_message_passing.py --benchmark-only``
(``AAHR_BENCH_THREADS=1`` for the single-thread rows only; one to two minutes on 2 shared cores).

Cases (AAHR's instance graph over a batch of 128 image-caption pairs, training step = forward + backward):
* ``gcn``: the joint GCN, n = 2B = 256 nodes, Din = Dout = 1024, dense relevance adjacency, bias,
  LeakyReLU 0.2; gradients to adj, x, W, b.
* ``attn``: the instance Transformer's attention, H = 16 heads, n = 256, dh = 64, an (n, n) additive
  bias with about half the entries -inf (top-50% connection) and one fully masked row; gradients to
  q, k, v and the bias.

Rows of each group: ``reference`` (eager, ``backend="reference"``), ``compiled`` (``torch.compile`` of the
reference function), ``cpp`` (``backend="cpp"``), ``triton`` / ``cuda`` (CUDA tensors; skipped without a
CUDA device).
``extra_info``: ``peak_extra_mib``; ``gflops`` of the GEMM work (gcn: 3 x 2 (n Din Dout + n^2 Dout);
attention: 12 H n^2 dh), ``frac_mm_ceiling`` against one fp32 ``torch.mm`` at the same thread count of shape
(n, Din) x (Din, Dout) for gcn and (H n, dh) x (dh, n) for attention.
Target (issue 4): cpp never slower than ``reference`` (report the ratio), at least as fast as ``compiled``.
"""
from __future__ import annotations

import math

import pytest
import torch

from aahr_fast import ops
from aahr_fast.ops.message_passing import gcn_layer_reference, masked_attention_reference

N_NODES, DIM = 256, 1024
H, DH = 16, 64
ROUNDS = 15

_COMPILED = {}


def _compiled(ref):
    if ref not in _COMPILED:
        _COMPILED[ref] = torch.compile(ref, dynamic=False)
    return _COMPILED[ref]


ROWS = ["reference", "compiled", "cpp", "triton", "cuda"]


def _impl(op, name, tools):
    """(fn, device type) of row ``name``; skips (pytest.skip) a backend that cannot run here."""
    public = {"gcn_layer": ops.gcn_layer, "masked_attention": ops.masked_attention}[op]
    ref = {"gcn_layer": gcn_layer_reference, "masked_attention": masked_attention_reference}[op]
    device = tools.require_backend(op, name)
    if name == "compiled":
        return _compiled(ref), device
    return (lambda *a: public(*a, backend=name)), device


def gcn_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    adj = torch.rand(N_NODES, N_NODES, generator=g)
    x = torch.randn(N_NODES, DIM, generator=g)
    w = torch.randn(DIM, DIM, generator=g) / math.sqrt(DIM)
    b = torch.randn(DIM, generator=g) * 0.1
    return adj, x, w, b


def attn_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(H, N_NODES, DH, generator=g) for _ in range(3))
    bias = torch.rand(N_NODES, N_NODES, generator=g)
    bias[torch.rand(N_NODES, N_NODES, generator=g) < 0.5] = float("-inf")
    bias[7] = float("-inf")
    return q, k, v, bias


CASES = {
    "gcn_layer": (gcn_case, 3 * 2.0 * (N_NODES * DIM * DIM + N_NODES * N_NODES * DIM), (N_NODES, DIM, DIM)),
    "masked_attention": (attn_case, 12.0 * H * N_NODES * N_NODES * DH, (H * N_NODES, N_NODES, DH)),
}


def _fwdbwd(fn, case, grad_out):
    leaves = [x.detach().requires_grad_() for x in case]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("impl", ROWS)
@pytest.mark.parametrize("op", ["gcn_layer", "masked_attention"])
def test_forward_backward(benchmark, bench_tools, threads, op, impl):
    t = bench_tools
    group = f"{'gcn' if op == 'gcn_layer' else 'attn'}-fwdbwd-T{threads}"
    benchmark.group = group
    make, flops, mm_shape = CASES[op]
    fn, device = _impl(op, impl, t)
    case = make()
    ref = _impl(op, "reference", t)[0]
    with torch.no_grad():
        out_shape = ref(*case).shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    want = _fwdbwd(ref, case, grad_out)
    case, grad_out = t.to_device((case, grad_out), device)
    got = _fwdbwd(fn, case, grad_out)  # also the warm-up / compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)

    def run():
        out = _fwdbwd(fn, case, grad_out)
        t.synchronize(device)
        return out

    run()
    peak, _ = t.peak_extra_bytes(run, device=device)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    t.finish_row(benchmark, group, impl, flops=flops, mm_shape=mm_shape, peak_bytes=peak, device=device,
                 threads=threads)

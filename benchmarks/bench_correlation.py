"""Benchmarks of the fused instance-correlation op (``instance_correlation``), issue 4.

Run: ``.venv/bin/python -m pytest benchmarks/bench_correlation.py --benchmark-only``
(``AAHR_BENCH_THREADS=1`` for the single-thread rows only; about a minute on 2 shared cores).

Case: 2B = 256 nodes (B = 128 images + 128 captions), D = 1024, L2-normalised embeddings, random
inter-modal relevance, sigma = 1, rho = 0.5, lam = 1 (AAHR Flickr30K settings).

Rows of each group (same inputs, same thread count):
* ``reference``: the eager reference (``backend="reference"``: cdist without mm, stable sorts, cats, where);
* ``compiled``: ``torch.compile`` of ``instance_correlation_reference`` (inductor C++; compiled before timing);
* ``cpp``: the fused C++ op (``backend="cpp"``);
* ``triton`` / ``cuda``: the GPU backends on CUDA tensors (skipped without a CUDA device; their
  ``frac_mm_ceiling`` is against the GPU's fp32 ``torch.mm``).

Groups ``corr-fwdbwd-T*`` time forward + backward (gradients of ``relevance`` and ``attn_bias`` back to
``v`` and ``t``, as in training), ``corr-fwd-T*`` the forward alone.
``extra_info``: ``peak_extra_mib`` (benchmarks/conftest.py), ``gflops`` of the mm-equivalent work
(per modality: the ranking Gram ``2 B^2 D`` + the distances ``2 B^2 D`` forward, ``2 B^2 D`` backward),
``frac_mm_ceiling`` = that over one fp32 ``torch.mm`` of shape (B, D) x (D, B) at the same thread count.
Target (issue 4): cpp >= 2x faster than ``reference`` for forward + backward, at least as fast as ``compiled``.
"""
from __future__ import annotations

import pytest
import torch

from aahr_fast import ops
from aahr_fast.ops.correlation import instance_correlation_reference

B, D = 128, 1024
OPTS = dict(sigma=1.0, rho=0.5, lam=1.0)
ROUNDS = 20


def make_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    return v, t, torch.rand(B, B, generator=g), torch.rand(B, B, generator=g)


_COMPILED = {}


ROWS = ["reference", "compiled", "cpp", "triton", "cuda"]


def _impl(name, tools):
    """(fn, device type) of row ``name``; skips (pytest.skip) a backend that cannot run here."""
    device = tools.require_backend("instance_correlation", name)
    if name == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(instance_correlation_reference, dynamic=False)
        return (lambda *a: _COMPILED["fn"](*a, **OPTS)), device
    return (lambda *a: ops.instance_correlation(*a, **OPTS, backend=name)), device


def _fwdbwd(fn, case, g_rel, g_bias):
    v, t, ri, rt = case
    v, t = v.detach().requires_grad_(), t.detach().requires_grad_()
    c = fn(v, t, ri, rt)
    return torch.autograd.grad((c.relevance, c.attn_bias), (v, t), (g_rel, g_bias))


def _flops(backward: bool) -> float:
    per_modality = (2 + 2 + (2 if backward else 0)) * B * B * D
    return 2.0 * per_modality


def _finish(benchmark, t, group, impl, threads, peak, backward, device):
    t.finish_row(benchmark, group, impl, flops=_flops(backward), mm_shape=(B, B, D), peak_bytes=peak,
                 device=device, threads=threads)


@pytest.mark.parametrize("impl", ROWS)
def test_forward_backward(benchmark, bench_tools, threads, impl):
    t = bench_tools
    group = f"corr-fwdbwd-T{threads}"
    benchmark.group = group
    fn, device = _impl(impl, t)
    case = make_case()
    g = torch.Generator().manual_seed(1)
    g_rel, g_bias = torch.randn(2 * B, 2 * B, generator=g), torch.randn(2 * B, 2 * B, generator=g)
    want = _fwdbwd(_impl("reference", t)[0], case, g_rel, g_bias)
    case, g_rel, g_bias = t.to_device((case, g_rel, g_bias), device)
    got = _fwdbwd(fn, case, g_rel, g_bias)  # also the warm-up / compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)

    def run():
        out = _fwdbwd(fn, case, g_rel, g_bias)
        t.synchronize(device)
        return out

    run()
    peak, _ = t.peak_extra_bytes(run, device=device)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _finish(benchmark, t, group, impl, threads, peak, backward=True, device=device)


@pytest.mark.parametrize("impl", ROWS)
def test_forward(benchmark, bench_tools, threads, impl):
    t = bench_tools
    group = f"corr-fwd-T{threads}"
    benchmark.group = group
    fn, device = _impl(impl, t)
    want = _impl("reference", t)[0](*make_case())
    case = t.to_device(make_case(), device)

    def run():
        with torch.no_grad():
            out = fn(*case)
        t.synchronize(device)
        return out

    got = run()
    assert torch.equal(got.connection.cpu(), want.connection)
    torch.testing.assert_close(got.relevance.cpu(), want.relevance, rtol=1e-5, atol=1e-6)
    peak, _ = t.peak_extra_bytes(run, device=device)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _finish(benchmark, t, group, impl, threads, peak, backward=False, device=device)

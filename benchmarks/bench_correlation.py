"""Benchmarks of the fused instance-correlation op (``instance_correlation``), issue 4.

Run: ``.venv/bin/python -m pytest benchmarks/bench_correlation.py --benchmark-only``
(``AAHR_BENCH_THREADS=1`` for the single-thread rows only; about a minute on 2 shared cores).

Case: 2B = 256 nodes (B = 128 images + 128 captions), D = 1024, L2-normalised embeddings, random
inter-modal relevance, sigma = 1, rho = 0.5, lam = 1 (AAHR Flickr30K settings).

Rows of each group (same inputs, same thread count):
* ``reference``: the eager reference (``backend="reference"``: cdist without mm, stable sorts, cats, where);
* ``compiled``: ``torch.compile`` of ``instance_correlation_reference`` (inductor C++; compiled before timing);
* ``cpp``: the fused C++ op (``backend="cpp"``).

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


def _impl(name, tools):
    if name == "reference":
        return lambda *a: ops.instance_correlation(*a, **OPTS, backend="reference")
    if name == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(instance_correlation_reference, dynamic=False)
        return lambda *a: _COMPILED["fn"](*a, **OPTS)
    if name == "cpp":
        if "cpp" not in tools.backend_rows("instance_correlation"):
            pytest.skip("the C++ extension is not available here")
        return lambda *a: ops.instance_correlation(*a, **OPTS, backend="cpp")
    raise ValueError(name)


def _fwdbwd(fn, case, g_rel, g_bias):
    v, t, ri, rt = case
    v, t = v.detach().requires_grad_(), t.detach().requires_grad_()
    c = fn(v, t, ri, rt)
    return torch.autograd.grad((c.relevance, c.attn_bias), (v, t), (g_rel, g_bias))


def _flops(backward: bool) -> float:
    per_modality = (2 + 2 + (2 if backward else 0)) * B * B * D
    return 2.0 * per_modality


def _finish(benchmark, t, group, impl, threads, peak, backward):
    extra = dict(threads=threads, peak_extra_mib=peak / 2**20)
    med = t.median_seconds(benchmark)
    if med is not None:
        ceiling = t.mm_ceiling_gflops(B, B, D)
        gf = t.gflops(_flops(backward), med)
        extra.update(gflops=gf, frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    t.record(benchmark, group, impl, **extra)


@pytest.mark.parametrize("impl", ["reference", "compiled", "cpp"])
def test_forward_backward(benchmark, bench_tools, threads, impl):
    t = bench_tools
    group = f"corr-fwdbwd-T{threads}"
    benchmark.group = group
    case = make_case()
    fn = _impl(impl, t)
    g = torch.Generator().manual_seed(1)
    g_rel, g_bias = torch.randn(2 * B, 2 * B, generator=g), torch.randn(2 * B, 2 * B, generator=g)
    want = _fwdbwd(_impl("reference", t), case, g_rel, g_bias)
    got = _fwdbwd(fn, case, g_rel, g_bias)  # also the warm-up / compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    def run():
        return _fwdbwd(fn, case, g_rel, g_bias)

    run()
    peak, _ = t.peak_extra_bytes(run)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _finish(benchmark, t, group, impl, threads, peak, backward=True)


@pytest.mark.parametrize("impl", ["reference", "compiled", "cpp"])
def test_forward(benchmark, bench_tools, threads, impl):
    t = bench_tools
    group = f"corr-fwd-T{threads}"
    benchmark.group = group
    case = make_case()
    fn = _impl(impl, t)

    def run():
        with torch.no_grad():
            return fn(*case)

    got, want = run(), _impl("reference", t)(*case)
    assert torch.equal(got.connection, want.connection)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-5, atol=1e-6)
    peak, _ = t.peak_extra_bytes(run)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _finish(benchmark, t, group, impl, threads, peak, backward=False)

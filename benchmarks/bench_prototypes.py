"""Benchmarks of the prototype ops (``swapped_prediction_loss``, ``sinkhorn``), issue 4.

Run: ``.venv/bin/python -m pytest benchmarks/bench_prototypes.py --benchmark-only``
(``AAHR_BENCH_THREADS=1`` for the single-thread rows only; one to two minutes on 2 shared cores).

Cases (AAHR Flickr30K): B = 128, K = 384 prototypes, D = 1024, L2-normalised embeddings and prototypes,
eps = 0.1, 3 Sinkhorn iterations, tau = 0.1; queue Q = 0 (AAHR's code) or Q = 2048 queued embeddings per
modality (the MoCo memory bank size; their scores join the Sinkhorn columns).

Groups: ``proto-loss-Q*-T*`` forward + backward of the loss (gradients to x_v, x_t and the prototypes);
``sinkhorn-Q*-T*`` the codes of one (B + Q, K) score matrix.
Rows: ``reference`` (eager, ``backend="reference"``), ``compiled`` (``torch.compile`` of the reference
function), ``cpp`` (``backend="cpp"``).
``extra_info``: ``peak_extra_mib``; for the loss ``gflops`` of the GEMM work
(``2 (2B + 2Q) K D`` forward + ``2 x 2 (2B) K D`` backward) and ``frac_mm_ceiling`` against one fp32
``torch.mm`` of shape (2B + 2Q, D) x (D, K) at the same thread count.
Target (issue 4): loss forward + backward >= 2x faster than ``reference``, at least as fast as ``compiled``.
"""
from __future__ import annotations

import pytest
import torch

from aahr_fast import ops
from aahr_fast.ops.prototypes import sinkhorn_reference, swapped_prediction_loss_reference

B, K, D = 128, 384, 1024
OPTS = dict(eps=0.1, n_iters=3, tau=0.1)
ROUNDS = 15

_COMPILED = {}


def _unit(n, g):
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)


def loss_case(q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xv, xt, c = _unit(B, g), _unit(B, g), _unit(K, g)
    qv, qt = (_unit(q, g), _unit(q, g)) if q else (None, None)
    return xv, xt, c, qv, qt


def _loss_impl(name, tools):
    if name == "reference":
        return lambda xv, xt, c, qv, qt: ops.swapped_prediction_loss(xv, xt, c, queue_v=qv, queue_t=qt, **OPTS,
                                                                     backend="reference")
    if name == "compiled":
        if "loss" not in _COMPILED:
            _COMPILED["loss"] = torch.compile(swapped_prediction_loss_reference, dynamic=False)
        return lambda xv, xt, c, qv, qt: _COMPILED["loss"](xv, xt, c, queue_v=qv, queue_t=qt, **OPTS)
    if name == "cpp":
        if "cpp" not in tools.backend_rows("swapped_prediction_loss"):
            pytest.skip("the C++ extension is not available here")
        return lambda xv, xt, c, qv, qt: ops.swapped_prediction_loss(xv, xt, c, queue_v=qv, queue_t=qt, **OPTS,
                                                                     backend="cpp")
    raise ValueError(name)


def _sinkhorn_impl(name, tools):
    if name == "reference":
        return lambda s: ops.sinkhorn(s, OPTS["eps"], OPTS["n_iters"], backend="reference")
    if name == "compiled":
        if "sk" not in _COMPILED:
            _COMPILED["sk"] = torch.compile(sinkhorn_reference, dynamic=False)
        return lambda s: _COMPILED["sk"](s, OPTS["eps"], OPTS["n_iters"])
    if name == "cpp":
        if "cpp" not in tools.backend_rows("sinkhorn"):
            pytest.skip("the C++ extension is not available here")
        return lambda s: ops.sinkhorn(s, OPTS["eps"], OPTS["n_iters"], backend="cpp")
    raise ValueError(name)


def _fwdbwd(fn, case):
    xv, xt, c, qv, qt = case
    leaves = [x.detach().requires_grad_() for x in (xv, xt, c)]
    loss = fn(*leaves, qv, qt)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", ["reference", "compiled", "cpp"])
@pytest.mark.parametrize("q", [0, 2048], ids=lambda q: f"Q{q}")
def test_loss_forward_backward(benchmark, bench_tools, threads, q, impl):
    t = bench_tools
    group = f"proto-loss-Q{q}-T{threads}"
    benchmark.group = group
    case = loss_case(q)
    fn = _loss_impl(impl, t)
    want = _fwdbwd(_loss_impl("reference", t), case)
    got = _fwdbwd(fn, case)  # also the warm-up / compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def run():
        return _fwdbwd(fn, case)

    run()
    peak, _ = t.peak_extra_bytes(run)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    extra = dict(threads=threads, peak_extra_mib=peak / 2**20)
    med = t.median_seconds(benchmark)
    if med is not None:
        flops = 2.0 * (2 * B + 2 * q) * K * D + 2 * 2.0 * (2 * B) * K * D
        ceiling = t.mm_ceiling_gflops(2 * B + 2 * q, K, D)
        gf = t.gflops(flops, med)
        extra.update(gflops=gf, frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    t.record(benchmark, group, impl, **extra)


@pytest.mark.parametrize("impl", ["reference", "compiled", "cpp"])
@pytest.mark.parametrize("q", [0, 2048], ids=lambda q: f"Q{q}")
def test_sinkhorn(benchmark, bench_tools, threads, q, impl):
    t = bench_tools
    group = f"sinkhorn-Q{q}-T{threads}"
    benchmark.group = group
    xv, _, c, qv, _ = loss_case(q)
    scores = (xv @ c.t()) if qv is None else torch.cat([xv, qv]) @ c.t()
    fn = _sinkhorn_impl(impl, t)
    torch.testing.assert_close(fn(scores), _sinkhorn_impl("reference", t)(scores), rtol=1e-4, atol=1e-6)

    def run():
        return fn(scores)

    run()
    peak, _ = t.peak_extra_bytes(run)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    t.record(benchmark, group, impl, threads=threads, peak_extra_mib=peak / 2**20)

"""Benchmarks of the prototype ops (``swapped_prediction_loss``, ``sinkhorn``), issue 4.

Run: ``.venv/bin/python -m pytest benchmarks/bench_prototypes.py --benchmark-only``
(``AAHR_BENCH_THREADS=1`` for the single-thread rows only; one to two minutes on 2 shared cores).

Cases (AAHR Flickr30K): B = 128, K = 384 prototypes, D = 1024, L2-normalised embeddings and prototypes,
eps = 0.1, 3 Sinkhorn iterations, tau = 0.1; queue Q = 0 (AAHR's code) or Q = 2048 queued embeddings per
modality (the MoCo memory bank size; their scores join the Sinkhorn columns).

Groups: ``proto-loss-Q*-T*`` forward + backward of the loss (gradients to x_v, x_t and the prototypes);
``sinkhorn-Q*-T*`` the codes of one (B + Q, K) score matrix; ``proto-loss-Q*-medium-T*`` the loss under
``torch.set_float32_matmul_precision("medium")`` for every row and the ceiling.
Rows: ``reference`` (eager, ``backend="reference"``), ``compiled`` (``torch.compile`` of the reference
function), ``cpp`` (``backend="cpp"``),
``triton`` / ``cuda`` (CUDA tensors; skipped without a CUDA device).
``extra_info``: ``peak_extra_mib``; for the loss ``gflops`` of the GEMM work
(``2 (2B + 2Q) K D`` forward + ``2 x 2 (2B) K D`` backward) and ``frac_mm_ceiling`` against one fp32
``torch.mm`` of shape (2B + 2Q, D) x (D, K) at the same thread count; for Sinkhorn ``gflops`` of the
log-domain iterations (``(8 + 12 n_iters) (B + Q) K``, see :func:`sinkhorn_flops`) against the GEMM that
makes its scores, (B + Q, D) x (D, K) (Sinkhorn is elementwise / exp-bound: a small fraction is expected).
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


ROWS = ["reference", "compiled", "cpp", "triton", "cuda"]


def _loss_impl(name, tools, compiled_key="loss"):
    """(fn, device type) of row ``name``; skips (pytest.skip) a backend that cannot run here.
    ``compiled_key``: cache key of the compiled row (one compiled function per matmul-precision setting)."""
    device = tools.require_backend("swapped_prediction_loss", name)
    if name == "compiled":
        if compiled_key not in _COMPILED:
            _COMPILED[compiled_key] = torch.compile(swapped_prediction_loss_reference, dynamic=False)
        compiled = _COMPILED[compiled_key]
        return (lambda xv, xt, c, qv, qt: compiled(xv, xt, c, queue_v=qv, queue_t=qt, **OPTS)), device
    return (lambda xv, xt, c, qv, qt: ops.swapped_prediction_loss(xv, xt, c, queue_v=qv, queue_t=qt, **OPTS,
                                                                  backend=name)), device


def _sinkhorn_impl(name, tools):
    device = tools.require_backend("sinkhorn", name)
    if name == "compiled":
        if "sk" not in _COMPILED:
            _COMPILED["sk"] = torch.compile(sinkhorn_reference, dynamic=False)
        return (lambda s: _COMPILED["sk"](s, OPTS["eps"], OPTS["n_iters"])), device
    return (lambda s: ops.sinkhorn(s, OPTS["eps"], OPTS["n_iters"], backend=name)), device


def sinkhorn_flops(rows: int, k: int, n_iters: int) -> float:
    """FLOPs of the log-domain Sinkhorn on a (rows, K) score matrix, counted per element of Q (K x rows),
    one FLOP per add / subtract / multiply / divide / compare / exp (as the reference computes it):

    * ``S / eps``: 1; the global log-sum-exp and its subtraction: max 1 + subtract 1 + exp 1 + sum 1
      + subtract 1 = 5;
    * each iteration: two log-sum-exps (rows, then columns), each max 1 + subtract 1 + exp 1 + sum 1 = 4,
      followed by subtracting it and ``log K`` (resp. ``log B``) = 2, so 12 per iteration;
    * the result ``exp(log_q + log B)``: 2.

    Total ``(8 + 12 n_iters) * rows * K`` (the O(rows + K) logs of the sums are left out). A fused
    backend may do less arithmetic (one max per pass); this counts the useful work of the algorithm, the
    same for every row.
    """
    return (8.0 + 12.0 * n_iters) * rows * k


def _fwdbwd(fn, case):
    xv, xt, c, qv, qt = case
    leaves = [x.detach().requires_grad_() for x in (xv, xt, c)]
    loss = fn(*leaves, qv, qt)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves)


def _time_loss(benchmark, t, threads, group, impl, q, compiled_key="loss", **extra):
    """Check row ``impl`` against the reference, then time the loss forward + backward on the queue-``q`` case
    as row ``impl`` of ``group`` (peak extra memory, GFLOP/s, fraction of the mm ceiling, ``extra``)."""
    benchmark.group = group
    fn, device = _loss_impl(impl, t, compiled_key)
    case = loss_case(q)
    want = _fwdbwd(_loss_impl("reference", t)[0], case)
    case = t.to_device(case, device)
    got = _fwdbwd(fn, case)  # also the warm-up / compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)

    def run():
        out = _fwdbwd(fn, case)
        t.synchronize(device)
        return out

    run()
    peak, _ = t.peak_extra_bytes(run, device=device)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    flops = 2.0 * (2 * B + 2 * q) * K * D + 2 * 2.0 * (2 * B) * K * D
    t.finish_row(benchmark, group, impl, flops=flops, mm_shape=(2 * B + 2 * q, K, D), peak_bytes=peak,
                 device=device, threads=threads, **extra)


@pytest.mark.parametrize("impl", ROWS)
@pytest.mark.parametrize("q", [0, 2048], ids=lambda q: f"Q{q}")
def test_loss_forward_backward(benchmark, bench_tools, threads, q, impl):
    _time_loss(benchmark, bench_tools, threads, f"proto-loss-Q{q}-T{threads}", impl, q)


@pytest.mark.parametrize("impl", ["reference", "compiled", "cpp"])
@pytest.mark.parametrize("q", [0, 2048], ids=lambda q: f"Q{q}")
def test_loss_forward_backward_medium_precision(benchmark, bench_tools, threads, q, impl):
    """Group ``proto-loss-Q*-medium-T*``: the loss forward + backward with
    ``torch.set_float32_matmul_precision("medium")`` for every row alike and for the ceiling (oneDNN may then
    run the fp32 GEMMs with bf16-based arithmetic and fp32 accumulation, as in ``xsim-fwd-N36-medium``).
    The comparison against the reference is the same as at default precision (rtol 1e-4): the GEMM outputs
    change by less than that here."""
    with bench_tools.matmul_precision("medium"):
        _time_loss(benchmark, bench_tools, threads, f"proto-loss-Q{q}-medium-T{threads}", impl, q,
                   compiled_key="loss-medium", matmul_precision="medium")


@pytest.mark.parametrize("impl", ROWS)
@pytest.mark.parametrize("q", [0, 2048], ids=lambda q: f"Q{q}")
def test_sinkhorn(benchmark, bench_tools, threads, q, impl):
    t = bench_tools
    group = f"sinkhorn-Q{q}-T{threads}"
    benchmark.group = group
    xv, _, c, qv, _ = loss_case(q)
    scores = (xv @ c.t()) if qv is None else torch.cat([xv, qv]) @ c.t()
    fn, device = _sinkhorn_impl(impl, t)
    want = _sinkhorn_impl("reference", t)[0](scores)
    scores = scores.to(device)
    torch.testing.assert_close(fn(scores).cpu(), want, rtol=1e-4, atol=1e-6)

    def run():
        out = fn(scores)
        t.synchronize(device)
        return out

    run()
    peak, _ = t.peak_extra_bytes(run, device=device)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    rows = scores.shape[0]
    # ceiling: the GEMM that produced these scores, (B + Q, D) x (D, K), same thread count / device
    t.finish_row(benchmark, group, impl, flops=sinkhorn_flops(rows, K, OPTS["n_iters"]), mm_shape=(rows, K, D),
                 peak_bytes=peak, device=device, threads=threads)

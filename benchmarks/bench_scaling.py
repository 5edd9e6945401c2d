"""Scaling sweeps: how time and peak memory grow with batch size, regions, words, prototypes, queue (issue 6).

Run: ``.venv/bin/python -m pytest benchmarks/bench_scaling.py --benchmark-only`` (small sweeps, about two
minutes on 2 shared cores); ``--full`` widens every sweep (batch up to 1024; much longer).

Every distinct case is its own group ``scale-<case>-T<threads>`` with one row per backend (``reference``,
and ``cpp`` on CPU), so pytest-benchmark prints the same-run ratio at each size. A case on several sweeps
(B = 128, N = 49, L = 32 is on all three cross-similarity sweeps) is measured once; the training step at
B = 128 is the row of ``bench_train_step.py``. ``extra_info`` carries what
``python -m aahr_fast.benchmark_report`` needs to fit the log-log slopes: ``sweeps`` =
``{sweep: {"x_name", "x", "expect"}}`` (the sweeps this case is a point of, its size there, the expected
growth as text; ``"mem_model_bytes": None`` where the row's memory model does not apply to that sweep),
``backend``, ``peak_extra_mib``, ``work_flops`` (the useful FLOPs of the case; the *expected* time
exponent is the least-squares log-log slope of ``work_flops`` over the sweep's points), ``mem_model_bytes``
(the dominant memory term the implementation is expected to allocate; its slope is the expected memory
exponent; None where no single term applies), ``fixed`` (all sizes), ``threads``, and ``gflops`` /
``frac_mm_ceiling`` (against one fp32 ``torch.mm`` of the op's main GEMM shape, same thread count, the
session-cached ceiling of ``benchmarks/conftest.py``).

Sweeps (D = 256, the width of the flickr8k_cpu model; all regions and words valid so work scales exactly):
* ``xsim-B``: ``fragment_word_relevance`` forward (no_grad, as AAHR computes the inter-modal relevance),
  N = 49, L = 32, B = 64..256 (``--full``: ..1024). Time ~ 2 B^2 N L D (B^2). Memory: the vectorised
  reference materialises (B, B, L, N) scores, ~ B^2 N L; the fused op only its two (B, B) outputs, ~ B^2,
  above bounded per-thread tile buffers that dominate at these sizes (no single-term model: n/a).
* ``xsim-N`` / ``xsim-L``: the same op at B = 128 over regions N (9..49) / words L (8..32). Time ~ N / ~ L;
  reference memory ~ N / ~ L; fused memory independent of N and L (exponent 0).
* ``corr-B``: ``instance_correlation`` forward + backward over 2B nodes, B = 64..512: time ~ B^2 D,
  memory ~ B^2 (the (2B, 2B) relevance / connection / bias and the B x B intra distances).
* ``proto-K``: ``swapped_prediction_loss`` forward + backward, B = 128, no queue, K = 128..512 prototypes:
  time ~ B K D (K^1), memory ~ B K (K^1).
* ``proto-Q``: the same loss with Q queued embeddings per modality (their scores join the Sinkhorn
  columns), K = 128, Q = 512..4096: time and memory ~ (B + Q) K, i.e. slope -> 1 once Q >> B.
* ``train-B``: one whole training step (``bench_train_step.py``, preset flickr8k_cpu), B = 64, 128, 256
  (``--full``: ..1024): the encoders, momentum encoders, prototypes and MoCo are linear in B, the
  region-word relevance, instance graph and triplet losses quadratic; the expected time exponent is the
  slope of the counted FLOPs (``_e2e.step_flops``).

Reference rows whose (B, B, L, N) score tensor would need more than ``REF_MEM_CAP_GIB`` are skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import _e2e
from aahr_fast import ops

D = 256
REF_MEM_CAP_GIB = 3.0
#: measured peak extra memory of the reference cross similarity / its score tensor (B=128, N=49, L=32).
REF_XSIM_MEM_FACTOR = 6.0
MIN_ROUNDS, MAX_ROUNDS, TARGET_S = 3, 25, 0.5  # timed rounds per row: about TARGET_S seconds in all
TRAIN_ROUNDS = 2
OPTS_CORR = dict(sigma=1.0, rho=0.5, lam=1.0)
OPTS_PROTO = dict(eps=0.1, n_iters=3, tau=0.1)


@dataclass
class Case:
    """One sweep point: ``make(backend) -> zero-arg callable``, its useful FLOPs, memory model per row
    kind (``reference`` / ``fused``), the mm shape for the ceiling, and the fixed sizes."""

    make: Callable[[str], Callable[[], Any]]
    work_flops: float
    mem_model: dict
    mm_shape: tuple
    fixed: dict
    ref_bytes_estimate: float = 0.0
    op: str = ""


def _unit(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)


def xsim_case(b: int, n: int, l: int) -> Case:
    g = torch.Generator().manual_seed(0)
    regions, words = torch.randn(b, n, D, generator=g), torch.randn(b, l, D, generator=g)
    rl, wl = torch.full((b,), n, dtype=torch.int64), torch.full((b,), l, dtype=torch.int64)

    def make(backend):
        def run():
            with torch.no_grad():
                return ops.fragment_word_relevance(regions, rl, words, wl, backend=backend)
        return run

    scores = 4.0 * b * b * n * l
    return Case(make, 2.0 * b * b * n * l * D, {"reference": scores, "fused": 8.0 * b * b}, (b * l, b * n, D),
                dict(B=b, N=n, L=l, D=D), REF_XSIM_MEM_FACTOR * scores, "fragment_word_relevance")


def corr_case(b: int) -> Case:
    g = torch.Generator().manual_seed(0)
    v, t = _unit(b, g), _unit(b, g)
    ri, rt = torch.rand(b, b, generator=g), torch.rand(b, b, generator=g)
    g_rel, g_bias = torch.randn(2 * b, 2 * b, generator=g), torch.randn(2 * b, 2 * b, generator=g)

    def make(backend):
        def run():
            vv, tt = v.detach().requires_grad_(), t.detach().requires_grad_()
            c = ops.instance_correlation(vv, tt, ri, rt, **OPTS_CORR, backend=backend)
            return torch.autograd.grad((c.relevance, c.attn_bias), (vv, tt), (g_rel, g_bias))
        return run

    mats = 4.0 * (2 * b) ** 2
    return Case(make, 2.0 * 6 * b * b * D, {"reference": mats, "fused": mats}, (b, b, D), dict(B=b, D=D),
                op="instance_correlation")


def proto_case(b: int, k: int, q: int) -> Case:
    g = torch.Generator().manual_seed(0)
    xv, xt, c = _unit(b, g), _unit(b, g), _unit(k, g)
    qv, qt = (_unit(q, g), _unit(q, g)) if q else (None, None)

    def make(backend):
        def run():
            leaves = [x.detach().requires_grad_() for x in (xv, xt, c)]
            loss = ops.swapped_prediction_loss(*leaves, queue_v=qv, queue_t=qt, **OPTS_PROTO, backend=backend)
            return torch.autograd.grad(loss, leaves)
        return run

    scores = 4.0 * 2 * (b + q) * k
    flops = 2.0 * (2 * b + 2 * q) * k * D + 2 * 2.0 * (2 * b) * k * D
    return Case(make, flops, {"reference": scores, "fused": scores}, (2 * b + 2 * q, k, D),
                dict(B=b, K=k, Q=q, D=D), op="swapped_prediction_loss")


@dataclass(frozen=True)
class Sweep:
    """One sweep: the varied size ``x_name`` over ``default`` (or ``full`` with ``--full``) values;
    ``key(x)`` names the case (equal keys = the same measurement, shared by several sweeps) and
    ``case(x)`` builds it. ``fused_mem_model=False``: no single memory term predicts the fused rows on
    this sweep (their expected memory exponent is reported as n/a; ``expect`` says why)."""

    x_name: str
    default: tuple
    full: tuple
    key: Callable[[int], tuple]
    case: Callable[[int], Case]
    expect: str = ""
    fused_mem_model: bool = True


def _xsim(b, n, l):
    return ("xsim", b, n, l)


SWEEPS = {
    "xsim-B": Sweep("B", (64, 128, 256), (64, 128, 256, 512, 1024), lambda x: _xsim(x, 49, 32),
                    lambda x: xsim_case(x, 49, 32),
                    "time ~ B^2 N L D (2); memory: reference ~ B^2 N L (2); fused: two (B, B) float32 outputs "
                    "(8 B^2 bytes, 0.5 MiB at B = 256) above bounded per-thread tile buffers (about 1 MiB at one "
                    "thread), so its slope stays between 0 and 2 and nears 2 only for B >> 350", False),
    "xsim-N": Sweep("N", (9, 25, 49), (4, 9, 16, 25, 36, 49, 64, 100), lambda x: _xsim(128, x, 32),
                    lambda x: xsim_case(128, x, 32),
                    "time ~ N (1); memory: reference ~ N (1), fused independent of N (0)"),
    "xsim-L": Sweep("L", (8, 16, 32), (4, 8, 16, 32, 64), lambda x: _xsim(128, 49, x),
                    lambda x: xsim_case(128, 49, x),
                    "time ~ L (1); memory: reference ~ L (1), fused independent of L (0)"),
    "corr-B": Sweep("B", (64, 128, 256, 512), (64, 128, 256, 512, 1024, 2048), lambda x: ("corr", x), corr_case,
                    "time ~ B^2 D (2); memory ~ B^2 (2)"),
    "proto-K": Sweep("K", (128, 256, 512), (64, 128, 256, 512, 1024, 2048, 4096), lambda x: ("proto", 128, x, 0),
                     lambda x: proto_case(128, x, 0), "time ~ B K D (1); memory ~ B K (1)"),
    "proto-Q": Sweep("Q", (512, 1024, 2048, 4096), (512, 1024, 2048, 4096, 8192, 16384, 32768),
                     lambda x: ("proto", 128, 128, x), lambda x: proto_case(128, 128, x),
                     "time and memory ~ (B + Q) K (-> 1 for Q >> B)"),
}
#: the training-step sweep; its B = 128 point is the row of bench_train_step.py (same case, not repeated).
TRAIN_SWEEP = Sweep("B", (64, 128, 256), (64, 128, 256, 512, 1024), lambda x: ("train", x), None,
                    _e2e.TRAIN_SWEEP_EXPECT)
TRAIN_SHARED_B = 128
OP_BACKENDS = ("reference", "cpp")


def sweep_points(full: bool) -> dict:
    """``{case key: (build, op rows, {sweep: x})}`` over all sweeps, each distinct case once."""
    points: dict = {}
    for name, sw in SWEEPS.items():
        for x in (sw.full if full else sw.default):
            k = sw.key(x)
            if k not in points:
                points[k] = (lambda sw=sw, x=x: sw.case(x), OP_BACKENDS, {})
            points[k][2][name] = x
    for x in (TRAIN_SWEEP.full if full else TRAIN_SWEEP.default):
        if x != TRAIN_SHARED_B:
            points[TRAIN_SWEEP.key(x)] = (None, ("reference", "default"), {"train-B": x})
    return points


def sweep_info(memberships: dict, backend: str = "reference") -> dict:
    """The ``extra_info["sweeps"]`` entry: ``{sweep: {"x_name", "x", "expect"}}`` (plus
    ``"mem_model_bytes": None`` where the row-level memory model does not apply to this sweep)."""
    out = {}
    for name, x in memberships.items():
        sw = TRAIN_SWEEP if name == "train-B" else SWEEPS[name]
        out[name] = dict(x_name=sw.x_name, x=x, expect=sw.expect)
        if backend != "reference" and not sw.fused_mem_model:
            out[name]["mem_model_bytes"] = None
    return out


_POINTS: dict = {}


def pytest_generate_tests(metafunc):
    if "point" not in metafunc.fixturenames:
        return
    _POINTS.clear()
    _POINTS.update(sweep_points(metafunc.config.getoption("--full", default=False)))
    params, ids = [], []
    for key, (_, rows, _m) in _POINTS.items():
        for row in rows:
            params.append((key, row))
            ids.append("-".join(str(k) for k in key) + f"-{row}")
    metafunc.parametrize("point", params, ids=ids)


def test_scaling(benchmark, bench_tools, threads, point):
    t = bench_tools
    key, row = point
    build, _, memberships = _POINTS[key]
    group = "scale-" + "-".join(f"{k:05d}" if isinstance(k, int) else k for k in key) + f"-T{threads}"
    sweeps = sweep_info(memberships, row)
    if key[0] == "train":
        b = key[1]
        scores = 4.0 * b * b * _e2e.N_REGIONS * _e2e.MAX_TOKENS
        if row == "reference" and REF_XSIM_MEM_FACTOR * scores > REF_MEM_CAP_GIB * 2**30:
            pytest.skip(f"reference step at B={b} needs about {REF_XSIM_MEM_FACTOR * scores / 2**30:.1f} GiB "
                        f"(> {REF_MEM_CAP_GIB} GiB cap)")
        _e2e.run_step_benchmark(benchmark, t, group=group, preset="flickr8k_cpu", batch_size=b, mode=row,
                                device="cpu", threads=threads, rounds=TRAIN_ROUNDS, sweeps=sweeps,
                                work_flops=_e2e.step_flops("flickr8k_cpu", b), mem_model_bytes=None)
        return
    case = build()
    if row != "reference" and row not in t.backend_rows(case.op):
        pytest.skip(f"backend {row!r} is not available here for {case.op}")
    if row == "reference" and case.ref_bytes_estimate > REF_MEM_CAP_GIB * 2**30:
        pytest.skip(f"reference at {key} needs about {case.ref_bytes_estimate / 2**30:.1f} GiB "
                    f"(> {REF_MEM_CAP_GIB} GiB cap)")
    benchmark.group = group
    fn = case.make(row)
    fn()  # warm-up (extension load)
    t0 = time.perf_counter()
    peak, _ = t.peak_extra_bytes(fn)  # its wall time (profiler overhead included) sizes the timed rounds
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(time.perf_counter() - t0, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    info = dict(backend=row, threads=threads, peak_extra_mib=peak / 2**20, sweeps=sweeps, fixed=case.fixed,
                work_flops=case.work_flops,
                mem_model_bytes=case.mem_model["reference" if row == "reference" else "fused"])
    med = t.median_seconds(benchmark)
    if med is not None:
        ceiling = t.mm_ceiling_gflops(*case.mm_shape)
        gf = t.gflops(case.work_flops, med)
        info.update(gflops=gf, frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    t.record(benchmark, group, row, **info)

"""Shared benchmark helpers (pytest-benchmark) for the ops benchmarks.

* ``threads`` fixture: runs a benchmark once per intra-op thread count (``AAHR_BENCH_THREADS``, e.g.
  ``1,2``; without it only the 1-thread rows run, see the suite options at the end of this file) and
  restores the count.
* :func:`peak_extra_bytes` (:mod:`aahr_fast.utils.memory`): peak of the torch CPU allocator's running total while a call runs (raw
  allocation events of the torch profiler with ``profile_memory=True``; tensors allocated before the call
  are not counted, so this is the *extra* memory an op needs). Memory that bypasses the torch allocator
  (BLAS packing buffers) is invisible to every row alike.
* :func:`gflops`, :func:`mm_ceiling_gflops`: GFLOP/s of useful work, and the practical compute ceiling:
  the GFLOP/s of one fp32 ``torch.mm`` with the same FLOPs (same M, N, K), same thread count.
* :func:`backend_rows` (alias ``benchmark_rows``): the backends of an op runnable here, one benchmark row
  each: ``reference`` / ``cpp`` on CPU tensors, ``triton`` / ``cuda`` on CUDA tensors where CUDA is
  available; :func:`require_backend` skips a row cleanly otherwise and names its device.
* :func:`finish_row`: records a row with the three contract fields (peak extra MiB, GFLOP/s, fraction of
  the mm ceiling measured in the same session on the row's device).
* :func:`record` + the terminal summary: every row's median, and per group the ratio of each peer's
  median to the ``cpp`` row's (speed-up), memory ratios and the fraction of the mm ceiling.

Benchmark modules get these through the ``bench_tools`` fixture (a namespace), not by importing this
file (several ``conftest`` modules exist, so ``import conftest`` is ambiguous).

Files named ``bench_*.py`` in this folder are collected when the folder is given to pytest
(``pytest benchmarks --benchmark-only``).
"""
from __future__ import annotations

import contextlib
import os
import time
import types
from collections import defaultdict
from typing import Callable, Optional

import pytest
import torch

from aahr_fast.utils.memory import peak_extra_bytes  # noqa: F401  (part of bench_tools)


# Every ``compiled`` row of one reference function shares dynamo's per-function cache of compiled graphs:
# the cross-similarity groups alone compile the reference for two region counts, the 16-image check
# slice, grad mode on and off, and two matmul precisions. Past the default recompile limit (8) dynamo
# silently runs the function eagerly, so a later compiled row would time eager code; the suite raises it.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``) unless named explicitly."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _thread_counts() -> list[int]:
    raw = os.environ.get("AAHR_BENCH_THREADS", "1,2")
    return [int(x) for x in raw.split(",") if x.strip()]


@pytest.fixture(params=_thread_counts(), ids=lambda t: f"T{t}")
def threads(request) -> int:
    """Intra-op thread count for this benchmark row (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@contextlib.contextmanager
def matmul_precision(mode: str):
    """Run the body under ``torch.set_float32_matmul_precision(mode)`` and restore the previous setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def synchronize(device: str = "cpu") -> None:
    """Wait for queued CUDA work when ``device`` is a CUDA device (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: backend -> device type of the tensors its benchmark row runs on.
BACKEND_DEVICE = {"reference": "cpu", "compiled": "cpu", "cpp": "cpu", "authors": "cpu", "triton": "cuda",
                  "cuda": "cuda"}
#: the GPU backends: rows only where CUDA is available (CUDA tensors), skipped otherwise.
GPU_BACKENDS = ("triton", "cuda")


def backend_device(name: str) -> str:
    """Device type (``"cpu"`` / ``"cuda"``) of benchmark row ``name`` (a backend or ``compiled``/``authors``)."""
    return BACKEND_DEVICE.get(name, "cpu")


def to_device(case, device: str):
    """``case`` (a tensor, None, or a tuple/list of them, nested) moved to ``device``."""
    if isinstance(case, torch.Tensor):
        return case.to(device)
    if isinstance(case, (tuple, list)):
        return type(case)(to_device(x, device) for x in case)
    return case


def require_backend(op: str, name: str) -> str:
    """Skip the current benchmark (``pytest.skip``) unless backend ``name`` of ``op`` runs here; return the
    device type its tensors live on. ``reference``-derived rows (``compiled``, ``authors``) always run."""
    if name in ("reference", "compiled", "authors"):
        return "cpu"
    if name not in backend_rows(op):
        why = "no CUDA device" if name in GPU_BACKENDS and not torch.cuda.is_available() else "not available"
        pytest.skip(f"backend {name!r} of {op}: {why} here")
    return backend_device(name)


def gflops(flops: float, seconds: float) -> float:
    """GFLOP/s."""
    return flops / seconds / 1e9


_CEILING: dict[tuple, float] = {}


def mm_ceiling_gflops(m: int, n: int, k: int, repeats: int = 5, timer: Callable[[], float] = time.perf_counter,
                      device: str = "cpu") -> float:
    """GFLOP/s of ``(m x k) @ (k x n)`` fp32 ``torch.mm`` at the current thread count (median of repeats),
    under the current ``torch.get_float32_matmul_precision()`` (a separate ceiling per setting).

    ``timer``: the benchmark's timer (``getattr(benchmark, "_timer", time.perf_counter)``), so that the
    ceiling and the row are measured alike (wall clock, or CPU time with ``--benchmark-timer``).
    ``device="cuda"``: the GPU's fp32 ceiling (TF32 off for the measurement, synchronised timing; a GPU
    row's ``frac_mm_ceiling`` is against this, never against the CPU's).
    """
    dev_type = torch.device(device).type
    key = (m, n, k, torch.get_num_threads(), getattr(timer, "__name__", repr(timer)), dev_type,
           torch.get_float32_matmul_precision())
    if key not in _CEILING:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(m, k, generator=g).to(device), torch.randn(n, k, generator=g).to(device)
        out = torch.empty(m, n, device=device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            torch.mm(a, b.t(), out=out)
            synchronize(dev_type)
            ts = []
            for _ in range(repeats):
                t0 = timer()
                torch.mm(a, b.t(), out=out)
                synchronize(dev_type)
                ts.append(timer() - t0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        _CEILING[key] = 2.0 * m * n * k / sorted(ts)[len(ts) // 2] / 1e9
    return _CEILING[key]


def backend_rows(op: str) -> list[str]:
    """Backends of ``op`` that can be benchmark rows here (``reference`` first): ``reference`` and ``cpp``
    on CPU tensors, plus ``triton`` and ``cuda`` on CUDA tensors when a CUDA device is present (a GPU
    machine gets GPU rows from the same files). Triton's CPU interpreter is a test tool, not a row."""
    from aahr_fast.ops import _dispatch

    rows = []
    probes = [("reference", "cpu"), ("cpp", "cpu")]
    if torch.cuda.is_available():
        probes += [(b, "cuda") for b in GPU_BACKENDS]
    for b, dev in probes:
        try:
            _dispatch.resolve_backend(b, torch.zeros(1, device=dev), op=op)
        except Exception:
            continue
        rows.append(b)
    return rows


benchmark_rows = backend_rows


def rss_peak_extra_mib(fn: Callable) -> Optional[float]:
    """Rise of the process high-water mark while ``fn()`` runs (VmHWM after ``echo 5 > clear_refs``, minus
    VmRSS before), MiB: sees memory outside the torch allocator (NumPy, FAISS); page-granular, so small
    numbers are noisy. None where /proc does not allow it."""
    def status_kib(field):
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    base = status_kib("VmRSS")
    fn()
    peak = status_kib("VmHWM")
    return None if base is None or peak is None else round(max(0, peak - base) / 1024, 2)


def finish_row(benchmark, group: str, name: str, *, flops: float, mm_shape: tuple[int, int, int],
               peak_bytes: int, device: str = "cpu", **extra) -> None:
    """Record a row with the contract fields: ``peak_extra_mib``, ``gflops`` (``flops`` / median) and
    ``frac_mm_ceiling`` against one fp32 ``torch.mm`` of ``mm_shape`` = (M, N, K) on ``device`` at the same
    thread count with the benchmark's timer; ``extra`` goes into ``extra_info`` too."""
    extra = dict(extra, peak_extra_mib=peak_bytes / 2**20)
    if torch.device(device).type == "cuda":
        extra["device"] = torch.cuda.get_device_name(0)
    med = median_seconds(benchmark)
    if med is not None:
        ceiling = mm_ceiling_gflops(*mm_shape, timer=getattr(benchmark, "_timer", time.perf_counter), device=device)
        gf = gflops(flops, med)
        extra.update(gflops=gf, frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    record(benchmark, group, name, **extra)


_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


def median_seconds(benchmark) -> Optional[float]:
    """Median of a finished pytest-benchmark run (None with ``--benchmark-disable``)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return stats.stats.median


def record(benchmark, group: str, name: str, **extra) -> None:
    """Store one row (median + ``extra``, also put into ``benchmark.extra_info``) for the summary."""
    benchmark.extra_info.update(extra)
    med = median_seconds(benchmark)
    if med is not None:
        _RESULTS[group][name] = dict(median_s=med, **extra)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("aahr_fast ops benchmark summary (median; ratios against the cpp row of each group)")
    for group in sorted(_RESULTS):
        rows = _RESULTS[group]
        base = rows.get("cpp")
        tr.write_line(f"[{group}]")
        for name, r in sorted(rows.items(), key=lambda kv: kv[1]["median_s"]):
            parts = [f"  {name:<10} {r['median_s'] * 1e3:10.1f} ms"]
            if "gflops" in r:
                parts.append(f"{r['gflops']:7.1f} GFLOP/s")
            if "frac_mm_ceiling" in r:
                parts.append(f"{100 * r['frac_mm_ceiling']:5.1f}% of mm")
            if "peak_extra_mib" in r:
                parts.append(f"peak extra {r['peak_extra_mib']:9.1f} MiB")
            if base is not None and name != "cpp":
                parts.append(f"cpp is {r['median_s'] / base['median_s']:5.2f}x faster")
                if base.get("peak_extra_mib") and r.get("peak_extra_mib"):
                    parts.append(f"cpp memory {100 * base['peak_extra_mib'] / r['peak_extra_mib']:5.1f}%")
            tr.write_line("  ".join(parts))


@pytest.fixture(scope="session")
def bench_tools() -> types.SimpleNamespace:
    """The helpers above as one namespace: peak_extra_bytes, gflops, mm_ceiling_gflops, backend_rows
    (alias benchmark_rows), require_backend, backend_device, to_device, synchronize, rss_peak_extra_mib,
    median_seconds, record, finish_row, GPU_BACKENDS."""
    return types.SimpleNamespace(
        peak_extra_bytes=peak_extra_bytes,
        matmul_precision=matmul_precision,
        gflops=gflops,
        mm_ceiling_gflops=mm_ceiling_gflops,
        backend_rows=backend_rows,
        benchmark_rows=backend_rows,
        require_backend=require_backend,
        backend_device=backend_device,
        to_device=to_device,
        synchronize=synchronize,
        rss_peak_extra_mib=rss_peak_extra_mib,
        median_seconds=median_seconds,
        record=record,
        finish_row=finish_row,
        GPU_BACKENDS=GPU_BACKENDS,
    )


# ====================================================================================================
# Suite options and run metadata (issue 6: end-to-end / scaling benchmarks + report generator).
# Added by the owner of bench_train_step.py / bench_retrieval_eval.py / bench_scaling.py and
# aahr_fast/benchmark_report.py; nothing above this line depends on it.
#
# * ``--full``: wider sweeps (bench_scaling.py) and the paper-width training step (bench_train_step.py).
# * One intra-op thread is the suite's default: without an explicit ``AAHR_BENCH_THREADS`` the rows of the
#   ``threads`` fixture other than 1 are deselected (2-thread timings on these 2 shared cores stall whenever
#   anything else runs), and every benchmark starts from ``torch.set_num_threads(1)``.
#   ``AAHR_BENCH_THREADS=1,2`` brings the 2-thread rows back.
# * ``--benchmark-json`` output gets ``machine_info["aahr"]`` (CPU model, cores, torch / triton / numpy /
#   python versions, thread settings) and ``aahr_suite`` (wall and CPU time of the session, dates, load
#   average at start and end, options), read by ``python -m aahr_fast.benchmark_report``.
# ====================================================================================================
_SUITE_T0 = time.time()
_SUITE_LOAD0 = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _suite_threads() -> int:
    return _thread_counts()[0] if os.environ.get("AAHR_BENCH_THREADS") else 1


def pytest_addoption(parser):
    group = parser.getgroup("aahr_fast benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="aahr_fast: run the long sweeps (scaling up to B=1024, paper-width training step)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("AAHR_BENCH_THREADS"):
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        t = callspec.params.get("threads") if callspec is not None else None
        (drop if t is not None and t != 1 else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def _suite_thread_default():
    """Every benchmark starts from the suite's thread count (1 unless AAHR_BENCH_THREADS says otherwise)."""
    old = torch.get_num_threads()
    torch.set_num_threads(_suite_threads())
    yield
    torch.set_num_threads(old)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    import platform

    import numpy

    info = dict(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        triton=_version("triton"),
        numpy=numpy.__version__,
        python=platform.python_version(),
        torch_threads_default=_suite_threads(),
        bench_threads=os.environ.get("AAHR_BENCH_THREADS") or "1 (suite default)",
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        full=bool(config.getoption("--full", default=False)),
    )
    machine_info["aahr"] = info  # (pytest-benchmark calls this hook when it writes the JSON, at the end)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import resource

    end = time.time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    output_json["aahr_suite"] = dict(
        wall_s=round(end - _SUITE_T0, 2),
        cpu_s=round(own.ru_utime + own.ru_stime, 2),  # the pytest process (all its threads)
        cpu_s_children=round(children.ru_utime + children.ru_stime, 2),  # e.g. inductor compile workers
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(_SUITE_T0)),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(end)),
        loadavg_start=_SUITE_LOAD0,
        loadavg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        full=bool(config.getoption("--full", default=False)),
        args=list(config.invocation_params.args),
    )

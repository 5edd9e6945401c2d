"""Benchmarks of the retrieval ranking (aahr_fast.evaluation): time and peak extra memory.

Run: ``.venv/bin/python -m pytest benchmarks/bench_evaluation.py --benchmark-only``
(about 30-60 s on 2 shared cores; one intra-op thread).

Groups:
* ``rank-1k``: 1,000 x 5,000 (Flickr 1K / one COCO fold): our sort-free chunked ranking vs the field's
  NumPy argsort loop (GPO/SCAN ``i2t``/``t2i``, re-written here as the baseline), so pytest-benchmark
  prints the ratio.
* ``rank-5k``: 5,000 x 25,000 (COCO 5K): ``recall_metrics`` on the matrix (the argsort baseline takes
  tens of seconds at this size and is left out), and the 5-fold COCO 1K protocol on the same matrix.

``extra_info`` (helpers in benchmarks/conftest.py): ``peak_extra_mib`` is the peak of the torch allocator's
running total while one call runs (profiler allocation events; the input matrix, allocated before, is
not included);
``peak_extra_rss_mib`` the rise of the process high-water mark (VmHWM after ``clear_refs``), which also
sees NumPy's memory (page-granular, so small numbers are noisy); ``matrix_mib`` is the input's size;
``threads`` the intra-op thread count; ``gflops`` the ranking's useful operations (``4 N M`` per ranked
(N, M) matrix, see :func:`rank_ops`; GOP/s) over the median and ``frac_mm_ceiling`` that over one fp32
``torch.mm`` of the 1K similarity GEMM shape (:data:`CEILING_MM`), same thread count and session (ranking
is memory-bound comparison work: a small fraction is expected).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aahr_fast import evaluation as ev

THREADS = 1


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _case(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, 5 * n, generator=g)
    ci = torch.arange(n).repeat_interleave(5)
    s[ci, torch.arange(5 * n)] += 2.0  # a trained-model-like matrix: mid-range recalls
    return s, ci


def _argsort_baseline(sims: np.ndarray) -> dict:
    """The reference codebases' loop (data-and-eval.md section 4): argsort every row / column, 5
    consecutive captions per image. Returns the same metric dict as ``recall_metrics``."""
    n = sims.shape[0]
    r_i2t = np.zeros(n)
    for i in range(n):
        inds = np.argsort(sims[i])[::-1]
        r_i2t[i] = min(np.where(inds == c)[0][0] for c in range(5 * i, 5 * i + 5))
    r_t2i = np.zeros(5 * n)
    st = sims.T
    for i in range(n):
        for j in range(5):
            inds = np.argsort(st[5 * i + j])[::-1]
            r_t2i[5 * i + j] = np.where(inds == i)[0][0]
    return ev.metrics_from_ranks(r_i2t.astype(np.int64), r_t2i.astype(np.int64))


#: the similarity GEMM of a 1K test split at the paper's width, (1000, 1024) x (1024, 5000): the ceiling
#: the ranking rows are measured against (same thread count, same session).
CEILING_MM = (1000, 5000, 1024)


def rank_ops(n_images: int, n_captions: int) -> float:
    """Useful operations of ranking an (N, M) matrix in both directions: per score and direction one
    comparison against the ground truth's score and one count (add), ``4 N M`` in all (the ground-truth
    maxima, O(M), are left out). Counted the same for every row of a group (the argsort baseline does
    far more work to get the same ranks)."""
    return 4.0 * n_images * n_captions


def _info(benchmark, tools, fn, s) -> int:
    """Fill the memory fields; return the torch allocator's peak extra bytes of one call."""
    peak, _ = tools.peak_extra_bytes(fn)
    benchmark.extra_info["peak_extra_rss_mib"] = tools.rss_peak_extra_mib(fn)
    benchmark.extra_info["matrix_mib"] = round(s.numel() * s.element_size() / 2**20, 1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["shape"] = list(s.shape)
    return peak


def _finish(benchmark, tools, name, peak, ops_count):
    tools.finish_row(benchmark, benchmark.group, name, flops=ops_count, mm_shape=CEILING_MM, peak_bytes=peak,
                     threads=torch.get_num_threads())


@pytest.fixture(scope="module")
def case1k():
    return _case(1000)


@pytest.fixture(scope="module")
def case5k():
    return _case(5000)


def test_rank_1k_ours(benchmark, bench_tools, case1k):
    s, ci = case1k
    benchmark.group = "rank-1k"
    fn = lambda: ev.recall_metrics(s, ci)  # noqa: E731
    peak = _info(benchmark, bench_tools, fn, s)
    out = benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    _finish(benchmark, bench_tools, "ours", peak, rank_ops(*s.shape))
    assert 0 < out["i2t_r1"] < 100


def test_rank_1k_argsort_baseline(benchmark, bench_tools, case1k):
    s, ci = case1k
    benchmark.group = "rank-1k"
    a = s.numpy()
    fn = lambda: _argsort_baseline(a)  # noqa: E731
    peak = _info(benchmark, bench_tools, fn, s)
    out = benchmark.pedantic(fn, rounds=2, iterations=1)
    _finish(benchmark, bench_tools, "argsort_baseline", peak, rank_ops(*s.shape))
    ours = ev.recall_metrics(s, ci)  # continuous scores: no ties, the two must agree
    assert all(out[k] == pytest.approx(ours[k]) for k in ours)


def test_rank_5k_ours(benchmark, bench_tools, case5k):
    s, ci = case5k
    benchmark.group = "rank-5k"
    fn = lambda: ev.recall_metrics(s, ci)  # noqa: E731
    peak = _info(benchmark, bench_tools, fn, s)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    _finish(benchmark, bench_tools, "ours", peak, rank_ops(*s.shape))


def test_rank_5k_coco_5fold(benchmark, bench_tools, case5k):
    s, ci = case5k
    benchmark.group = "rank-5k"
    fn = lambda: ev.evaluate_coco_5fold(s, ci)  # noqa: E731
    peak = _info(benchmark, bench_tools, fn, s)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    n, m = s.shape  # five diagonal 1K blocks: (N/5) x (M/5) each
    _finish(benchmark, bench_tools, "coco_5fold", peak, 5 * rank_ops(n // 5, m // 5))

"""Benchmarks of the retrieval ranking (aahr_fast.evaluation): time and peak extra memory.

Run: ``.venv/bin/python -m pytest benchmarks/bench_evaluation.py --benchmark-only``
(about 30-60 s on 2 shared cores; one intra-op thread).

Groups:
* ``rank-1k``: 1,000 x 5,000 (Flickr 1K / one COCO fold): our sort-free chunked ranking vs the field's
  NumPy argsort loop (GPO/SCAN ``i2t``/``t2i``, re-written here as the baseline), so pytest-benchmark
  prints the ratio.
* ``rank-5k``: 5,000 x 25,000 (COCO 5K): ``recall_metrics`` on the matrix (the argsort baseline takes
  tens of seconds at this size and is left out), and the 5-fold COCO 1K protocol on the same matrix.

``extra_info``: ``peak_extra_mib`` is the peak of the torch allocator's running total while one call
runs (profiler allocation events; the input matrix, allocated before, is not included);
``peak_extra_rss_mib`` the rise of the process high-water mark (VmHWM after ``clear_refs``), which also
sees NumPy's memory (page-granular, so small numbers are noisy); ``matrix_mib`` is the input's size;
``threads`` the intra-op thread count.
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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_peak_extra_mib(fn) -> float | None:
    """VmHWM after resetting it (``echo 5 > /proc/self/clear_refs``) minus VmRSS before: sees numpy too."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else round(max(0, peak - base) / 1024, 2)


def _info(benchmark, fn, s):
    benchmark.extra_info["peak_extra_mib"] = round(ev._peak_extra_bytes(fn) / 2**20, 2)
    benchmark.extra_info["peak_extra_rss_mib"] = _rss_peak_extra_mib(fn)
    benchmark.extra_info["matrix_mib"] = round(s.numel() * s.element_size() / 2**20, 1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["shape"] = list(s.shape)


@pytest.fixture(scope="module")
def case1k():
    return _case(1000)


@pytest.fixture(scope="module")
def case5k():
    return _case(5000)


def test_rank_1k_ours(benchmark, case1k):
    s, ci = case1k
    benchmark.group = "rank-1k"
    fn = lambda: ev.recall_metrics(s, ci)  # noqa: E731
    _info(benchmark, fn, s)
    out = benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    assert 0 < out["i2t_r1"] < 100


def test_rank_1k_argsort_baseline(benchmark, case1k):
    s, ci = case1k
    benchmark.group = "rank-1k"
    a = s.numpy()
    fn = lambda: _argsort_baseline(a)  # noqa: E731
    _info(benchmark, fn, s)
    out = benchmark.pedantic(fn, rounds=2, iterations=1)
    ours = ev.recall_metrics(s, ci)  # continuous scores: no ties, the two must agree
    assert all(out[k] == pytest.approx(ours[k]) for k in ours)


def test_rank_5k_ours(benchmark, case5k):
    s, ci = case5k
    benchmark.group = "rank-5k"
    fn = lambda: ev.recall_metrics(s, ci)  # noqa: E731
    _info(benchmark, fn, s)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


def test_rank_5k_coco_5fold(benchmark, case5k):
    s, ci = case5k
    benchmark.group = "rank-5k"
    fn = lambda: ev.evaluate_coco_5fold(s, ci)  # noqa: E731
    _info(benchmark, fn, s)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)

"""Benchmarks of gallery search (aahr_fast.index): FAISS exact / approximate vs a torch brute force.

Run: ``.venv/bin/python -m pytest benchmarks/bench_retrieval.py --benchmark-only``
(about a minute on 2 shared cores; one torch and one FAISS thread).

Data: a synthetic gallery shaped like the field's test galleries (D = 1024 as in the paper): ``N``
vectors in ``C = N / 5`` clusters (items of one "scene"), norms in [0.5, 1] (AAHR's fused embeddings have
norm <= 1), and 1,000 queries that are noisy copies of gallery items. Every row searches the 1,000
queries for their top 10 by inner product.

Groups:
* ``search-5k``: 5,000 items (COCO 5K images): ``brute`` (one ``torch.mm`` + ``torch.topk``), ``flat``
  (``IndexFlatIP``, exact), ``hnsw`` (M = 32, efSearch = 64), ``ivf`` (nlist = 71, nprobe = 8, the defaults).
* ``search-25k``: 25,000 items (COCO 5K captions): ``brute`` and ``flat``.

``extra_info``: ``recall@10`` of the row's top 10 against the exact top 10 (1.0 for exact rows),
``build_s`` the index construction time, ``n``/``d``/``queries``, and the contract fields
(benchmarks/conftest.py):
* ``peak_extra_mib``: torch allocator peak of one search (profiler events). FAISS allocates outside the
  torch allocator, so its rows read 0 there; ``peak_extra_rss_mib`` (rise of the process high-water mark,
  page-granular) sees every row's memory.
* ``gflops``: the exact inner-product search's work, ``2 queries n d`` FLOPs, over the row's median (for
  ``hnsw`` / ``ivf``, which compute fewer inner products, this is the *effective* rate: exact-search work
  per second); ``frac_mm_ceiling``: that over one fp32 ``torch.mm`` of shape (queries, d) x (d, n) at the
  same (one) thread count, measured in the same session.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from aahr_fast.index import faiss_search, make_faiss_index
from aahr_fast.retrieval import overlap_recall

D = 1024
QUERIES = 1000
K = 10


@pytest.fixture(autouse=True)
def _threads():
    import faiss

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(old)


_CACHE: dict = {}


def _data(n: int, seed: int = 0):
    if n not in _CACHE:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((n // 5, D)).astype(np.float32)
        g = centres[np.arange(n) // 5] + 0.6 * rng.standard_normal((n, D)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        g *= rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
        q = g[rng.integers(0, n, QUERIES)] + 0.02 * rng.standard_normal((QUERIES, D)).astype(np.float32)
        exact = torch.topk(torch.from_numpy(q) @ torch.from_numpy(g).T, K, dim=1).indices.numpy()
        _CACHE[n] = (np.ascontiguousarray(g), np.ascontiguousarray(q.astype(np.float32)), exact)
    return _CACHE[n]


def _brute(g: torch.Tensor, q: torch.Tensor):
    return torch.topk(q @ g.T, K, dim=1)


def _finish(benchmark, tools, name, n, fn):
    """The contract fields of a search row (see the module docstring)."""
    peak, _ = tools.peak_extra_bytes(fn)
    rss = tools.rss_peak_extra_mib(fn)
    tools.finish_row(benchmark, benchmark.group, name, flops=2.0 * QUERIES * n * D, mm_shape=(QUERIES, n, D),
                     peak_bytes=peak, threads=1, peak_extra_rss_mib=rss)


@pytest.mark.parametrize("n", [5000, 25000])
def test_brute(benchmark, bench_tools, n):
    g, q, exact = _data(n)
    benchmark.group = f"search-{n // 1000}k"
    gt, qt = torch.from_numpy(g), torch.from_numpy(q)
    _, ids = benchmark(_brute, gt, qt)
    benchmark.extra_info.update({"n": n, "d": D, "queries": QUERIES, "build_s": 0.0,
                                 "recall@10": overlap_recall(ids.numpy(), exact, (K,))["recall@10"]})
    _finish(benchmark, bench_tools, "brute", n, lambda: _brute(gt, qt))


@pytest.mark.parametrize("n, kind", [(5000, "flat"), (5000, "hnsw"), (5000, "ivf"), (25000, "flat")])
def test_faiss(benchmark, bench_tools, n, kind):
    g, q, exact = _data(n)
    benchmark.group = f"search-{n // 1000}k"
    t0 = time.perf_counter()
    index, params = make_faiss_index(g, kind)
    build = time.perf_counter() - t0
    _, ids = benchmark(faiss_search, index, q, K)
    benchmark.extra_info.update({"n": n, "d": D, "queries": QUERIES, "build_s": round(build, 3), **params,
                                 "recall@10": overlap_recall(ids, exact, (K,))["recall@10"]})
    _finish(benchmark, bench_tools, f"faiss-{kind}", n, lambda: faiss_search(index, q, K))

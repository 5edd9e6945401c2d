"""The C++ CPU cross-similarity op against the reference, and the dispatch / build fallback around it.

Documented behaviours pinned here:
* ties in a max (exactly equal scores) send the gradient to the lowest index, in both backends;
* a NaN in a valid slot makes the scores of every pair containing it NaN (NaN in padding is ignored);
* all-zero feature vectors have cosine 0 with everything and finite (zero-norm-safe) gradients;
* the C++ backward is deterministic: bitwise identical for 1 and 2 threads;
* a 1K x 5K gallery runs in one C++ call with O(Bi*Bt) extra memory (the reference: ``chunk_size``).
The first test to run builds the extension if its sources changed (tens of seconds, once).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch, _ext
from aahr_fast.utils.errors import DataError
from aahr_fast.utils.memory import peak_extra_bytes

from _ops_helpers import require_cpp_extension


@pytest.fixture(scope="module")
def cpp():
    require_cpp_extension(ci_message="the C++ extension must build under CI: {err}")
    return "cpp"


MODES = [
    ("relevance", {}),
    ("relevance", {"paper_compat": True}),
    ("relevance", {"negative_slope": 0.0}),
    ("hard_mean", {}),
    ("hard_lse", {"temperature": 0.3}),
]


def _call(mode, kw, backend, regions, rl, words, wl):
    """Outputs as a tuple of tensors, whatever the mode."""
    if mode == "relevance":
        return ops.fragment_word_relevance(regions, rl, words, wl, backend=backend, **kw)
    agg = "mean" if mode == "hard_mean" else "lse"
    return (ops.hard_assignment_similarity(regions, rl, words, wl, agg=agg, backend=backend, **kw),)


def _case(bi, n, bt, l, d, dtype=torch.float64, seed=0, full=False):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(bi, n, d, generator=g, dtype=dtype)
    words = torch.randn(bt, l, d, generator=g, dtype=dtype)
    rl = torch.full((bi,), n) if full else torch.randint(1, n + 1, (bi,), generator=g)
    wl = torch.full((bt,), l) if full else torch.randint(1, l + 1, (bt,), generator=g)
    return regions, rl, words, wl


def _compare(mode, kw, regions, rl, words, wl, rtol, atol, seed=1):
    """Forward outputs and input gradients (random upstream weights) of cpp vs reference."""
    results = {}
    for backend in ("reference", "cpp"):
        r = regions.detach().clone().requires_grad_()
        w = words.detach().clone().requires_grad_()
        outs = _call(mode, kw, backend, r, rl, w, wl)
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
        results[backend] = [o.detach() for o in outs] + [r.grad, w.grad]
    for got, want in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return results


@pytest.mark.parametrize("mode, kw", MODES, ids=[m + ("-" + "-".join(k) if k else "") for m, k in MODES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference_forward_backward(cpp, mode, kw, dtype):
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    _compare(mode, kw, *_case(5, 7, 6, 9, 16, dtype=dtype), **tol)


@pytest.mark.parametrize("mode, kw", MODES[:1] + MODES[3:], ids=["relevance", "hard_mean", "hard_lse"])
def test_cpp_gradcheck_float64(cpp, mode, kw):
    regions, rl, words, wl = _case(3, 4, 3, 5, 6)
    regions.requires_grad_()
    words.requires_grad_()
    torch.autograd.gradcheck(lambda r, w: _call(mode, kw, "cpp", r, rl, w, wl), (regions, words))


@pytest.mark.parametrize(
    "bi, n, bt, l, d",
    [(1, 37, 1, 13, 1000), (2, 37, 3, 13, 1000), (129, 5, 129, 4, 8), (1, 1, 1, 1, 1), (3, 1, 2, 1, 5)],
)
def test_cpp_odd_sizes(cpp, bi, n, bt, l, d):
    for mode, kw in (MODES[0], MODES[4]):
        _compare(mode, kw, *_case(bi, n, bt, l, d), rtol=1e-9, atol=1e-11)


def test_cpp_many_small_tiles_and_uneven_blocks(cpp, monkeypatch):
    """Tiny tiles: many tiles, caption and image block counts differ (conflict-free backward rounds)."""
    monkeypatch.setenv("AAHR_XSIM_TILE", "7x5")
    for mode, kw in (MODES[0], MODES[3]):
        _compare(mode, kw, *_case(11, 4, 17, 3, 6), rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("AAHR_XSIM_TILE", "5x40")
    _compare("relevance", {}, *_case(17, 4, 6, 3, 6), rtol=1e-10, atol=1e-12)


def test_cpp_noncontiguous_and_expanded_inputs(cpp):
    g = torch.Generator().manual_seed(3)
    base_r = torch.randn(4, 10, 6, generator=g, dtype=torch.float64)
    regions = base_r.transpose(1, 2)  # (4, 6, 10) non-contiguous
    words = torch.randn(1, 5, 20, generator=g, dtype=torch.float64)[:, :, ::2].expand(3, 5, 10)  # stride-0 batch
    rl, wl = torch.tensor([6, 2, 5, 1]), torch.tensor([5, 3, 1])
    assert not regions.is_contiguous() and words.stride(0) == 0
    for mode, kw in (MODES[0], MODES[3]):
        _compare(mode, kw, regions, rl, words, wl, rtol=1e-10, atol=1e-12)
    # all lengths full: the packed path is a reshape of the (copied) input
    _compare("relevance", {}, regions, torch.full((4,), 6), words, torch.full((3,), 5), rtol=1e-10, atol=1e-12)


def test_cpp_zero_vectors(cpp):
    regions, rl, words, wl = _case(3, 4, 2, 5, 6, full=True)
    regions[0] = 0.0  # a whole image of zero regions
    regions[1, 2] = 0.0
    words[1, 0] = 0.0
    res = _compare("relevance", {}, regions, rl, words, wl, rtol=1e-10, atol=1e-12)
    t2i, i2t = res["cpp"][:2]
    assert torch.equal(t2i[:, 0], torch.zeros(2, dtype=t2i.dtype)) and torch.equal(i2t[0], torch.zeros(2, dtype=t2i.dtype))
    assert all(torch.isfinite(x).all() for x in res["cpp"])
    _compare("hard_lse", {"temperature": 0.2}, regions, rl, words, wl, rtol=1e-10, atol=1e-12)


def test_cpp_ties_send_gradient_to_lowest_index(cpp):
    e = torch.eye(3, dtype=torch.float64)
    regions = torch.stack([torch.stack([e[0], e[0], e[1]])])  # regions 0 and 1 identical
    words = torch.stack([torch.stack([e[0], e[2]])])  # word 1 is orthogonal to all: ties at 0 everywhere
    rl, wl = torch.tensor([3]), torch.tensor([2])
    for mode, kw in MODES:
        res = _compare(mode, kw, regions, rl, words, wl, rtol=1e-12, atol=1e-14)
    # hard mode: word 0's best region is 0 (tied with 1); word 1 ties at cosine 0 over all: region 0 again
    r = regions.clone().requires_grad_()
    ops.hard_assignment_similarity(r, rl, words, wl, backend="cpp").sum().backward()
    assert r.grad[0, 1].abs().max() == 0 and r.grad[0, 2].abs().max() == 0 and r.grad[0, 0].abs().max() > 0
    assert res  # compared above


def test_cpp_nan_policy(cpp):
    regions, rl, words, wl = _case(3, 4, 2, 5, 6, full=True)
    rl = torch.tensor([4, 4, 2])
    regions[0, 1, 3] = float("nan")  # valid slot of image 0
    regions[2, 3] = float("nan")  # padding of image 2
    for backend in ("reference", "cpp"):
        t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, backend=backend)
        assert torch.isnan(t2i[:, 0]).all() and torch.isnan(i2t[0]).all()
        assert torch.isfinite(t2i[:, 1:]).all() and torch.isfinite(i2t[1:]).all()
        h = ops.hard_assignment_similarity(regions, rl, words, wl, backend=backend)
        assert torch.isnan(h[0]).all() and torch.isfinite(h[1:]).all()


def test_cpp_half_inputs_run_in_float32(cpp):
    regions, rl, words, wl = _case(3, 4, 2, 5, 8, dtype=torch.float32)
    t2i, i2t = ops.fragment_word_relevance(regions.half(), rl, words.half(), wl, backend="cpp")
    assert t2i.dtype == torch.float16
    ref = ops.fragment_word_relevance(regions.half().float(), rl, words.half().float(), wl, backend="reference")
    torch.testing.assert_close(t2i.float(), ref[0], rtol=2e-3, atol=2e-3)


def test_cpp_backward_is_deterministic_across_thread_counts(cpp, monkeypatch):
    monkeypatch.setenv("AAHR_XSIM_TILE", "16x16")
    regions, rl, words, wl = _case(20, 6, 24, 5, 32, dtype=torch.float32)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        r, w = regions.clone().requires_grad_(), words.clone().requires_grad_()
        t2i, i2t = ops.fragment_word_relevance(r, rl, w, wl, backend="cpp")
        (t2i.sum() + 0.5 * i2t.sum()).backward()
        grads.append((t2i.detach(), r.grad, w.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cpp_caption_scores_the_same_alone_as_inside_a_padded_batch(cpp):
    """Variable lengths, C++ backend: every (image, caption) pair scores the same when the two are run alone
    (no padding at all) as inside a padded batch whose padding holds garbage (NaN regions, huge words)."""
    regions, rl, words, wl = _case(3, 5, 4, 6, 8, seed=4)
    rl, wl = torch.tensor([5, 2, 1]), torch.tensor([6, 1, 4, 2])
    for i in range(3):
        regions[i, rl[i]:] = float("nan")
    for j in range(4):
        words[j, wl[j]:] = 1e6
    t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, backend="cpp")
    hard = ops.hard_assignment_similarity(regions, rl, words, wl, agg="lse", temperature=0.3, backend="cpp")
    assert torch.isfinite(t2i).all() and torch.isfinite(i2t).all() and torch.isfinite(hard).all()
    for i in range(3):
        for j in range(4):
            r1, w1 = regions[i:i + 1, : rl[i]], words[j:j + 1, : wl[j]]
            a, b = ops.fragment_word_relevance(r1, rl[i:i + 1], w1, wl[j:j + 1], backend="cpp")
            h = ops.hard_assignment_similarity(r1, rl[i:i + 1], w1, wl[j:j + 1], agg="lse", temperature=0.3,
                                               backend="cpp")
            torch.testing.assert_close(t2i[j, i], a[0, 0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(i2t[i, j], b[0, 0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(hard[i, j], h[0, 0], rtol=1e-12, atol=1e-12)


def test_cpp_tile_buffers_of_every_thread_are_counted(cpp, monkeypatch):
    """The per-thread score tiles are allocated by the calling thread (the profiler measure sees only its
    allocations): with a fixed 128 x 128 tile, 2 threads need exactly one more 64 KiB tile than 1 thread,
    forward and backward."""
    monkeypatch.setenv("AAHR_XSIM_TILE", "128x128")
    regions, rl, words, wl = _case(64, 8, 64, 8, 16, dtype=torch.float32, seed=7)
    rl, wl = torch.full((64,), 8), torch.full((64,), 8)  # full lengths: 16 images / captions per 128-row tile
    tile = 128 * 128 * 4

    def fwd_bwd():
        r, w = regions.clone().requires_grad_(), words.clone().requires_grad_()
        a, b = ops.fragment_word_relevance(r, rl, w, wl, backend="cpp")
        return torch.autograd.grad(a.sum() + b.sum(), [r, w])

    before = torch.get_num_threads()
    peaks = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                fwd, _ = peak_extra_bytes(lambda: ops.fragment_word_relevance(regions, rl, words, wl, backend="cpp"))
            both, _ = peak_extra_bytes(fwd_bwd)
            peaks[threads] = (fwd, both)
    finally:
        torch.set_num_threads(before)
    assert peaks[2][0] - peaks[1][0] == tile, peaks
    assert peaks[2][1] - peaks[1][1] == tile, peaks


def test_cpp_gallery_1k_x_5k_needs_o_bi_bt_extra_memory(cpp):
    """A 1K-image x 5K-caption gallery (the 1K test protocol's shape) in one call: the tiled C++ op's extra
    memory is its two (Bi, Bt) outputs plus small per-thread tiles, never the (Bt, Bi, L, N) score tensor
    (572 MiB here); spot-checked pairs equal the reference run on those pairs alone."""
    g = torch.Generator().manual_seed(5)
    bi, bt, n, l, d = 1000, 5000, 6, 5, 8
    regions, words = torch.randn(bi, n, d, generator=g), torch.randn(bt, l, d, generator=g)
    rl, wl = torch.randint(1, n + 1, (bi,), generator=g), torch.randint(1, l + 1, (bt,), generator=g)
    out_bytes = bi * bt * regions.element_size()
    full_4d = out_bytes * n * l
    slack = 8 * 2**20  # tile buffers (4 MiB at one thread, 1 MiB per thread otherwise), packed inputs, norms
    peak, (t2i, i2t) = peak_extra_bytes(lambda: ops.fragment_word_relevance(regions, rl, words, wl, backend="cpp"))
    assert t2i.shape == (bt, bi) and i2t.shape == (bi, bt)
    assert peak <= 2 * out_bytes + slack < full_4d / 10, (peak, out_bytes)
    peak_h, hard = peak_extra_bytes(lambda: ops.hard_assignment_similarity(regions, rl, words, wl, backend="cpp"))
    assert hard.shape == (bi, bt) and peak_h <= out_bytes + slack, (peak_h, out_bytes)
    ii, jj = torch.tensor([0, 499, 999]), torch.tensor([0, 2500, 4999])
    a, b = ops.fragment_word_relevance(regions[ii], rl[ii], words[jj], wl[jj], backend="reference")
    torch.testing.assert_close(t2i[jj][:, ii], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(i2t[ii][:, jj], b, rtol=1e-5, atol=1e-6)
    h = ops.hard_assignment_similarity(regions[ii], rl[ii], words[jj], wl[jj], backend="reference")
    torch.testing.assert_close(hard[ii][:, jj], h, rtol=1e-5, atol=1e-6)


def test_reference_chunked_mode_bounds_its_score_buffer():
    """The reference's gallery mode: ``chunk_size`` images at a time keep the (Bt, chunk, L, N) buffers, so
    the peak extra memory shrinks with the chunk while the scores stay the same."""
    regions, rl, words, wl = _case(40, 6, 400, 5, 8, dtype=torch.float32, seed=6)
    outs, peaks = [], []
    for chunk in (None, 4):
        peak, out = peak_extra_bytes(
            lambda: ops.fragment_word_relevance(regions, rl, words, wl, chunk_size=chunk, backend="reference"))
        peaks.append(peak)
        outs.append(out)
    assert peaks[1] < peaks[0] / 4, peaks
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_empty_batch_and_bad_packed_input_raise(cpp):
    with pytest.raises(DataError, match="empty"):
        ops.fragment_word_relevance(torch.randn(0, 3, 4), torch.zeros(0, dtype=torch.long), torch.randn(2, 5, 4),
                                    torch.tensor([5, 2]), backend="cpp")
    with pytest.raises(DataError, match="word_lens"):
        ops.hard_assignment_similarity(torch.randn(1, 3, 4), torch.tensor([3]), torch.randn(2, 5, 4),
                                       torch.tensor([6, 2]), backend="cpp")
    with pytest.raises(RuntimeError, match="sum\\(region_lens\\)"):  # the raw C++ op checks its packing
        torch.ops.aahr_fast.cross_similarity_forward(torch.randn(4, 3), torch.tensor([3, 2]), torch.randn(2, 3),
                                                     torch.tensor([2]), "relevance", 0.1, 1e-8, 1.0)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.aahr_fast.cross_similarity_forward(torch.randn(3, 3), torch.tensor([3]), torch.randn(2, 3),
                                                     torch.tensor([2]), "soft", 0.1, 1e-8, 1.0)


@settings(max_examples=25, deadline=None)
@given(
    bi=st.integers(1, 6), bt=st.integers(1, 6), n=st.integers(1, 9), l=st.integers(1, 9), d=st.integers(1, 12),
    seed=st.integers(0, 2**16), mode=st.sampled_from(["relevance", "hard_mean", "hard_lse"]),
)
def test_cpp_property_random_shapes(bi, bt, n, l, d, seed, mode):
    if _ext.extension_error() is not None:
        pytest.skip("C++ extension unavailable")
    kw = {"temperature": 0.5} if mode == "hard_lse" else {}
    _compare(mode, kw, *_case(bi, n, bt, l, d, seed=seed), rtol=1e-8, atol=1e-10, seed=seed)


# ----------------------------------------------------------------------------- dispatch + build fallback
def test_default_is_cpp_on_cpu_and_env_forces_reference(cpp, monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("AAHR_OPS_BACKEND", raising=False)
    assert _dispatch.resolve_backend(None, x, op="fragment_word_relevance") == "cpp"
    calls = []
    real = _dispatch._REGISTRY["fragment_word_relevance"]["cpp"]
    monkeypatch.setitem(_dispatch._REGISTRY["fragment_word_relevance"], "cpp",
                        _dispatch._Impl(lambda *a, **k: calls.append(1) or real.fn(*a, **k), None))
    regions, rl, words, wl = _case(2, 3, 2, 4, 5)
    ops.fragment_word_relevance(regions, rl, words, wl)
    assert calls == [1]
    monkeypatch.setenv("AAHR_OPS_BACKEND", "reference")
    assert _dispatch.resolve_backend(None, x, op="fragment_word_relevance") == "reference"
    ops.fragment_word_relevance(regions, rl, words, wl)
    assert calls == [1]  # the cpp implementation was not called
    assert _dispatch.resolve_backend("cpp", x, op="fragment_word_relevance") == "cpp"  # argument beats env


def _broken_loader(tmp_path):
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "broken.cpp").write_text("#error deliberately broken source for the fallback test\n")
    return _ext.ExtensionLoader(source_dir=src, build_root=tmp_path / "build", with_cuda=False)


def test_broken_build_falls_back_to_reference_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("AAHR_OPS_BACKEND", raising=False)
    monkeypatch.setenv("AAHR_EXT_BUILD_TIMEOUT", "120")
    _dispatch._reset_warnings()
    regions, rl, words, wl = _case(2, 3, 2, 4, 5)
    want = ops.fragment_word_relevance(regions, rl, words, wl, backend="reference")
    with _ext.use_loader(_broken_loader(tmp_path)):
        with pytest.warns(ops.BackendFallbackWarning, match="deliberately broken"):
            got = ops.fragment_word_relevance(regions, rl, words, wl)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", ops.BackendFallbackWarning)
            ops.hard_assignment_similarity(regions, rl, words, wl)  # second fallback: no new warning
        with pytest.raises(ops.BackendUnavailableError, match="failed"):
            ops.fragment_word_relevance(regions, rl, words, wl, backend="cpp")
    _dispatch._reset_warnings()


def test_stale_lock_is_removed_and_a_held_lock_times_out(monkeypatch, tmp_path, capsys):
    loader = _broken_loader(tmp_path)
    loader.build_dir.mkdir(parents=True)
    lock = loader.build_dir / "lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    monkeypatch.setenv("AAHR_EXT_LOCK_STALE_MIN", "10")
    err = loader.error()
    assert "stale build lock" in capsys.readouterr().err
    assert err is not None and "deliberately broken" in err  # then it built (and failed) normally

    fresh = _broken_loader(tmp_path / "second")
    fresh.build_dir.mkdir(parents=True)
    (fresh.build_dir / "lock").write_text("")  # held by a (pretend) live build
    monkeypatch.setenv("AAHR_EXT_BUILD_TIMEOUT", "3")
    t0 = time.monotonic()
    err = fresh.error()
    assert time.monotonic() - t0 < 60
    assert err is not None and "AAHR_EXT_BUILD_TIMEOUT" in err and "lock" in err
    assert (fresh.build_dir / "lock").exists()  # someone else's lock is left alone


def test_cuda_build_failure_falls_back_to_a_cpu_only_build(tmp_path):
    loader = _broken_loader(tmp_path)
    (loader.source_dir / "cuda").mkdir()
    (loader.source_dir / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    loader.with_cuda = True  # pretend: on this CPU torch the CUDA build cannot work
    err = loader.error()
    assert loader.cuda_error is not None and "CUDA part" in loader.cuda_error
    assert not loader.with_cuda and loader.sources() == [loader.source_dir / "broken.cpp"]
    assert err is not None and "deliberately broken" in err  # the CPU-only build then ran (and failed here)


def test_simd_level_follows_cpuinfo_and_env(monkeypatch):
    monkeypatch.delenv("AAHR_EXT_SIMD", raising=False)
    avx512 = {"fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: set(avx512))
    assert _ext.simd_level() == "avx512"
    assert "-DCPU_CAPABILITY_AVX512" in _ext.ExtensionLoader(with_cuda=False).cflags()
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: avx512 - {"avx512vl"})  # a subset missing: AVX2 code
    assert _ext.simd_level() == "avx2"
    assert "-DCPU_CAPABILITY_AVX2" in _ext.ExtensionLoader(with_cuda=False).cflags()
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: set())
    assert _ext.simd_level() == "none"
    assert not any("CPU_CAPABILITY" in f for f in _ext.ExtensionLoader(with_cuda=False).cflags())
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: set(avx512))
    monkeypatch.setenv("AAHR_EXT_SIMD", "AVX2")  # forced, case-insensitive
    assert _ext.simd_level() == "avx2"
    a2 = _ext.ExtensionLoader(with_cuda=False).key()
    monkeypatch.setenv("AAHR_EXT_SIMD", "avx512")
    assert _ext.ExtensionLoader(with_cuda=False).key() != a2  # another build folder per SIMD level


def test_bad_simd_override_falls_back_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AAHR_EXT_SIMD", "sse9")
    loader = _ext.ExtensionLoader(source_dir=_ext.default_source_dir(), build_root=tmp_path, with_cuda=False)
    monkeypatch.setattr(_ext, "_namespace_loaded", lambda: False)  # as in a fresh process
    err = loader.error()
    assert err is not None and "AAHR_EXT_SIMD='sse9'" in err and "avx512, avx2, none" in err
    assert not any(tmp_path.iterdir())  # nothing was built

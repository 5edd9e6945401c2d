"""Triton backend of the cross-similarity ops vs the plain-PyTorch reference, forward and backward.

Runs the compiled kernels on a GPU, or the Triton interpreter on CPU (the root conftest sets
``TRITON_INTERPRET=1`` when CUDA is absent). Shapes are small and odd (N=37, L=13, D=1000, B=1, B=129)
so every masked load/store path is hit while each test stays within a few seconds under the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from aahr_fast import ops
from aahr_fast.kernels._testing import max_abs_diff, run_backend, triton_device

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)")
ON_GPU = DEV == "cuda"


def _inputs(bi, bt, n, l, d, dtype=torch.float32, seed=0, full=False):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(bi, n, d, generator=g).to(DEV, dtype)
    words = torch.randn(bt, l, d, generator=g).to(DEV, dtype)
    rl = torch.full((bi,), n) if full else torch.randint(1, n + 1, (bi,), generator=g)
    wl = torch.full((bt,), l) if full else torch.randint(1, l + 1, (bt,), generator=g)
    return regions, rl.to(DEV), words, wl.to(DEV)


def _relevance(paper_compat=False):
    def f(r, rl, w, wl, backend):
        return ops.fragment_word_relevance(r, rl, w, wl, paper_compat=paper_compat, backend=backend)
    return f


def _hard(agg, temperature=0.1):
    def f(r, rl, w, wl, backend):
        return ops.hard_assignment_similarity(r, rl, w, wl, agg=agg, temperature=temperature, backend=backend)
    return f


OPS = {
    "relevance": _relevance(),
    "relevance_paper_compat": _relevance(True),
    "hard_mean": _hard("mean"),
    "hard_lse": _hard("lse", 0.2),
}


def _check(fn, inputs, atol_out, atol_grad, ref_inputs=None):
    out_t, g_t = run_backend(fn, inputs, "triton")
    out_r, g_r = run_backend(fn, ref_inputs if ref_inputs is not None else inputs, "reference")
    for a, b in zip(out_t, out_r):
        assert a.dtype == inputs[0].dtype
        assert a.shape == b.shape
        assert max_abs_diff(a, b) <= atol_out, f"forward differs by {max_abs_diff(a, b)}"
    for a, b in zip(g_t, g_r):
        assert a is not None and b is not None
        scale = max(1.0, float(b.abs().max()))
        assert max_abs_diff(a, b) <= atol_grad * scale, f"gradient differs by {max_abs_diff(a, b)}"
    return out_t, g_t


@pytest.mark.parametrize("name", list(OPS))
def test_odd_sizes_fp32(name):
    inputs = _inputs(5, 7, 37, 13, 100)
    _check(OPS[name], inputs, 2e-5, 2e-5)


@pytest.mark.parametrize("name", ["relevance", "hard_lse"])
def test_wide_features_single_pair(name):
    # D = 1000 (not a multiple of any block), B = 1 on both sides
    _check(OPS[name], _inputs(1, 1, 5, 4, 1000, seed=1), 2e-5, 2e-5)


@pytest.mark.parametrize("bi,bt", [(129, 3), (2, 129)])
def test_batch_129_small_d(bi, bt):
    _check(OPS["relevance"], _inputs(bi, bt, 3, 4, 16, seed=2), 2e-5, 2e-5)


def test_non_contiguous_and_expanded_inputs():
    g = torch.Generator().manual_seed(3)
    # regions stored (Bi, D, N) and transposed; words every other token of a longer buffer
    regions = torch.randn(4, 24, 9, generator=g).to(DEV).transpose(1, 2)
    words = torch.randn(3, 14, 24, generator=g).to(DEV)[:, ::2]
    assert not regions.is_contiguous() and not words.is_contiguous()
    rl = torch.tensor([9, 3, 1, 5], device=DEV)
    wl = torch.tensor([7, 2, 4], device=DEV)
    for name in ("relevance", "hard_mean"):
        _check(OPS[name], (regions, rl, words, wl), 2e-5, 2e-5)
    # expanded (stride-0) batch: the same image four times
    expanded = torch.randn(1, 9, 24, generator=g).to(DEV).expand(4, 9, 24)
    _check(OPS["relevance"], (expanded, rl, words, wl), 2e-5, 2e-5)


@pytest.mark.parametrize("name", ["relevance", "hard_mean"])
def test_fp16_matches_fp32_reference(name):
    inputs16 = _inputs(3, 4, 11, 7, 64, dtype=torch.float16, seed=4)
    ref32 = tuple(x.float() if x.is_floating_point() else x for x in inputs16)
    out_t, g_t = run_backend(OPS[name], inputs16, "triton")
    out_r, g_r = run_backend(OPS[name], ref32, "reference")
    for a, b in zip(out_t, out_r):
        assert a.dtype == torch.float16
        assert max_abs_diff(a.float(), b) < 3e-3
    for a, b in zip(g_t, g_r):
        assert max_abs_diff(a.float(), b) < 2e-2 * max(1.0, float(b.abs().max()))


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is wrong under the Triton interpreter; bf16 is checked on GPU only")
@pytest.mark.parametrize("name", ["relevance", "hard_lse"])
def test_bf16_on_gpu(name):
    inputs = _inputs(8, 9, 36, 32, 256, dtype=torch.bfloat16, seed=5)
    ref32 = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    out_t, g_t = run_backend(OPS[name], inputs, "triton")
    out_r, g_r = run_backend(OPS[name], ref32, "reference")
    for a, b in zip(out_t, out_r):
        assert a.dtype == torch.bfloat16
        assert max_abs_diff(a.float(), b) < 3e-2
    for a, b in zip(g_t, g_r):
        assert max_abs_diff(a.float(), b) < 5e-2 * max(1.0, float(b.abs().max()))


def test_padding_garbage_is_ignored():
    regions, rl, words, wl = _inputs(3, 4, 6, 5, 16, seed=6)
    rl = torch.tensor([6, 2, 4], device=DEV)
    wl = torch.tensor([1, 5, 3, 2], device=DEV)
    dirty_r, dirty_w = regions.clone(), words.clone()
    for i, n in enumerate(rl.tolist()):
        dirty_r[i, n:] = float("nan")
    for j, n in enumerate(wl.tolist()):
        dirty_w[j, n:] = 1e30
    clean_out, clean_g = run_backend(OPS["relevance"], (regions, rl, words, wl), "triton")
    dirty_out, dirty_g = run_backend(OPS["relevance"], (dirty_r, rl, dirty_w, wl), "triton")
    for a, b in zip(clean_out, dirty_out):
        assert torch.isfinite(b).all()
        assert max_abs_diff(a, b) < 1e-6
    for a, b in zip(clean_g, dirty_g):
        assert torch.isfinite(b).all()
        assert max_abs_diff(a, b) < 1e-6


def test_caption_scores_the_same_alone_and_in_a_padded_batch():
    regions, rl, words, wl = _inputs(4, 3, 8, 6, 32, seed=7)
    t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, backend="triton")
    j = 1
    n = int(wl[j])
    t2i_1, i2t_1 = ops.fragment_word_relevance(regions, rl, words[j:j + 1, :n], wl[j:j + 1], backend="triton")
    assert max_abs_diff(t2i[j:j + 1], t2i_1) < 1e-6
    assert max_abs_diff(i2t[:, j:j + 1], i2t_1) < 1e-6


def test_ties_and_zero_vectors_route_gradient_like_the_reference():
    regions, rl, words, wl = _inputs(2, 2, 5, 4, 8, seed=8, full=True)
    regions[0, 1] = regions[0, 3]  # two identical regions: argmax ties -> lowest index
    regions[1, 2] = 0.0  # all-zero region: cosine 0, no NaN
    words[1, 0] = 0.0
    for name in ("relevance", "hard_mean"):
        out, grads = _check(OPS[name], (regions, rl, words, wl), 2e-5, 2e-5)
        assert all(torch.isfinite(g).all() for g in grads)


def test_backward_split_partials_are_deterministic_and_equal():
    from aahr_fast.kernels import cross_similarity as xk

    regions, rl, words, wl = _inputs(3, 6, 5, 4, 40, seed=9)
    rv = torch.arange(5, device=DEV)[None] < rl[:, None]
    wv = torch.arange(4, device=DEV)[None] < wl[:, None]
    rinv, winv = xk.inverse_norms(regions, 1e-8, rv), xk.inverse_norms(words, 1e-8, wv)
    g1 = torch.randn(6, 3, device=DEV)
    g2 = torch.randn(3, 6, device=DEV)
    kw = dict(mode=xk.MODE_RELEVANCE)
    a = xk.cross_similarity_backward(regions, rl, words, wl, rinv, winv, g1, g2, split=1, **kw)
    b = xk.cross_similarity_backward(regions, rl, words, wl, rinv, winv, g1, g2, split=3, **kw)
    for x, y in zip(a, b):
        assert max_abs_diff(x, y) < 1e-6


def test_chunk_size_is_accepted_and_irrelevant():
    regions, rl, words, wl = _inputs(6, 5, 7, 6, 24, seed=10)
    full = ops.fragment_word_relevance(regions, rl, words, wl, backend="triton")
    chunked = ops.fragment_word_relevance(regions, rl, words, wl, chunk_size=2, backend="triton")
    for a, b in zip(full, chunked):
        assert max_abs_diff(a, b) == 0.0


def test_nan_in_a_valid_slot_poisons_only_its_pairs():
    regions, rl, words, wl = _inputs(3, 2, 4, 3, 8, seed=11, full=True)
    regions[1, 0, 0] = float("nan")
    t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, backend="triton")
    assert torch.isnan(t2i[:, 1]).all() and torch.isnan(i2t[1]).all()
    assert torch.isfinite(t2i[:, [0, 2]]).all() and torch.isfinite(i2t[[0, 2]]).all()


def test_float64_runs_the_reference_path():
    regions, rl, words, wl = _inputs(2, 3, 4, 3, 8, dtype=torch.float64, seed=12)
    a = ops.fragment_word_relevance(regions, rl, words, wl, backend="triton")
    b = ops.fragment_word_relevance(regions, rl, words, wl, backend="reference")
    assert a[0].dtype == torch.float64
    assert max_abs_diff(a[0], b[0]) == 0.0 and max_abs_diff(a[1], b[1]) == 0.0


def test_backend_is_registered_and_forceable(monkeypatch):
    from aahr_fast.ops import _dispatch

    regions, rl, words, wl = _inputs(2, 2, 3, 3, 8, seed=13)
    assert "triton" in _dispatch.registered("fragment_word_relevance")
    assert _dispatch.resolve_backend("triton", regions, words, op="fragment_word_relevance") == "triton"
    monkeypatch.setenv("AAHR_OPS_BACKEND", "triton")
    assert _dispatch.resolve_backend(None, regions, words, op="hard_assignment_similarity") == "triton"

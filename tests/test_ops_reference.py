"""The plain-PyTorch references of the public ops: hand-computed cases, masking invariance, gradcheck.

All calls force ``backend="reference"`` so these tests pin the math, whatever backends are built.
"""
from __future__ import annotations

import math

import pytest
import torch

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch
from aahr_fast.utils.errors import ConfigError, DataError

REF = dict(backend="reference")


def _lens(*v):
    return torch.tensor(v, dtype=torch.int64)


# ----------------------------------------------------------------------------- cross similarity
def _toy():
    """1 image with regions (1,0), (0,1); 1 caption with words (1,0), (-1,0). cos = [[1,0],[-1,0]]."""
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    words = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=torch.float64)
    return regions, words


def test_relevance_hand_computed():
    regions, words = _toy()
    t2i, i2t = ops.fragment_word_relevance(regions, _lens(2), words, _lens(2), eps=1e-12, **REF)
    # s = LeakyReLU_0.1(cos) = [[1, 0], [-0.1, 0]] (rows words, cols regions)
    # t2i: column norms over words sqrt(1.01), 0 -> per word max over regions: 1/sqrt(1.01), max(-0.1/sqrt(1.01), 0)=0
    assert t2i.shape == (1, 1) and i2t.shape == (1, 1)
    assert t2i.item() == pytest.approx(0.5 / math.sqrt(1.01), rel=1e-9)
    # i2t: row norms over regions 1, 0.1 -> [[1, 0], [-1, 0]]; per region max over words 1, 0; mean 0.5
    assert i2t.item() == pytest.approx(0.5, rel=1e-9)


def test_relevance_masks_padded_region_and_paper_compat_does_not():
    regions, words = _toy()
    padded = torch.cat([regions, torch.zeros(1, 1, 2, dtype=regions.dtype)], dim=1)  # third slot = padding
    t2i, i2t = ops.fragment_word_relevance(padded, _lens(2), words, _lens(2), eps=1e-12, **REF)
    assert i2t.item() == pytest.approx(0.5, rel=1e-9)
    assert t2i.item() == pytest.approx(0.5 / math.sqrt(1.01), rel=1e-9)
    # the authors' code counts the zero padded slot: its max over words is 0, diluting the mean to 1/3
    t2i_p, i2t_p = ops.fragment_word_relevance(padded, _lens(2), words, _lens(2), eps=1e-12,
                                               paper_compat=True, **REF)
    assert i2t_p.item() == pytest.approx(1.0 / 3.0, rel=1e-9)
    assert t2i_p.item() == pytest.approx(0.5 / math.sqrt(1.01), rel=1e-9)


def test_relevance_padded_region_can_win_the_max_in_paper_compat():
    # every valid region scores below 0 for the word: the zero padded slot (score 0) wins the max
    regions = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    words = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    t2i, _ = ops.fragment_word_relevance(regions, _lens(1), words, _lens(1), eps=1e-12, **REF)
    t2i_p, _ = ops.fragment_word_relevance(regions, _lens(1), words, _lens(1), eps=1e-12, paper_compat=True, **REF)
    assert t2i.item() == pytest.approx(-1.0)  # -0.1 / 0.1
    assert t2i_p.item() == pytest.approx(0.0)


def test_hard_assignment_hand_computed():
    regions, words = _toy()
    mean = ops.hard_assignment_similarity(regions, _lens(2), words, _lens(2), **REF)
    assert mean.item() == pytest.approx(0.5)  # word maxima 1 and 0
    lse = ops.hard_assignment_similarity(regions, _lens(2), words, _lens(2), agg="lse", temperature=0.5, **REF)
    assert lse.item() == pytest.approx(0.5 * math.log(math.exp(2.0) + 1.0))
    # only region 1 valid: word maxima 0 and 0
    one = ops.hard_assignment_similarity(regions, _lens(1), words, _lens(2), **REF)
    assert one.item() == pytest.approx(0.5 * (1.0 + -1.0))


def test_relevance_zero_vectors_score_zero_without_nan():
    regions = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    words = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t2i, i2t = ops.fragment_word_relevance(regions, _lens(3, 2), words, _lens(3, 1), **REF)
    assert torch.equal(t2i, torch.zeros_like(t2i)) and torch.equal(i2t, torch.zeros_like(i2t))
    (t2i.sum() + i2t.sum()).backward()
    assert torch.isfinite(regions.grad).all() and torch.isfinite(words.grad).all()


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_masking_invariance_and_chunking(chunk):
    """A caption (image) scores the same alone as inside a padded batch with garbage in the padding."""
    torch.manual_seed(1)
    bi, n, bt, l, d = 3, 5, 4, 6, 8
    regions = torch.randn(bi, n, d, dtype=torch.float64)
    words = torch.randn(bt, l, d, dtype=torch.float64)
    rl, wl = _lens(5, 2, 3), _lens(6, 1, 4, 2)
    for i in range(bi):
        regions[i, rl[i]:] = float("nan")
    for j in range(bt):
        words[j, wl[j]:] = 1e6
    t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, chunk_size=chunk, **REF)
    hard = ops.hard_assignment_similarity(regions, rl, words, wl, chunk_size=chunk, **REF)
    assert torch.isfinite(t2i).all() and torch.isfinite(i2t).all() and torch.isfinite(hard).all()
    for i in range(bi):
        for j in range(bt):
            r1 = regions[i:i + 1, : rl[i]]
            w1 = words[j:j + 1, : wl[j]]
            a, b = ops.fragment_word_relevance(r1, rl[i:i + 1], w1, wl[j:j + 1], **REF)
            h = ops.hard_assignment_similarity(r1, rl[i:i + 1], w1, wl[j:j + 1], **REF)
            assert t2i[j, i].item() == pytest.approx(a.item(), rel=1e-12, abs=1e-12)
            assert i2t[i, j].item() == pytest.approx(b.item(), rel=1e-12, abs=1e-12)
            assert hard[i, j].item() == pytest.approx(h.item(), rel=1e-12, abs=1e-12)


def test_padding_gets_zero_gradient():
    torch.manual_seed(2)
    regions = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    words = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
    rl, wl = _lens(4, 2), _lens(5, 3, 1)
    t2i, i2t = ops.fragment_word_relevance(regions, rl, words, wl, **REF)
    (t2i.sum() + 2 * i2t.sum()).backward()
    assert regions.grad[1, 2:].abs().max() == 0 and words.grad[1, 3:].abs().max() == 0
    assert words.grad[2, 1:].abs().max() == 0
    assert regions.grad[0].abs().max() > 0


def test_relevance_gradcheck_float64():
    torch.manual_seed(3)
    regions = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    words = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    rl, wl = _lens(4, 3), _lens(3, 2, 1)
    for compat in (False, True):
        torch.autograd.gradcheck(
            lambda r, w: ops.fragment_word_relevance(r, rl, w, wl, paper_compat=compat, **REF), (regions, words)
        )
    for agg in ("mean", "lse"):
        torch.autograd.gradcheck(
            lambda r, w: ops.hard_assignment_similarity(r, rl, w, wl, agg=agg, temperature=0.3, **REF),
            (regions, words),
        )


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(regions=torch.randn(0, 3, 4)), DataError),
        (dict(words=torch.randn(0, 3, 4)), DataError),
        (dict(regions=torch.randn(2, 3)), DataError),
        (dict(words=torch.randn(2, 3, 5)), DataError),
        (dict(region_lens=_lens(3, 4)), DataError),
        (dict(region_lens=_lens(0, 1)), DataError),
        (dict(word_lens=_lens(1)), DataError),
        (dict(word_lens=torch.tensor([1.0, 2.0])), DataError),
        (dict(chunk_size=0), ConfigError),
        (dict(negative_slope=-0.1), ConfigError),
        (dict(backend="fast"), ConfigError),
    ],
)
def test_relevance_bad_input_errors(kwargs, err):
    args = dict(regions=torch.randn(2, 3, 4), region_lens=_lens(3, 1), words=torch.randn(2, 5, 4),
                word_lens=_lens(5, 2), backend="reference")
    args.update(kwargs)
    with pytest.raises(err):
        ops.fragment_word_relevance(args.pop("regions"), args.pop("region_lens"), args.pop("words"),
                                    args.pop("word_lens"), **args)


def test_empty_batch_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="empty"):
        ops.fragment_word_relevance(torch.randn(0, 3, 4), _lens(), torch.randn(2, 5, 4), _lens(5, 2), **REF)
    with pytest.raises(ValueError, match="agg"):
        ops.hard_assignment_similarity(torch.randn(1, 3, 4), _lens(3), torch.randn(2, 5, 4), _lens(5, 2),
                                       agg="max", **REF)


# ----------------------------------------------------------------------------- correlation
def test_intra_relevance_hand_computed_and_diagonal_exact():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    a = ops.intra_relevance(x, sigma=5.0, **REF)
    expected = torch.tensor([[1, math.exp(-1), math.exp(-1)], [math.exp(-1), 1, 1], [math.exp(-1), 1, 1]],
                            dtype=torch.float64)
    assert torch.allclose(a, expected)
    xr = torch.randn(7, 5)
    assert torch.equal(torch.diagonal(ops.intra_relevance(xr, **REF)), torch.ones(7))
    a.sum().backward()  # duplicate rows 1 and 2: zero distance off the diagonal too
    assert torch.isfinite(x.grad).all()


def test_intra_relevance_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.intra_relevance(x, sigma=0.7, **REF), (x,))


def test_topk_connection_ties_go_to_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    conn = ops.topk_connection(scores, rho=0.5, **REF)
    assert conn.tolist() == [[True, True, False, False], [False, True, True, False], [True, True, False, False]]
    assert ops.topk_connection(torch.randn(3, 10), rho=0.29, **REF).sum(1).tolist() == [2, 2, 2]
    assert ops.topk_connection(torch.randn(3, 100), rho=0.29, **REF).sum(1).tolist() == [29, 29, 29]
    with pytest.raises(ConfigError):
        ops.topk_connection(scores, rho=0.0, **REF)


def test_instance_correlation_blocks_and_bias():
    torch.manual_seed(4)
    b, d = 4, 6
    v = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1).requires_grad_()
    rel_i2t, rel_t2i = torch.rand(b, b, dtype=torch.float64), torch.rand(b, b, dtype=torch.float64)
    c = ops.instance_correlation(v, t, rel_i2t, rel_t2i, sigma=1.0, rho=0.5, lam=1.5, **REF)
    assert c.relevance.shape == c.connection.shape == c.attn_bias.shape == (2 * b, 2 * b)
    assert c.connection.dtype == torch.bool
    assert torch.equal(c.relevance[:b, b:], rel_i2t) and torch.equal(c.relevance[b:, :b], rel_t2i)
    assert torch.allclose(c.relevance[:b, :b], ops.intra_relevance(v, **REF))
    assert torch.equal(c.connection[:b, :b], ops.topk_connection(v @ v.t(), 0.5, **REF))
    assert torch.equal(c.connection[b:, :b], ops.topk_connection(rel_t2i, 0.5, **REF))
    assert c.connection.sum(1).tolist() == [4] * (2 * b)  # 2 per block row
    assert torch.all(c.connection.diagonal())  # unit vectors: self is the top intra score
    assert torch.equal(torch.isneginf(c.attn_bias), ~c.connection)
    assert torch.allclose(c.attn_bias[c.connection], 1.5 * c.relevance[c.connection])
    torch.autograd.gradcheck(
        lambda v, t: ops.instance_correlation(v, t, rel_i2t, rel_t2i, lam=1.5, **REF).relevance, (v, t)
    )
    with pytest.raises(DataError, match="rel_t2i"):
        ops.instance_correlation(v, t, rel_i2t, rel_t2i[:3], **REF)


# ----------------------------------------------------------------------------- message passing
def test_gcn_layer_hand_computed_and_gradcheck():
    adj = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = ops.gcn_layer(adj, x, w, b, negative_slope=0.2, **REF)
    # adj @ x = [[2.5, -2], [3, 0]]; + b = [[2.5, -1], [3, 1]]; LeakyReLU_0.2
    assert torch.allclose(out, torch.tensor([[2.5, -0.2], [3.0, 1.0]], dtype=torch.float64))
    args = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(4, 4), (4, 3), (3, 2), (2,)])
    torch.autograd.gradcheck(lambda *a: ops.gcn_layer(*a, **REF), args)
    with pytest.raises(DataError, match="weight"):
        ops.gcn_layer(adj, x, torch.eye(3), **REF)


def test_masked_attention_isolated_row_outputs_zero_and_single_connection_copies_value():
    torch.manual_seed(5)
    h, n, dh = 2, 3, 4
    q, k, v = (torch.randn(h, n, dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ninf = float("-inf")
    bias = torch.tensor([[0.0, ninf, ninf], [ninf, ninf, ninf], [0.3, 0.0, -1.0]], dtype=torch.float64,
                        requires_grad=True)
    out = ops.masked_attention(q, k, v, bias, **REF)
    assert torch.allclose(out[:, 0], v[:, 0])  # only itself connected
    assert torch.equal(out[:, 1], torch.zeros(h, dh, dtype=torch.float64))  # no connection
    p = torch.softmax(torch.einsum("hd,hnd->hn", q[:, 2], k) / 2.0 + bias[2], dim=-1)
    assert torch.allclose(out[:, 2], torch.einsum("hn,hnd->hd", p, v))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(bias.grad).all()
    assert torch.equal(q.grad[:, 1], torch.zeros(h, dh, dtype=torch.float64))
    torch.autograd.gradcheck(lambda q, k, v: ops.masked_attention(q, k, v, bias.detach(), **REF), (q, k, v))


# ----------------------------------------------------------------------------- prototypes
def _sinkhorn_naive(s, eps, n_iters):
    q = torch.exp(s / eps).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_sinkhorn_matches_direct_formula_and_is_stable():
    torch.manual_seed(6)
    s = torch.randn(6, 4, dtype=torch.float64) * 0.3
    codes = ops.sinkhorn(s, eps=0.1, n_iters=3, **REF)
    assert torch.allclose(codes, _sinkhorn_naive(s, 0.1, 3), rtol=1e-10, atol=1e-12)
    assert torch.allclose(codes.sum(1), torch.ones(6, dtype=torch.float64))
    uniform = ops.sinkhorn(torch.zeros(5, 4), **REF)
    assert torch.allclose(uniform, torch.full((5, 4), 0.25))
    big = ops.sinkhorn(torch.randn(8, 5) * 1e3, eps=0.01, n_iters=3, **REF)  # exp would overflow
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1), torch.ones(8))
    # many iterations: every prototype receives B/K of the mass
    balanced = ops.sinkhorn(torch.randn(8, 4, dtype=torch.float64), eps=0.5, n_iters=200, **REF)
    assert torch.allclose(balanced.sum(0), torch.full((4,), 2.0, dtype=torch.float64), atol=1e-6)
    assert not ops.sinkhorn(s.requires_grad_(), **REF).requires_grad


def test_swapped_prediction_loss_values_and_gradients():
    k, d = 5, 3
    zeros = torch.zeros(4, d, dtype=torch.float64)
    protos = torch.randn(k, d, dtype=torch.float64)
    # zero embeddings: uniform codes and uniform predictions -> 2 log K
    assert ops.swapped_prediction_loss(zeros, zeros, protos, **REF).item() == pytest.approx(2 * math.log(k))
    torch.manual_seed(7)
    x_v = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(4, d, dtype=torch.float64, requires_grad=True)
    c = torch.randn(k, d, dtype=torch.float64, requires_grad=True)
    loss = ops.swapped_prediction_loss(x_v, x_t, c, eps=0.1, n_iters=3, tau=0.1, **REF)
    s_v, s_t = x_v @ c.t(), x_t @ c.t()
    q_v, q_t = _sinkhorn_naive(s_v.detach(), 0.1, 3), _sinkhorn_naive(s_t.detach(), 0.1, 3)
    manual = -(q_t * torch.log_softmax(s_v / 0.1, 1)).sum(1).mean() - (q_v * torch.log_softmax(s_t / 0.1, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-10)
    # the gradient treats the codes as constants (not a full derivative, so no numerical gradcheck)
    g = torch.autograd.grad(loss, (x_v, x_t, c))
    g_manual = torch.autograd.grad(manual, (x_v, x_t, c))
    for a, b in zip(g, g_manual):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12) and a.abs().max() > 0
    # the queue changes the codes of the batch rows but not the shape of the loss
    qv, qt = torch.randn(6, d, dtype=torch.float64), torch.randn(6, d, dtype=torch.float64)
    lq = ops.swapped_prediction_loss(x_v, x_t, c, queue_v=qv, queue_t=qt, **REF)
    q_vq = _sinkhorn_naive(torch.cat([s_v, qv @ c.t()]).detach(), 0.1, 3)[:4]
    q_tq = _sinkhorn_naive(torch.cat([s_t, qt @ c.t()]).detach(), 0.1, 3)[:4]
    manual_q = -(q_tq * torch.log_softmax(s_v / 0.1, 1)).sum(1).mean() - (q_vq * torch.log_softmax(s_t / 0.1, 1)).sum(1).mean()
    assert lq.item() == pytest.approx(manual_q.item(), rel=1e-10)
    with pytest.raises(DataError, match="prototypes"):
        ops.swapped_prediction_loss(x_v, x_t, torch.randn(k, d + 1), **REF)


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_env_and_forced_backend_errors(monkeypatch):
    x = torch.randn(3, 2)
    monkeypatch.setenv("AAHR_OPS_BACKEND", "reference")
    assert _dispatch.resolve_backend(None, x, op="sinkhorn") == "reference"
    monkeypatch.setenv("AAHR_OPS_BACKEND", "warp")
    with pytest.raises(ConfigError, match="AAHR_OPS_BACKEND"):
        ops.sinkhorn(x)
    monkeypatch.delenv("AAHR_OPS_BACKEND")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.sinkhorn(x, backend="cuda")  # CPU tensors
    with pytest.raises(ConfigError):
        _dispatch.resolve_backend(None, x, op="no_such_op")


def test_register_plugs_in_a_backend_without_touching_dispatch(monkeypatch):
    calls = []

    def fake(scores, *, eps, n_iters):
        calls.append((eps, n_iters))
        return torch.zeros_like(scores)

    ops.registered("sinkhorn")  # import the real plugin modules first, so they cannot re-register over the fake
    saved = dict(_dispatch._REGISTRY["sinkhorn"])
    monkeypatch.setattr(_dispatch, "_backend_problem", lambda op, b, dev, kw: None)
    try:
        ops.register("sinkhorn", "cpp", fake)
        out = ops.sinkhorn(torch.randn(3, 2), eps=0.2, backend="cpp")
        assert calls == [(0.2, 3)] and torch.equal(out, torch.zeros(3, 2))
        with pytest.raises(ConfigError):
            ops.register("sinkhorn", "opencl", fake)
    finally:
        _dispatch._REGISTRY["sinkhorn"] = saved

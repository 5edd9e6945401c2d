"""Hostile inputs across backends (issue 14 item 5): every backend gives the reference's answer, or every
backend raises the same clear error.

* Sinkhorn / swapped prediction with scores of order 1e4 (``|S| / eps`` ~ 1e5): codes within 1e-6 of the
  reference (or of the float64 truth, where the float32 reference itself rounds ``S / eps``), rows summing
  to 1, loss and gradients within 1e-5 relative of float64.
* +-inf: with value checks on (eager default) the prototype ops raise DataError naming the op, the tensor,
  the first index and the value; with checks off every backend returns the same documented result (all-NaN
  codes, a NaN loss).
* The other ops' "Non-finite input:" contracts: NaN / +-inf forward results agree with the reference
  entry by entry (same NaN / inf positions, same finite values) on every backend.

Backends: ``reference``, ``cpp`` (skipped where the extension cannot build) and ``triton`` (GPU, or the
interpreter on CPU with tiny shapes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aahr_fast.ops as ops
from aahr_fast.kernels._testing import triton_device
from aahr_fast.utils.errors import DataError

from _ops_helpers import require_cpp_extension

BACKENDS = ["reference", "cpp", "triton"]
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "cpp":
        require_cpp_extension()
    if request.param == "triton" and triton_device() is None:
        pytest.skip("needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1)")
    return request.param


def _dev(backend: str) -> str:
    return triton_device() if backend == "triton" else "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(b: int, d: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, generator=g), dim=1) * scale


def _run(fn, backend, *args, **kw):
    """Call ``fn`` with ``backend`` on the backend's device; returns the outputs on CPU."""
    dev = _dev(backend)
    moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*moved, backend=backend, **kw)
    if isinstance(out, torch.Tensor):
        return out.cpu()
    return type(out)(*(o.cpu() for o in out)) if hasattr(out, "_fields") else tuple(o.cpu() for o in out)


def _same_nonfinite(got: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5, what: str = "") -> None:
    """Same NaN, +inf and -inf positions, finite entries within ``atol`` (relative to their size)."""
    got, ref = got.detach().float(), ref.detach().float()
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(f(got), f(ref)), f"{what}: {name} positions differ: got {f(got).nonzero().tolist()}, " \
                                            f"reference {f(ref).nonzero().tolist()}"
    fin = torch.isfinite(ref)
    if fin.any():
        torch.testing.assert_close(got[fin], ref[fin], atol=atol, rtol=atol, msg=what)


# ----------------------------------------------------------------------------- sinkhorn: huge scores
def _large_scores(case: str) -> torch.Tensor:
    g = _gen(11)
    if case == "randn_1e4":  # the case: Triton rows summed to 1.0026, codes off by 3e-3
        return torch.randn(16, 12, generator=g) * 1e4
    if case == "cosine_1e4":  # cosine scores scaled by 1e4: many rows dominated in every column
        return _unit(16, 8, g) @ _unit(12, 8, g).t() * 1e4
    if case == "offset_1e4":  # near-ties around 1e4: S / eps rounds by ~4e-3 in float32
        return 1e4 + torch.randn(16, 12, generator=g) * 0.3
    if case == "odd_strided":  # odd sizes, a strided view, several blocks of rows under the interpreter
        return (torch.randn(37, 42, generator=g) * 3e3)[:, ::2]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["randn_1e4", "cosine_1e4", "offset_1e4", "odd_strided"])
@pytest.mark.parametrize("eps,n_iters", [(0.1, 3), (0.05, 1), (0.1, 5)])
def test_sinkhorn_large_scores_match_reference(backend, case, eps, n_iters):
    s = _large_scores(case)
    got = _run(ops.sinkhorn, backend, s, eps, n_iters).double()
    ref = ops.sinkhorn(s, eps, n_iters, backend="reference").double()
    truth = ops.sinkhorn(s.double(), eps, n_iters, backend="reference")  # same float32 scores, float64 math
    assert torch.isfinite(got).all()
    # the reference's answer, or the exact one: the float32 reference rounds S / eps (|S / eps| ~ 1e5) before
    # anything else, so where that rounding shows (offset_1e4: ~5e-4) a backend may be closer to float64
    err = min(float((got - ref).abs().max()), float((got - truth).abs().max()))
    assert err <= 1e-6, f"{backend} {case}: codes off by {err:.2e}"
    torch.testing.assert_close(got.sum(1), torch.ones(s.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    col_err = min(float((got.sum(0) - ref.sum(0)).abs().max()), float((got.sum(0) - truth.sum(0)).abs().max()))
    assert col_err <= 1e-5 * s.shape[0], f"{backend} {case}: column sums off by {col_err:.2e}"


def test_sinkhorn_large_scores_half_precision(backend):
    s = _large_scores("randn_1e4")[:8, :6].half()  # fp16 holds 1e4 (max 65504)
    got = _run(ops.sinkhorn, backend, s, 0.1, 3)
    assert got.dtype == torch.float16
    ref = ops.sinkhorn(s.float(), 0.1, 3, backend="reference")
    assert float((got.float() - ref).abs().max()) <= 1e-3  # one fp16 ulp of the codes


# ----------------------------------------------------------------------------- swapped prediction: huge scores
@pytest.mark.parametrize("queue", [False, True])
def test_swapped_prediction_large_scores_match_float64(backend, queue):
    g = _gen(1)
    xv, xt, c = _unit(6, 16, g, 100.0), _unit(6, 16, g, 100.0), _unit(5, 16, g, 100.0)  # scores ~1e4
    kw = dict(queue_v=_unit(9, 16, g, 100.0), queue_t=_unit(7, 16, g, 100.0)) if queue else {}
    dev = _dev(backend)
    ins = [t.to(dev).requires_grad_() for t in (xv, xt, c)]
    loss = ops.swapped_prediction_loss(*ins, backend=backend, **{k: v.to(dev) for k, v in kw.items()})
    grads = torch.autograd.grad(loss, ins)
    r64 = [t.double().requires_grad_() for t in (xv, xt, c)]
    l64 = ops.swapped_prediction_loss(*r64, backend="reference", **{k: v.double() for k, v in kw.items()})
    g64 = torch.autograd.grad(l64, r64)
    assert abs(float(loss) / float(l64) - 1) <= 1e-5, (float(loss), float(l64))
    for name, a, b in zip(("x_v", "x_t", "prototypes"), grads, g64):
        rel = float((a.cpu().double() - b).abs().max() / b.abs().max())
        assert rel <= 1e-5, f"{backend}: d loss / d {name} off by {rel:.2e} (relative to its max)"


# ----------------------------------------------------------------------------- sinkhorn: +-inf and NaN
def _hostile_scores(case: str) -> torch.Tensor:
    s = torch.randn(6, 5, generator=_gen(3))
    if case == "+inf entry":
        s[2, 3] = float("inf")
    elif case == "-inf entry":
        s[2, 3] = float("-inf")
    elif case == "-inf column":
        s[:, 3] = float("-inf")
    elif case == "+inf row":
        s[2, :] = float("inf")
    elif case == "nan entry":
        s[2, 3] = float("nan")
    elif case == "overflow":  # finite scores, S / eps = inf in float32
        s[2, 3] = 3e38
    else:
        raise AssertionError(case)
    return s


@pytest.mark.parametrize("case,value", [("+inf entry", "inf"), ("-inf entry", "-inf"), ("-inf column", "-inf"),
                                        ("+inf row", "inf")])
def test_sinkhorn_inf_raises_with_value_checks(backend, case, value):
    s = _hostile_scores(case)
    first = "2, 3" if case != "-inf column" and case != "+inf row" else ("0, 3" if case == "-inf column" else "2, 0")
    with pytest.raises(DataError, match=rf"^sinkhorn: scores\[{first}\] = {value} is infinite"):
        _run(ops.sinkhorn, backend, s, 0.1, 3)


@pytest.mark.parametrize("case", ["+inf entry", "-inf entry", "-inf column", "+inf row", "nan entry", "overflow"])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_sinkhorn_nonfinite_gives_all_nan_codes_with_checks_off(backend, case, n_iters):
    s = _hostile_scores(case)
    with ops.value_checks(False):
        got = _run(ops.sinkhorn, backend, s, 0.1, n_iters)
        ref = ops.sinkhorn(s, 0.1, n_iters, backend="reference")
    assert got.shape == s.shape and torch.isnan(ref).all()
    assert torch.isnan(got).all(), f"{backend} {case}: {got}"


def test_sinkhorn_nan_and_overflow_are_not_refused_by_the_checks(backend):
    for case in ("nan entry", "overflow"):  # NaN: documented propagation (never raised); overflow: finite input
        assert torch.isnan(_run(ops.sinkhorn, backend, _hostile_scores(case), 0.1, 3)).all()


def test_sinkhorn_checks_off_by_environment(backend, monkeypatch):
    monkeypatch.setenv("AAHR_OPS_VALUE_CHECKS", "0")
    assert torch.isnan(_run(ops.sinkhorn, backend, _hostile_scores("-inf column"), 0.1, 3)).all()


def test_sinkhorn_half_precision_inf(backend):
    s = _hostile_scores("-inf entry").half()
    with ops.value_checks(False):
        got = _run(ops.sinkhorn, backend, s, 0.1, 3)
    assert got.dtype == torch.float16 and torch.isnan(got).all()


# ----------------------------------------------------------------------------- swapped prediction: +-inf and NaN
def _swap_inputs(where: str, value: float):
    g = _gen(5)
    t = dict(x_v=_unit(4, 8, g), x_t=_unit(4, 8, g), prototypes=_unit(5, 8, g), queue_v=_unit(6, 8, g),
             queue_t=_unit(3, 8, g))
    t[where][1, 2] = value
    return t


@pytest.mark.parametrize("where", ["x_v", "x_t", "prototypes", "queue_v", "queue_t"])
@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_swapped_prediction_inf_raises_with_value_checks(backend, where, value):
    t = _swap_inputs(where, float(value))
    dev = _dev(backend)
    with pytest.raises(DataError, match=rf"^swapped_prediction_loss: {where}\[1, 2\] = {value} is infinite"):
        ops.swapped_prediction_loss(t["x_v"].to(dev), t["x_t"].to(dev), t["prototypes"].to(dev),
                                    queue_v=t["queue_v"].to(dev), queue_t=t["queue_t"].to(dev), backend=backend)


@pytest.mark.parametrize("where", ["x_v", "x_t", "prototypes", "queue_v", "queue_t"])
@pytest.mark.parametrize("value", ["nan", "+inf", "-inf"])
def test_swapped_prediction_nonfinite_gives_nan_loss_with_checks_off(backend, where, value):
    t = _swap_inputs(where, NONFINITE[value])

    def loss_and_grads(be):
        dev = _dev(be)
        ins = [t[n].to(dev).requires_grad_() for n in ("x_v", "x_t", "prototypes")]
        with ops.value_checks(False):
            loss = ops.swapped_prediction_loss(*ins, queue_v=t["queue_v"].to(dev), queue_t=t["queue_t"].to(dev),
                                               backend=be)
        return loss.cpu(), [x.cpu() for x in torch.autograd.grad(loss, ins)]

    loss, grads = loss_and_grads(backend)
    ref_loss, ref_grads = loss_and_grads("reference")
    assert torch.isnan(ref_loss) and torch.isnan(loss)
    for name, a, b in zip(("x_v", "x_t", "prototypes"), grads, ref_grads):
        # documented: non-finite exactly where the reference's gradient is (NaN / inf mix not specified)
        assert torch.equal(~torch.isfinite(a), ~torch.isfinite(b)), f"{backend}: d loss / d {name}"
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the other ops' contracts
def _xsim_inputs(where: str, value: float):
    g = _gen(7)
    r, w = torch.randn(3, 4, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    rl, wl = torch.tensor([4, 2, 3]), torch.tensor([5, 3])
    if where == "valid region":
        r[1, 1, 2] = value
    elif where == "padded region":
        r[1, 3, 0] = value
    elif where == "valid word":
        w[1, 2, 5] = value
    else:
        raise AssertionError(where)
    return r, rl, w, wl


@pytest.mark.parametrize("where", ["valid region", "padded region", "valid word"])
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("op", ["fwr", "has_mean", "has_lse"])
def test_cross_similarity_nonfinite_contract(backend, op, where, value):
    r, rl, w, wl = _xsim_inputs(where, NONFINITE[value])
    if op == "fwr":
        fn = ops.fragment_word_relevance
    else:
        agg = op.split("_")[1]

        def fn(*a, backend):
            return (ops.hard_assignment_similarity(*a, agg=agg, backend=backend).t(),)  # (Bt, Bi) like t2i
    got, ref = _run(fn, backend, r, rl, w, wl), _run(fn, "reference", r, rl, w, wl)
    for a, b in zip(got, ref):
        _same_nonfinite(a, b, what=f"{op} {where} {value}")
    t2i = ref[0]  # (Bt, Bi)
    if where == "padded region":
        assert torch.isfinite(t2i).all()  # padding is ignored
    else:  # the pairs that contain the bad slot are NaN, the others finite
        bad = torch.zeros_like(t2i, dtype=torch.bool)
        if where == "valid region":
            bad[:, 1] = True
        else:
            bad[1, :] = True
        assert torch.equal(torch.isnan(t2i), bad)


@pytest.mark.parametrize("value", list(NONFINITE))
def test_intra_relevance_nonfinite_contract(backend, value):
    x = torch.randn(5, 4, generator=_gen(8))
    x[2, 1] = NONFINITE[value]
    got = _run(ops.intra_relevance, backend, x)
    ref = _run(ops.intra_relevance, "reference", x)
    _same_nonfinite(got, ref, what=f"intra_relevance {value}")
    off = torch.ones(5, dtype=torch.bool)
    off[2] = False
    assert float(ref[2, 2]) == 1.0
    if value == "nan":
        assert torch.isnan(ref[2, off]).all() and torch.isnan(ref[off, 2]).all()
    else:  # an infinite coordinate: infinite distance, relevance exactly 0
        assert (ref[2, off] == 0).all() and (ref[off, 2] == 0).all()
    assert torch.isfinite(ref[off][:, off]).all()


@pytest.mark.parametrize("value", ["+inf", "-inf"])
def test_topk_connection_inf_ranks_first_or_last(backend, value):
    s = torch.randn(5, 6, generator=_gen(9))
    s[1, 4] = NONFINITE[value]
    s[3, :] = NONFINITE[value]  # a whole row of ties at inf: lowest indices win
    got = _run(ops.topk_connection, backend, s, 0.5)
    ref = _run(ops.topk_connection, "reference", s, 0.5)
    assert torch.equal(got, ref)
    assert bool(ref[1, 4]) == (value == "+inf")
    assert ref[3].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("where", ["v", "rel_i2t"])
@pytest.mark.parametrize("value", list(NONFINITE))
def test_instance_correlation_nonfinite_contract(backend, where, value):
    g = _gen(10)
    t = dict(v=torch.randn(4, 6, generator=g), t=torch.randn(4, 6, generator=g),
             rel_i2t=torch.randn(4, 4, generator=g), rel_t2i=torch.randn(4, 4, generator=g))
    t[where][1, 2] = NONFINITE[value]
    args = (t["v"], t["t"], t["rel_i2t"], t["rel_t2i"])
    got = _run(ops.instance_correlation, backend, *args)
    ref = _run(ops.instance_correlation, "reference", *args)
    _same_nonfinite(got.relevance, ref.relevance, what="relevance")
    assert torch.equal(got.connection, ref.connection)
    _same_nonfinite(got.attn_bias, ref.attn_bias, what="attn_bias")
    if where == "rel_i2t":  # copied into relevance; +inf / NaN rank first (connected), -inf last
        v = ref.relevance[1, 4 + 2]
        assert (torch.isnan(v) if value == "nan" else float(v) == NONFINITE[value])
        assert bool(ref.connection[1, 4 + 2]) == (value != "-inf")


@pytest.mark.parametrize("where", ["adj", "x", "weight", "bias"])
@pytest.mark.parametrize("value", list(NONFINITE))
def test_gcn_layer_nonfinite_contract(backend, where, value):
    g = _gen(12)
    t = dict(adj=torch.randn(5, 5, generator=g), x=torch.randn(5, 4, generator=g),
             weight=torch.randn(4, 3, generator=g), bias=torch.randn(3, generator=g))
    t[where].view(-1)[1] = NONFINITE[value]
    args = (t["adj"], t["x"], t["weight"], t["bias"])
    _same_nonfinite(_run(ops.gcn_layer, backend, *args), _run(ops.gcn_layer, "reference", *args),
                    what=f"gcn_layer {where} {value}")


@pytest.mark.parametrize("where", ["q", "k", "v", "bias"])
@pytest.mark.parametrize("value", list(NONFINITE))
def test_masked_attention_nonfinite_contract(backend, where, value):
    g = _gen(13)
    t = dict(q=torch.randn(2, 5, 4, generator=g), k=torch.randn(2, 5, 4, generator=g),
             v=torch.randn(2, 5, 4, generator=g), bias=torch.randn(5, 5, generator=g))
    t["bias"][0, :] = float("-inf")  # a fully masked row: exactly 0
    t["bias"][3, 1] = float("-inf")  # one masked pair
    if where == "bias":
        t["bias"][2, 3] = NONFINITE[value]
    else:
        t[where][0, 2, 1] = NONFINITE[value]
    args = (t["q"], t["k"], t["v"], t["bias"])
    got = _run(ops.masked_attention, backend, *args)
    ref = _run(ops.masked_attention, "reference", *args)
    _same_nonfinite(got, ref, what=f"masked_attention {where} {value}")
    assert (ref[:, 0] == 0).all()  # the fully masked row stays 0 whatever the other rows see
    if where == "bias" and value == "-inf":  # -inf in the bias is the mask: all finite
        assert torch.isfinite(ref).all()


def test_intra_relevance_two_rows_infinite_in_one_coordinate_are_nan_to_each_other(backend):
    x = torch.randn(5, 4, generator=_gen(14))
    x[1, 0] = x[3, 0] = float("inf")
    got = _run(ops.intra_relevance, backend, x)
    ref = _run(ops.intra_relevance, "reference", x)
    _same_nonfinite(got, ref, what="intra_relevance inf pair")
    assert torch.isnan(ref[1, 3]) and torch.isnan(ref[3, 1]) and float(ref[1, 1]) == float(ref[3, 3]) == 1.0
    assert float(ref[1, 0]) == 0.0


@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_hard_assignment_gradients_with_a_nonfinite_region_match_reference(backend, agg, value):
    """A NaN cosine wins the argmax (torch.max semantics) on every backend, so the finite gradient entries
    agree; the Triton backward used to skip it and route the word's gradient to a finite region."""
    r, rl, w, wl = _xsim_inputs("valid region", NONFINITE[value])

    def grads(be):
        dev = _dev(be)
        rr, ww = r.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        sim = ops.hard_assignment_similarity(rr, rl.to(dev), ww, wl.to(dev), agg=agg, backend=be)
        return [x.cpu() for x in torch.autograd.grad(sim.sum(), (rr, ww))]  # unit upstream gradient, NaN pairs too

    for a, b in zip(grads(backend), grads("reference")):
        _same_nonfinite(a, b, what=f"hard_assignment grads {agg} {value}")

"""Ops as registered PyTorch operators (issue 14): backend-module naming, torch.library.opcheck of every
fused op's per-backend operators, torch.compile(fullgraph=True) of every public op."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch

OPS_DIR = Path(ops.__file__).parent
FAMILIES = sorted(set(_dispatch.OP_FAMILY.values()))


def test_backend_modules_follow_one_naming_pattern():
    """Every backend module is ops/_<backend>_<family>.py and the dispatcher's templates import exactly them."""
    names = [p.stem for p in OPS_DIR.glob("*.py")]
    backend_like = [n for n in names if re.search(r"(^|_)(cpp|cuda)(_|$)", n)]
    pattern = re.compile(r"^_(cpp|cuda)_(%s)$" % "|".join(FAMILIES))
    assert backend_like, names
    assert [n for n in backend_like if not pattern.match(n)] == []
    for n in backend_like:
        backend, family = pattern.match(n).groups()
        assert f"aahr_fast.ops.{n}" in [t.format(family=family) for t in _dispatch._PLUGIN_TEMPLATES[backend]]
    for family in FAMILIES:  # every family has a C++ backend module, importable by that name
        importlib.import_module(f"aahr_fast.ops._cpp_{family}")


# ----------------------------------------------------------------------------------------- opcheck
def _g(*shape, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _cpp_cases(dtype):
    """(operator, args) for every aahr::*_cpp forward operator (odd shapes, padded lengths)."""
    from aahr_fast.ops import _cpp_correlation as cc, _cpp_cross_similarity as cx, _cpp_message_passing as cm, \
        _cpp_prototypes as cp

    r, w = _g(3, 5, 7, dtype=dtype), _g(4, 6, 7, dtype=dtype, seed=1)
    rl, wl = torch.tensor([5, 2, 4]), torch.tensor([1, 6, 3, 5])
    v, t = _g(5, 6, dtype=dtype), _g(5, 6, dtype=dtype, seed=2)
    rel_i2t, rel_t2i = _g(5, 5, dtype=dtype, grad=False), _g(5, 5, dtype=dtype, grad=False, seed=3)
    with torch.no_grad():
        sv, st = v @ v.t(), t @ t.t()
    h, n, dh = 2, 5, 3
    bias = _g(n, n, dtype=dtype, seed=4).detach().masked_fill(torch.eye(n, dtype=torch.bool).roll(1, 0), float("-inf"))
    cases = [
        (cx.cross_similarity_op, (r, rl, w, wl, "relevance", 0.1, 1e-8, 1.0)),
        (cx.cross_similarity_op, (r, rl, w, wl, "hard_mean", 0.0, 1e-8, 0.1)),
        (cx.cross_similarity_op, (r, rl, w, wl, "hard_lse", 0.0, 1e-8, 0.1)),
        (cc.intra_relevance_op, (v, 0.7)),
        (cc.topk_connection_op, (sv.clone(), 2)),
        (cc.instance_correlation_op, (v, t, rel_i2t, rel_t2i, sv, st, 0.7, 2, 0.5)),
        (cm.gcn_layer_op, (_g(5, 5, dtype=dtype), _g(5, 4, dtype=dtype, seed=5), _g(4, 3, dtype=dtype, seed=6),
                           _g(3, dtype=dtype), 0.2)),
        (cm.gcn_layer_op, (_g(5, 5, dtype=dtype), _g(5, 3, dtype=dtype, seed=5), _g(3, 4, dtype=dtype, seed=6),
                           None, -0.1)),
        (cm.masked_attention_op, (_g(h, n, dh, dtype=dtype), _g(h, n, dh, dtype=dtype, seed=7),
                                  _g(h, n, dh, dtype=dtype, seed=8), bias.clone().requires_grad_(), 0.5)),
        (cp.sinkhorn_op, (_g(6, 5, dtype=dtype, grad=False), 0.1, 3)),
        (cp.swapped_prediction_loss_op, (_g(4, 5, dtype=dtype), _g(4, 5, dtype=dtype, seed=9),
                                         _g(3, 5, dtype=dtype, seed=10), None, None, 0.1, 3, 0.1)),
        (cp.swapped_prediction_loss_op, (_g(4, 5, dtype=dtype), _g(4, 5, dtype=dtype, seed=9),
                                         _g(3, 5, dtype=dtype, seed=10), _g(7, 5, dtype=dtype, grad=False),
                                         _g(6, 5, dtype=dtype, grad=False, seed=11), 0.1, 3, 0.1)),
    ]
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_cpp_operators(dtype):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch) of every cpp operator."""
    cases = _cpp_cases(dtype)
    covered = {f"aahr::{op._name}" for op, _ in cases}
    from aahr_fast.ops._library import operators

    forward_ops = {q for q in operators() if q.endswith("_cpp")}
    assert forward_ops <= covered, forward_ops - covered
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------ torch.compile
def _public_cases():
    """(name, fn(*tensors) -> tensor outputs, tensors) for every public op, odd shapes, padded lengths."""
    r, w = _g(3, 5, 7, dtype=torch.float32), _g(4, 6, 7, dtype=torch.float32, seed=1)
    rl, wl = torch.tensor([5, 2, 4]), torch.tensor([1, 6, 3, 5])
    v, t = _g(5, 6, dtype=torch.float32), _g(5, 6, dtype=torch.float32, seed=2)
    ri, rt = _g(5, 5, dtype=torch.float32, grad=False).sigmoid(), _g(5, 5, dtype=torch.float32, grad=False).sigmoid()
    n = 5
    bias = torch.zeros(n, n).masked_fill(torch.eye(n, dtype=torch.bool).roll(1, 0), float("-inf"))
    q, k, vv = (_g(2, n, 3, dtype=torch.float32, seed=s) for s in (7, 8, 9))
    return [
        ("fragment_word_relevance", lambda r, w: ops.fragment_word_relevance(r, rl, w, wl), (r, w)),
        ("hard_assignment_similarity", lambda r, w: ops.hard_assignment_similarity(r, rl, w, wl, agg="lse"), (r, w)),
        ("intra_relevance", lambda v: ops.intra_relevance(v, sigma=0.7), (v,)),
        ("topk_connection", lambda v: ops.topk_connection(v @ v.t(), rho=0.5), (v,)),
        ("instance_correlation", lambda v, t: tuple(ops.instance_correlation(v, t, ri, rt, sigma=0.7, rho=0.5, lam=0.5)),
         (v, t)),
        ("gcn_layer", lambda a, x, wt: ops.gcn_layer(a, x, wt, None, 0.2),
         (_g(5, 5, dtype=torch.float32), _g(5, 4, dtype=torch.float32, seed=3), _g(4, 3, dtype=torch.float32, seed=4))),
        ("masked_attention", lambda q, k, v: ops.masked_attention(q, k, v, bias), (q, k, vv)),
        ("sinkhorn", lambda v: ops.sinkhorn(v @ v.t(), eps=0.1, n_iters=3), (v,)),
        ("swapped_prediction_loss", lambda a, b, c: ops.swapped_prediction_loss(a, b, c, eps=0.1, n_iters=3, tau=0.1),
         (v, t, _g(3, 6, dtype=torch.float32, seed=5))),
    ]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _fwd_bwd(fn, tensors):
    ins = [x.detach().clone().requires_grad_(x.requires_grad) for x in tensors]
    outs = _as_tuple(fn(*ins))
    loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs) if o.is_floating_point() and o.requires_grad)
    grads = torch.autograd.grad(loss, ins, allow_unused=True) if torch.is_tensor(loss) else [None] * len(ins)
    return outs, grads


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", [c[0] for c in _public_cases()])
def test_public_op_compiles_fullgraph(case, backend, monkeypatch):
    """Each public op under torch.compile(fullgraph=True) (Dynamo + AOTAutograd): forward and backward equal eager."""
    monkeypatch.setenv("AAHR_OPS_BACKEND", backend)
    name, fn, tensors = next(c for c in _public_cases() if c[0] == case)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, grad_c = _fwd_bwd(compiled, tensors)
    out_e, grad_e = _fwd_bwd(fn, tensors)
    for a, b in zip(out_c, out_e):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad_c, grad_e):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_public_ops_compile_with_inductor_and_call_the_operators():
    """Inductor (the default backend) compiles a chain of cpp ops; the graph holds the aahr:: operators."""
    from torch._dynamo.testing import CompileCounterWithBackend

    r, w = _g(3, 5, 7, dtype=torch.float32), _g(4, 6, 7, dtype=torch.float32, seed=1)
    rl, wl = torch.tensor([5, 2, 4]), torch.tensor([1, 6, 3, 5])

    def fn(r, w):
        t2i, i2t = ops.fragment_word_relevance(r, rl, w, wl, backend="cpp")
        rel = ops.intra_relevance(i2t, sigma=0.5, backend="cpp")
        return t2i.sum() + rel.sum()

    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out_c, grad_c = _fwd_bwd(compiled, (r, w))
    out_e, grad_e = _fwd_bwd(fn, (r, w))
    torch.testing.assert_close(out_c[0], out_e[0])
    for a, b in zip(grad_c, grad_e):
        torch.testing.assert_close(a, b)
    assert any("aahr.cross_similarity_cpp" in s for s in seen), seen
    assert any("aahr.intra_relevance_cpp" in s for s in seen), seen
    del CompileCounterWithBackend

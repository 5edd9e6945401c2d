"""Ops as registered PyTorch operators (issue 14): backend-module naming, torch.library.opcheck of every
fused op's per-backend operators, torch.compile(fullgraph=True) of every public op.

Triton operators run under the Triton interpreter here (``TRITON_INTERPRET=1``, set by the root conftest.py
when no GPU is visible), where they are registered as opaque ``custom_op``s (``_library.triton_traceable``);
the ``triton_op`` form (kernels captured with ``wrap_triton``) is checked by tracing its decomposition on
fake tensors in a subprocess without the interpreter (``tests/_triton_op_trace.py``). CUDA operators cannot
run here: their registration, fakes and autograd wiring are checked with meta tensors.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aahr_fast.ops as ops
from aahr_fast.kernels._testing import triton_device
from aahr_fast.ops import _dispatch
from aahr_fast.ops._library import operators, registration_kind, triton_traceable

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


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("case", [c[0] for c in _public_cases()])
def test_public_op_compiles_fullgraph(case, backend, monkeypatch):
    """Each public op under torch.compile(fullgraph=True) (Dynamo + AOTAutograd): forward and backward equal eager.

    ``backend="aot_eager"`` (Dynamo + AOTAutograd, no Inductor codegen) keeps it fast; under the interpreter the
    triton operators are opaque custom ops there (Inductor over them: test_triton_public_ops_compile_with_inductor).
    """
    if backend == "triton" and triton_device() is None:
        pytest.skip("needs a CUDA GPU or the Triton interpreter")
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


def _inductor_chain_matches_eager(backend: str, device) -> list[str]:
    """Compile fragment_word_relevance -> intra_relevance on ``backend`` with Inductor (fullgraph); assert the
    compiled values and gradients equal eager and return the call targets of the Dynamo graph."""
    r, w = _g(3, 5, 7, dtype=torch.float32).to(device), _g(4, 6, 7, dtype=torch.float32, seed=1).to(device)
    rl, wl = torch.tensor([5, 2, 4], device=device), torch.tensor([1, 6, 3, 5], device=device)

    def fn(r, w):
        t2i, i2t = ops.fragment_word_relevance(r, rl, w, wl, backend=backend)
        rel = ops.intra_relevance(i2t, sigma=0.5, backend=backend)
        return t2i.sum() + rel.sum()

    torch._dynamo.reset()
    seen = []

    def inductor(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=inductor)
    out_c, grad_c = _fwd_bwd(compiled, (r, w))
    out_e, grad_e = _fwd_bwd(fn, (r, w))
    torch.testing.assert_close(out_c[0], out_e[0])
    for a, b in zip(grad_c, grad_e):
        torch.testing.assert_close(a, b)
    return seen


def test_public_ops_compile_with_inductor_and_call_the_operators():
    """Inductor (the default backend) compiles a chain of cpp ops; the graph holds the aahr:: operators."""
    seen = _inductor_chain_matches_eager("cpp", "cpu")
    assert any("aahr.cross_similarity_cpp" in s for s in seen), seen
    assert any("aahr.intra_relevance_cpp" in s for s in seen), seen


# ------------------------------------------------------------------------- triton and cuda operators
TRITON_OPS = ["cross_similarity", "intra_relevance", "topk_connection", "instance_correlation", "gcn_layer",
              "masked_attention", "sinkhorn", "swapped_prediction_loss"]
CUDA_OPS = ["cross_similarity", "sinkhorn", "swapped_prediction_loss"]
NO_GRAD = {"topk_connection", "sinkhorn"}  # boolean output / codes without gradient: forward operator only
REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(triton_device() is None, reason="needs a CUDA GPU or the Triton interpreter")


def _triton_glue():
    """The triton glue after every kernel module registered its family (imports Triton)."""
    for family in FAMILIES:
        importlib.import_module(f"aahr_fast.kernels.{family}")
    from aahr_fast.ops import _triton_glue

    return _triton_glue


def _expected(suffix: str, names: list[str]) -> set[str]:
    fwd = {f"aahr::{n}_{suffix}" for n in names}
    return fwd | {f"aahr::{n}_{suffix}_backward" for n in names if n not in NO_GRAD}


def test_registered_operator_names_include_every_triton_and_cuda_operator():
    """aahr::<op>_triton and aahr::<op>_cuda (+ _backward where differentiable) are registered, callable as
    torch.ops.aahr.*, each as a triton_op where Triton compiles kernels and as a custom_op under the interpreter."""
    pytest.importorskip("triton")
    tg = _triton_glue()
    importlib.import_module("aahr_fast.ops._cuda_cross_similarity")
    importlib.import_module("aahr_fast.ops._cuda_prototypes")
    names = set(operators())
    want_triton, want_cuda = _expected("triton", TRITON_OPS), _expected("cuda", CUDA_OPS)
    assert want_triton <= names, sorted(want_triton - names)
    assert want_cuda <= names, sorted(want_cuda - names)
    assert {q for q in names if "_triton" in q} == want_triton
    assert {q for q in names if q.endswith("_cuda") or q.endswith("_cuda_backward")} == want_cuda
    assert {f"aahr::{k}" for k in tg.OPERATORS} == {f"aahr::{n}_triton" for n in TRITON_OPS}
    for q in want_triton | want_cuda:
        packet = getattr(torch.ops.aahr, q.split("::")[1])
        assert packet.default._schema.name == q
    kind = "triton_op" if triton_traceable() else "custom_op"
    assert {registration_kind(q) for q in want_triton} == {kind}
    assert {registration_kind(q) for q in want_cuda} == {"custom_op"}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        assert kind == "custom_op"  # the interpreter fallback
    # one schema per triton / cuda operator pair (same arguments, whichever backend runs)
    for n in CUDA_OPS:
        a = getattr(torch.ops.aahr, f"{n}_triton").default._schema
        b = getattr(torch.ops.aahr, f"{n}_cuda").default._schema
        assert [(x.name, str(x.type)) for x in a.arguments] == [(x.name, str(x.type)) for x in b.arguments]
        assert [str(x.type) for x in a.returns] == [str(x.type) for x in b.returns]


def _triton_cases():
    """(id, operator, args) for every aahr::*_triton operator, forward and backward: odd shapes, padded lengths,
    partial ``needs`` (placeholders), optional tensors present and absent."""
    tg = _triton_glue()
    f = torch.float32
    r, w = _g(3, 5, 7, dtype=f), _g(4, 6, 7, dtype=f, seed=1)
    rl, wl = torch.tensor([5, 2, 4]), torch.tensor([1, 6, 3, 5])
    v, t = _g(5, 6, dtype=f), _g(5, 6, dtype=f, seed=2)
    ri = _g(5, 5, dtype=f, grad=False, seed=3).sigmoid()
    rt = _g(5, 5, dtype=f, grad=False, seed=4).sigmoid()
    with torch.no_grad():
        sv = v @ v.t()
        _rel, conn, _bias, dist = tg.instance_correlation_op(v, t, ri, rt, 0.7, 2, 0.5)
    h, n, dh = 2, 5, 3
    mask = torch.eye(n, dtype=torch.bool).roll(1, 0)
    bias = _g(n, n, dtype=f, seed=5).detach().masked_fill(mask, float("-inf")).requires_grad_()
    bias_h = _g(h, n, n, dtype=f, seed=6).detach().masked_fill(mask, float("-inf")).requires_grad_()
    q, k, vv = (_g(h, n, dh, dtype=f, seed=s) for s in (7, 8, 9))
    xv, xt, c = _g(4, 5, dtype=f, seed=10), _g(4, 5, dtype=f, seed=11), _g(3, 5, dtype=f, seed=12)
    adj, x, wt, b = _g(5, 5, dtype=f), _g(5, 4, dtype=f, seed=5), _g(4, 3, dtype=f, seed=6), _g(3, dtype=f)
    with torch.no_grad():
        _loss, ds_v, ds_t = tg.swapped_prediction_loss_op(xv, xt, c, None, None, 0.1, 3, 0.1)
        _rel, dist_v = tg.intra_relevance_op(v, 0.7)
        gcn_out, gcn_h = tg.gcn_layer_op(adj, x, wt, b, 0.2)
        att_out, att_lse = tg.masked_attention_op(q, k, vv, bias)
    d = lambda x: x.detach()  # noqa: E731
    return [
        ("xsim_relevance", tg.cross_similarity_op, (r, rl, w, wl, "relevance", 0.1, 1e-8, 1.0)),
        ("xsim_hard_mean", tg.cross_similarity_op, (r, rl, w, wl, "hard_mean", 0.0, 1e-8, 0.1)),
        ("xsim_hard_lse", tg.cross_similarity_op, (r, rl, w, wl, "hard_lse", 0.0, 1e-8, 0.1)),
        ("xsim_backward_regions_only", tg.cross_similarity_backward_op,
         (_g(4, 3, dtype=f, grad=False), _g(3, 4, dtype=f, grad=False, seed=1), d(r), rl, d(w), wl, "relevance", 0.1,
          1e-8, 1.0, [True, False])),
        ("intra_relevance", tg.intra_relevance_op, (v, 0.7)),
        ("intra_relevance_backward", tg.intra_relevance_backward_op, (_g(5, 5, dtype=f, grad=False), d(v), dist_v,
                                                                      0.7)),
        ("topk_connection", tg.topk_connection_op, (sv, 2)),
        ("instance_correlation", tg.instance_correlation_op, (v, t, ri, rt, 0.7, 2, 0.5)),
        ("instance_correlation_backward_t_only", tg.instance_correlation_backward_op,
         (_g(10, 10, dtype=f, grad=False), None, d(v), d(t), conn, dist, 0.7, 0.5, [False, True])),
        ("gcn_bias", tg.gcn_layer_op, (_g(5, 5, dtype=f), _g(5, 4, dtype=f, seed=5), _g(4, 3, dtype=f, seed=6),
                                       _g(3, dtype=f), 0.2)),
        ("gcn_backward_x_bias_only", tg.gcn_layer_backward_op,
         (_g(5, 3, dtype=f, grad=False), d(adj), d(x), d(wt), gcn_h, gcn_out, 0.2, True, [False, True, False, True])),
        ("gcn_no_bias", tg.gcn_layer_op, (_g(5, 5, dtype=f), _g(5, 3, dtype=f, seed=5), _g(3, 4, dtype=f, seed=6),
                                          None, -0.1)),
        ("attention_shared_bias", tg.masked_attention_op, (q, k, vv, bias)),
        ("attention_head_bias", tg.masked_attention_op, (q, k, vv, bias_h)),
        ("attention_backward_q_bias_only", tg.masked_attention_backward_op,
         (_g(h, n, dh, dtype=f, grad=False), d(q), d(k), d(vv), d(bias), att_out, att_lse, [True, False, False, True])),
        ("sinkhorn", tg.sinkhorn_op, (_g(6, 5, dtype=f, grad=False), 0.1, 3)),
        ("swav", tg.swapped_prediction_loss_op, (xv, xt, c, None, None, 0.1, 3, 0.1)),
        ("swav_queues", tg.swapped_prediction_loss_op, (xv, xt, c, _g(7, 5, dtype=f, grad=False),
                                                        _g(6, 5, dtype=f, grad=False, seed=1), 0.1, 3, 0.1)),
        ("swav_backward_prototypes_only", tg.swapped_prediction_loss_backward_op,
         (torch.tensor(1.5), d(xv), d(xt), d(c), ds_v, ds_t, [False, False, True])),
    ]


@needs_triton
@pytest.mark.parametrize("case", [c[0] for c in _triton_cases()] if triton_device() else [])
def test_opcheck_triton_operators(case):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch with dynamic shapes)
    of every aahr::*_triton operator on the Triton interpreter (CPU) or a GPU."""
    name, op, args = next(c for c in _triton_cases() if c[0] == case)
    dev = triton_device()
    args = tuple(a.detach().to(dev).requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)
    torch.library.opcheck(op, args)


@needs_triton
def test_opcheck_triton_cases_cover_every_triton_operator():
    covered = {f"aahr::{op._name}" for _, op, _ in _triton_cases()}
    assert covered == _expected("triton", TRITON_OPS)


@needs_triton
def test_triton_backward_placeholders_and_values():
    """The backward operators return (0,) placeholders for gradients not asked for, and the asked-for ones equal
    the reference's gradients (the operators are not just shape-correct)."""
    cases = {c[0]: c for c in _triton_cases()}
    _, op, args = cases["xsim_backward_regions_only"]
    d_r, d_w = op(*args)
    assert d_r.shape == args[2].shape and d_w.shape == (0,)
    ga, gb, r, rl, w, wl = args[:6]
    r = r.clone().requires_grad_()
    t2i, i2t = ops.fragment_word_relevance(r, rl, w, wl, negative_slope=0.1, backend="reference")
    (ref,) = torch.autograd.grad((t2i * ga).sum() + (i2t * gb).sum(), [r])
    torch.testing.assert_close(d_r, ref, rtol=1e-4, atol=1e-5)
    _, op, args = cases["swav_backward_prototypes_only"]
    d_xv, d_xt, d_c = op(*args)
    assert d_xv.shape == (0,) and d_xt.shape == (0,) and d_c.shape == args[3].shape
    xv, xt, c = args[1], args[2], args[3].clone().requires_grad_()
    loss = ops.swapped_prediction_loss(xv, xt, c, eps=0.1, n_iters=3, tau=0.1, backend="reference")
    (ref,) = torch.autograd.grad(loss * 1.5, [c])
    torch.testing.assert_close(d_c, ref, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_public_ops_compile_with_inductor_and_call_the_operators(monkeypatch):
    """Inductor (the default backend) compiles a chain of triton ops (fullgraph); values and gradients equal eager,
    and the Dynamo graph calls the aahr::*_triton operators (under the interpreter Inductor keeps them as opaque
    calls; with compiled Triton AOTAutograd decomposes them into their kernels, tests/_triton_op_trace.py)."""
    seen = _inductor_chain_matches_eager("triton", triton_device())
    assert any("aahr.cross_similarity_triton" in s for s in seen), seen
    assert any("aahr.intra_relevance_triton" in s for s in seen), seen


def test_triton_op_decomposes_into_kernel_launches_without_a_gpu():
    """With Triton compiling kernels (interpreter off), every aahr::*_triton operator is a triton_op whose
    functional decomposition (what AOTAutograd hands Inductor) holds its Triton kernels as
    triton_kernel_wrapper_functional nodes and no aahr:: call, with the registered fake's output shapes/dtypes.
    Traced on fake tensors in a subprocess (nothing runs, no GPU needed)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_triton_op_trace.py")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == _expected("triton", TRITON_OPS)
    for qual, r in report.items():
        assert r["kind"] == "triton_op", (qual, r)
        assert r["aahr"] == 0, (qual, r)
        assert r["outputs"] == r["fake"], (qual, r)
        assert r["noted_kernels"] >= 3, (qual, r)  # the family's kernels + _utils' matmul kernels
        if qual != "aahr::topk_connection_triton":  # the top-k is a torch sort (no kernel)
            assert r["kernels"] >= 1, (qual, r)


def _meta(*shape, grad=True, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(grad)


def _cuda_cases():
    from aahr_fast.ops import _cuda_cross_similarity as cx, _cuda_prototypes as cp

    r, w = _meta(3, 5, 7), _meta(4, 6, 7)
    rl, wl = _meta(3, grad=False, dtype=torch.int64), _meta(4, grad=False, dtype=torch.int64)
    return [
        ("xsim_relevance", cx.cross_similarity_op, (r, rl, w, wl, "relevance", 0.1, 1e-8, 1.0),
         [(4, 3), (3, 4)]),
        ("xsim_hard_lse", cx.cross_similarity_op, (r, rl, w, wl, "hard_lse", 0.0, 1e-8, 0.1), [(3, 4), (0,)]),
        ("xsim_backward_words_only", cx.cross_similarity_backward_op,
         (_meta(4, 3, grad=False), _meta(3, 4, grad=False), r.detach(), rl, w.detach(), wl, "relevance", 0.1, 1e-8,
          1.0, [False, True]), [(0,), (4, 6, 7)]),
        ("sinkhorn", cp.sinkhorn_op, (_meta(6, 5, grad=False), 0.1, 3), [(6, 5)]),
        ("swav", cp.swapped_prediction_loss_op, (_meta(4, 5), _meta(4, 5), _meta(3, 5), None, None, 0.1, 3, 0.1),
         [(), (4, 3), (4, 3)]),
        ("swav_queues", cp.swapped_prediction_loss_op,
         (_meta(4, 5), _meta(4, 5), _meta(3, 5), _meta(7, 5, grad=False), _meta(6, 5, grad=False), 0.1, 3, 0.1),
         [(), (4, 3), (4, 3)]),
        ("swav_backward", cp.swapped_prediction_loss_backward_op,
         (_meta(grad=False), _meta(4, 5, grad=False), _meta(4, 5, grad=False), _meta(3, 5, grad=False),
          _meta(4, 3, grad=False), _meta(4, 3, grad=False), [True, False, True]), [(4, 5), (0,), (3, 5)]),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _cuda_cases()])
def test_cuda_operators_fakes_with_meta_tensors(case):
    """The aahr::*_cuda operators' fakes give the documented shapes, and opcheck (schema, fake tensor, autograd
    registration, AOT dispatch) passes on meta tensors: the CUDA kernels never run (they cannot here)."""
    _, op, args, shapes = next(c for c in _cuda_cases() if c[0] == case)
    out = op(*args)
    out = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in out] == shapes
    assert all(o.device.type == "meta" for o in out)
    torch.library.opcheck(op, args)


def test_cuda_operators_are_cuda_only_and_cover_every_cuda_operator():
    """device_types="cuda": a CPU call is refused by the dispatcher (NotImplementedError), not run."""
    assert {f"aahr::{c[1]._name}" for c in _cuda_cases()} == _expected("cuda", CUDA_OPS)
    from aahr_fast.ops import _cuda_prototypes as cp

    with pytest.raises(NotImplementedError):
        cp.sinkhorn_op(torch.randn(4, 3), 0.1, 3)

"""``python -m aahr_fast.gpucheck``: one prepared GPU check of every GPU backend, with a speed table.

On a CUDA machine, within a time budget (default 280 s):

1. starts building the C++/CUDA extension (:mod:`aahr_fast.ops._ext`, a child process) in the background;
2. checks every GPU backend (``triton`` for all ops; ``cuda`` for the cross similarity and prototype ops)
   against the plain-PyTorch reference, forward and backward, in float32 and bfloat16 (the reference
   runs in float32 on the same, rounded, inputs);
3. times forward and forward+backward of every op for ``reference``, ``torch.compile(reference)``,
   ``triton`` and ``cuda`` at the AAHR shapes (B=128, N=36, L=32, D=1024, K=384, 2B=256 nodes, 16 heads
   of 64) and at B=1024, with achieved TFLOP/s for the compute-bound ops (useful FLOPs: the forward's
   matmul FLOPs, x3 for forward+backward) and the peak extra CUDA memory;
4. runs the 1,000 images x 5,000 captions gallery cross similarity (inference, no grad) per backend with
   its peak extra memory (the reference with ``chunk_size`` so that it stays bounded too).

Everything is printed as tables and written as JSON with ``--out``. Sections that do not fit in the
remaining budget are recorded as skipped, never silently dropped. Exit status: 0 when every check
passed, 1 when a check failed, 2 when no CUDA device is visible (a clear message, nothing measured).

``--selftest-cpu`` runs the same code path on tiny CPU tensors under the Triton interpreter (used by
the test-suite to keep this script working on machines without a GPU); its timings are not measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

NO_CUDA_EXIT = 2


# ------------------------------------------------------------------------------------------ helpers
class Budget:
    """Wall-clock budget: ``left()`` seconds remain; ``allows(s)`` if at least s seconds remain."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, s: float) -> bool:
        return self.left() >= s


def _add_tflops(row: dict, flops: float | None) -> None:
    """Add achieved TFLOP/s to a speed row from its medians: forward ``flops``, forward+backward 3x that."""
    if not flops:
        return
    row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
    if "fwd_bwd_ms" in row:
        row["fwd_bwd_tflops"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12


def _mark_error(row: dict, exc: BaseException) -> None:
    """Record a failed measurement in its row (the check goes on with the next row)."""
    row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


_QUICK = False  # --selftest-cpu: one warm-up, two timed reps (the numbers are not measurements then)


def bench(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 20, max_s: float = 2.0) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU), at most ``max_s`` of reps."""
    import torch

    if _QUICK:
        warmup, reps, max_s = 1, 2, 0.0

    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    t_end = time.perf_counter() + max_s
    while len(times) < reps and (len(times) < min(3, reps) or time.perf_counter() < t_end):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before it, in MiB."""
    import torch

    if device != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _max_err(a, b) -> float:
    from aahr_fast.kernels._testing import max_abs_diff

    return max_abs_diff(a, b)


# ---------------------------------------------------------------------------------------- op cases
@dataclass
class OpCase:
    """One public op: how to build inputs at batch size B and call it, and its useful forward FLOPs."""

    name: str
    make: Callable  # (B, dtype, device, tiny) -> tuple of inputs
    call: Callable  # (*inputs, backend=...) -> outputs
    flops: Optional[Callable] = None  # (B, tiny) -> forward FLOPs (None = not compute-bound)
    cuda: bool = False  # has a "cuda" backend


def _shapes(tiny: bool) -> dict:
    if tiny:
        return dict(N=5, L=4, D=24, K=7, H=2, DH=16)
    return dict(N=36, L=32, D=1024, K=384, H=16, DH=64)


def _cases() -> list[OpCase]:
    import torch
    import torch.nn.functional as F

    from aahr_fast import ops

    def xs_inputs(B, dtype, device, tiny):
        s = _shapes(tiny)
        g = torch.Generator().manual_seed(B)
        r = torch.randn(B, s["N"], s["D"], generator=g).to(device, dtype)
        w = torch.randn(B, s["L"], s["D"], generator=g).to(device, dtype)
        rl = torch.randint(max(1, s["N"] // 2), s["N"] + 1, (B,), generator=g).to(device)
        wl = torch.randint(max(1, s["L"] // 3), s["L"] + 1, (B,), generator=g).to(device)
        return r, rl, w, wl

    def xs_flops(B, tiny):
        s = _shapes(tiny)
        return 2.0 * B * B * s["N"] * s["L"] * s["D"]

    def corr_inputs(B, dtype, device, tiny):
        s = _shapes(tiny)
        g = torch.Generator().manual_seed(B + 1)
        v = F.normalize(torch.randn(B, s["D"], generator=g), dim=-1).to(device, dtype)
        t = F.normalize(torch.randn(B, s["D"], generator=g), dim=-1).to(device, dtype)
        ri = torch.rand(B, B, generator=g).to(device, dtype)
        rt = torch.rand(B, B, generator=g).to(device, dtype)
        return v, t, ri, rt

    def gcn_inputs(B, dtype, device, tiny):
        s = _shapes(tiny)
        n, d = 2 * B, s["D"]
        g = torch.Generator().manual_seed(B + 2)
        adj = torch.rand(n, n, generator=g).to(device, dtype)
        x = torch.randn(n, d, generator=g).to(device, dtype)
        w = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device, dtype)
        b = torch.randn(d, generator=g).to(device, dtype)
        return adj, x, w, b

    def gcn_flops(B, tiny):
        n, d = 2 * B, _shapes(tiny)["D"]
        return 2.0 * n * d * d + 2.0 * n * n * d

    def attn_inputs(B, dtype, device, tiny):
        s = _shapes(tiny)
        n = 2 * B
        g = torch.Generator().manual_seed(B + 3)
        q, k, v = (torch.randn(s["H"], n, s["DH"], generator=g).to(device, dtype) for _ in range(3))
        bias = torch.rand(n, n, generator=g)
        bias = bias.masked_fill(torch.rand(n, n, generator=g) < 0.5, float("-inf")).to(device, dtype)
        return q, k, v, bias

    def attn_flops(B, tiny):
        s = _shapes(tiny)
        return 4.0 * s["H"] * (2 * B) ** 2 * s["DH"]

    def sk_inputs(B, dtype, device, tiny):
        g = torch.Generator().manual_seed(B + 4)
        return (torch.randn(B, _shapes(tiny)["K"], generator=g).to(device, dtype),)

    def swav_inputs(B, dtype, device, tiny):
        s = _shapes(tiny)
        g = torch.Generator().manual_seed(B + 5)
        xv = F.normalize(torch.randn(B, s["D"], generator=g), dim=-1).to(device, dtype)
        xt = F.normalize(torch.randn(B, s["D"], generator=g), dim=-1).to(device, dtype)
        c = F.normalize(torch.randn(s["K"], s["D"], generator=g), dim=-1).to(device, dtype)
        return xv, xt, c

    def swav_flops(B, tiny):
        s = _shapes(tiny)
        return 2.0 * 2 * B * s["K"] * s["D"]

    return [
        OpCase("fragment_word_relevance", xs_inputs,
               lambda r, rl, w, wl, backend: ops.fragment_word_relevance(r, rl, w, wl, backend=backend), xs_flops, True),
        OpCase("hard_assignment_similarity", xs_inputs,
               lambda r, rl, w, wl, backend: ops.hard_assignment_similarity(r, rl, w, wl, agg="lse", backend=backend),
               xs_flops, True),
        OpCase("instance_correlation", corr_inputs,
               lambda v, t, ri, rt, backend: tuple(ops.instance_correlation(v, t, ri, rt, lam=1.5, backend=backend))),
        OpCase("gcn_layer", gcn_inputs,
               lambda a, x, w, b, backend: ops.gcn_layer(a, x, w, b, 0.2, backend=backend), gcn_flops),
        OpCase("masked_attention", attn_inputs,
               lambda q, k, v, b, backend: ops.masked_attention(q, k, v, b, backend=backend), attn_flops),
        OpCase("sinkhorn", sk_inputs, lambda s, backend: ops.sinkhorn(s, 0.1, 3, backend=backend), None, True),
        OpCase("swapped_prediction_loss", swav_inputs,
               lambda xv, xt, c, backend: ops.swapped_prediction_loss(xv, xt, c, backend=backend), swav_flops, True),
    ]


# ------------------------------------------------------------------------------------------ sections
def _backend_ok(case: OpCase, backend: str, inputs) -> Optional[str]:
    """None when ``backend`` can run ``case`` on ``inputs``, else the reason."""
    from aahr_fast.ops import _dispatch

    try:
        _dispatch.resolve_backend(backend, *[x for x in inputs if hasattr(x, "device")], op=case.name)
    except Exception as exc:  # noqa: BLE001 - the reason goes into the report
        return f"{type(exc).__name__}: {exc}"
    return None


def check_correctness(cases, backends, dtypes, device, tiny, budget, report) -> bool:
    """Every (op, backend, dtype) vs the reference, forward and backward. Returns True when all pass."""
    import torch

    from aahr_fast.kernels._testing import run_backend

    all_ok = True
    B = 4 if tiny else 16
    for case in cases:
        for backend in backends:
            if backend == "cuda" and not case.cuda:
                continue
            for dtype in dtypes:
                row = dict(op=case.name, backend=backend, dtype=str(dtype).replace("torch.", ""), B=B)
                if not budget.allows(10):
                    row.update(status="skipped", reason="time budget")
                    report["checks"].append(row)
                    continue
                inputs = case.make(B, dtype, device, tiny)
                why = _backend_ok(case, backend, inputs)
                if why is not None:
                    row.update(status="unavailable", reason=why)
                    report["checks"].append(row)
                    continue
                try:
                    grad = case.name != "sinkhorn"
                    out_b, g_b = run_backend(case.call, inputs, backend, grad=grad)
                    ref_in = tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
                    out_r, g_r = run_backend(case.call, ref_in, "reference", grad=grad)
                    tol = 2e-4 if dtype == torch.float32 else 5e-2
                    scale_o = max([1.0] + [float(o.float().abs().nan_to_num(0, 0, 0).max()) for o in out_r
                                           if o.is_floating_point() and o.numel()])
                    err_o = max(_max_err(a.float() if a.is_floating_point() else a,
                                         b.float() if b.is_floating_point() else b) for a, b in zip(out_b, out_r))
                    err_g = 0.0
                    scale_g = 1.0
                    for a, b in zip(g_b, g_r):
                        if a is None or b is None:
                            if (a is None) != (b is None) and not (b is not None and float(b.abs().max()) == 0):
                                err_g = float("inf")
                            continue
                        scale_g = max(scale_g, float(b.float().abs().max()))
                        err_g = max(err_g, _max_err(a.float(), b.float()))
                    ok = err_o <= tol * scale_o and err_g <= tol * scale_g
                    row.update(status="pass" if ok else "FAIL", fwd_max_abs_err=err_o, grad_max_abs_err=err_g,
                               tol_rel=tol, fwd_scale=scale_o, grad_scale=scale_g)
                    all_ok &= ok
                except Exception as exc:  # noqa: BLE001
                    row.update(status="FAIL", reason=f"{type(exc).__name__}: {exc}",
                               trace=traceback.format_exc(limit=4))
                    all_ok = False
                report["checks"].append(row)
    return all_ok


def _fwd_bwd(case: OpCase, inputs, backend: str, call=None):
    """A closure running forward+backward once with fixed upstream weights (fresh grads each call)."""
    import torch

    from aahr_fast.kernels._testing import weights_like

    leaves = [x.detach().requires_grad_(True) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]
    fn = call or case.call
    outs0 = fn(*leaves, backend=backend)
    outs0 = [outs0] if torch.is_tensor(outs0) else [o for o in outs0 if torch.is_tensor(o)]
    weights = [weights_like(o, i).to(o.dtype) if o.is_floating_point() else None for i, o in enumerate(outs0)]

    def run():
        for x in leaves:
            if torch.is_tensor(x):
                x.grad = None
        outs = fn(*leaves, backend=backend)
        outs = [outs] if torch.is_tensor(outs) else [o for o in outs if torch.is_tensor(o)]
        total = None
        for o, w in zip(outs, weights):
            if w is None or not o.requires_grad:
                continue
            term = torch.where(torch.isfinite(o), o * w, torch.zeros((), device=o.device, dtype=o.dtype)).sum()
            total = term if total is None else total + term
        if total is not None:
            total.backward()
        return outs

    return run


def _compiled_reference(case: OpCase):
    """``torch.compile`` of the op's reference implementation, called like ``case.call(..., backend=)``."""
    import torch

    from aahr_fast.ops import _dispatch

    ref = _dispatch.get_impl(case.name, "reference")
    if case.name == "fragment_word_relevance":
        f = lambda r, rl, w, wl: ref(r, rl, w, wl)  # noqa: E731
    elif case.name == "hard_assignment_similarity":
        f = lambda r, rl, w, wl: ref(r, rl, w, wl, agg="lse")  # noqa: E731
    elif case.name == "instance_correlation":
        f = lambda v, t, ri, rt: tuple(ref(v, t, ri, rt, lam=1.5))  # noqa: E731
    elif case.name == "gcn_layer":
        f = lambda a, x, w, b: ref(a, x, w, b, 0.2)  # noqa: E731
    elif case.name == "sinkhorn":
        f = lambda s: ref(s, 0.1, 3)  # noqa: E731
    else:
        f = ref
    compiled = torch.compile(f, dynamic=False)
    return lambda *args, backend=None: compiled(*args)


def speed(cases, backends, B_list, device, tiny, budget, report, *, dtype, with_reference: bool = True) -> None:
    """Time forward and forward+backward of every (op, B, backend); TFLOP/s for compute-bound ops."""
    import torch

    for B in B_list:
        for case in cases:
            inputs = case.make(B, dtype, device, tiny)
            flops = case.flops(B, tiny) if case.flops else None
            names = (["reference"] if with_reference else []) + list(backends)
            for name in names:
                row = dict(op=case.name, B=B, backend=name, dtype=str(dtype).replace("torch.", ""))
                if not budget.allows(8):
                    row.update(status="skipped", reason="time budget")
                    report["speed"].append(row)
                    continue
                if name == "cuda" and not case.cuda:
                    continue
                if name != "reference":
                    why = _backend_ok(case, name, inputs)
                    if why is not None:
                        row.update(status="unavailable", reason=why)
                        report["speed"].append(row)
                        continue
                try:
                    def fwd():
                        with torch.no_grad():
                            return case.call(*inputs, backend=name)

                    row["fwd_ms"] = bench(fwd, device, max_s=1.5)
                    row["fwd_peak_extra_mb"] = peak_extra_mb(fwd, device)
                    if case.name != "sinkhorn":
                        run = _fwd_bwd(case, inputs, name)
                        row["fwd_bwd_ms"] = bench(run, device, max_s=2.0)
                        row["fwd_bwd_peak_extra_mb"] = peak_extra_mb(run, device)
                    _add_tflops(row, flops)
                    row["status"] = "ok"
                except Exception as exc:  # noqa: BLE001
                    _mark_error(row, exc)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                report["speed"].append(row)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()


def gallery(backends, device, tiny, budget, report, dtype) -> None:
    """1,000 images x 5,000 captions (inference) per backend: time and peak extra memory."""
    import torch

    from aahr_fast import ops

    s = _shapes(tiny)
    n_img, n_cap = (12, 50) if tiny else (1000, 5000)
    g = torch.Generator().manual_seed(7)
    regions = torch.randn(n_img, s["N"], s["D"], generator=g).to(device, dtype)
    words = torch.randn(n_cap, s["L"], s["D"], generator=g).to(device, dtype)
    rl = torch.full((n_img,), s["N"], device=device)
    wl = torch.randint(max(1, s["L"] // 3), s["L"] + 1, (n_cap,), generator=g).to(device)
    flops = 2.0 * n_img * n_cap * s["N"] * s["L"] * s["D"]
    input_mb = (regions.numel() + words.numel()) * regions.element_size() / 2**20
    for name in ["reference"] + list(backends):
        row = dict(images=n_img, captions=n_cap, backend=name, dtype=str(dtype).replace("torch.", ""),
                   input_mb=input_mb, output_mb=2 * n_img * n_cap * 4 / 2**20)
        if not budget.allows(15):
            row.update(status="skipped", reason="time budget")
            report["gallery"].append(row)
            continue
        chunk = 8 if name == "reference" else None
        row["chunk_size"] = chunk
        try:
            if name != "reference":
                why = _backend_ok(OpCase("fragment_word_relevance", None, None), name, (regions, words))
                if why is not None:
                    row.update(status="unavailable", reason=why)
                    report["gallery"].append(row)
                    continue

            def fwd():
                with torch.no_grad():
                    return ops.fragment_word_relevance(regions, rl, words, wl, chunk_size=chunk, backend=name)

            row["peak_extra_mb"] = peak_extra_mb(fwd, device)
            row["ms"] = bench(fwd, device, warmup=1, reps=5, max_s=3.0)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            _mark_error(row, exc)
            if device == "cuda":
                torch.cuda.empty_cache()
        report["gallery"].append(row)

_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@contextlib.contextmanager
def no_sync_guard(device: str):
    """Fail on host synchronisation inside the block.

    CUDA: ``torch.cuda.set_sync_debug_mode("error")`` (every synchronising CUDA call raises), restored afterwards.
    CPU (the self-test; CPU has no stream to synchronise): the ``torch.Tensor`` methods that read values on the
    host are patched to record their caller; yields the list of those reads (the caller asserts it is empty).
    """
    import torch

    reads: list[str] = []
    if device == "cuda":
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield reads
        finally:
            torch.cuda.set_sync_debug_mode(old)
        return
    saved = {n: getattr(torch.Tensor, n) for n in _HOST_READS}

    def wrap(name, orig):
        def f(self, *a, **k):
            reads.append(f"{name} at {traceback.format_stack(limit=3)[0].strip()}")
            return orig(self, *a, **k)
        return f

    try:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, wrap(n, orig))
        yield reads
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)


def compiled_step_check(device: str, tiny: bool, report: dict, *, compile_backend: str = "inductor") -> bool:
    """One AAHR training step (small flickr8k_cpu-style model, every loss term on) with the loss compiled by
    ``torch.compile`` and run, forward and backward, under :func:`no_sync_guard`. Records
    ``report["compiled_step"]`` = {status, graph_breaks, host_reads / reason, loss}; returns True when it ran
    without a synchronisation.

    On CUDA the loss compiles with ``fullgraph=False``, so a graph break is counted and reported, not fatal: the
    Triton / CUDA backends are registered operators now (``aahr::<op>_triton`` / ``_cuda``), so 0 breaks are
    expected there, but that has only been checked on CPU (interpreter / fake tensors), not yet on a GPU.
    """
    import dataclasses

    import torch

    from aahr_fast.config import load_config
    from aahr_fast.models import build_model
    from aahr_fast.ops import value_checks

    dims = dict(region_dim=64, img_global_dim=32, token_dim=48, txt_global_dim=24)
    cfg = load_config("flickr8k_cpu").model
    cfg = dataclasses.replace(cfg, embed_dim=32 if tiny else 256, dropout=0.0, num_prototypes=16, queue_size=32,
                              proto_start=0, graph_start=0, moco_start=0).validate()
    b = 8 if tiny else 128
    g = torch.Generator().manual_seed(0)
    batch = dict(regions=torch.randn(b, 7, 64, generator=g), region_lens=torch.full((b,), 7),
                 img_global=torch.randn(b, 32, generator=g), tokens=torch.randn(b, 9, 48, generator=g),
                 token_lens=torch.randint(1, 10, (b,), generator=g), txt_global=torch.randn(b, 24, generator=g),
                 img_index=torch.arange(b), cap_index=torch.arange(b))
    batch = {k: v.to(device) for k, v in batch.items()}
    row: dict = dict(device=device, batch=b, embed_dim=cfg.embed_dim, compile_backend=compile_backend)
    report["compiled_step"] = row
    try:
        model = build_model(cfg, dims).to(device).train()
        for q in (model.queue_v, model.queue_t):
            q.count.fill_(q.size)
        fn = lambda bt: model.training_losses(bt, 1, None)  # noqa: E731
        model.prepare_step()
        explained = torch._dynamo.explain(fn)(batch)
        row["graph_breaks"] = int(explained.graph_break_count)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=(device != "cuda"), backend=compile_backend)
        with value_checks(False):
            compiled(batch)["loss"].backward()  # compilation and first run, outside the guard
            model.zero_grad(set_to_none=True)
            model.prepare_step()
            with no_sync_guard(device) as reads:
                out = compiled(batch)
                out["loss"].backward()
        row["host_reads"] = reads
        row["loss"] = float(out["loss"].detach())
        row["status"] = "ok" if not reads else "host reads"
        return not reads
    except Exception as exc:  # noqa: BLE001  (a sync under the CUDA guard raises RuntimeError)
        _mark_error(row, exc)
        return False



# ------------------------------------------------------------------------------------------ output
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_tables(report: dict, out=sys.stdout) -> None:
    """Human-readable tables of a report (checks, speed, gallery)."""
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\n== device: {report['device']}  torch {report['torch']}  triton {report.get('triton')}")
    ext = report.get("cuda_ext", {})
    p(f"== CUDA extension: {ext.get('status')} ({_fmt(ext.get('seconds'))} s) {ext.get('error', '') or ''}".rstrip())
    p("\n== correctness vs reference (max abs error; tolerance = tol_rel x scale)")
    p(f"{'op':28s} {'backend':8s} {'dtype':9s} {'status':11s} {'fwd err':>10s} {'grad err':>10s}  note")
    for r in report["checks"]:
        p(f"{r['op']:28s} {r['backend']:8s} {r['dtype']:9s} {r['status']:11s} {_fmt(r.get('fwd_max_abs_err')):>10s} "
          f"{_fmt(r.get('grad_max_abs_err')):>10s}  {(r.get('reason') or '')[:90]}")
    p("\n== speed (median ms; TFLOP/s = useful matmul FLOPs, fwd+bwd counted as 3x fwd; peak extra MiB)")
    p(f"{'op':28s} {'B':>5s} {'backend':14s} {'fwd ms':>9s} {'TF/s':>7s} {'f+b ms':>9s} {'TF/s':>7s} "
      f"{'peak MiB':>9s}  note")
    for r in report["speed"]:
        p(f"{r['op']:28s} {r['B']:5d} {r['backend']:14s} {_fmt(r.get('fwd_ms')):>9s} {_fmt(r.get('fwd_tflops')):>7s} "
          f"{_fmt(r.get('fwd_bwd_ms')):>9s} {_fmt(r.get('fwd_bwd_tflops')):>7s} "
          f"{_fmt(r.get('fwd_bwd_peak_extra_mb', r.get('fwd_peak_extra_mb'))):>9s}  "
          f"{(r.get('reason') or r.get('status', ''))[:70]}")
    p("\n== gallery cross similarity (inference)")
    for r in report["gallery"]:
        p(f"{r['images']}x{r['captions']} {r['backend']:10s} {r['dtype']:9s} {_fmt(r.get('ms')):>9s} ms "
          f"{_fmt(r.get('tflops')):>7s} TF/s  peak extra {_fmt(r.get('peak_extra_mb'))} MiB "
          f"(inputs {_fmt(r['input_mb'])} MiB, outputs {_fmt(r['output_mb'])} MiB)  {(r.get('reason') or '')[:80]}")
    cs = report.get("compiled_step")
    if cs:
        p("\n== compiled AAHR training step under the no-sync guard (torch.cuda.set_sync_debug_mode('error'))")
        p(f"{cs.get('device')} B={cs.get('batch')} D={cs.get('embed_dim')} {cs.get('compile_backend')}: "
          f"{cs.get('status')}, graph breaks {cs.get('graph_breaks')}, host reads {len(cs.get('host_reads') or [])} "
          f"{(cs.get('reason') or '')[:120]}")
    p(f"\n== total {report.get('total_s', 0):.1f} s; skipped sections: "
      f"{sum(1 for k in ('checks', 'speed', 'gallery') for r in report[k] if r.get('status') == 'skipped')}")


# -------------------------------------------------------------------------------------------- main
def _start_extension_build(report: dict) -> threading.Thread:
    """Build/load the C++/CUDA extension in a background thread (the compiler runs in a child process)."""
    def work():
        t0 = time.perf_counter()
        try:
            from aahr_fast.ops import _ext

            err = _ext.extension_error(cuda=True)
            report["cuda_ext"] = dict(status="built" if err is None else "unavailable", error=err)
        except Exception as exc:  # noqa: BLE001
            report["cuda_ext"] = dict(status="error", error=f"{type(exc).__name__}: {exc}")
        report["cuda_ext"]["seconds"] = round(time.perf_counter() - t0, 1)

    th = threading.Thread(target=work, name="aahr-ext-build", daemon=True)
    th.start()
    return th


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aahr_fast.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the report as JSON to this file")
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget in seconds (default 280)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows")
    ap.add_argument("--no-cuda-ext", action="store_true", help="do not build/check the CUDA extension")
    ap.add_argument("--sizes", default="128,1024", help="batch sizes of the speed table (default 128,1024)")
    ap.add_argument("--selftest-cpu", action="store_true",
                    help="tiny CPU run under the Triton interpreter (tests this script; not a measurement)")
    args = ap.parse_args(argv)

    if args.selftest_cpu:
        global _QUICK
        _QUICK = True
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.selftest_cpu and not torch.cuda.is_available():
        print(
            "aahr_fast.gpucheck: no CUDA device is visible (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}). This check needs a machine with an "
            "NVIDIA GPU and a CUDA build of torch; nothing was measured. See docs/GPU.md.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT

    budget = Budget(args.budget_s)
    device = "cpu" if args.selftest_cpu else "cuda"
    tiny = args.selftest_cpu
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    report: dict = dict(
        device=(torch.cuda.get_device_name(0) if device == "cuda" else f"CPU (selftest, {platform.processor()})"),
        selftest=bool(args.selftest_cpu), torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
        budget_s=args.budget_s, checks=[], speed=[], gallery=[], cuda_ext={"status": "not requested"},
        notes="TFLOP/s count useful matmul FLOPs (forward; forward+backward = 3x forward). Peak memory is the "
              "CUDA allocator's peak above the memory allocated before the call.",
    )
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks and timings use exact-fp32 products
    use_cuda_ext = device == "cuda" and not args.no_cuda_ext
    build = _start_extension_build(report) if use_cuda_ext else None

    cases = _cases()
    dtypes = [torch.float32] if tiny else [torch.float32, torch.bfloat16]
    ok = check_correctness(cases, ["triton"], dtypes, device, tiny, budget, report)
    sizes = [4] if tiny else [int(s) for s in args.sizes.split(",") if s]
    bf16 = torch.float32 if tiny else torch.bfloat16
    # AAHR shapes first (triton vs reference), then the gallery, then the CUDA backend once built
    speed(cases, ["triton"], sizes[:1], device, tiny, budget, report, dtype=bf16)
    gallery(["triton"], device, tiny, budget, report, bf16)
    if build is not None:
        build.join(timeout=max(1.0, budget.left() - 60))
        if build.is_alive():
            report["cuda_ext"] = dict(status="skipped", error="still building when the time budget ran low")
        elif report["cuda_ext"].get("status") == "built":
            ok &= check_correctness(cases, ["cuda"], dtypes, device, tiny, budget, report)
            speed(cases, ["cuda"], sizes[:1], device, tiny, budget, report, dtype=bf16, with_reference=False)
            gallery(["cuda"], device, tiny, budget, report, bf16)
    backends_big = ["triton"] + (["cuda"] if report["cuda_ext"].get("status") == "built" else [])
    speed(cases, backends_big, sizes[1:], device, tiny, budget, report, dtype=bf16)
    if not args.no_compile:
        speed_compile_only(cases, sizes[:1], device, tiny, budget, report, bf16)
        ok &= compiled_step_check(device, tiny, report, compile_backend="aot_eager" if tiny else "inductor")
    report["total_s"] = round(budget.seconds - budget.left(), 1)
    report["all_checks_passed"] = bool(ok)
    print_tables(report)
    if args.out:
        from aahr_fast.utils.io import atomic_save_json

        atomic_save_json(json.loads(json.dumps(report, default=str)), args.out)
        print(f"wrote {args.out}")
    return 0 if ok else 1


def speed_compile_only(cases, B_list, device, tiny, budget, report, dtype) -> None:
    """torch.compile(reference) rows (compile time dominates: run last, within what is left of the budget)."""
    import torch

    for B in B_list:
        for case in cases:
            row = dict(op=case.name, B=B, backend="torch.compile", dtype=str(dtype).replace("torch.", ""))
            if not budget.allows(45):
                row.update(status="skipped", reason="time budget (compile takes tens of seconds per op)")
                report["speed"].append(row)
                continue
            inputs = case.make(B, dtype, device, tiny)
            flops = case.flops(B, tiny) if case.flops else None
            try:
                t0 = time.perf_counter()
                call = _compiled_reference(case)

                def fwd():
                    with torch.no_grad():
                        return call(*inputs)

                fwd()
                _sync(device)
                row["compile_s_fwd"] = round(time.perf_counter() - t0, 2)
                row["fwd_ms"] = bench(fwd, device, max_s=1.0)
                if case.name != "sinkhorn" and budget.allows(30):
                    run = _fwd_bwd(case, inputs, None, call=call)
                    row["fwd_bwd_ms"] = bench(run, device, max_s=1.5)
                    row["fwd_bwd_peak_extra_mb"] = peak_extra_mb(run, device)
                _add_tflops(row, flops)
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001
                _mark_error(row, exc)
            report["speed"].append(row)


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the Triton kernels: launch policy, dot precision, and a strided matmul.

Everything here is written against the Triton >= 3.6 language (``tl.dot(..., input_precision=)``,
``tl.reshape``, ``tl.atomic_add``); nothing newer is used. The same kernels run

* on CUDA tensors, compiled by Triton for the GPU, and
* on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` in the environment *before*
  this module is imported), which is how the test-suite checks them on machines without a GPU.

Interpreter facts that shape the code (see ``shared/docs/toolchain.md``): bf16 ``tl.dot`` returns
garbage there, so bf16 operands are up-cast to fp32 before every dot when interpreting; every load
and store is masked, because out-of-bounds accesses are not detected; the interpreter's cost grows
with the number of programs, so the launch helpers pick large blocks when interpreting.

Index arithmetic: every row/column index is widened to int64 *before* it is multiplied by a stride,
so offsets stay exact for tensors with more than 2**31 elements (e.g. a COCO-5K gallery of 25,000
captions x 32 tokens x 1024 dims is 8.2e8 elements; with batch offsets products exceed int32).
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

__all__ = [
    "interpreting",
    "next_pow2",
    "dot_config",
    "num_sms",
    "matmul",
    "leaky_relu_backward_colsum",
    "check_triton_tensor",
    "launch",
    "unused_arg",
    "traced_launches",
]

_LAUNCH_STATE = threading.local()


@contextlib.contextmanager
def traced_launches():
    """Inside this block :func:`launch` hands kernels to ``torch.library.wrap_triton``.

    The bodies of the ``aahr::*_triton`` operators (:mod:`aahr_fast.ops._triton_glue`) run inside it, so when
    ``torch.compile`` decomposes such a ``torch.library.triton_op`` the launches are recorded as
    ``triton_kernel_wrapper_*`` graph nodes that Inductor compiles. Outside it (launchers called directly:
    kernel tests, :mod:`._aot` capture, benchmarks) kernels launch as plain ``kernel[grid](...)``.
    """
    prev = getattr(_LAUNCH_STATE, "on", False)
    _LAUNCH_STATE.on = True
    try:
        yield
    finally:
        _LAUNCH_STATE.on = prev


def unused_arg(like: torch.Tensor) -> torch.Tensor:
    """A fresh (1, 1) tensor (``like``'s dtype / device) for a pointer argument the kernel does not touch.

    Used where a constexpr switches an input off (no bias, no second output, ...). Not an alias of a buffer the
    kernel writes: when ``torch.compile`` captures a launch (``wrap_triton``) and cannot analyse which arguments
    the kernel stores to, it treats every tensor argument as written, and an output also passed as the dummy
    could then be replaced by the untouched copy.
    """
    return torch.empty((1, 1), device=like.device, dtype=like.dtype)


def launch(kernel):
    """The launch handle of a ``@triton.jit`` kernel: use as ``launch(kernel)[grid](*args, **meta)``.

    Returns ``torch.library.wrap_triton(kernel)`` inside :func:`traced_launches` (which itself returns the
    raw kernel in eager mode, where ``triton_op`` disables wrapping, and for interpreter kernels under
    ``TRITON_INTERPRET=1``), else ``kernel`` unchanged. Same arguments and semantics either way.
    """
    if getattr(_LAUNCH_STATE, "on", False):
        wrap = getattr(torch.library, "wrap_triton", None)
        if wrap is not None:
            return wrap(kernel)
    return kernel


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (Triton block extents must be powers of two)."""
    return max(int(minimum), triton.next_power_of_2(max(int(n), 1)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (used to size split-K style grids); 1 on CPU."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_config(*dtypes: torch.dtype) -> tuple[bool, str]:
    """Decide how ``tl.dot`` treats operands of the given storage dtypes.

    Returns:
        ``(fp32_dot, precision)``: ``fp32_dot`` is True when the operands are cast to fp32 before the
        dot (fp32 inputs, mixed dtypes, or bf16 under the interpreter, where bf16 dots are broken);
        ``precision`` is the ``input_precision`` of fp32 dots: ``"tf32"`` only when
        ``torch.backends.cuda.matmul.allow_tf32`` is set (mirroring torch's own matmul policy,
        ~1e-3 relative error); otherwise ``"tf32x3"`` on GPU (three TF32 tensor-core products,
        ~fp32 accuracy; plain ``"ieee"`` would fall back to CUDA-core FMAs, several times slower and
        register-hungry) and ``"ieee"`` under the interpreter (exact fp32).
    Accumulation is always fp32.
    """
    dts = set(dtypes)
    fp32_dot = (
        torch.float32 in dts
        or torch.float64 in dts
        or len(dts) > 1
        or (interpreting() and torch.bfloat16 in dts)
    )
    if interpreting():
        return fp32_dot, "ieee"
    return fp32_dot, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3")


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_tensor(name: str, t: torch.Tensor, ndim: int) -> None:
    """Validate a floating input of a Triton op.

    Raises:
        ValueError: wrong rank, unsupported dtype (fp32/fp16/bf16 only), or a CPU tensor while the
            Triton interpreter is off (a CPU launch would fail deep inside Triton with
            ``0 active drivers``).
    """
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED:
        raise ValueError(f"{name}: Triton backend supports float32/float16/bfloat16, got {t.dtype}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: the Triton backend needs CUDA tensors (got {t.device}); CPU tensors only run "
            "under the Triton interpreter (TRITON_INTERPRET=1 set before importing aahr_fast.kernels)"
        )


@triton.jit
def fdot(a, b, acc, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; operands up-cast to fp32 when FP32_DOT."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    slope,
    HAS_BIAS: tl.constexpr, LEAKY: tl.constexpr, ACCUMULATE: tl.constexpr,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # int64 scalar block bases (large products), int32 offsets inside the tile (cheap registers)
    m0 = tl.program_id(0).to(tl.int64) * BM
    n0 = tl.program_id(1).to(tl.int64) * BN
    im = tl.arange(0, BM)
    jn = tl.arange(0, BN)
    kk = tl.arange(0, BK)
    mm = (m0 + im) < M
    mn = (n0 + jn) < N
    a_blk = a_ptr + m0 * s_am
    b_blk = b_ptr + n0 * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk = (k0 + kk) < K
        k64 = m0 * 0 + k0  # int64 (loop counters are int32 on GPU)
        a = tl.load(a_blk + k64 * s_ak + im[:, None] * s_am + kk[None, :] * s_ak, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_blk + k64 * s_bk + kk[:, None] * s_bk + jn[None, :] * s_bn, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = fdot(a, b, acc, FP32_DOT, PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n0 + jn, mask=mn, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if LEAKY:
        acc = tl.where(acc > 0, acc, acc * slope)
    c_ptrs = c_ptr + m0 * s_cm + n0 * s_cn + im[:, None] * s_cm + jn[None, :] * s_cn
    cmask = mm[:, None] & mn[None, :]
    if ACCUMULATE:
        acc = acc + tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def _mm_blocks(M: int, N: int, K: int, fp32_dot: bool) -> tuple[int, int, int, int]:
    if interpreting():
        return next_pow2(M, 16) if M <= 128 else 128, next_pow2(N, 16) if N <= 128 else 128, 128 if K > 64 else next_pow2(K, 16), 4
    # 64x64x32 tiles: no register spills on sm_80/sm_90 (ptxas via kernels/_aot.py); the 3-pass
    # tf32x3 product of fp32 operands needs 8 warps to stay spill-free
    return 64, 64, 32, 8 if fp32_dot else 4


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    leaky_slope: float | None = None,
    accumulate: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Strided matmul ``out (M,N) [+]= act(a (M,K) @ b (K,N) + bias (N,))`` in one Triton kernel.

    Any strides (transposed views are free), fp32/fp16/bf16 operands, fp32 accumulation, int64 offsets.
    Epilogue: optional bias add and LeakyReLU (``leaky_slope``), or accumulation into ``out``.
    Used by the GCN layer (``act(A (X W) + b)``) and the prototype-loss backward.

    Args:
        a, b: 2-D tensors on the same device.
        out: optional preallocated (M,N) output (required when ``accumulate``).
        bias: optional (N,) bias.
        leaky_slope: LeakyReLU negative slope applied after the bias; None = identity.
        accumulate: add into ``out`` instead of overwriting it.
        out_dtype: dtype of a fresh output (default: ``a.dtype``).
    Returns:
        The (M,N) output tensor.
    Raises:
        ValueError: shape mismatch, or ``accumulate`` without ``out``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: incompatible shapes {tuple(a.shape)} @ {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out=")
        out = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    elif tuple(out.shape) != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
            if bias is not None:
                out += bias
            if leaky_slope is not None:
                out.copy_(torch.nn.functional.leaky_relu(out, leaky_slope))
        return out
    fp32_dot, prec = dot_config(a.dtype, b.dtype)
    bm, bn, bk, warps = _mm_blocks(M, N, K, fp32_dot)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    launch(_mm_kernel)[grid](
        a, b, out, bias if bias is not None else unused_arg(out),
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        float(leaky_slope or 0.0),
        HAS_BIAS=bias is not None, LEAKY=leaky_slope is not None, ACCUMULATE=accumulate,
        FP32_DOT=fp32_dot, PREC=prec, BM=bm, BN=bn, BK=bk, num_warps=warps,
    )
    return out


@triton.jit
def _leaky_bwd_colsum_kernel(
    g_ptr, y_ptr, dpre_ptr, dbias_ptr,
    M, N,
    s_gm, s_gn, s_ym, s_yn,
    slope,
    HAS_DBIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    n0 = tl.program_id(0).to(tl.int64) * BN
    jn = tl.arange(0, BN)
    im = tl.arange(0, BM)
    mn = (n0 + jn) < N
    colsum = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(0, M, BM):
        base = n0 * 0 + m0  # int64 (loop counters are int32 on GPU)
        msk = ((m0 + im) < M)[:, None] & mn[None, :]
        g = tl.load(g_ptr + base * s_gm + n0 * s_gn + im[:, None] * s_gm + jn[None, :] * s_gn, mask=msk, other=0.0)
        y = tl.load(y_ptr + base * s_ym + n0 * s_yn + im[:, None] * s_ym + jn[None, :] * s_yn, mask=msk, other=0.0)
        g = g.to(tl.float32)
        d = tl.where(y.to(tl.float32) > 0, g, g * slope)
        tl.store(dpre_ptr + base * N + n0 + im[:, None] * N + jn[None, :], d, mask=msk)
        colsum += tl.sum(d, axis=0)
    if HAS_DBIAS:
        tl.store(dbias_ptr + n0 + jn, colsum, mask=mn)


def leaky_relu_backward_colsum(
    grad_out: torch.Tensor, out: torch.Tensor, slope: float, want_colsum: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused LeakyReLU backward + bias gradient: ``dpre = g * (y > 0 ? 1 : slope)``, ``db = dpre.sum(0)``.

    ``y`` is the LeakyReLU *output* (its sign equals the pre-activation's for slope > 0, so the
    pre-activation need not be saved). Shapes (M,N); returns fp32 ``dpre`` (contiguous) and fp32 ``db`` (N,).
    """
    M, N = grad_out.shape
    dpre = torch.empty((M, N), device=grad_out.device, dtype=torch.float32)
    db = torch.empty((N,), device=grad_out.device, dtype=torch.float32) if want_colsum else None
    if M == 0 or N == 0:
        if db is not None:
            db.zero_()
        return dpre, db
    bn = 128
    bm = 128 if interpreting() else 16  # 16x128 x 4 warps: ~96 registers, no spills (sm_90)
    launch(_leaky_bwd_colsum_kernel)[(triton.cdiv(N, bn),)](
        grad_out, out, dpre, db if db is not None else unused_arg(dpre),
        M, N, grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1),
        float(slope), HAS_DBIAS=want_colsum, BM=bm, BN=bn,
    )
    return dpre, db

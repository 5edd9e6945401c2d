"""Ahead-of-time GPU compilation check of the Triton kernels, runnable on a machine without a GPU.

Triton can compile a ``@triton.jit`` function for an explicit target (``GPUTarget("cuda", 90, 32)``)
without a driver: front end -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (with the ``ptxas`` shipped in
the triton wheel). That catches everything the CPU interpreter cannot: type/layout errors of the GPU
lowering, unsupported ops, bf16 dots, register-allocation failures in ``ptxas``.

How: the real host launchers (``kernels/*.py``) are called on small CPU tensors while
``JITFunction.run`` is replaced by a recorder (:func:`capture_launches`), so every launch is captured
with its exact argument types and constexprs. Each captured launch is then compiled for each
requested architecture (:func:`compile_launch`). Must run with ``TRITON_INTERPRET`` unset or ``0``
(under the interpreter ``triton.jit`` returns interpreter objects, not compilable ``JITFunction``s).

CLI (used by ``tests/test_triton_compile.py``)::

    python -m aahr_fast.kernels._aot --arch 80,90 [--dtypes float32,float16,bfloat16] [--jobs 2] [--only NAMES]

prints one line per (kernel variant, arch) with the cubin's registers and spill stack (from the
``cuobjdump`` shipped with triton) and exits 1 if any compile fails.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its bound arguments, and launch options."""

    fn: Any
    args: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    call_args: tuple = ()
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> tuple:
        """Identity of the compiled variant (argument types + constexpr values + options)."""
        sig, const = signature_of(self)
        return (self.name, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
                tuple(sorted(self.options.items())))


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of running.

    Raises:
        RuntimeError: if the Triton interpreter is on (nothing to compile then).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT capture needs TRITON_INTERPRET unset/0 before importing the kernels")
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        opts = {}
        for k, v in kwargs.items():
            if k in names:
                bound[k] = v
            elif k in _LAUNCH_OPTIONS:
                opts[k] = v
        for p in self.params:
            if p.name not in bound:
                default = getattr(getattr(p, "_param", None), "default", inspect.Parameter.empty)
                if default is inspect.Parameter.empty:
                    raise TypeError(f"{self.__name__}: argument {p.name!r} missing in captured launch")
                bound[p.name] = default
        launches.append(Launch(self, bound, opts, tuple(args), dict(kwargs)))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _scalar_type(v: Any) -> str:
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {v!r}")


def signature_of(launch: Launch) -> tuple[dict[str, str], dict[str, Any]]:
    """Triton ``ASTSource`` signature and constexprs of a captured launch."""
    sig: dict[str, str] = {}
    const: dict[str, Any] = {}
    for p in launch.fn.params:
        v = launch.args[p.name]
        if p.is_constexpr or v is None:
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TORCH_TO_TRITON[v.dtype]
        else:
            sig[p.name] = _scalar_type(v)
    return sig, const


def compile_launch(launch: Launch, cc: int):
    """Compile a captured launch for ``sm_<cc>`` and return Triton's compiled kernel (has ``.asm``).

    Uses Triton's own argument binder for the target's backend when available (so integer arguments
    equal to 1 become constants and 16-divisible sizes / 16-aligned pointers get the same
    ``tt.divisibility`` hints as a real launch, i.e. the same vectorisation and register use);
    otherwise (other Triton versions) a plain signature without specialisation.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", cc, 32)
    if launch.call_args or launch.call_kwargs:
        try:
            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            backend = make_backend(target)
            fn = launch.fn
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = binder(*launch.call_args, **launch.call_kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, dict(launch.call_kwargs), bound_args, specialization, options
            )
            src = ASTSource(fn, signature, constexprs, attrs)
            return triton.compile(src, target=target, options=options.__dict__)
        except (ImportError, AttributeError, TypeError):
            pass
    sig, const = signature_of(launch)
    src = ASTSource(fn=launch.fn, signature=sig, constexprs=const)
    return triton.compile(src, target=target, options=dict(launch.options))


def _exercise_all(dtype: torch.dtype) -> None:
    """Call every host launcher once on small CPU tensors of ``dtype`` (launches are captured)."""
    from . import correlation, cross_similarity, message_passing, prototypes

    for mod in (cross_similarity, correlation, message_passing, prototypes):
        fn: Callable[[torch.dtype], None] | None = getattr(mod, "_aot_exercise", None)
        if fn is None:
            raise RuntimeError(f"{mod.__name__} has no _aot_exercise(dtype)")
        fn(dtype)


def collect(dtypes: list[torch.dtype]) -> list[Launch]:
    """All distinct kernel variants the launchers produce for the given input dtypes."""
    seen: dict[tuple, Launch] = {}
    with capture_launches() as launches:
        for dt in dtypes:
            _exercise_all(dt)
    for la in launches:
        seen.setdefault(la.key(), la)
    return list(seen.values())


def resource_usage(cubin: bytes) -> str:
    """``"REG:n STACK:m"`` of a cubin from the ``cuobjdump`` shipped with triton ("" when unavailable).

    STACK > 0 means register spills to local memory (slower, not an error).
    """
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    for line in out.splitlines():
        if "REG:" in line:
            parts = line.split()
            return " ".join(p for p in parts if p.startswith(("REG:", "STACK:")))
    return ""


def _compile_one(job: tuple[int, int]) -> tuple[str, int, bool, str, float]:
    idx, cc = job
    la = _JOBS[idx]
    t = time.time()
    desc = f"{la.name}[{_short(la)}]"
    try:
        k = compile_launch(la, cc)
        cubin = k.asm.get("cubin", b"")
        ok = bool(cubin)
        msg = f"cubin {len(cubin)} B, smem {k.metadata.shared} B, {resource_usage(cubin) or 'resources n/a'}"
    except Exception as exc:  # noqa: BLE001 - reported per kernel
        ok = False
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1][:400]
    return desc, cc, ok, msg, time.time() - t


def _short(la: Launch) -> str:
    sig, const = signature_of(la)
    ptr_types = sorted({v for v in sig.values() if v.startswith("*fp") or v.startswith("*bf")})
    consts = ",".join(f"{k}={v}" for k, v in const.items() if isinstance(v, (bool, int, str)) and k.isupper())
    return "/".join(ptr_types) + (";" + consts if consts else "")


_JOBS: list[Launch] = []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, e.g. 80,90")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--only", default="", help="comma-separated kernel names to compile (default: all)")
    args = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    archs = [int(a) for a in args.arch.split(",") if a]
    only = {n for n in args.only.split(",") if n}
    global _JOBS
    _JOBS = [la for la in collect(dtypes) if not only or la.name in only]
    if not _JOBS:
        print(f"no kernel launches matched --only={args.only!r}")
        return 1
    jobs = [(i, cc) for i in range(len(_JOBS)) for cc in archs]
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_one, jobs)
    else:
        results = [_compile_one(j) for j in jobs]
    failed = 0
    for desc, cc, ok, msg, dt in results:
        failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} sm_{cc} {desc}: {msg} ({dt:.1f} s)")
    print(f"{len(results) - failed}/{len(results)} kernel variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

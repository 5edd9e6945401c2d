"""Compile checks of the CUDA sources (nothing CUDA can run on these machines).

* every ``csrc/cuda/*.cu`` with ``nvcc -c -arch=sm_80`` and ``-arch=sm_90``, warnings as errors
  (``--Werror all-warnings``, host ``-Wall -Wextra -Werror``, ptxas ``--warn-on-spills``): any error
  or warning (register spills included) fails;
* the torch binding ``csrc/cuda/*_binding.cpp`` with the host compiler (``-fsyntax-only``, warnings as
  errors for our code) against torch's headers. The CPU torch wheel ships the c10/cuda headers but not
  the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is generated for the check.

All compiles run concurrently in one module fixture (15-35 s of wall time on 2 shared cores, hence
``slow``: still run by ``make test`` and CI).
Skipped with the reason when nvcc (or a host C++ compiler) is absent. On a GPU machine the last tests
also *run* the CUDA backend (built by aahr_fast.ops._ext) against the reference, fp32 and bf16.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDINGS = sorted(CUDA_DIR.glob("*_binding.cpp"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources cannot be compile-checked here")


def _nvcc_cmd(src: Path, arch: str, out: Path) -> list[str]:
    return [
        NVCC, "-c", f"-arch={arch}", "-std=c++17", "-O3",
        "--Werror", "all-warnings",
        "-Xcompiler", "-Wall,-Wextra,-Werror",
        "-Xptxas", "--warn-on-spills",
        # the defines torch.utils.cpp_extension passes to nvcc (no implicit half/bf16 conversions)
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
        "-o", str(out), str(src),
    ]


def _binding_cmd(src: Path, stub: Path) -> list[str]:
    import torch.utils.cpp_extension as ce

    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-isystem", str(stub)]
    for inc in ce.include_paths():
        cmd += ["-isystem", inc]
    cmd += ["-isystem", str(_cuda_include()), f"-I{CUDA_DIR}", str(src)]
    return cmd


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script, so try the usual places)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(NVCC).resolve().parents[1]),
             "/usr/local/cuda"]
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    pytest.skip(f"CUDA headers (cuda_runtime.h) not found under {[c for c in cands if c]}")


def _run(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_compile")
    stub = tmp / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
        "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
    )
    jobs = {}
    for src in CU_FILES:
        for arch in ARCHS:
            jobs[(src.name, arch)] = _nvcc_cmd(src, arch, tmp / f"{src.stem}.{arch}.o")
    if CXX is not None:
        for src in BINDINGS:
            jobs[(src.name, "host")] = _binding_cmd(src, stub)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(_run, cmd) for key, cmd in jobs.items()}
        return {key: fut.result() for key, fut in futures.items()}


def test_cuda_sources_exist():
    names = {p.name for p in CU_FILES}
    assert {"cross_similarity.cu", "prototypes.cu"} <= names
    assert BINDINGS, "no csrc/cuda/*_binding.cpp"
    assert (CUDA_DIR / "aahr_cuda.cuh").is_file()


def test_cu_headers_are_torch_free():
    for path in list(CU_FILES) + sorted(CUDA_DIR.glob("*.cuh")):
        text = path.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, path


@pytest.mark.slow  # the shared compile fixture takes ~15-35 s of wall time on 2 busy cores
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", [p.name for p in CU_FILES])
def test_nvcc_compiles_without_warnings(results, src, arch):
    rc, out = results[(src, arch)]
    assert rc == 0, f"nvcc -arch={arch} {src} failed:\n{out[-4000:]}"
    assert "warning" not in out.lower(), f"nvcc -arch={arch} {src} warned:\n{out[-4000:]}"


@pytest.mark.slow
@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++/c++) for the binding check")
@pytest.mark.parametrize("src", [p.name for p in BINDINGS])
def test_binding_compiles_against_torch_headers(results, src):
    rc, out = results[(src, "host")]
    assert rc == 0, f"host compile of {src} failed:\n{out[-4000:]}"
    assert "warning" not in out.lower(), f"host compile of {src} warned:\n{out[-4000:]}"


# --------------------------------------------------------------------------- runtime (GPU machines only)
def _cuda_backend_ready() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: the CUDA backend can only be compile-checked here"
    from aahr_fast.ops import _ext

    return _ext.extension_error(cuda=True)


def _gpu_cases():
    from aahr_fast import ops

    return {
        "relevance": lambda r, rl, w, wl, backend: ops.fragment_word_relevance(r, rl, w, wl, backend=backend),
        "hard_mean": lambda r, rl, w, wl, backend: ops.hard_assignment_similarity(r, rl, w, wl, backend=backend),
        "hard_lse": lambda r, rl, w, wl, backend: ops.hard_assignment_similarity(r, rl, w, wl, agg="lse",
                                                                                 backend=backend),
    }


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["relevance", "hard_mean", "hard_lse"])
def test_cuda_cross_similarity_matches_reference_on_gpu(name, dtype_name):
    why = _cuda_backend_ready()
    if why is not None:
        pytest.skip(why)
    import torch

    from aahr_fast.kernels._testing import max_abs_diff, run_backend

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(9, 37, 200, generator=g).cuda().to(dtype)
    w = torch.randn(11, 13, 200, generator=g).cuda().to(dtype)
    rl = torch.randint(1, 38, (9,), generator=g).cuda()
    wl = torch.randint(1, 14, (11,), generator=g).cuda()
    fn = _gpu_cases()[name]
    out_c, g_c = run_backend(fn, (r, rl, w, wl), "cuda")
    out_r, g_r = run_backend(fn, (r.float(), rl, w.float(), wl), "reference")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(out_c, out_r):
        assert max_abs_diff(a.float(), b) <= tol
    for a, b in zip(g_c, g_r):
        assert max_abs_diff(a.float(), b) <= 3 * tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_cuda_prototypes_match_reference_on_gpu(dtype_name):
    why = _cuda_backend_ready()
    if why is not None:
        pytest.skip(why)
    import torch
    import torch.nn.functional as F

    from aahr_fast import ops
    from aahr_fast.kernels._testing import max_abs_diff, run_backend

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(129, 384, generator=g).cuda().to(dtype)
    a = ops.sinkhorn(s, 0.1, 3, backend="cuda")
    b = ops.sinkhorn(s.float(), 0.1, 3, backend="reference")
    assert max_abs_diff(a.float(), b) <= (1e-5 if dtype == torch.float32 else 1e-2)
    xv, xt = (F.normalize(torch.randn(128, 256, generator=g), dim=-1).cuda().to(dtype) for _ in range(2))
    c = F.normalize(torch.randn(384, 256, generator=g), dim=-1).cuda().to(dtype)

    def loss(xv, xt, c, backend):
        return ops.swapped_prediction_loss(xv, xt, c, backend=backend)

    out_c, g_c = run_backend(loss, (xv, xt, c), "cuda")
    out_r, g_r = run_backend(loss, (xv.float(), xt.float(), c.float()), "reference")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert max_abs_diff(out_c[0].float(), out_r[0]) <= tol * max(1.0, abs(float(out_r[0])))
    for x, y in zip(g_c, g_r):
        assert max_abs_diff(x.float(), y) <= 3 * tol * max(1.0, float(y.abs().max()))

"""Compile checks of the CUDA sources (nothing CUDA can run on these machines).

* every ``csrc/cuda/*.cu`` with ``nvcc -c -arch=sm_80`` and ``-arch=sm_90``, warnings as errors
  (``--Werror all-warnings``, host ``-Wall -Wextra -Werror``, ptxas ``--warn-on-spills``): any error
  or warning (register spills included) fails;
* the torch binding ``csrc/cuda/*_binding.cpp`` with the host compiler (``-fsyntax-only``, warnings as
  errors for our code) against torch's headers. The CPU torch wheel ships the c10/cuda headers but not
  the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is generated for the check.

All compiles run concurrently in one module fixture (15-35 s of wall time on 2 shared cores, hence
``slow``: still run by ``make test`` and CI).
Skipped with the reason when nvcc (or a host C++ compiler) is absent.
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

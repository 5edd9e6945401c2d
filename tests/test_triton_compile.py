"""Ahead-of-time GPU compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

The Triton interpreter (used by the other ``test_triton_*`` files) cannot catch GPU-only failures
(lowering errors, unsupported layouts, bf16 dots, ptxas errors). ``python -m aahr_fast.kernels._aot``
captures every launch of the real host launchers on tiny CPU tensors and compiles each kernel variant
to a cubin with Triton's GPU pipeline and the ``ptxas`` shipped in the triton wheel. It runs in a
subprocess with ``TRITON_INTERPRET=0`` and a fresh ``TRITON_CACHE_DIR`` (a real compile, not a cache hit).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.is_file(), reason=f"triton's ptxas not found at {PTXAS}")


def _aot(tmp_path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, "-m", "aahr_fast.kernels._aot", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )


def test_aot_pipeline_compiles_a_kernel_for_sm80_and_sm90(tmp_path):
    # one small kernel, both architectures: proves the capture + compile path (the slow test does all)
    proc = _aot(tmp_path, "--arch", "80,90", "--dtypes", "bfloat16", "--only", "_offdiag_kernel")
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
    assert lines and all(ln.startswith("OK") for ln in lines), proc.stdout[-4000:]
    assert any("sm_80" in ln for ln in lines) and any("sm_90" in ln for ln in lines)
    assert all("REG:" in ln for ln in lines)  # resource usage read back from the cubins


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    # ~108 variants (fp32: tf32x3 dots, bf16: native dots) x 2 architectures; ~3 min on 2 busy cores
    proc = _aot(tmp_path, "--arch", "80,90", "--dtypes", "float32,bfloat16", "--jobs", "2")
    assert proc.returncode == 0, "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL"))[-4000:]
    names = {ln.split()[2].split("[")[0] for ln in proc.stdout.splitlines() if ln.startswith("OK")}
    for kernel in ("_xsim_fwd_kernel", "_xsim_bwd_kernel", "_pairwise_fwd_kernel", "_offdiag_kernel",
                   "_pairwise_bwd_weights_kernel", "_mm_kernel", "_leaky_bwd_colsum_kernel", "_attn_fwd_kernel",
                   "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_sk_col_kernel", "_sk_row_kernel",
                   "_swav_loss_kernel"):
        assert kernel in names, f"{kernel} was not compiled"

"""``python -m aahr_fast.gpucheck``: the clear no-GPU exit, the report tables, and a CPU self-test run."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from aahr_fast import gpucheck


def _run(*args: str, timeout: int = 600, interpret: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "aahr_fast.gpucheck", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the no-GPU message cannot be shown here")
def test_without_cuda_exits_nonzero_with_a_clear_message(tmp_path):
    out = tmp_path / "report.json"
    proc = _run("--out", str(out))
    assert proc.returncode == gpucheck.NO_CUDA_EXIT == 2
    assert "no CUDA device is visible" in proc.stderr
    assert "nothing was measured" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # no report of numbers that were never measured


def test_print_tables_shows_every_row_and_skips():
    report = dict(
        device="X", torch="t", triton="3", cuda_ext={"status": "built", "seconds": 1.5},
        checks=[dict(op="sinkhorn", backend="triton", dtype="float32", status="pass", fwd_max_abs_err=1e-7,
                     grad_max_abs_err=0.0)],
        speed=[dict(op="gcn_layer", B=128, backend="triton", dtype="bfloat16", fwd_ms=0.5, fwd_tflops=12.0,
                    fwd_bwd_ms=1.5, fwd_bwd_tflops=12.0, fwd_bwd_peak_extra_mb=3.0, status="ok"),
               dict(op="gcn_layer", B=1024, backend="torch.compile", dtype="bfloat16", status="skipped",
                    reason="time budget")],
        gallery=[dict(images=1000, captions=5000, backend="triton", dtype="bfloat16", ms=30.0, tflops=300.0,
                      peak_extra_mb=40.0, input_mb=400.0, output_mb=38.0, status="ok")],
        total_s=12.0,
    )
    buf = io.StringIO()
    gpucheck.print_tables(report, out=buf)
    text = buf.getvalue()
    assert "sinkhorn" in text and "pass" in text
    assert "time budget" in text
    assert "1000x5000" in text
    assert "skipped sections: 1" in text


def test_budget_accounting():
    b = gpucheck.Budget(100.0)
    assert b.allows(50) and not b.allows(1000)
    assert 99.0 < b.left() <= 100.0


@pytest.mark.slow
def test_selftest_on_cpu_runs_every_section(tmp_path):
    out = tmp_path / "selftest.json"
    proc = _run("--selftest-cpu", "--no-compile", "--out", str(out), interpret=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["selftest"] is True
    assert report["all_checks_passed"] is True
    ops = {r["op"] for r in report["checks"]}
    assert len(ops) == 7 and all(r["status"] == "pass" for r in report["checks"])
    assert {(r["op"], r["backend"]) for r in report["speed"] if r["status"] == "ok"} >= {
        ("fragment_word_relevance", "reference"), ("fragment_word_relevance", "triton")}
    assert {r["backend"] for r in report["gallery"]} == {"reference", "triton"}

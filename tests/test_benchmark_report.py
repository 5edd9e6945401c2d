"""Tests of the benchmark report generator (``aahr_fast.benchmark_report``) on a small pytest-benchmark JSON
fixture whose numbers are chosen so every ratio and exponent is known exactly, plus one end-to-end run of
a real (tiny) benchmark through ``benchmarks/conftest.py``'s JSON hooks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aahr_fast import benchmark_report as br
from aahr_fast.utils.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(group, name, median, extra=None, params=None, fullname=None, rounds=5, iqr=0.001):
    return dict(group=group, name=name, fullname=fullname or f"benchmarks/bench_x.py::{name}",
                params=params, extra_info=extra or {},
                stats=dict(median=median, iqr=iqr, rounds=rounds, min=median, max=median, mean=median))


def fixture_run() -> dict:
    """Groups: ``xsim-fwd-T1`` (reference 400 ms, compiled 200 ms, cpp 100 ms), ``rank-1k`` (ours 25 ms,
    argsort baseline 500 ms, no params) and a 3-point sweep ``xsim-B`` where time = 1e-6 B^2 s for the
    reference and 2.5e-7 B^2 s for cpp, memory = B^2 / 1024 MiB (reference) and 0.5 MiB flat (cpp)."""
    xsim = "benchmarks/bench_cross_similarity.py::test_forward[T1-{}]"
    benches = [
        _bench("xsim-fwd-T1", "test_forward[T1-reference]", 0.4,
               dict(peak_extra_mib=500.0, gflops=10.0, frac_mm_ceiling=0.2, threads=1),
               dict(impl="reference", threads=1), xsim.format("reference")),
        _bench("xsim-fwd-T1", "test_forward[T1-cpp]", 0.1,
               dict(peak_extra_mib=5.0, gflops=40.0, frac_mm_ceiling=0.8, threads=1),
               dict(impl="cpp", threads=1), xsim.format("cpp")),
        _bench("xsim-fwd-T1", "test_forward[T1-compiled]", 0.2,
               dict(peak_extra_mib=100.0, gflops=20.0, frac_mm_ceiling=0.4, threads=1),
               dict(impl="compiled", threads=1), xsim.format("compiled")),
        _bench("rank-1k", "test_rank_1k_ours", 0.025, dict(peak_extra_mib=9.0),
               fullname="benchmarks/bench_evaluation.py::test_rank_1k_ours"),
        _bench("rank-1k", "test_rank_1k_argsort_baseline", 0.5, dict(peak_extra_mib=3.0),
               fullname="benchmarks/bench_evaluation.py::test_rank_1k_argsort_baseline"),
    ]
    for b in (64, 128, 256):
        for backend, t, mem in (("reference", 1e-6 * b * b, b * b / 1024), ("cpp", 2.5e-7 * b * b, 0.5)):
            benches.append(_bench(
                f"scale-xsim-{b:05d}-T1", f"test_scaling[xsim-{b}-{backend}-T1]", t,
                dict(backend=backend, threads=1, peak_extra_mib=mem, gflops=1.0, frac_mm_ceiling=0.5,
                     work_flops=2.0 * b * b * 49 * 32 * 256,
                     mem_model_bytes=(4.0 * b * b * 49 * 32) if backend == "reference" else 8.0 * b * b,
                     sweeps={"xsim-B": dict(x_name="B", x=b, expect="time ~ B^2")}),
                dict(point=[["xsim", b, 49, 32], backend], threads=1),
                f"benchmarks/bench_scaling.py::test_scaling[xsim-{b}-{backend}-T1]"))
    return dict(
        machine_info=dict(cpu=dict(brand_raw="raw brand", count=2),
                          aahr=dict(cpu_model="Test CPU 9000", logical_cpus=2, usable_cpus=2, cpu_capability="AVX2",
                                    torch="2.13.0", triton="3.9.0", numpy="2.1.0", python="3.11.7",
                                    torch_threads_default=1, bench_threads="1 (suite default)")),
        commit_info=dict(id="0123456789abcdef", dirty=False),
        benchmarks=benches, datetime="2026-11-29T12:00:00+00:00", version="5.3.1",
        aahr_suite=dict(wall_s=123.4, cpu_s=100.0, cpu_s_children=20.0, loadavg_start=[1.5, 1.0, 1.0],
                        loadavg_end=[2.5, 1.0, 1.0], full=False, args=["benchmarks", "--benchmark-only"]),
    )


@pytest.fixture()
def run_json(tmp_path) -> Path:
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(fixture_run()))
    return p


def _table_row(md: str, group: str, label: str) -> list[str]:
    """Cells of the row ``label`` in the table of ``group``."""
    section = md.split(f"#### `{group}`", 1)[1].split("####", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in group {group!r}:\n{section}")


def test_group_tables_have_rows_and_ratios(run_json, tmp_path):
    md = br.write_report(run_json, tmp_path / "docs" / "BENCHMARKS.md", tmp_path / "docs" / "benchmarks")
    assert (tmp_path / "docs" / "BENCHMARKS.md").read_text() == md
    # columns: row, median ms, IQR ms, rounds, speed-up, time/fastest, peak MiB, memory vs base, GFLOP/s, % ceiling
    cpp = _table_row(md, "xsim-fwd-T1", "cpp")
    assert cpp[1] == "100.0" and cpp[3] == "5"
    assert cpp[4] == "4.00x" and cpp[5] == "1.00"          # 0.4 / 0.1
    assert cpp[6] == "5" and cpp[7] == "0.010"             # 5 / 500 MiB
    assert cpp[8] == "40.0" and cpp[9] == "80.0"
    comp = _table_row(md, "xsim-fwd-T1", "compiled")
    assert comp[4] == "2.00x" and comp[5] == "2.00" and comp[7] == "0.200"
    ref = _table_row(md, "xsim-fwd-T1", "reference")
    assert ref[4] == "1.00x" and ref[5] == "4.00" and ref[6] == "500.0"
    assert "speed-up vs reference" in md.split("#### `xsim-fwd-T1`", 1)[1].split("\n\n", 2)[1]
    # rows sorted by median inside the group
    section = md.split("#### `xsim-fwd-T1`", 1)[1].split("####", 1)[0]
    assert section.index("| cpp ") < section.index("| compiled ") < section.index("| reference ")
    # no reference row: the *baseline* row is the base; labels from the function names
    ours = _table_row(md, "rank-1k", "ours")
    assert ours[4] == "20.00x" and ours[7] == "3.000"      # 0.5 / 0.025; 9 / 3 MiB
    assert "speed-up vs argsort_baseline" in md
    # grouped under their source file
    assert md.index("### benchmarks/bench_cross_similarity.py") < md.index("#### `xsim-fwd-T1`")
    assert md.index("### benchmarks/bench_evaluation.py") < md.index("#### `rank-1k`")


def test_run_facts_and_coverage(run_json, tmp_path):
    md = br.write_report(run_json, tmp_path / "B.md", None)
    for text in ("| CPU | Test CPU 9000 |", "2 logical, 2 usable", "2.13.0 / 3.9.0 / 2.1.0", "| python | 3.11.7 |",
                 "2026-11-29T12:00:00", "0123456789ab", "123 s (2.1 min)", "| intra-op threads | 1 ",
                 "1.5 / 2.5", "AVX2", "| suite CPU time (user + sys) | 120 s (2.0 min;"):
        assert text in md, text
    cov = md.split("## Coverage", 1)[1]
    assert "| `rank-1k` | ours | gflops, frac_mm_ceiling |" in cov
    assert "xsim-fwd-T1" not in cov  # complete rows are not listed
    md2 = br.write_report(run_json, tmp_path / "B2.md", None, wall_time=600.0)
    assert "600 s (10.0 min) (given on the command line)" in md2
    assert f"Generated by `python -m aahr_fast.benchmark_report {run_json} --out {tmp_path / 'B2.md'} --no-plots " \
           f"--wall-time 600` from one run" in md2


def test_run_facts_name_the_timer_and_the_thread_counts(tmp_path):
    run = fixture_run()
    md = br.write_report(_dump(run, tmp_path / "a.json"), tmp_path / "A.md", None)
    assert "| timer | ? |" in md and "the rows being single-threaded" in md  # the fixture records no timer
    for b in run["benchmarks"]:
        b["options"] = {"timer": "time.process_time"}
    run["machine_info"]["aahr"]["bench_threads"] = "1,2"
    md = br.write_report(_dump(run, tmp_path / "b.json"), tmp_path / "B.md", None, cpu_time=200.0)
    assert "| timer | CPU time of the process, all threads summed (time.process_time) |" in md
    assert "200 s (3.3 min; above the wall time: the T2 rows keep two cores busy)" in md
    assert "single-threaded" not in md
    # the remark follows the numbers: 120 s of CPU time in 123.4 s of wall time is not "above the wall time"
    md = br.write_report(_dump(run, tmp_path / "b2.json"), tmp_path / "B2.md", None)
    assert "120 s (2.0 min; 0.97x the wall time, although the T2 rows can keep two cores busy)" in md
    assert "above the wall time" not in md
    for b in run["benchmarks"]:
        b["options"] = {"timer": "perf_counter"}
    md = br.write_report(_dump(run, tmp_path / "c.json"), tmp_path / "C.md", None)
    assert "| timer | wall clock (time.perf_counter) |" in md


def _dump(run: dict, path: Path) -> Path:
    path.write_text(json.dumps(run))
    return path


def test_sweep_exponents_table_and_plots(run_json, tmp_path):
    plots = tmp_path / "docs" / "benchmarks"
    md = br.write_report(run_json, tmp_path / "docs" / "BENCHMARKS.md", plots)
    scaling = md.split("## Scaling", 1)[1]
    assert "#### `xsim-B-T1` (B)" in scaling and "Expected: time ~ B^2." in scaling
    # backend | points | time obs | time expected | mem obs | mem expected
    ref = _table_row(scaling, "xsim-B-T1", "reference")
    assert ref[1:] == ["3", "2.00", "2.00", "2.00", "2.00"]
    cpp = _table_row(scaling, "xsim-B-T1", "cpp")
    assert cpp[1:] == ["3", "2.00", "2.00", "0.00", "2.00"]
    # per-point table: B, cpp ms, cpp MiB, reference ms, reference MiB
    pt = _table_row(scaling, "xsim-B-T1", "256")
    assert pt == ["256", "16.4", "0.5", "65.5", "64.0"]
    png = plots / "scaling_xsim-B-T1.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert "![xsim-B-T1](benchmarks/scaling_xsim-B-T1.png)" in md
    assert (plots / "speedups.png").read_bytes()[:8] == PNG_MAGIC
    assert "![speed-ups](benchmarks/speedups.png)" in md
    # the scale-* groups are listed in the sweep appendix, not among the op groups
    assert "#### `scale-xsim-00064-T1`" in scaling and "#### `scale-xsim-00064-T1`" not in md.split("## Scaling")[0]
    # no temporary files left beside the outputs
    assert sorted(p.name for p in plots.iterdir()) == ["scaling_xsim-B-T1.png", "speedups.png"]


def test_loglog_slope():
    xs = [2.0, 4.0, 8.0, 16.0]
    assert br.loglog_slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert br.loglog_slope(xs, [7.0] * 4) == pytest.approx(0.0)
    # least squares over noisy points: exact value of the normal equations
    ys = [1.0, 2.2, 3.9, 8.5]
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / 4, sum(ly) / 4
    want = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    assert br.loglog_slope(xs, ys) == pytest.approx(want)
    assert math.isnan(br.loglog_slope([4.0], [1.0]))
    assert math.isnan(br.loglog_slope([4.0, 4.0], [1.0, 2.0]))
    assert br.loglog_slope([1.0, 2.0, 4.0, 8.0], [0.0, 2.0, 8.0, None]) == pytest.approx(2.0)  # bad points ignored


def test_row_labels():
    def mk(name, params=None, extra=None):
        return br.Row("g", name, name, params or {}, 1.0, 0.0, 1, extra or {})

    rows = [mk("test_brute[5000]", {"n": 5000}), mk("test_faiss[5000-flat]", {"n": 5000, "kind": "flat"}),
            mk("test_faiss[5000-hnsw]", {"n": 5000, "kind": "hnsw"})]
    assert br.row_labels(rows) == ["brute", "faiss-flat", "faiss-hnsw"]
    rows = [mk("t[a]", {"point": [["x", 64], "reference"], "threads": 1}),
            mk("t[b]", {"point": [["x", 64], "cpp"], "threads": 1})]
    assert br.row_labels(rows) == ["reference", "cpp"]
    rows = [mk("t[a]", extra={"backend": "reference"}), mk("t[b]", extra={"backend": "cpp"})]
    assert br.row_labels(rows) == ["reference", "cpp"]
    rows = [mk("t[a]"), mk("t[b]")]  # nothing distinguishes them but the full names
    assert br.row_labels(rows) == ["t[a]", "t[b]"]


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="nope.json: cannot read"):
        br.load_run(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmarks": [')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(line 1"):
        br.load_run(bad)
    bad.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(DataError, match="holds no benchmarks"):
        br.load_run(bad)
    bad.write_text(json.dumps({"machine_info": {}}))
    with pytest.raises(DataError, match="'benchmarks' list"):
        br.load_run(bad)
    run = fixture_run()
    del run["benchmarks"][1]["stats"]["median"]
    bad.write_text(json.dumps(run))
    with pytest.raises(DataError, match=r"benchmarks\[1\] \(test_forward\[T1-cpp\]\): no stats.median"):
        br.write_report(bad, tmp_path / "B.md", None)
    run = fixture_run()
    run["benchmarks"][-1]["extra_info"]["sweeps"] = {"xsim-B": {"x_name": "B"}}
    bad.write_text(json.dumps(run))
    with pytest.raises(DataError, match=r"sweeps'\]\['xsim-B'\] needs 'x'"):
        br.write_report(bad, tmp_path / "B.md", None)
    with pytest.raises(ConfigError, match="wall-time"):
        br.write_report(bad, tmp_path / "B.md", None, wall_time=-1.0)
    assert not (tmp_path / "B.md").exists()  # nothing written on error
    assert br.main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "B.md"), "--no-plots"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "B.md").exists()


def test_cli_writes_report(run_json, tmp_path):
    out = tmp_path / "r" / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "aahr_fast.benchmark_report", str(run_json), "--out", str(out),
                           "--plots", str(tmp_path / "r" / "img")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| cpp | 100.0 |" in out.read_text()
    assert (tmp_path / "r" / "img" / "scaling_xsim-B-T1.png").is_file()


@pytest.mark.slow
def test_real_benchmark_json_round_trip(tmp_path):
    """One real sweep point through pytest-benchmark and ``benchmarks/conftest.py`` (thread default,
    machine info and suite hooks), then the report: the JSON carries what the report needs."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "AAHR_BENCH_THREADS"}
    env["AAHR_DISABLE_EXT"] = "1"  # reference rows only: no C++ build inside a unit test
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_scaling.py", "--benchmark-only", "-q", "-p",
         "no:cacheprovider", "-k", "proto-128-128-0-reference or proto-128-256-0-reference",
         f"--benchmark-json={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())
    import torch

    aahr = run["machine_info"]["aahr"]
    assert aahr["torch"] == torch.__version__ and aahr["torch_threads_default"] == 1
    assert aahr["logical_cpus"] == os.cpu_count()
    assert run["aahr_suite"]["wall_s"] > 0 and run["aahr_suite"]["cpu_s"] > 0
    names = sorted(b["name"] for b in run["benchmarks"])
    assert names == ["test_scaling[proto-128-128-0-reference-T1]", "test_scaling[proto-128-256-0-reference-T1]"]
    for b in run["benchmarks"]:
        assert b["extra_info"]["threads"] == 1 and b["extra_info"]["peak_extra_mib"] > 0
    md = br.write_report(out, tmp_path / "B.md", None)
    assert "#### `proto-K-T1` (K)" in md
    assert _table_row(md.split("## Scaling", 1)[1], "proto-K-T1", "reference")[1] == "2"


def test_per_sweep_model_override_base_row_and_single_round(tmp_path):
    run = fixture_run()
    for b in run["benchmarks"]:
        sw = b["extra_info"].get("sweeps")
        if sw and b["extra_info"]["backend"] == "cpp":
            sw["xsim-B"]["mem_model_bytes"] = None  # no memory model for the fused rows of this sweep
    run["benchmarks"][2]["extra_info"]["base_row"] = True  # compiled is the base of xsim-fwd-T1
    run["benchmarks"][0]["stats"]["rounds"] = 1
    p = tmp_path / "b.json"
    p.write_text(json.dumps(run))
    md = br.write_report(p, tmp_path / "B.md", None)
    cpp = _table_row(md.split("## Scaling", 1)[1], "xsim-B-T1", "cpp")
    assert cpp[1:] == ["3", "2.00", "2.00", "0.00", "n/a"]
    assert _table_row(md.split("## Scaling", 1)[1], "xsim-B-T1", "reference")[5] == "2.00"
    assert "speed-up vs compiled" in md
    assert _table_row(md, "xsim-fwd-T1", "cpp")[4] == "2.00x"      # 0.2 / 0.1
    ref = _table_row(md, "xsim-fwd-T1", "reference")
    assert ref[4] == "0.50x" and ref[2] == "-" and ref[3] == "1"   # one round: no IQR


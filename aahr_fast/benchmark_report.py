"""Benchmark report: ``docs/BENCHMARKS.md`` (tables) + ``docs/benchmarks/*.png`` (log-log plots) from one
pytest-benchmark JSON run.

Usage::

    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-json=/work/cache/bench.json
    .venv/bin/python -m aahr_fast.benchmark_report /work/cache/bench.json \\
        [--out docs/BENCHMARKS.md] [--plots docs/benchmarks] [--wall-time SECONDS] [--cpu-time SECONDS]

What the report holds (every number comes from the JSON; nothing is re-measured):

* the run: date, CPU model and cores, intra-op thread count, torch / triton / numpy / python versions,
  commit, load average, suite wall time (``machine_info["aahr"]`` and ``aahr_suite``, written by the
  hooks in ``benchmarks/conftest.py``; pytest-benchmark's own ``machine_info`` / ``datetime`` otherwise);
* one table per ``benchmark.group``: per row the median and IQR (ms), rounds, the speed-up against the
  group's base row (``extra_info["base_row"]``, else ``reference``, else a ``*baseline*`` row, else the
  slowest row) = base
  median / row median, time / fastest, ``peak_extra_mib`` and its ratio to the base row, GFLOP/s and the
  fraction of the same-thread fp32 ``torch.mm`` ceiling (``extra_info`` keys ``peak_extra_mib``,
  ``gflops``, ``frac_mm_ceiling``);
* the scaling sweeps (rows whose ``extra_info["sweeps"]`` is ``{sweep: {"x_name", "x", "expect"}}``,
  optionally with per-sweep ``work_flops`` / ``mem_model_bytes`` overriding the row's; see
  ``benchmarks/bench_scaling.py``): per sweep and backend the observed exponent of time and of peak
  memory (least-squares slope of log y on log x) next to the expected one (the same slope of the
  ``work_flops`` / ``mem_model_bytes`` models over the same points), a table of the points and a log-log
  PNG (matplotlib, Agg backend);
* the rows that lack one of the three ``extra_info`` fields (coverage of the benchmark contract).

Medians and same-run ratios are quoted because the machines are shared and noisy (docs ``toolchain.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from aahr_fast.utils.errors import ConfigError, DataError
from aahr_fast.utils.io import atomic_write, atomic_write_path

__all__ = ["Row", "Sweep", "load_run", "rows_from_run", "group_rows", "row_labels", "group_table",
           "collect_sweeps", "loglog_slope", "render_report", "write_report", "main"]

CONTRACT_FIELDS = ("peak_extra_mib", "gflops", "frac_mm_ceiling")


@dataclass
class Row:
    """One benchmark of the run.

    Attributes: group (``benchmark.group``; ``"(no group)"`` when unset), name (test name), fullname
    (``file::test[params]``), params (pytest parameters), median_s / iqr_s / rounds (pytest-benchmark stats,
    seconds), extra (``extra_info``), label (short row name inside its group, set by :func:`group_rows`).
    """

    group: str
    name: str
    fullname: str
    params: dict
    median_s: float
    iqr_s: float
    rounds: int
    extra: dict
    label: str = ""

    @property
    def source(self) -> str:
        """The benchmark file (``benchmarks/bench_x.py``) or ``"?"``."""
        return self.fullname.split("::", 1)[0] if "::" in self.fullname else "?"


def load_run(path: str | os.PathLike) -> dict:
    """Read a pytest-benchmark JSON file (``--benchmark-json``).

    Raises:
        DataError: missing / unreadable file, invalid JSON, or no ``benchmarks`` list (names the file).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read the benchmark JSON ({e.strerror or e})") from None
    try:
        run = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); expected the "
                        f"file written by pytest --benchmark-json") from None
    if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
        raise DataError(f"{path}: expected a pytest-benchmark JSON object with a 'benchmarks' list")
    if not run["benchmarks"]:
        raise DataError(f"{path}: the run holds no benchmarks (was pytest run with --benchmark-only and "
                        f"without --benchmark-disable?)")
    run["_source"] = str(path)
    return run


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{what}: expected a finite number, got {value!r}")
    return float(value)


def rows_from_run(run: dict) -> list[Row]:
    """The benchmarks of a loaded run as :class:`Row` objects (labels not yet set).

    Raises:
        DataError: a benchmark without ``name`` or ``stats.median`` (names its index and the file).
    """
    src = run.get("_source", "benchmark JSON")
    rows = []
    for i, b in enumerate(run["benchmarks"]):
        where = f"{src}: benchmarks[{i}]"
        if not isinstance(b, dict) or "name" not in b:
            raise DataError(f"{where}: expected an object with 'name', 'stats', 'extra_info'")
        stats = b.get("stats")
        if not isinstance(stats, dict) or "median" not in stats:
            raise DataError(f"{where} ({b['name']}): no stats.median")
        median = _num(stats["median"], f"{where} ({b['name']}) stats.median")
        if median <= 0:
            raise DataError(f"{where} ({b['name']}): stats.median must be positive, got {median}")
        iqr = stats.get("iqr", 0.0)
        extra = b.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise DataError(f"{where} ({b['name']}): extra_info must be an object")
        rows.append(Row(group=b.get("group") or "(no group)", name=b["name"], fullname=b.get("fullname", b["name"]),
                        params=b.get("params") or {}, median_s=median,
                        iqr_s=float(iqr) if _is_num(iqr) else float("nan"),
                        rounds=int(stats.get("rounds", 0) or 0), extra=extra))
    return rows


def _flat(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return [y for x in value for y in _flat(x)]
    return [value]


def _func_parts(names: Sequence[str]) -> list[str]:
    """Test function names (without ``[params]``) minus their common prefix (cut after ``_``); empty
    strings when all rows share one function."""
    funcs = [n.split("[", 1)[0] for n in names]
    if len(set(funcs)) < 2:
        return ["" for _ in funcs]
    prefix = os.path.commonprefix(funcs)
    cut = prefix.rfind("_") + 1
    return [f[cut:] or f for f in funcs]


def row_labels(rows: Sequence[Row]) -> list[str]:
    """Short unique labels for the rows of one group.

    ``extra_info["backend"]`` when present on every row and unique; else the test function name without
    the group's common prefix (when the rows come from different functions) joined with the pytest
    parameter values that differ between the rows (``threads`` and constant values dropped, lists
    flattened), e.g. ``cpp``, ``authors``, ``faiss-hnsw``, ``argsort_baseline``; else the full test names.
    """
    backends = [r.extra.get("backend") for r in rows]
    if all(isinstance(b, str) for b in backends) and len(set(backends)) == len(rows):
        return backends
    keys = sorted({k for r in rows for k in r.params if k != "threads"})
    parts: list[list[str]] = [[f] if f else [] for f in _func_parts([r.name for r in rows])]
    for k in keys:
        vals = [_flat(r.params.get(k)) if k in r.params else [] for r in rows]
        width = max(len(v) for v in vals)
        for j in range(width):
            col = [v[j] if j < len(v) else None for v in vals]
            if len({repr(c) for c in col}) > 1:
                for i, c in enumerate(col):
                    if c is not None:
                        parts[i].append(str(c))
    labels = ["-".join(p) for p in parts]
    if all(labels) and len(set(labels)) == len(rows):
        return labels
    return [r.name for r in rows]


def group_rows(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """``{group: rows sorted by median}`` with :attr:`Row.label` set (groups in name order)."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.group].append(r)
    out = {}
    for g in sorted(groups):
        rs = groups[g]
        for r, lab in zip(rs, row_labels(rs)):
            r.label = lab
        out[g] = sorted(rs, key=lambda r: r.median_s)
    return out


def base_row(rows: Sequence[Row]) -> Row:
    """The row ratios are taken against: one with ``extra_info["base_row"]`` true, else the one labelled
    ``reference``, else one whose label contains ``baseline``, else the slowest."""
    for r in rows:
        if r.extra.get("base_row") is True:
            return r
    for key in ("reference", "baseline"):
        for r in rows:
            if r.label == key or (key == "baseline" and key in r.label):
                return r
    return max(rows, key=lambda r: r.median_s)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _slope(x: float) -> str:
    return _fmt(x, ".2f", "n/a")


def _mib(x: Optional[float]) -> str:
    return _fmt(x, ".1f" if x is not None and abs(x) >= 10 else ".3g")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return _fmt(ms, ".3g" if ms < 10 else ".1f" if ms < 1e4 else ".0f")


def group_table(rows: Sequence[Row]) -> list[dict]:
    """The computed table of one group (rows sorted by median): per row ``label``, ``median_ms``,
    ``iqr_ms`` (None with one round), ``rounds``, ``speedup`` (base median / row median), ``vs_fastest``
    (row / fastest median),
    ``peak_mib``, ``mem_vs_base`` (row peak / base peak), ``gflops``, ``pct_ceiling`` (percent), ``base``
    (the base row's label)."""
    rows = sorted(rows, key=lambda r: r.median_s)
    base = base_row(rows)
    fastest = rows[0].median_s
    bpeak = base.extra.get("peak_extra_mib")
    out = []
    for r in rows:
        peak = r.extra.get("peak_extra_mib")
        frac = r.extra.get("frac_mm_ceiling")
        out.append(dict(
            label=r.label, median_ms=r.median_s * 1e3, iqr_ms=r.iqr_s * 1e3 if r.rounds > 1 else None,
            rounds=r.rounds,
            speedup=base.median_s / r.median_s, vs_fastest=r.median_s / fastest,
            peak_mib=peak if _is_num(peak) else None,
            mem_vs_base=(peak / bpeak) if _is_num(peak) and _is_num(bpeak) and bpeak > 0 else None,
            gflops=r.extra.get("gflops") if _is_num(r.extra.get("gflops")) else None,
            pct_ceiling=100.0 * frac if _is_num(frac) else None,
            base=base.label,
        ))
    return out


def _markdown_group(name: str, rows: Sequence[Row]) -> list[str]:
    table = group_table(rows)
    base = table[0]["base"]
    lines = [f"#### `{name}`", "",
             f"| row | median ms | IQR ms | rounds | speed-up vs {base} | time / fastest | peak extra MiB "
             f"| memory vs {base} | GFLOP/s | % of mm ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(
            f"| {t['label']} | {_ms(t['median_ms'] / 1e3)} "
            f"| {_ms(t['iqr_ms'] / 1e3) if t['iqr_ms'] is not None else '-'} | {t['rounds']} "
            f"| {t['speedup']:.2f}x | {t['vs_fastest']:.2f} | {_mib(t['peak_mib'])} "
            f"| {_fmt(t['mem_vs_base'], '.3f')} | {_fmt(t['gflops'], '.1f')} | {_fmt(t['pct_ceiling'], '.1f')} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------- sweeps


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the observed exponent ``e`` of ``y ~ x^e``.

    Points with a non-positive or missing x or y are ignored; NaN when fewer than two distinct x remain.
    """
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys)
           if _is_num(a) and _is_num(b) and a > 0 and b > 0]
    if len({p[0] for p in pts}) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


@dataclass
class Sweep:
    """One scaling sweep at one thread count: ``points[backend]`` = list of dicts ``x``, ``median_s``,
    ``peak_mib``, ``work``, ``mem_model`` sorted by x."""

    name: str
    threads: Any
    x_name: str
    expect: str
    points: dict = field(default_factory=lambda: defaultdict(list))

    @property
    def key(self) -> str:
        return f"{self.name}-T{self.threads}" if self.threads is not None else self.name

    def fits(self) -> dict[str, dict]:
        """Per backend: ``time_exp``, ``time_expected``, ``mem_exp``, ``mem_expected``, ``n`` points."""
        out = {}
        for be, pts in sorted(self.points.items()):
            xs = [p["x"] for p in pts]
            out[be] = dict(
                n=len(pts),
                time_exp=loglog_slope(xs, [p["median_s"] for p in pts]),
                time_expected=loglog_slope(xs, [p["work"] for p in pts]),
                mem_exp=loglog_slope(xs, [p["peak_mib"] for p in pts]),
                mem_expected=loglog_slope(xs, [p["mem_model"] for p in pts]),
            )
        return out


def collect_sweeps(rows: Iterable[Row]) -> dict[str, Sweep]:
    """Sweeps from the rows' ``extra_info["sweeps"]`` (see the module docstring), keyed
    ``<sweep>-T<threads>``. Raises DataError for a malformed entry (names the benchmark)."""
    sweeps: dict[str, Sweep] = {}
    for r in rows:
        entry = r.extra.get("sweeps")
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise DataError(f"{r.fullname}: extra_info['sweeps'] must be an object {{sweep: {{x_name, x, expect}}}}")
        backend = r.extra.get("backend") or r.label or r.name
        threads = r.extra.get("threads", r.params.get("threads"))
        for name, spec in entry.items():
            if not isinstance(spec, dict) or "x" not in spec:
                raise DataError(f"{r.fullname}: extra_info['sweeps'][{name!r}] needs 'x' (and 'x_name', 'expect')")
            x = _num(spec["x"], f"{r.fullname}: sweeps[{name!r}].x")
            sw = sweeps.setdefault(f"{name}-T{threads}" if threads is not None else name,
                                   Sweep(name, threads, str(spec.get("x_name", "x")), str(spec.get("expect", ""))))
            sw.points[backend].append(dict(
                x=x, median_s=r.median_s, peak_mib=r.extra.get("peak_extra_mib"),
                work=spec.get("work_flops", r.extra.get("work_flops")),
                mem_model=spec.get("mem_model_bytes", r.extra.get("mem_model_bytes")), group=r.group))
    for sw in sweeps.values():
        for pts in sw.points.values():
            pts.sort(key=lambda p: p["x"])
    return dict(sorted(sweeps.items()))


def plot_sweep(sweep: Sweep, path: str | os.PathLike) -> None:
    """Log-log plot of one sweep (time and peak extra memory against x, one line per backend), written
    atomically as PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fits = sweep.fits()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for be, pts in sorted(sweep.points.items()):
        xs = [p["x"] for p in pts]
        f = fits[be]
        axes[0].plot(xs, [p["median_s"] * 1e3 for p in pts], "o-",
                     label=f"{be}: slope {_slope(f['time_exp'])} (exp. {_slope(f['time_expected'])})")
        mem = [(x, p["peak_mib"]) for x, p in zip(xs, pts) if _is_num(p["peak_mib"]) and p["peak_mib"] > 0]
        if mem:
            axes[1].plot([m[0] for m in mem], [m[1] for m in mem], "s-",
                         label=f"{be}: slope {_slope(f['mem_exp'])} (exp. {_slope(f['mem_expected'])})")
    for ax, what in zip(axes, ("median time (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep.x_name)
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"scaling: {sweep.key}", fontsize=11)
    fig.tight_layout()
    try:
        atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_speedups(groups: dict[str, list[Row]], path: str | os.PathLike) -> bool:
    """Horizontal bar chart of the speed-up of each group's fastest row over its ``reference`` row (groups
    with a reference row and another row only; scaling points left out). Returns False (no file) when no
    group qualifies."""
    items = []
    for g, rows in groups.items():
        if g.startswith("scale-") or len(rows) < 2 or not any(r.label == "reference" for r in rows):
            continue
        ref = next(r for r in rows if r.label == "reference")
        best = min((r for r in rows if r is not ref), key=lambda r: r.median_s)
        items.append((g, best.label, ref.median_s / best.median_s))
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(items) + 1.2))
    ys = range(len(items))
    ax.barh(list(ys), [s for _, _, s in items], color="tab:blue")
    for y, (_, _, sp) in zip(ys, items):
        ax.text(sp, y, f" {sp:.2f}x", va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{g} ({lab})" for g, lab, _ in items], fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of the fastest row over reference (median, same run)")
    ax.invert_yaxis()
    fig.tight_layout()
    try:
        atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return True


def _sweep_markdown(sweep: Sweep, plot_rel: Optional[str]) -> list[str]:
    fits = sweep.fits()
    lines = [f"#### `{sweep.key}` ({sweep.x_name})", ""]
    if sweep.expect:
        lines += [f"Expected: {sweep.expect}.", ""]
    lines += [f"| backend | points | time exponent (observed) | time exponent (expected, work model) "
              f"| memory exponent (observed) | memory exponent (expected, memory model) |",
              "|---|---:|---:|---:|---:|---:|"]
    for be, f in fits.items():
        lines.append(f"| {be} | {f['n']} | {_slope(f['time_exp'])} | {_slope(f['time_expected'])} "
                     f"| {_slope(f['mem_exp'])} | {_slope(f['mem_expected'])} |")
    lines.append("")
    backends = sorted(sweep.points)
    xs = sorted({p["x"] for pts in sweep.points.values() for p in pts})
    head = " | ".join(f"{be} ms | {be} MiB" for be in backends)
    lines += [f"| {sweep.x_name} | {head} |", "|---:|" + "---:|" * (2 * len(backends))]
    for x in xs:
        cells = []
        for be in backends:
            p = next((p for p in sweep.points[be] if p["x"] == x), None)
            cells += [_ms(p["median_s"]) if p else "skipped", _mib(p["peak_mib"]) if p else "-"]
        lines.append(f"| {x:g} | " + " | ".join(cells) + " |")
    lines.append("")
    if plot_rel:
        lines += [f"![{sweep.key}]({plot_rel})", ""]
    return lines


# ---------------------------------------------------------------------------------------------------- report


def _timer_fact(run: dict) -> str:
    """What the rows' times are: wall clock or process CPU time (pytest-benchmark's ``--benchmark-timer``)."""
    timers = sorted({str((b.get("options") or {}).get("timer", "?")) for b in run.get("benchmarks") or []})
    words = {"perf_counter": "wall clock (time.perf_counter)",
             "process_time": "CPU time of the process, all threads summed (time.process_time)"}
    return ", ".join(words.get(t.split(".")[-1], t) for t in timers) or "?"


def _run_facts(run: dict, wall_time: Optional[float], cpu_time: Optional[float] = None) -> list[tuple[str, str]]:
    mi = run.get("machine_info") or {}
    aahr = mi.get("aahr") or {}
    cpu = mi.get("cpu") or {}
    suite = run.get("aahr_suite") or {}
    commit = run.get("commit_info") or {}
    facts = [
        ("date (end of run)", str(run.get("datetime", suite.get("finished", "?")))),
        ("CPU", str(aahr.get("cpu_model") or cpu.get("brand_raw") or mi.get("processor") or "?")),
        ("cores", f"{aahr.get('logical_cpus', cpu.get('count', '?'))} logical, "
                  f"{aahr.get('usable_cpus', '?')} usable by the process"),
        ("CPU capability (torch)", str(aahr.get("cpu_capability", "?"))),
        ("intra-op threads", f"{aahr.get('torch_threads_default', '?')} (AAHR_BENCH_THREADS: "
                             f"{aahr.get('bench_threads', '?')}); each row's count is in its group name (T1, T2)"),
        ("timer", _timer_fact(run)),
        ("GPU", str(aahr.get("cuda_device") or "none")),
        ("torch / triton / numpy", f"{aahr.get('torch', '?')} / {aahr.get('triton', '?')} / {aahr.get('numpy', '?')}"),
        ("python", str(aahr.get("python") or mi.get("python_version", "?"))),
        ("pytest-benchmark", str(run.get("version", "?"))),
        ("commit", f"{str(commit.get('id', '?'))[:12]}{' (dirty working tree)' if commit.get('dirty') else ''}"),
    ]
    wall = wall_time if wall_time is not None else suite.get("wall_s")
    if wall is not None:
        facts.append(("suite wall time", f"{float(wall):.0f} s ({float(wall) / 60:.1f} min)"
                      + (" (given on the command line)" if wall_time is not None else
                         " (conftest import to JSON write)")))
    if cpu_time is not None or _is_num(suite.get("cpu_s")):
        cpu = cpu_time if cpu_time is not None else float(suite["cpu_s"]) + float(suite.get("cpu_s_children") or 0.0)
        multi = any(t.strip() not in ("", "1") for t in str(aahr.get("bench_threads", "1")).split("(")[0].split(","))
        # the remark must agree with the two numbers it sits next to
        ratio = cpu / float(wall) if wall is not None and float(wall) > 0 else None
        if multi:
            if ratio is None:
                why = "the T2 rows can keep two cores busy"
            elif ratio > 1.05:
                why = "above the wall time: the T2 rows keep two cores busy"
            else:
                why = f"{ratio:.2f}x the wall time, although the T2 rows can keep two cores busy"
        elif ratio is None or 0.85 <= ratio <= 1.15:
            why = "about the wall time on an idle machine, the rows being single-threaded"
        else:
            why = f"{ratio:.2f}x the wall time, the rows being single-threaded"
        facts.append(("suite CPU time (user + sys)", f"{cpu:.0f} s ({cpu / 60:.1f} min; {why})"
                      + (" (given on the command line)" if cpu_time is not None else "")))
    if suite.get("loadavg_start") or suite.get("loadavg_end"):
        la0, la1 = suite.get("loadavg_start"), suite.get("loadavg_end")
        facts.append(("load average (1 min) start / end",
                      f"{_fmt(la0[0] if la0 else None, '.1f')} / {_fmt(la1[0] if la1 else None, '.1f')}"))
    if suite.get("args"):
        facts.append(("pytest arguments", "`" + " ".join(suite["args"]) + "`"))
    facts.append(("sweeps", "full (--full)" if suite.get("full") or aahr.get("full") else "default (small)"))
    return facts


def _coverage(groups: dict[str, list[Row]]) -> list[str]:
    missing = []
    for g, rows in groups.items():
        for r in rows:
            lack = [f for f in CONTRACT_FIELDS if not _is_num(r.extra.get(f))]
            if lack:
                missing.append(f"| `{g}` | {r.label} | {', '.join(lack)} |")
    if not missing:
        return ["Every row records peak extra memory, GFLOP/s and the fraction of the mm ceiling.", ""]
    return ["Rows without one of the contract fields (`extra_info`: " + ", ".join(CONTRACT_FIELDS) + "):", "",
            "| group | row | missing |", "|---|---|---|", *missing, ""]


def render_report(run: dict, *, plot_dir: Optional[str | os.PathLike] = None,
                  md_dir: Optional[str | os.PathLike] = None, wall_time: Optional[float] = None,
                  json_name: Optional[str] = None, cpu_time: Optional[float] = None,
                  command: Optional[str] = None) -> str:
    """The markdown report of a loaded run; writes the PNG plots into ``plot_dir`` when given (links are
    relative to ``md_dir``, the folder of the markdown file). Returns the markdown text."""
    rows = rows_from_run(run)
    groups = group_rows(rows)
    sweeps = collect_sweeps(rows)
    plot_dir = Path(plot_dir) if plot_dir is not None else None
    md_dir = Path(md_dir) if md_dir is not None else (plot_dir.parent if plot_dir is not None else Path("."))

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, md_dir)).as_posix()

    src = json_name or run.get("_source", "the benchmark JSON")
    command = command or f"python -m aahr_fast.benchmark_report {src}"
    lines = ["# aahr_fast benchmarks", "",
             f"Generated by `{command}` from one run of",
             "`python -m pytest benchmarks --benchmark-only --benchmark-json=FILE`; do not edit by hand.",
             "Numbers are medians of the rounds of each row; ratios compare rows of the same group measured in",
             "the same run (the machine is shared and noisy, so absolute times drift between runs, same-run",
             "ratios much less). Speed-up = base median / row median, base = the row marked `base_row`, else",
             "the `reference` row, else a `*baseline*` row, else the slowest row. Peak extra memory is the torch",
             "allocator's peak above what was allocated before the call (profiler events); GFLOP/s counts",
             "each row's useful work; the ceiling is one fp32 `torch.mm` of a stated shape on the same",
             "thread count in the same session.",
             "", "## Run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _run_facts(run, wall_time, cpu_time)]
    lines.append("")

    if plot_dir is not None:
        sp = plot_dir / "speedups.png"
        if plot_speedups(groups, sp):
            lines += ["## Speed-ups over the reference", "", f"![speed-ups]({rel(sp)})", ""]

    by_source: dict[str, list[str]] = defaultdict(list)
    for g, rs in groups.items():
        if not g.startswith("scale-"):
            by_source[rs[0].source].append(g)
    lines += ["## Groups", ""]
    for source in sorted(by_source):
        lines += [f"### {source}", ""]
        for g in by_source[source]:
            lines += _markdown_group(g, groups[g])

    if sweeps:
        lines += ["## Scaling", "",
                  "Observed exponent = least-squares slope of log(median time) or log(peak extra memory) on",
                  "log(size) over the sweep's points; expected = the same slope of the work model",
                  "(`work_flops`) or memory model (`mem_model_bytes`) over the same points. Points and the",
                  "per-size tables (`scale-*` groups) follow each fit.", ""]
        for key, sw in sweeps.items():
            plot_rel = None
            if plot_dir is not None:
                p = plot_dir / f"scaling_{key}.png"
                plot_sweep(sw, p)
                plot_rel = rel(p)
            lines += _sweep_markdown(sw, plot_rel)
        scale_groups = [g for g in groups if g.startswith("scale-")]
        if scale_groups:
            lines += ["<details><summary>per-size groups of the sweeps</summary>", ""]
            for g in scale_groups:
                lines += _markdown_group(g, groups[g])
            lines += ["</details>", ""]

    lines += ["## Coverage", ""] + _coverage(groups)
    return "\n".join(lines).rstrip() + "\n"


def write_report(json_path: str | os.PathLike, out: str | os.PathLike = "docs/BENCHMARKS.md",
                 plot_dir: str | os.PathLike | None = "docs/benchmarks", wall_time: Optional[float] = None,
                 cpu_time: Optional[float] = None) -> str:
    """Load ``json_path``, write the markdown to ``out`` and the plots to ``plot_dir`` (atomic writes).
    ``wall_time`` / ``cpu_time`` (seconds, measured outside pytest) override the JSON's.
    Returns the markdown. Raises DataError for a bad JSON file, ConfigError for a bad wall / CPU time."""
    for name, value in (("--wall-time", wall_time), ("--cpu-time", cpu_time)):
        if value is not None and not (_is_num(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    run = load_run(json_path)
    out = Path(out)
    command = f"python -m aahr_fast.benchmark_report {json_path}"
    if str(out) != "docs/BENCHMARKS.md":
        command += f" --out {out}"
    if plot_dir is None:
        command += " --no-plots"
    elif str(plot_dir) != "docs/benchmarks":
        command += f" --plots {plot_dir}"
    for flag, value in (("--wall-time", wall_time), ("--cpu-time", cpu_time)):
        if value is not None:
            command += f" {flag} {value:g}"
    text = render_report(run, plot_dir=plot_dir, md_dir=out.parent, wall_time=wall_time, json_name=str(json_path),
                         cpu_time=cpu_time, command=command)
    with atomic_write(out, "w") as fh:
        fh.write(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m aahr_fast.benchmark_report``); returns the exit status (2 on bad input)."""
    ap = argparse.ArgumentParser(prog="python -m aahr_fast.benchmark_report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    ap.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown file to write (default: %(default)s)")
    ap.add_argument("--plots", default="docs/benchmarks", help="folder for the PNG plots (default: %(default)s)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--wall-time", type=float, default=None,
                    help="suite wall time in seconds, measured outside pytest (overrides the JSON's)")
    ap.add_argument("--cpu-time", type=float, default=None,
                    help="suite CPU time (user + sys) in seconds, measured outside pytest (overrides the JSON's)")
    args = ap.parse_args(argv)
    try:
        write_report(args.json, args.out, None if args.no_plots else args.plots, args.wall_time, args.cpu_time)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    print(f"wrote {args.out}" + ("" if args.no_plots else f" and plots in {args.plots}/"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

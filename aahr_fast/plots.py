"""PNG plots of a training run, drawn from its ``metrics.jsonl`` (matplotlib, Agg backend, headless).

Two figures are written atomically into the run folder (``aahr_fast.utils.io.atomic_write_path``):

* ``loss.png``: the total training loss per iteration (raw, light) with a moving average, plus
  the logged loss parts (base triplet, prototype, graph, MoCo, ...) as moving averages;
* ``dev_rsum.png``: dev rsum per epoch (left axis) and the dev R@1 of both directions (right axis).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aahr_fast.metrics_log import MetricsLog
from aahr_fast.utils.io import atomic_write_path

__all__ = ["plot_run", "moving_average"]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first ``window-1`` points average what exists so far).

    Args:
        values: (n,) float array. window: >= 1 points.
    Returns:
        (n,) float64 array.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or window <= 1:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def _save(fig, path: Path) -> None:
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_run(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Draw ``loss.png`` and ``dev_rsum.png`` from a ``metrics.jsonl`` into ``out_dir``.

    Returns the written paths (a figure with no data to show is skipped).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics_path)
    out_dir = Path(out_dir)
    written = []
    steps = [r for r in records if r.get("type") == "step" and np.isfinite(r.get("loss", np.nan))]
    if steps:
        x = np.array([r["step"] for r in steps])
        y = np.array([r["loss"] for r in steps], dtype=np.float64)
        window = max(1, len(steps) // 50)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
        ax.plot(x, moving_average(y, window), color="tab:blue", lw=1.6, label=f"loss (avg {window})")
        names = sorted({k for r in steps for k in (r.get("parts") or {})} - {"total", "loss"})
        for i, name in enumerate(names):
            py = np.array([(r.get("parts") or {}).get(name, np.nan) for r in steps], dtype=np.float64)
            ok = np.isfinite(py)
            if ok.any() and np.nanmax(np.abs(py)) > 0:  # C0 is the total loss
                ax.plot(x[ok], moving_average(py[ok], window), lw=1.0, color=f"C{1 + i % 9}", label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        path = out_dir / "loss.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    epochs = [r for r in records if r.get("type") == "epoch" and isinstance(r.get("dev"), dict)]
    if epochs:
        e = np.array([r["epoch"] for r in epochs])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(e, [r["dev"].get("rsum", np.nan) for r in epochs], "o-", color="tab:red", label="dev rsum")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("dev rsum (max 600)")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        for key, style in (("i2t_r1", "s--"), ("t2i_r1", "^--")):
            vals = [r["dev"].get(key, np.nan) for r in epochs]
            if np.isfinite(vals).any():
                ax2.plot(e, vals, style, lw=1.0, alpha=0.8, label=f"dev {key}")
        ax2.set_ylabel("R@1 (%)")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
        ax.set_title("model selection on the dev split")
        path = out_dir / "dev_rsum.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written

"""``metrics.jsonl``, the training log of a run: :class:`MetricsLog`.

Its own module (below both) because the trainer (:mod:`aahr_fast.engine`) writes it and the plots
(:mod:`aahr_fast.plots`) read it: neither of those imports the other. ``aahr_fast.engine.MetricsLog`` is
the same class.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from aahr_fast.utils.io import atomic_write

__all__ = ["MetricsLog"]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

    Record types: ``step`` (epoch, step, loss, parts, lr, grad_norm), ``skip`` (a non-finite step),
    ``epoch`` (epoch, step, train_loss, dev metrics, lr, seconds), ``resume``, ``stop``. Appends are
    plain line writes (a log, not a result file); a crash can leave at most a partial last line,
    which :meth:`read` ignores, and on resume :meth:`truncate_to_step` rewrites the file atomically
    without the records past the checkpoint.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        """All complete records of a metrics file (a truncated last line is skipped)."""
        out = []
        p = Path(path)
        if not p.is_file():
            return out
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def truncate_to_step(self, step: int) -> None:
        """Keep only records with ``step <= step`` (events without a step are kept)."""
        keep = [r for r in self.read(self.path) if r.get("step", -1) <= step]
        with atomic_write(self.path, "w") as fh:
            for r in keep:
                fh.write(json.dumps(r) + "\n")

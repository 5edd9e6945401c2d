"""Training-collapse detection for the trainer (issue 15, item 5).

A collapsed run keeps producing finite losses, so the non-finite guard never fires: the classic case is
every embedding becoming the same vector, after which the hinge loss is exactly its margin term at every
step and nothing is learnt. Two signals, both read from what a training step already returns:

* **embedding spread** of the detached final embeddings ``out["embeddings"] = (f_v, f_t)``: the RMS
  distance of the L2-normalised rows from their mean, :func:`embedding_spread`, in ``[0, 1]``
  (0: every row points the same way, or every row is zero; about 1 for unrelated directions). The step
  below ``run.collapse_min_spread`` in either modality is collapsed;
* **a stuck loss**: the loss equals the previous checked loss within a relative tolerance
  ``run.collapse_loss_rtol``. A loss of exactly 0 is never "stuck" (every hinge satisfied: converged,
  not collapsed).

Host syncs: :func:`step_statistics` only builds 0-d tensors (no ``.item()``); the trainer reads them to
the host at logging time, once per logged step (``run.log_every_steps``), with one ``tolist()``.

:class:`CollapseMonitor` turns the checks into events: the first collapsed check of a run of them is
reported (``"collapse"`` record in ``metrics.jsonl`` and a log line), a healthy check after it ends the
run (reported as recovered), and a run lasting ``run.collapse_patience`` iterations stops training with
:class:`TrainingCollapseError`. While a run of collapsed checks lasts, the trainer writes no checkpoint,
so ``last.json`` keeps naming the last good one (the non-finite guard's rule); a run that ends while
collapsed with no checkpoint at all stops with :class:`TrainingCollapseError` too. ``collapse_patience=0``
only reports: checkpoints are written as usual and training never stops for it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from aahr_fast.utils.errors import AAHRError

__all__ = ["TrainingCollapseError", "embedding_spread", "step_statistics", "CollapseMonitor"]


class TrainingCollapseError(AAHRError, RuntimeError):
    """The embeddings or the loss stayed collapsed for ``run.collapse_patience`` iterations; the run stopped
    (the last good checkpoint is kept)."""


def embedding_spread(x: torch.Tensor) -> torch.Tensor:
    """RMS distance of the L2-normalised rows of ``x`` from their mean: ``sqrt(mean_i ||u_i - mean(u)||^2)``.

    Args:
        x: (B, D) floating tensor, B >= 1 (any device; detached here).
    Returns:
        0-d float32 tensor on ``x``'s device, in ``[0, 1]``: 0 when all rows share one direction or are all
        zero (a zero row normalises to zero), ~1 for independent random directions. No host sync.
    Raises:
        ValueError: ``x`` is not 2-D or has no rows.
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"embedding_spread: expected a (B, D) tensor with B >= 1, got shape {tuple(x.shape)}")
    u = F.normalize(x.detach().float(), dim=-1)
    return (u - u.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean().sqrt()


def step_statistics(out: dict) -> dict[str, torch.Tensor]:
    """Collapse statistics of one training step's output, as 0-d tensors (no host read).

    Args:
        out: the dict ``model.training_step`` returned; its optional ``"embeddings"`` entry is a pair
            ``(f_v (B, D), f_t (B, D))`` of detached final embeddings.
    Returns:
        ``{"spread_img": t, "spread_txt": t}``, or ``{}`` when the model returns no embeddings (then only
        the stuck-loss check applies).
    Raises:
        ValueError: ``"embeddings"`` is not a pair of (B, D) tensors.
    """
    emb = out.get("embeddings")
    if emb is None:
        return {}
    if not isinstance(emb, (tuple, list)) or len(emb) != 2 or not all(torch.is_tensor(e) for e in emb):
        raise ValueError("training_step()['embeddings'] must be a pair (f_v, f_t) of (B, D) tensors")
    return {"spread_img": embedding_spread(emb[0]), "spread_txt": embedding_spread(emb[1])}


class CollapseMonitor:
    """Counts consecutive collapsed checks and decides when to report and when to stop.

    Args:
        patience: iterations a run of collapsed checks may last before :meth:`check` asks to stop (>= 1),
            or 0: report only, never stop.
        min_spread: a spread below this (either modality) is collapsed; 0 disables the spread check.
        loss_rtol: the loss is stuck when ``|loss - previous| <= loss_rtol * max(|loss|, |previous|)``
            (and loss != 0); None disables the loss check.
    Raises:
        ValueError: a negative argument.
    """

    def __init__(self, patience: int, min_spread: float, loss_rtol: Optional[float]) -> None:
        if patience < 0 or min_spread < 0 or (loss_rtol is not None and loss_rtol < 0):
            raise ValueError(f"CollapseMonitor: patience={patience}, min_spread={min_spread}, "
                             f"loss_rtol={loss_rtol}: expected values >= 0")
        self.patience = int(patience)
        self.min_spread = float(min_spread)
        self.loss_rtol = None if loss_rtol is None else float(loss_rtol)
        self.prev_loss: Optional[float] = None
        self.since: Optional[int] = None     # 1-based iteration of the first collapsed check of the run
        self.reason: Optional[str] = None

    @property
    def active(self) -> bool:
        """True while the latest check was collapsed."""
        return self.since is not None

    @property
    def withholding(self) -> bool:
        """True while the trainer must not write a checkpoint: a collapse is active and may still stop the
        run (``patience > 0``). With ``patience == 0`` (report only) checkpoints are written as usual."""
        return self.active and self.patience > 0

    def diagnose(self, loss: float, stats: dict[str, float]) -> Optional[str]:
        """Why this step looks collapsed (a sentence), or None when it looks healthy. Pure: no state change."""
        why = []
        if self.min_spread > 0:
            low = {k: v for k, v in stats.items() if k.startswith("spread") and v < self.min_spread}
            if low:
                vals = ", ".join(f"{k.split('_', 1)[1]} {v:.3g}" for k, v in sorted(low.items()))
                why.append(f"embedding spread {vals} < run.collapse_min_spread={self.min_spread:g} "
                           f"(the embeddings of a batch all point the same way)")
        prev = self.prev_loss
        if (self.loss_rtol is not None and prev is not None and loss != 0.0 and math.isfinite(loss)
                and abs(loss - prev) <= self.loss_rtol * max(abs(loss), abs(prev))):
            why.append(f"the loss is stuck at {loss:.6g} (equal to the previous checked step within "
                       f"run.collapse_loss_rtol={self.loss_rtol:g})")
        return "; ".join(why) or None

    def check(self, step: int, loss: float, stats: dict[str, float]) -> dict[str, Any]:
        """Feed one checked step (1-based ``step``, host floats). Returns ``{"event": e, "reason": r,
        "steps": n}`` where ``e`` is ``"start"`` (first collapsed check of a run), ``"ongoing"``, ``"stop"``
        (the run has lasted ``patience`` iterations), ``"recovered"`` (healthy after a run) or None."""
        reason = self.diagnose(loss, stats)
        self.prev_loss = float(loss)
        if reason is None:
            if self.since is None:
                return {"event": None, "reason": None, "steps": 0}
            n = step - self.since
            self.since, self.reason = None, None
            return {"event": "recovered", "reason": None, "steps": n}
        first = self.since is None
        if first:
            self.since = step
        self.reason = reason
        n = step - self.since + 1
        if self.patience and n >= self.patience:
            return {"event": "stop", "reason": reason, "steps": n}
        return {"event": "start" if first else "ongoing", "reason": reason, "steps": n}

    def state_dict(self) -> dict:
        """Plain-python state (saved in the training checkpoint, for an exact resume)."""
        return {"prev_loss": self.prev_loss, "since": self.since, "reason": self.reason}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore :meth:`state_dict`; None (a checkpoint from before collapse detection) resets."""
        state = state or {}
        self.prev_loss = state.get("prev_loss")
        self.since = state.get("since")
        self.reason = state.get("reason")

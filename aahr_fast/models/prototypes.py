"""Clustering prototypes and the cross-modal swapped-prediction loss (``aahr-method.md`` section 2.5 and
section 3 item 2; SwAV, Caron et al. 2020).

``K`` trainable prototypes in the joint space, initialised N(0, 1) and re-L2-normalised row-wise (in
place, without gradient) at every training forward pass that follows a change of the parameter, as SwAV and the authors' code do. The loss is
``aahr_fast.ops.swapped_prediction_loss``: Sinkhorn-Knopp codes (eps, 3 iterations, no gradient) of
each modality are predicted from the other modality's prototype scores at temperature tau.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast import ops
from aahr_fast.utils.errors import DataError

__all__ = ["Prototypes"]


class Prototypes(nn.Module):
    """Prototype matrix ``C`` (K, D) and the swapped-prediction loss on fused embeddings.

    Args:
        num_prototypes: K (384 Flickr30K, 768 COCO). dim: D. eps, n_iters: Sinkhorn entropy / iterations.
        tau: softmax temperature of the predictions. backend: forced ops backend or None.
    Forward:
        f_v (B, D), f_t (B, D) float (the fused embeddings) -> scalar loss
        ``-1/B sum_i sum_k q^t_ik log softmax(f_v,i C^T / tau)_k - 1/B sum_i sum_k q^v_ik log softmax(f_t,i C^T / tau)_k``.
    In a multi-process run (``dist`` set by ``AAHR.set_distributed``) ``f_v, f_t`` are this rank's
    shard and the codes come from ``aahr_fast.distributed.distributed_sinkhorn``.
    Raises:
        DataError on shape mismatch.
    """

    def __init__(self, num_prototypes: int, dim: int, *, eps: float = 0.1, n_iters: int = 3, tau: float = 0.1,
                 backend: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_prototypes, dim))
        self.eps, self.n_iters, self.tau, self.backend = eps, n_iters, tau, backend
        self.dist = None   # set by AAHR.set_distributed: f_v, f_t are then this rank's shard
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-L2-normalise the prototype rows in place (no gradient)."""
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self._normalized_version = self.weight._version

    def renormalize_if_changed(self) -> None:
        """Renormalise the prototypes when the parameter changed since the last normalisation."""
        if self.weight._version != self._normalized_version:
            self.normalize_()

    def forward(self, f_v: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        if f_v.dim() != 2 or f_v.shape != f_t.shape or f_v.shape[1] != self.weight.shape[1]:
            raise DataError(f"Prototypes: expected f_v, f_t of shape (B, {self.weight.shape[1]}), got "
                            f"{tuple(f_v.shape)} and {tuple(f_t.shape)}")
        if self.training:
            # renormalise only when the parameter changed since the last normalisation (an optimiser
            # step or a checkpoint load bumps its version): a second forward before backward (gradient
            # accumulation) must not modify a tensor the first graph saved
            if not torch.compiler.is_compiling():  # compiled callers run AAHR.prepare_step() eagerly first
                self.renormalize_if_changed()
            protos = self.weight
        else:   # eval (e.g. a validation loss): leave the parameter untouched
            protos = F.normalize(self.weight, dim=1)
        if self.dist is not None and self.training:
            # multi-process: local rows, distributed Sinkhorn (global sums by all_reduce); the value is
            # the global loss, the gradient is scaled for DDP's averaging (aahr_fast/distributed.py)
            from aahr_fast.distributed import sharded_swapped_prediction_loss

            return sharded_swapped_prediction_loss(f_v, f_t, protos, eps=self.eps, n_iters=self.n_iters,
                                                   tau=self.tau, ctx=self.dist)
        kw = {"backend": self.backend} if self.backend else {}
        return ops.swapped_prediction_loss(f_v, f_t, protos, eps=self.eps, n_iters=self.n_iters, tau=self.tau, **kw)

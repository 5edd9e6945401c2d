"""Momentum (EMA) key encoders and feature queues ("dynamic memory banks"), ``aahr-method.md`` section 2.4
(MoCo, He et al. 2020; USER).

- :func:`ema_update`: ``theta_k <- m theta_k + (1 - m) theta_q`` over matching parameters.
- :class:`FeatureQueue`: a ring buffer of ``M`` L2-normalised keys with the image index of each key;
  any ``M`` works (not only multiples of the batch) and a short last batch is fine: the write pointer
  wraps. Keys, ids, pointer and the count of keys ever written are buffers, so they live in the
  ``state_dict`` and move with ``.to(device)``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from aahr_fast.utils.errors import DataError

__all__ = ["ema_update", "FeatureQueue", "make_momentum_copy"]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, m: float) -> None:
    """In-place EMA of ``target``'s parameters towards ``source``'s: ``t <- m t + (1 - m) s``.

    Parameters are matched by name: every parameter of ``target`` must exist in ``source`` with the same
    shape (``target`` is a :func:`make_momentum_copy` of ``source``; a copy made with ``exclude`` has a
    subset of the names, and only those are averaged: the left-out modules are frozen and shared).
    Buffers (BatchNorm statistics) are not averaged (MoCo).
    Raises DataError naming a parameter of ``target`` missing from ``source`` or of another shape.
    """
    src = dict(source.named_parameters())
    for name, p_t in target.named_parameters():
        p_s = src.get(name)
        if p_s is None or p_s.shape != p_t.shape:
            raise DataError(f"ema_update: parameter {name!r} missing or of another shape in the source module")
        p_t.mul_(m).add_(p_s.detach(), alpha=1.0 - m)


def make_momentum_copy(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> nn.Module:
    """Deep copy of ``module`` with ``requires_grad=False`` everywhere (a MoCo key encoder).

    Args:
        module: the online (query) encoder.
        exclude: submodules of ``module`` the copy must not hold: frozen parts whose output the caller computes
            once and feeds to both encoders (e.g. ``TextEncoder.frozen_modules()``, the lower layers of a
            partly fine-tuned BERT). They are None in the copy (absent from its ``parameters()`` and
            ``state_dict``, so no duplicate weights); code that would run them must not be called on the copy.
    Returns:
        the copy (same class; its parameter names are a subset of ``module``'s).
    Raises:
        Nothing of its own (``copy.deepcopy`` errors propagate).
    """
    import copy

    memo = {id(m): None for m in exclude}   # deepcopy returns the memo entry, None, for each excluded module
    twin = copy.deepcopy(module, memo)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class FeatureQueue(nn.Module):
    """FIFO ring buffer of ``size`` keys of width ``dim`` plus the image index of each key.

    Buffers: ``feats`` (M, D) float32, initialised with random unit rows (the authors' code);
    ``ids`` (M,) int64, ``-1`` for slots never written (never equal to an image index);
    ``ptr`` () int64 next write slot; ``count`` () int64 number of keys ever enqueued.

    Args:
        size: M, number of slots. dim: D, key width.
    Raises:
        DataError: ``size`` or ``dim`` below 1 (constructor); :meth:`enqueue` with keys not (n, D) or ids
            not (n,) (both shapes named).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise DataError(f"FeatureQueue: size and dim must be positive, got {size}, {dim}")
        self.size, self.dim = size, dim
        self.register_buffer("feats", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._count_host: int | None = None   # host mirror of count (see is_full)
        self._ptr_host: int | None = None     # host mirror of ptr (see enqueue)
        self._full_host = False

    @property
    def is_full(self) -> bool:
        """True once ``size`` keys have been written in total (the queue has been filled once).

        Answered from a host-side mirror of ``count`` (read from the buffer once, after construction or a
        state-dict load, then advanced by :meth:`enqueue`), so the training step never reads it from the device.
        """
        if not self._full_host:  # once full, a queue stays full: compiled steps guard on this one bool
            if self._count_host is None:
                self._count_host = int(self.count)
            self._full_host = self._count_host >= self.size
        return self._full_host

    def _load_from_state_dict(self, *args, **kwargs):
        self._count_host = self._ptr_host = None
        self._full_host = False
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``keys`` (n, D) and ``ids`` (n,) at the pointer, wrapping around; when ``n > M`` only
        the last ``M`` keys are kept (``n = 0`` is a no-op).

        Raises:
            DataError: ``keys`` not (n, D) or ``ids`` not (n,) (both shapes named).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim or ids.shape != (keys.shape[0],):
            raise DataError(f"FeatureQueue.enqueue: expected keys (n, {self.dim}) and ids (n,), got "
                            f"{tuple(keys.shape)} and {tuple(ids.shape)}")
        n = keys.shape[0]
        if n == 0:
            return
        keys = keys.detach().to(self.feats.dtype)
        ids = ids.to(self.ids.device, torch.long)
        ptr = self._ptr_host if self._ptr_host is not None else int(self.ptr)
        start = ptr + max(n - self.size, 0)
        if n > self.size:
            keys, ids = keys[-self.size:], ids[-self.size:]
        idx = (torch.arange(keys.shape[0], device=self.feats.device) + start) % self.size
        self.feats[idx] = keys
        self.ids[idx] = ids
        self._ptr_host = (ptr + n) % self.size   # host mirror: no device read on the next enqueue
        self.ptr.fill_(self._ptr_host)
        self.count.add_(n)
        if self._count_host is not None:
            self._count_host += n
            self._full_host = self._full_host or self._count_host >= self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

"""Input validation shared by the public ops (one clear error instead of a deep traceback)."""
from __future__ import annotations

import math

import torch

from ..utils.errors import ConfigError, DataError


def check_tensor(op: str, name: str, x, ndim: int, *, floating: bool = True) -> None:
    """Raise DataError unless ``x`` is a tensor of rank ``ndim`` (floating point when ``floating``)."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise DataError(f"{op}: {name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise DataError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def check_same_device(op: str, **tensors) -> None:
    """Raise DataError when the given tensors are not all on one device."""
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise DataError(f"{op}: all tensors must be on one device, got {devs}")


def common_float_dtype(op: str, **tensors) -> torch.dtype:
    """Promoted floating dtype of the given floating tensors (they are cast to it)."""
    dt = None
    for t in tensors.values():
        if t is None:
            continue
        dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    assert dt is not None
    return dt


def check_lengths(op: str, name: str, lens, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Validate a lengths vector and return it as int64 on ``device``.

    Raises:
        DataError: not a 1-D integer tensor of size ``batch``, or a value outside ``[1, max_len]``
        (the first offending index is named). On the ``meta`` device only shape and dtype are checked.
    """
    if not isinstance(lens, torch.Tensor):
        lens = torch.as_tensor(lens)
    if lens.dim() != 1 or lens.shape[0] != batch:
        raise DataError(f"{op}: {name} must have shape ({batch},), got {tuple(lens.shape)}")
    if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
        raise DataError(f"{op}: {name} must be an integer tensor, got {lens.dtype}")
    lens = lens.to(device=device, dtype=torch.int64)
    if lens.device.type == "meta":  # shape-only tensors: values cannot be read, so only shapes are checked
        return lens
    bad = (lens < 1) | (lens > max_len)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise DataError(f"{op}: {name}[{idx}] = {int(lens[idx])} is outside [1, {max_len}]")
    return lens


def check_nonempty(op: str, **sizes: int) -> None:
    """Raise DataError (a ValueError) naming the first zero size (empty batch / no fragments)."""
    for n, s in sizes.items():
        if s == 0:
            raise DataError(f"{op}: empty input: {n} is 0 (an empty batch has no similarity to compute)")


def check_positive(op: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number > 0 (>= 0 when ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{op}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{op}: {name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")


def length_mask(lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean (B, max_len) mask, True for positions < lens[b]."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]

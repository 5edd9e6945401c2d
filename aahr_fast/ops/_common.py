"""Input validation shared by the public ops (one clear error instead of a deep traceback)."""
from __future__ import annotations

import contextlib
import math
import os
import threading

import torch

from ..utils.errors import ConfigError, DataError


_STATE = threading.local()


def _default_value_checks() -> bool:
    return os.environ.get("AAHR_OPS_VALUE_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the public ops may read tensor *values* on the host to validate them.

    Value checks (lengths in range, NaN / inf in inputs) cost a device-to-host read, i.e. a stream sync on
    GPU. They run for a user calling an op eagerly and are skipped (a) inside :func:`value_checks` ``(False)``,
    which the trainer uses around its step after validating data where it enters (collate), (b) while
    ``torch.compile`` traces, (c) for meta / fake tensors, and (d) everywhere when ``AAHR_OPS_VALUE_CHECKS=0``.
    Shape, dtype and device checks never read values and always run.
    """
    enabled = getattr(_STATE, "enabled", None)
    if enabled is None:
        enabled = _default_value_checks()
    if not enabled or torch.compiler.is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.device.type == "meta" or _is_fake(t)):
            return False
    return True


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(is_fake(t))


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the ops' host-reading value checks on or off in this thread (see :func:`value_checks_enabled`).

    Example: ``with aahr_fast.ops.value_checks(False): loss = model(batch)``: no op reads tensor values on the
    host, so a CUDA step runs without syncs. Inputs must then be valid: lengths outside ``[1, max]`` are
    undefined behaviour (out-of-range reads are clamped, not detected).
    """
    previous = getattr(_STATE, "enabled", None)
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = previous


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
    if not value_checks_enabled(lens):  # meta / fake / compiled / switched off: shapes only
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


def check_no_inf(op: str, *, why: str = "", **tensors) -> None:
    """Raise DataError naming the first +inf / -inf entry (tensor name, row-major index, value) of the given
    tensors, checked in the order given; None values (absent optional inputs) are skipped.

    A host-reading value check (one reduction per tensor and a single host sync when all are clean): it runs
    only when :func:`value_checks_enabled` allows it, so a compiled / ``value_checks(False)`` / meta caller gets
    the op's documented non-finite result instead. NaN is not looked for (each op documents how NaN propagates).
    """
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named or not value_checks_enabled(*(t for _, t in named)):
        return
    with torch.no_grad():
        flags = torch.stack([torch.isinf(t).any().to(named[0][1].device) for _, t in named])
        if not bool(flags.any()):
            return
        name, x = named[int(flags.to(torch.int8).argmax())]
        where = torch.isinf(x).nonzero()
    first = where[0]
    idx = ", ".join(str(int(v)) for v in first)
    val = float(x.detach()[tuple(int(v) for v in first)])
    raise DataError(f"{op}: {name}[{idx}] = {val} is infinite ({where.shape[0]} infinite entries in {name} of "
                    f"shape {tuple(x.shape)}){'; ' + why if why else ''}")

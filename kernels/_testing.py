"""Helpers shared by the Triton backend tests (``tests/test_triton_*.py``) and :mod:`aahr_fast.gpucheck`.

:func:`run_backend` runs a public op on fresh leaf copies of the inputs, reduces every floating output
to a scalar with fixed pseudo-random weights (non-finite entries, e.g. the ``-inf`` of an attention
bias, are left out), back-propagates, and returns the outputs and the input gradients; comparing two
backends is then a matter of comparing two such results (:func:`max_abs_diff`).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

__all__ = ["triton_device", "run_backend", "max_abs_diff", "weights_like"]


def triton_device() -> str | None:
    """``"cuda"`` when a GPU is visible, ``"cpu"`` under the Triton interpreter, else None (cannot run)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "cpu"
    return None


def weights_like(t: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Deterministic fp32 weights in [-1, 1] of ``t``'s shape (independent of the global RNG)."""
    g = torch.Generator().manual_seed(1234 + salt)
    return (torch.rand(t.shape, generator=g) * 2 - 1).to(t.device)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def run_backend(
    fn: Callable[..., object], inputs: Sequence[object], backend: str, *, grad: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Run ``fn(*leaf_copies, backend=backend)`` and back-propagate a weighted sum of its outputs.

    Floating tensor inputs become leaf tensors requiring grad (other inputs are passed through).
    Returns ``(outputs detached, grads)`` with one grad (or None) per floating input.
    """
    leaves = []
    args = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
                # expanded (stride-0) input: the leaf is the un-expanded base, the op sees the expanded view
                idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in x.stride())
                leaf = x[idx].detach().clone().requires_grad_(grad)
                arg = leaf.expand(x.shape)
            elif not x.is_contiguous():
                # keep the caller's strides: the same layout over a fresh copy
                leaf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
                with torch.no_grad():
                    leaf.copy_(x.detach())
                leaf.requires_grad_(grad)
                arg = leaf
            else:
                leaf = x.detach().clone().requires_grad_(grad)
                arg = leaf
            leaves.append(leaf)
            args.append(arg)
        else:
            args.append(x)
    out = fn(*args, backend=backend)
    outs = _outputs(out)
    if grad:
        total = None
        for i, o in enumerate(outs):
            if not (o.is_floating_point() and o.requires_grad):
                continue
            w = weights_like(o, i).to(torch.float32)
            of = o.float()
            term = torch.where(torch.isfinite(of), of * w, torch.zeros((), device=o.device)).sum()
            total = term if total is None else total + term
        if total is not None:
            total.backward()
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Largest absolute difference (fp64), treating equal non-finite entries (inf == inf, NaN == NaN) as 0."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.dtype == torch.bool or b.dtype == torch.bool:
        return float((a != b).sum().item())
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    d = torch.where(same, torch.zeros(()), (a64 - b64).abs())
    return float(d.max().item()) if d.numel() else 0.0

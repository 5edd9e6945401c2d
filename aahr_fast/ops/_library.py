"""Registration of the fused kernels as PyTorch operators (``torch.ops.aahr.*``).

Every backend kernel of a public op is a registered operator with a schema, a fake (meta) implementation
that computes output shapes and dtypes without reading data, and a registered autograd formula whose
backward is itself a registered operator (``<name>_backward``, with its own fake). So ``torch.compile``
(Dynamo + AOTAutograd + Inductor) traces through the public ops with ``fullgraph=True``: the kernels
appear as opaque calls in the graph, and ``torch.library.opcheck`` validates schema, fake and autograd.

Names: ``aahr::<op>_<backend>`` and ``aahr::<op>_<backend>_backward``, e.g. ``aahr::intra_relevance_cpp``.
The namespace ``aahr`` is Python-defined (``torch.library.custom_op`` fragments); the C++ extension owns
``aahr_fast`` (its raw kernels ``torch.ops.aahr_fast.*``, one ``TORCH_LIBRARY`` in ``csrc/aahr_ops.cpp``), so
the two never register one namespace twice. The operator implementations call the raw kernels; the public
entry points in :mod:`aahr_fast.ops` validate, pick a backend and call these operators.

Conventions: outputs never alias inputs or each other; a gradient that was not asked for is returned as a
fresh zero-size placeholder (``needs`` flags) and mapped to ``None`` by the autograd formula.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

NAMESPACE = "aahr"

__all__ = ["NAMESPACE", "fused_op", "placeholder", "grad_or_none", "operators"]

_DEFINED: dict[str, object] = {}


def fused_op(name: str, schema: str, impl: Callable, fake: Callable, *,
             device_types: Optional[str | Sequence[str]] = None):
    """Define ``aahr::<name>`` (functional, no mutated arguments) with ``impl`` and its fake ``fake``.

    Args:
        name: operator name inside the ``aahr`` namespace.
        schema: the argument / return part of the schema, e.g. ``"(Tensor x, float sigma) -> Tensor"``.
        impl: the eager implementation (calls a kernel); takes the schema's arguments positionally.
        fake: same arguments, returns empty tensors of the outputs' shapes / dtypes / devices; must not read data.
        device_types: restrict ``impl`` to these device types (other devices raise NotImplementedError).
    Returns:
        the ``torch.library.CustomOpDef``; call it like a function, ``.register_autograd(...)`` on it.
    Re-defining a name (a module re-imported by tests) returns the first definition.
    """
    qual = f"{NAMESPACE}::{name}"
    if qual in _DEFINED:
        return _DEFINED[qual]
    op = torch.library.custom_op(qual, impl, mutates_args=(), device_types=device_types, schema=schema)
    op.register_fake(fake)
    _DEFINED[qual] = op
    return op


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """A fresh zero-size tensor (the output slot of a gradient that was not requested)."""
    return like.new_empty((0,))


def grad_or_none(g: torch.Tensor, need: bool) -> Optional[torch.Tensor]:
    """``g`` when requested, else ``None`` (the placeholder is dropped)."""
    return g if need else None


def fresh(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``t`` as a new tensor: a zero-size / undefined kernel output becomes a fresh placeholder (no aliasing)."""
    if t is None or t.numel() == 0:
        return placeholder(like)
    return t


def operators() -> dict[str, object]:
    """Qualified name -> CustomOpDef of every operator defined so far (tests: opcheck over all of them)."""
    return dict(_DEFINED)

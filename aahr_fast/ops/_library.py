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

Triton operators (``fused_op(..., triton=True)``, the ``aahr::<op>_triton`` family): defined with
``torch.library.triton_op``, whose body launches the kernels through ``torch.library.wrap_triton``
(:func:`aahr_fast.kernels._utils.launch`), so under ``torch.compile`` AOTAutograd decomposes the operator into
its kernel launches and Inductor sees (and schedules) the Triton kernels themselves. Fallback: when the Triton
interpreter is on (``TRITON_INTERPRET=1``, the CPU test setup), ``triton.jit`` returns interpreter objects
that cannot be traced into a graph (the decomposition would run them on fake tensors), and when Triton is not
importable; then the same name, schema, fake and autograd formula are registered as an opaque
``torch.library.custom_op`` (what the cpp operators are), which ``torch.compile`` keeps as one call and
``torch.library.opcheck`` can check. :func:`triton_traceable` says which of the two a process gets.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import importlib.util
import inspect
import os
import typing

import torch

NAMESPACE = "aahr"

__all__ = ["NAMESPACE", "fused_op", "placeholder", "grad_or_none", "fresh", "operators", "registration_kind",
           "triton_traceable", "note_triton_kernels"]

_DEFINED: dict[str, object] = {}
#: qualified name -> "triton_op" or "custom_op" (how :func:`fused_op` registered it)
_KIND: dict[str, str] = {}


def triton_traceable() -> bool:
    """True when ``fused_op(..., triton=True)`` registers a ``torch.library.triton_op`` in this process.

    False (the opaque ``custom_op`` fallback) when the Triton interpreter is on (``TRITON_INTERPRET`` set and not
    ``0``: interpreter kernels cannot be captured by ``wrap_triton``), when Triton is not installed, or when
    this torch has no ``torch.library.triton_op``. Read at definition time (module import).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return False
    return importlib.util.find_spec("triton") is not None


_PY_TYPES = {"Tensor": torch.Tensor, "float": float, "int": int, "SymInt": int, "str": str, "bool": bool}


def _py_type(t) -> object:
    text = str(t)
    if text.startswith("List[") and text.endswith("]"):
        return typing.List[_PY_TYPES[text[len("List["):-1]]]  # noqa: UP006
    if text.startswith("Optional[") and text.endswith("]"):
        return typing.Optional[_PY_TYPES[text[len("Optional["):-1]]]
    return _PY_TYPES[text]


def _signature(qual: str, schema: str) -> inspect.Signature:
    """The annotated Python signature of a schema (``triton_op`` infers its schema from annotations only)."""
    parsed = torch._C.parse_schema(qual + schema)
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_py_type(a.type))
              for a in parsed.arguments]
    rets = [_py_type(r.type) for r in parsed.returns]
    ret = rets[0] if len(rets) == 1 else typing.Tuple[tuple(rets)]  # noqa: UP006 (infer_schema wants typing.Tuple)
    return inspect.Signature(params, return_annotation=ret)


def _normal(schema: str) -> str:
    return str(torch._C.parse_schema(schema)).replace("SymInt", "int")


def fused_op(name: str, schema: str, impl: Callable, fake: Callable, *,
             device_types: Optional[str | Sequence[str]] = None, triton: bool = False):
    """Define ``aahr::<name>`` (functional, no mutated arguments) with ``impl`` and its fake ``fake``.

    Args:
        name: operator name inside the ``aahr`` namespace.
        schema: the argument / return part of the schema, e.g. ``"(Tensor x, float sigma) -> Tensor"``.
        impl: the eager implementation (calls a kernel); takes the schema's arguments positionally.
        fake: same arguments, returns empty tensors of the outputs' shapes / dtypes / devices; must not read data.
        device_types: restrict ``impl`` to these device types (other devices raise NotImplementedError).
            Ignored by a ``triton_op`` (its kernels launch on the tensors' device).
        triton: ``impl`` launches Triton kernels through :func:`aahr_fast.kernels._utils.launch`; define the
            operator with ``torch.library.triton_op`` when :func:`triton_traceable`, else (interpreter,
            no Triton) as the opaque ``custom_op`` fallback. Both get the same schema (the triton_op's
            signature is built from ``schema``; ``int`` arguments become ``SymInt`` in both), ``fake`` and autograd.
    Returns:
        the ``torch.library.CustomOpDef``; call it like a function, ``.register_autograd(...)`` on it.
    Raises:
        RuntimeError: (``triton``) the schema inferred from the signature built from ``schema`` differs from it.
    Re-defining a name (a module re-imported by tests) returns the first definition.
    """
    qual = f"{NAMESPACE}::{name}"
    if qual in _DEFINED:
        return _DEFINED[qual]
    if triton:
        # triton_op infers its schema from annotations (it ignores a schema string): give impl the signature of
        # ``schema`` and register the fallback with the inferred schema too, so both spell it alike (int -> SymInt)
        from torch._library.infer_schema import infer_schema

        impl.__signature__ = _signature(qual, schema)
        inferred = infer_schema(impl, mutates_args=())
        if _normal(qual + inferred) != _normal(qual + schema):
            raise RuntimeError(f"{qual}: inferred schema {inferred} differs from {schema}")
        if triton_traceable():
            op = torch.library.triton_op(qual, impl, mutates_args=())
            _KIND[qual] = "triton_op"
        else:
            op = torch.library.custom_op(qual, impl, mutates_args=(), device_types=device_types, schema=inferred)
            _KIND[qual] = "custom_op"
    else:
        op = torch.library.custom_op(qual, impl, mutates_args=(), device_types=device_types, schema=schema)
        _KIND[qual] = "custom_op"
    op.register_fake(fake)  # replaces a triton_op's default fake (its body): ours reads no data, launches nothing
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


def note_triton_kernels(qual: str, kernels: Sequence[object]) -> None:
    """Record the ``@triton.jit`` kernels a ``triton_op`` ``qual`` launches (no-op for the custom_op fallback).

    ``triton_op`` finds them by reading its body's source for ``wrap_triton(...)`` calls, which misses kernels
    launched through :func:`aahr_fast.kernels._utils.launch` in other modules; AOTAutograd's cache key includes
    the source of the recorded kernels, so without this an edited kernel could hit a stale compiled graph.
    Uses torch's private ``torch._library.triton.triton_ops_to_kernels`` table when it exists.
    """
    if _KIND.get(qual) != "triton_op":
        return
    table = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(table, dict):
        known = table.setdefault(qual, [])
        known.extend(k for k in kernels if all(k is not j for j in known))


def registration_kind(qual: str) -> str:
    """``"triton_op"`` or ``"custom_op"``: how :func:`fused_op` registered ``qual`` (KeyError if it did not)."""
    return _KIND[qual]

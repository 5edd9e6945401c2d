"""Backend registry and selection for the public fused ops.

Every public op in :mod:`aahr_fast.ops` has one implementation per backend:

``reference``  plain PyTorch (``aahr_fast/ops/<family>.py``); defines correctness; any device.
``cpp``        C++ CPU extension (``csrc/``, JIT-built by :mod:`aahr_fast.ops._ext`); CPU tensors.
``triton``     Triton kernels (``kernels/<family>.py`` = ``aahr_fast.kernels.<family>``); CUDA tensors,
               or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, tests only).
``cuda``       CUDA extension (``csrc/cuda``); CUDA tensors.

Selection (:func:`resolve_backend`): an explicit ``backend=`` argument wins, then the environment
variable ``AAHR_OPS_BACKEND``, then the default: for CUDA tensors ``triton`` if importable and
registered for the op, else ``cuda``, else ``reference``; for CPU tensors ``cpp`` if the extension
builds/loads and implements the op, else ``reference``. A *forced* backend (argument or environment)
that cannot run raises :class:`BackendUnavailableError` naming the reason. A *default* backend whose
extension fails to build gives one :class:`BackendFallbackWarning` per (backend, reason) and the
reference is used.

Plugging in a backend (other engineers do this without editing this file):

* call :func:`register` (``register(op, backend, fn, supports=None)``) at import time of the module
  that holds the implementation. ``fn`` takes exactly the reference's arguments (already validated by
  the public op: lengths are int64 on the tensors' device, dtypes agree) and returns the same outputs,
  differentiable through registered operators (:func:`aahr_fast.ops._library.fused_op` + ``register_autograd``;
  what ``torch.compile`` needs) or its own ``torch.autograd.Function``. ``supports(**kwargs) -> bool`` may
  decline some option combinations (the default selection then uses the reference; a forced backend
  raises).
* put that module where the dispatcher imports it on first use: ``aahr_fast.ops._cpp_<family>`` (cpp),
  ``aahr_fast.kernels.<family>`` (triton), ``aahr_fast.ops._cuda_<family>`` (cuda), where ``<family>`` is
  the op's module (``cross_similarity``, ``correlation``, ``message_passing``, ``prototypes``; see
  :data:`OP_FAMILY`). :func:`add_plugin_module` adds further module templates.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from ..utils.errors import AAHRError, ConfigError

BACKENDS = ("reference", "cpp", "triton", "cuda")
ENV_VAR = "AAHR_OPS_BACKEND"

#: public op name -> the module ("family") that defines its reference.
OP_FAMILY = {
    "fragment_word_relevance": "cross_similarity",
    "hard_assignment_similarity": "cross_similarity",
    "intra_relevance": "correlation",
    "topk_connection": "correlation",
    "instance_correlation": "correlation",
    "gcn_layer": "message_passing",
    "masked_attention": "message_passing",
    "sinkhorn": "prototypes",
    "swapped_prediction_loss": "prototypes",
}

#: backend -> module templates imported (once) before that backend is looked up for an op.
_PLUGIN_TEMPLATES: dict[str, list[str]] = {
    "reference": [],
    "cpp": ["aahr_fast.ops._cpp_{family}"],
    "triton": ["aahr_fast.kernels.{family}"],
    "cuda": ["aahr_fast.ops._cuda_{family}"],
}


class BackendUnavailableError(AAHRError, RuntimeError):
    """A forced backend (argument or ``AAHR_OPS_BACKEND``) cannot run this op on these tensors."""


class BackendFallbackWarning(RuntimeWarning):
    """The default fast backend failed (e.g. the C++ extension did not build); the reference runs."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    supports: Optional[Callable[..., bool]]


_REGISTRY: dict[str, dict[str, _Impl]] = {op: {} for op in OP_FAMILY}
_IMPORTED: set[str] = set()
_IMPORT_ERRORS: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()
_LOCK = threading.RLock()


def register(op: str, backend: str, fn: Callable, *, supports: Optional[Callable[..., bool]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of public op ``op``.

    Args:
        op: a public op name (a key of :data:`OP_FAMILY`).
        backend: one of :data:`BACKENDS`.
        fn: callable with the reference's signature and outputs (see module docstring).
        supports: optional ``supports(**kwargs) -> bool`` over the op's keyword options.
    Raises:
        ConfigError: unknown op or backend name.
    Re-registering replaces the previous implementation (last one wins).
    """
    if op not in OP_FAMILY:
        raise ConfigError(f"register: unknown op {op!r}; expected one of {sorted(OP_FAMILY)}")
    if backend not in BACKENDS:
        raise ConfigError(f"register: unknown backend {backend!r}; expected one of {BACKENDS}")
    with _LOCK:
        _REGISTRY[op][backend] = _Impl(fn, supports)


def add_plugin_module(backend: str, template: str) -> None:
    """Also import ``template.format(family=...)`` before looking up ``backend`` implementations."""
    if backend not in BACKENDS:
        raise ConfigError(f"add_plugin_module: unknown backend {backend!r}; expected one of {BACKENDS}")
    with _LOCK:
        if template not in _PLUGIN_TEMPLATES[backend]:
            _PLUGIN_TEMPLATES[backend].append(template)


def registered(op: str) -> dict[str, Callable]:
    """Backends registered so far for ``op`` (after importing its plugin modules) -> implementation."""
    for backend in BACKENDS:
        _import_plugins(op, backend)
    return {b: impl.fn for b, impl in _REGISTRY[op].items()}


def _import_plugins(op: str, backend: str) -> None:
    family = OP_FAMILY[op]
    for template in list(_PLUGIN_TEMPLATES[backend]):
        name = template.format(family=family)
        with _LOCK:
            if name in _IMPORTED:
                continue
            _IMPORTED.add(name)
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                    continue  # that plugin does not exist (yet): not an error
                _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a broken plugin must not break the reference path
                _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"


def _devices(tensors: Iterable) -> set[str]:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor) or type(t).__name__ == "_DeviceOnly"}


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _backend_problem(op: str, backend: str, device: str, kwargs: dict) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device`` with ``kwargs``; None when it can."""
    if backend == "cpp" and device != "cpu":
        return f"the cpp backend runs on CPU tensors only (got {device} tensors)"
    if backend == "cuda" and device != "cuda":
        return f"the cuda backend needs CUDA tensors (got {device} tensors)"
    if backend == "triton" and device != "cuda" and not _triton_interpreter():
        return f"the triton backend needs CUDA tensors or TRITON_INTERPRET=1 (got {device} tensors)"
    if backend == "triton":
        try:
            importlib.import_module("triton")
        except Exception as exc:
            return f"triton is not importable ({type(exc).__name__}: {exc})"
    _import_plugins(op, backend)
    impl = _REGISTRY[op].get(backend)
    if impl is None:
        tried = [t.format(family=OP_FAMILY[op]) for t in _PLUGIN_TEMPLATES[backend]]
        errs = [f"{m}: {_IMPORT_ERRORS[m]}" for m in tried if m in _IMPORT_ERRORS]
        extra = f" (import errors: {'; '.join(errs)})" if errs else ""
        return f"no {backend} implementation of {op} is registered (looked in {tried}){extra}"
    if impl.supports is not None and not impl.supports(**kwargs):
        return f"the {backend} implementation of {op} does not support these options {kwargs}"
    if backend in ("cpp", "cuda"):  # checked last: it may build the extension (seconds, once)
        err = _extension_error(backend)
        if err is not None:
            return f"the {backend} extension is unavailable: {err}"
    return None


def _extension_error(backend: str) -> Optional[str]:
    from . import _ext

    return _ext.extension_error(cuda=(backend == "cuda"))


def _warn_once(backend: str, reason: str) -> None:
    key = (backend, reason)
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(
        f"aahr_fast.ops: default backend {backend!r} unavailable, using the reference instead: {reason}",
        BackendFallbackWarning,
        stacklevel=4,
    )


def _reset_warnings() -> None:
    """Forget which fallback warnings were shown (tests)."""
    with _LOCK:
        _WARNED.clear()


def resolve_backend(name: Optional[str], *tensors, op: str, options: Optional[dict] = None) -> str:
    """Pick the backend that runs ``op`` on ``tensors``.

    Args:
        name: explicit backend (wins), or None to consult ``AAHR_OPS_BACKEND`` then the default.
        *tensors: the op's tensor inputs (their device decides the default); non-tensors are ignored.
        op: public op name (key of :data:`OP_FAMILY`).
        options: the op's keyword options, passed to a backend's ``supports`` predicate.
    Returns:
        One of :data:`BACKENDS`.
    Raises:
        ConfigError: unknown op or backend name (argument or environment).
        BackendUnavailableError: a forced backend cannot run (reason in the message).
        ValueError: tensors on more than one device type.
    """
    if op not in OP_FAMILY:
        raise ConfigError(f"unknown op {op!r}; expected one of {sorted(OP_FAMILY)}")
    return _resolve_devices(name, tensors, op, options or {})


def _resolve_devices(name: Optional[str], tensors, op: str, options: dict) -> str:
    devs = _devices(tensors)
    if len(devs) > 1:
        raise ValueError(f"{op}: all tensors must be on one device type, got {sorted(devs)}")
    device = devs.pop() if devs else "cpu"

    forced, source = name, "backend argument"
    if forced is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            forced, source = env, f"environment variable {ENV_VAR}"
    if forced is not None:
        if forced not in BACKENDS:
            raise ConfigError(f"{op}: unknown backend {forced!r} from the {source}; expected one of {BACKENDS}")
        if forced == "reference":
            return "reference"
        problem = _backend_problem(op, forced, device, options)
        if problem is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} forced by the {source} cannot run: {problem}")
        return forced

    candidates = ("triton", "cuda") if device == "cuda" else ("cpp",) if device == "cpu" else ()
    for backend in candidates:
        problem = _backend_problem(op, backend, device, options)
        if problem is None:
            return backend
        if backend in ("cpp", "cuda") and op in _REGISTRY and backend in _REGISTRY[op]:
            err = _extension_error(backend)
            if err is not None:
                _warn_once(backend, err)
    return "reference"


def get_impl(op: str, backend: str) -> Callable:
    """The registered implementation of ``op`` for ``backend`` (imports plugins on first use).

    Raises:
        BackendUnavailableError: nothing registered for that pair.
    """
    _import_plugins(op, backend)
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        raise BackendUnavailableError(f"{op}: no {backend!r} implementation registered")
    return impl.fn


def dispatch(op: str, backend: Optional[str], *tensors, options: Optional[dict] = None) -> tuple[str, Callable]:
    """``(resolved backend name, implementation)`` for ``op`` on ``tensors``; see :func:`resolve_backend`.

    Under ``torch.compile`` the choice is made once per (op, backend argument, device types, options) at trace
    time by :func:`_resolve_traced`, a constant for Dynamo (no locks, imports or environment reads are traced),
    so the public ops compile with ``fullgraph=True``; the compiled graph then calls the registered operators.
    """
    if torch.compiler.is_compiling():
        devs = tuple(sorted({t.device.type for t in tensors if isinstance(t, torch.Tensor)}))
        opts = tuple(sorted((options or {}).items()))
        name = _resolve_traced(op, backend, devs, opts)
        return name, _REGISTRY[op][name].fn
    name = resolve_backend(backend, *tensors, op=op, options=options)
    return name, get_impl(op, name)


class _DeviceOnly:
    """Stands in for a tensor in :func:`resolve_backend` (only ``.device.type`` is read)."""

    def __init__(self, device_type: str):
        self.device = torch.device(device_type)


@torch.compiler.assume_constant_result
def _resolve_traced(op: str, backend: Optional[str], device_types: tuple, options: tuple) -> str:
    """:func:`resolve_backend` from device types and option items, evaluated eagerly while Dynamo traces."""
    with _LOCK:
        name = _resolve_devices(backend, [_DeviceOnly(d) for d in device_types], op, dict(options))
        _import_plugins(op, name)
    return name

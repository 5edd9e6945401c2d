"""Setup shared by the C++ op tests (tests/test_ops_*.py): extension availability and unit-row inputs.

The per-test fixture built on :func:`require_cpp_extension` is ``cpp_extension`` in ``tests/conftest.py``.

Not a test module (no ``test_`` prefix); imported by name because pytest puts ``tests/`` on ``sys.path``
(rootdir conftest, default ``prepend`` import mode).
"""
from __future__ import annotations

import os

import pytest
import torch

from aahr_fast.ops import _ext

SKIP_MESSAGE = "C++ extension unavailable: {err}"


def require_cpp_extension(ci_message: str = SKIP_MESSAGE) -> None:
    """Skip the calling test when the C++ extension cannot be built/loaded here; fail instead under CI=true.

    Args:
        ci_message: failure text under ``CI=true``, formatted with ``err`` (the build/load error text
            from :func:`aahr_fast.ops._ext.extension_error`). The skip text is always ``SKIP_MESSAGE``.
    Raises:
        pytest's Skipped / Failed outcomes (never returns in those cases).
    """
    err = _ext.extension_error()
    if err is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(ci_message.format(err=err))
    pytest.skip(SKIP_MESSAGE.format(err=err))


def unit_rows(b: int, d: int, dtype: torch.dtype = torch.float64, gen: torch.Generator | None = None) -> torch.Tensor:
    """(b, d) standard-normal rows L2-normalised to unit length (dim 1), ``dtype``, drawn from ``gen``."""
    return torch.nn.functional.normalize(torch.randn(b, d, dtype=dtype, generator=gen), dim=1)

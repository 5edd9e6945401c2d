"""Ops as registered PyTorch operators (issue 14): backend-module naming, torch.library.opcheck of every
fused op's per-backend operators, torch.compile(fullgraph=True) of every public op."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import aahr_fast.ops as ops
from aahr_fast.ops import _dispatch

OPS_DIR = Path(ops.__file__).parent
FAMILIES = sorted(set(_dispatch.OP_FAMILY.values()))


def test_backend_modules_follow_one_naming_pattern():
    """Every backend module is ops/_<backend>_<family>.py and the dispatcher's templates import exactly them."""
    names = [p.stem for p in OPS_DIR.glob("*.py")]
    backend_like = [n for n in names if re.search(r"(^|_)(cpp|cuda)(_|$)", n)]
    pattern = re.compile(r"^_(cpp|cuda)_(%s)$" % "|".join(FAMILIES))
    assert backend_like, names
    assert [n for n in backend_like if not pattern.match(n)] == []
    for n in backend_like:
        backend, family = pattern.match(n).groups()
        assert f"aahr_fast.ops.{n}" in [t.format(family=family) for t in _dispatch._PLUGIN_TEMPLATES[backend]]
    for family in FAMILIES:  # every family has a C++ backend module, importable by that name
        importlib.import_module(f"aahr_fast.ops._cpp_{family}")

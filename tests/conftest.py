"""Shared test fixtures: real-data location and the CI rule for it.

Real Flickr8k data is read from ``$AAHR_FLICKR8K`` or ``<repo>/../shared/data/flickr8k``. Where it is
absent, tests that need it are skipped with a clear reason, except under ``CI=true`` where its absence
is a failure (CI must exercise the real-data path).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _ops_helpers import require_cpp_extension

REPO_ROOT = Path(__file__).resolve().parents[1]


def flickr8k_path() -> Path:
    env = os.environ.get("AAHR_FLICKR8K")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    path = flickr8k_path()
    if not (path / "captions.txt").is_file():
        msg = f"Flickr8k not found at {path} (set AAHR_FLICKR8K to its folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; under CI=true the real-data tests must run")
        pytest.skip(msg)
    return path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same seed and one intra-op thread.

    The suite runs on 2 shared cores with small tensors, where a second intra-op thread only adds
    synchronisation cost; a test that wants more threads sets them itself (restored afterwards).
    """
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def cpp_extension() -> None:
    """Skip (fail under CI=true) when the C++ extension cannot be built here; one intra-op thread.

    The C++ op test modules use it for every test: ``pytestmark = pytest.mark.usefixtures("cpp_extension")``.
    """
    require_cpp_extension()
    torch.set_num_threads(1)

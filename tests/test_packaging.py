"""The repository's top-level ``kernels/`` folder never shadows the PyPI package ``kernels``.

``transformers`` (>= 5) imports the PyPI package ``kernels`` when a text backbone loads. Python run from the
repository root (``python -m aahr_fast.train``, ``make train``, pytest) has that root as ``sys.path[0]``, so a
*regular* package ``kernels/`` there would be found first and break every backbone load (the 2026-12-05
fresh-machine failure: ``cannot import name 'CUDAProperties' from 'kernels'``). The folder is a namespace
portion instead and is bound as ``aahr_fast.kernels`` by ``aahr_fast/__init__.py``; a wheel copies it there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib.util, os, sys
import aahr_fast.kernels as k
import aahr_fast.kernels._host
import aahr_fast.kernels._utils
assert [os.path.realpath(p) for p in k.__path__] == [os.path.realpath(sys.argv[1])], k.__path__
top = importlib.util.find_spec("kernels")
if top is not None:  # the PyPI package (installed with transformers >= 5), never the repository folder
    import kernels
    assert getattr(kernels, "__file__", None), f"'kernels' resolved to a namespace package: {kernels.__path__}"
    repo_kernels = os.path.join(os.path.realpath(sys.argv[2]), "kernels") + os.sep
    assert not os.path.realpath(kernels.__file__).startswith(repo_kernels), kernels.__file__
if importlib.util.find_spec("transformers") is not None and top is not None:
    import transformers.integrations.hub_kernels  # the import that failed on 2026-12-05
print("ok")
"""


def _probe(cwd: Path, kernels_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, str(kernels_dir), str(REPO)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_kernels_folder_is_a_namespace_portion():
    assert (REPO / "kernels" / "cross_similarity.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a regular package that shadows the PyPI 'kernels' from the repo root")


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_pypi_kernels_and_aahr_fast_kernels_import_together(where, tmp_path):
    cwd = REPO if where == "repo_root" else tmp_path
    out = _probe(cwd, REPO / "kernels")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_text_backbone_loads_from_repo_root():
    """The full failing path of the fresh-machine trial: MiniLM through transformers, run from the repo root."""
    pytest.importorskip("transformers")
    code = ("from aahr_fast.backbones import TextBackbone; import torch; "
            "ids, lens = TextBackbone().tokenize(['a dog runs on the beach']); print(tuple(ids.shape))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_wheel_installs_kernels_as_subpackage(tmp_path):
    """A non-editable install ships the folder as ``aahr_fast/kernels`` and imports it from there."""
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(REPO), "-w", str(wheel_dir)], capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel in this environment: {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("aahr_fast-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "aahr_fast" / "kernels" / "cross_similarity.py").is_file()
    assert not (site / "aahr_fast" / "kernels" / "__init__.py").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _probe(tmp_path, site / "aahr_fast" / "kernels", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

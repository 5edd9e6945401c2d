"""Triton kernels of aahr_fast's fused ops, installed as ``aahr_fast.kernels`` (one module per op family).

``cross_similarity``, ``correlation``, ``message_passing``, ``prototypes``: kernels + host launchers;
importing one registers the ``"triton"`` backend of its ops (glue in ``aahr_fast/ops/_triton_glue.py``).
``_utils`` (launch policy, dot precision, strided matmul), ``_host`` (torch-only helpers, no Triton),
``_aot`` (GPU compilation without a GPU), ``_testing`` (backend comparison helpers).
This package itself imports nothing, so ``aahr_fast.kernels._host`` works without Triton installed.
"""

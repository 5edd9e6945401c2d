"""aahr_fast: AAHR image-text matching with fused hot-path ops.

Sub-packages:
    aahr_fast.ops       public fused ops (reference / C++ CPU / Triton / CUDA backends)
    aahr_fast.models    the AAHR model, its losses and the VSE baseline
    aahr_fast.data      dataset readers (precomp, Flickr8k, COCO, Karpathy) and the synthetic set
    aahr_fast.kernels   Triton kernels (source folder ``kernels/``)
Entry points: ``python -m aahr_fast.train | evaluate | prepare | index | search | gpucheck``.
"""

__version__ = "0.1.0"

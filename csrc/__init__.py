# C++ CPU and CUDA sources of aahr_fast's fused ops (JIT-built by aahr_fast.ops._ext).

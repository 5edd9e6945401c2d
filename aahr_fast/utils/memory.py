"""Peak extra memory of one call, from the torch profiler's raw allocator events.

Used by the benchmarks (``benchmarks/conftest.py``), ``python -m aahr_fast.evaluation --bench`` and the memory
tests of the ops. See ``docs/toolchain.md`` in ../shared: the running sum of the profiler's allocation
events is exact for the torch allocators (numpy / Python memory is not seen).
"""
from __future__ import annotations

from typing import Callable

import torch


def peak_extra_bytes(fn: Callable, *args, device: str = "cpu", **kwargs) -> tuple[int, object]:
    """Peak extra memory of one call ``fn(*args, **kwargs)`` and its result.

    The profiler (``profile_memory=True``) records every allocation (bytes > 0) and free (bytes < 0) of the
    torch allocator; their running sum in time order, restricted to ``device``'s type (``"cpu"``, or
    ``"cuda"``: the CUDA caching allocator reports its blocks to the same profiler), peaks at the call's
    extra memory above what was allocated before it. A CUDA call is synchronised before the profiler
    stops.

    Not seen: memory outside the torch allocators (numpy, Python objects, ``std::vector`` in C++ kernels) and
    torch allocations made on other threads than the caller's (``at::parallel_for`` / OpenMP workers, Python
    threads): the profiler's memory reporting is thread-local. Measured: 8 MiB allocated in a Python thread
    during the call are not counted; with two intra-op threads the C++ cross-similarity op's peak counts one
    of its two 1 MiB per-thread tile buffers. Kernels whose scratch should be counted allocate it with
    ``at::empty`` on the calling thread.

    Args:
        fn: the call to measure; ``args`` / ``kwargs`` are passed to it.
        device: ``"cpu"`` or a CUDA device (string or ``torch.device``): whose allocations are counted.
    Returns:
        ``(peak_bytes, result)``: peak_bytes is an int >= 0 (bytes), result is what ``fn`` returned.
    Raises:
        RuntimeError: from ``torch.device`` for an unknown device string; whatever ``fn`` raises.
    """
    from torch.profiler import ProfilerActivity, profile

    dev_type = torch.device(device).type
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
        if dev_type == "cuda":
            torch.cuda.synchronize()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None:
            ev_dev = getattr(node.extra_fields, "device", None)
            if ev_dev is None or ev_dev.type == dev_type:
                events.append((node.start_time_ns, size))
    events.sort()
    run = peak = 0
    for _, size in events:
        run += size
        peak = max(peak, run)
    return peak, out

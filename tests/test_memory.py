"""``aahr_fast.utils.memory.peak_extra_bytes``: the peak of the torch allocator's running total during one call."""
from __future__ import annotations

import torch

from aahr_fast.utils.memory import peak_extra_bytes

MIB = 2**20


def test_peak_counts_what_the_call_allocates_not_what_existed_before():
    before = torch.ones(8 * MIB // 4)  # 8 MiB allocated earlier: not counted

    def fn():
        a = torch.empty(4 * MIB // 4)  # 4 MiB live ...
        b = torch.empty(2 * MIB // 4)  # ... + 2 MiB = 6 MiB peak
        del a, b
        c = torch.empty(5 * MIB // 4)  # after the frees: 5 MiB < 6 MiB
        return c.numel()

    peak, out = peak_extra_bytes(fn)
    assert out == 5 * MIB // 4
    assert 6 * MIB <= peak < 6 * MIB + 64 * 1024, peak
    assert before.numel() == 2 * MIB


def test_args_and_kwargs_are_passed_and_a_call_without_allocations_is_zero():
    x = torch.arange(10.0)
    peak, out = peak_extra_bytes(torch.add, x, 1, alpha=2)
    assert torch.equal(out, x + 2) and peak >= x.numel() * 4
    peak0, out0 = peak_extra_bytes(lambda: 3)
    assert (peak0, out0) == (0, 3)

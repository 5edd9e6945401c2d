"""End-to-end benchmark: one AAHR training step, reference ops vs the fused default (issue 6).

Run: ``.venv/bin/python -m pytest benchmarks/bench_train_step.py --benchmark-only`` (about a minute on 2
shared cores; ``--full`` adds the paper-width model, several minutes more).

Case: frozen backbones, i.e. feature inputs of the Flickr8k prepared shapes (``benchmarks/_e2e.py``:
49 x 1280 regions, 1280-d global, <= 32 x 384 tokens, 384-d sentence vector), B = 128 pairs, the model
from ``aahr_fast.models.build_model`` with every loss term on (warm-ups at 0, MoCo queues full).
A step is what the trainer does per batch: zero_grad, forward (both encoders, momentum encoders,
prototypes, instance graph, MoCo), backward, clip, AdamW, EMA + enqueue.

Group ``train-step-<preset>-B128-<device>-T<threads>``, one row per ops backend on the same inputs:
* ``reference``: ``AAHR_OPS_BACKEND=reference`` (every fused op in plain PyTorch);
* the default backend for the device (``cpp`` on CPU when the C++ extension builds, ``triton`` on CUDA),
  named after the backend it resolved to;
* ``<backend>-compiled`` (modes ``compiled`` / ``compiled-reference``): the same step with the model's loss
  (``AAHR.training_losses``, forward + backward) under ``torch.compile(fullgraph=True)`` (Inductor), on the
  fused ops (registered operators, opaque to Inductor) or on the reference ops (which Inductor fuses itself);
  compilation happens in an untimed warm-up step.
Presets: ``flickr8k_cpu`` (width 256, the configuration trained on this machine) by default; ``paper``
(width 1024, the paper's Flickr30K model) with ``--full``.

``extra_info``: ``peak_extra_mib`` (torch allocator, profiler events; whole step incl. backward),
``step_gflop`` (FLOPs of one reference step counted by ``FlopCounterMode``: matmul/bmm/attention,
forward + backward), ``gflops`` = step_gflop / median (same useful work for every row),
``frac_mm_ceiling`` against one fp32 ``torch.mm`` of the step's largest GEMM shape
(B*49 x 1280) @ (1280 x D) at the same thread count, measured right after the row
(``_e2e.mm_ceiling_now``: the machine's load drifts during a long run), ``backend``, ``preset``,
``batch``, ``embed_dim``, ``threads``, ``device``, ``loss_parts`` (of the verification step; every term
must be present), and for the flickr8k_cpu CPU rows the ``sweeps`` / ``work_flops`` entries that make them
the B = 128 point of ``bench_scaling.py``'s ``train-B`` sweep.
"""
from __future__ import annotations

import pytest
import torch

import _e2e

B = 128
ROUNDS = 5


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        full = metafunc.config.getoption("--full", default=False)
        metafunc.parametrize("preset", list(_e2e.PRESETS) if full else ["flickr8k_cpu"])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mode", ["reference", "default", "compiled", "compiled-reference"])
def test_train_step(benchmark, bench_tools, threads, preset, mode, device):
    extra = {}
    if preset == "flickr8k_cpu" and device == "cpu" and not mode.startswith("compiled"):
        # also the B = 128 point of bench_scaling.py's train-B sweep (eager rows only)
        extra = dict(sweeps=_e2e.train_sweep_info(B), work_flops=_e2e.step_flops(preset, B), mem_model_bytes=None)
    _e2e.run_step_benchmark(benchmark, bench_tools, group=f"train-step-{preset}-B{B}-{device}-T{threads}",
                            preset=preset, batch_size=B, mode=mode, device=device, threads=threads,
                            rounds=ROUNDS if preset == "flickr8k_cpu" else 2, **extra)
